#!/usr/bin/env bash
# The GPU check (scripts/gpu_check.py): tokenize, 40M/150M training steps (tokens/s, MFU), 150M planning and a
# short `jowa eval` on one CUDA device, <= 8 min, one table at the end. --cpu: the same code at tiny sizes on CPU.
#
#   bash scripts/gpu_check.sh [--json OUT] [--compile reduce-overhead] [--peak-tflops T] [--device cuda:N]
#   bash scripts/gpu_check.sh --cpu [--json OUT]
#
# Sets up .venv first when it is missing (scripts/setup.sh). JOWA_PYTHON=/path/to/python uses that interpreter
# instead (the test suite runs this wrapper with its own). Paths given as arguments are relative to where it runs.
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
PY="${JOWA_PYTHON:-}"
if [ -z "$PY" ]; then
  [ -x "$ROOT/.venv/bin/python" ] || bash "$ROOT/scripts/setup.sh"
  PY="$ROOT/.venv/bin/python"
fi
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"  # the code beside this script, whatever is installed
exec "$PY" "$ROOT/scripts/gpu_check.py" "$@"
