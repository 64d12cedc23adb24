#!/usr/bin/env bash
# The README's test command: install everything needed (from nothing), then run the test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python -m pytest -q "$@"
