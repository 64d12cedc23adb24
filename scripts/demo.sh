#!/usr/bin/env bash
# The README's main-job command: install everything needed (from nothing), then run the main job
# on the small built-in default. Output goes to ./demo_out (override: scripts/demo.sh --out DIR).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/jowa demo "$@"
