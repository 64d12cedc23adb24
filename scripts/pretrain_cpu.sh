#!/usr/bin/env bash
# Issue D acceptance run (<= 15 min on CPU): record SpaceInvaders + Centipede (run 1 trains, run 2 is held out),
# train a tiny tokenizer, build token shards, pretrain the `tiny` world-action model on the time left, and print
# held-out accuracies against their baselines, tokens/s and the parameter counts of all four presets.
#
#   bash scripts/pretrain_cpu.sh [OUT_DIR] [extra args of scripts/pretrain_cpu.py]   (default OUT_DIR: runs/pretrain_cpu)
#
# Rerunning with the same OUT_DIR resumes; --tokenizer PATH reuses a tokenizer (more time for pretraining).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-runs/pretrain_cpu}
shift $(( $# > 0 ? 1 : 0 )) || true
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-2}
exec .venv/bin/python scripts/pretrain_cpu.py --out "$OUT" "$@"
