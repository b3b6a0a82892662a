#!/usr/bin/env bash
# Installs glmkit with its test tools, then runs the whole test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh --dev
. .venv/bin/activate
python -m pytest -q "$@"
