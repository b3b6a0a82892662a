#!/usr/bin/env bash
# Reproduces glmkit/assets/glm-tiny, the bundled model, from ../shared/data/corpus:
#   1. the tokenizer (glmkit tokenizer train, ChatGLM-6B layout, 10240 ids, byte fallback),
#   2. pretraining (glmkit pretrain --config configs/glm-tiny.yaml; 1300 steps, about 45-60 minutes on 2 CPU threads),
#   3. the held-out evaluation (glmkit eval ppl on the last 1000 Tang poems, never trained on),
#   4. the copy into glmkit/assets/glm-tiny with its model card.
# Rerunning resumes an interrupted run from its last checkpoint. Extra arguments are passed to `glmkit pretrain`
# as overrides, e.g. `scripts/train_glm_tiny.sh train.max_steps=100`.
set -euo pipefail
cd "$(dirname "$0")/.."
DATA=${DATA:-../shared/data/corpus}
WORK=${WORK:-out/glm-tiny}
PY=${PYTHON:-python}
mkdir -p "$WORK"

# Tang poems 39000.. are held out: neither the tokenizer nor the model sees them.
head -n 39000 "$DATA/tang-poems.jsonl" > "$WORK/tang-train.jsonl"
tail -n +39001 "$DATA/tang-poems.jsonl" > "$WORK/tang-heldout.jsonl"

if [ ! -f "$WORK/tokenizer/ice_text.model" ]; then
  $PY -m glmkit.cli tokenizer train --input "$WORK/tang-train.jsonl" "$DATA/song-ci.jsonl" "$DATA/classics.jsonl" \
    "$DATA/moby-dick.jsonl" "$DATA/state-of-the-union.jsonl" --vocab-size 10240 --family chatglm \
    --output "$WORK/tokenizer"
fi

start=$(date +%s)
$PY -m glmkit.cli pretrain --config configs/glm-tiny.yaml tokenizer="$WORK/tokenizer" train.out_dir="$WORK/run" "$@"
echo "pretraining wall time this invocation: $(( $(date +%s) - start )) s"

$PY -m glmkit.cli eval ppl --model "$WORK/run/final" --data "$WORK/tang-heldout.jsonl" --unigram-corpus "$DATA" \
  --json "$WORK/heldout-eval.json"

$PY -m glmkit.evaluate card --model "$WORK/run/final" --run "$WORK/run" --eval "$WORK/heldout-eval.json" \
  --output glmkit/assets/glm-tiny
