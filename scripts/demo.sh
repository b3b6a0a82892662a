#!/usr/bin/env bash
# Installs glmkit, then runs its main job on the bundled model glm-tiny (no download):
# a blank filled, a continuation generated (in float, then quantized to INT4 while loading), and a short chat
# through a pipe.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
echo "== glmkit fill"
glmkit fill "床前明月[MASK]，疑是地上霜。" --seed 0
echo "== glmkit generate"
glmkit generate "春眠不覺曉，" --max-new-tokens 48 --seed 0
echo "== glmkit generate --quantize int4 (group-wise INT4, quantized while loading)"
glmkit generate "春眠不覺曉，" --max-new-tokens 48 --seed 0 --quantize int4
echo "== glmkit chat (through a pipe)"
printf '作者#李白*體裁#五言絕句*題目#靜夜思\n' | glmkit chat --seed 0
