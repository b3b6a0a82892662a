#!/usr/bin/env bash
# Installs glmkit into ./.venv (CPU PyTorch pinned first, so no dependency can pull a multi-GB CUDA build).
# Usage: bash scripts/setup.sh [--dev]   (--dev adds test tools and Debian's Chromium for the browser test)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
. .venv/bin/activate
python -m pip install -q --upgrade pip
python -m pip install -q "torch==2.13.0"
if [ "${1:-}" = "--dev" ]; then
  python -m pip install -q -e ".[dev]"
  if [ -x scripts/install_browser.sh ] || [ -f scripts/install_browser.sh ]; then
    bash scripts/install_browser.sh
  fi
else
  python -m pip install -q -e .
fi
