#!/usr/bin/env bash
# The <= 10 min CPU tokenizer run: record real Atari play of two games (ale-py, DQN-Replay format), draw an
# episode index, train the `tiny` tokenizer on it, and print how reconstruction L1 and codebook perplexity moved.
#
#   bash scripts/train_tokenizer_cpu.sh [WORK_DIR] [STEPS]     (defaults: runs/tokenizer_cpu, 700)
#
# Outputs: WORK_DIR/run/{tokenizer.pt, metrics.jsonl, recon/step_*.png, tb/}. Extra args after STEPS are
# passed to `jowa tokenizer train` (e.g. --set dead_code_restart=true).
set -euo pipefail
cd "$(dirname "$0")/.."
WORK=${1:-runs/tokenizer_cpu}
STEPS=${2:-700}
shift $(( $# > 2 ? 2 : $# )) || true
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-2}
BIN=.venv/bin
mkdir -p "$WORK"
for G in Pong SpaceInvaders; do
  if [ ! -d "$WORK/replay/$G/1/replay_logs" ]; then
    # Random play, 2,500 agent steps each, Dopamine's preprocessing (sticky actions 0.25, frame skip 4).
    $BIN/jowa-data record "$G" --out "$WORK/replay" --run 1 --steps 2500 --seed 0 --capacity 1000 \
      --max-episode-steps 1000 --compresslevel 1 --quiet
  fi
done
if [ ! -f "$WORK/episodes.parquet" ]; then
  $BIN/jowa-data subsample Pong SpaceInvaders --replay "$WORK/replay" --out "$WORK/episodes.parquet" \
    --runs 1 --checkpoints 0-999 --fraction 1.0 --include-incomplete --seed 0
fi
RESUME=""
[ -f "$WORK/run/checkpoint.pt" ] && RESUME="--resume"
start=$(date +%s)
$BIN/jowa tokenizer train --preset tiny --out "$WORK/run" --index "$WORK/episodes.parquet" \
  --replay "$WORK/replay" --set steps="$STEPS" --set image_every=100 --set ckpt_every=100 $RESUME "$@"
echo "wall time: $(( $(date +%s) - start )) s"
$BIN/python - "$WORK/run" <<'PY'
import json, sys
rows = [json.loads(l) for l in open(f"{sys.argv[1]}/metrics.jsonl")]
for r in rows[:: max(1, len(rows) // 10)] + [rows[-1]]:
    print(f"step {r['step']:5d}  l1 {r['l1']:.4f}  perplexity {r['perplexity']:7.1f}  usage {r['usage']:.4f}  "
          f"dead {r['dead_codes']:4d}  frames/s {r['frames_per_s']:.1f}")
PY
