#!/usr/bin/env bash
# Reproduces glmkit/assets/glm-tiny, the bundled model, from ../shared/data/corpus:
#   1. the tokenizer (glmkit tokenizer train, ChatGLM-6B layout, 10240 ids, byte fallback);
#   2. the data files: Tang poems 0-38999 for training, 39000-39999 held out, each also as bodies on one line;
#   3. stage 1: glmkit pretrain --config configs/glm-tiny.yaml with DeepNorm α = √8 (model.alpha_num_layers=4), as
#      the first release was trained (1300 steps, about 45-60 minutes on 2 CPU threads);
#   4. stage 2: glmkit pretrain --config configs/glm-tiny-bodies.yaml from stage 1 (train.init_from), with
#      ChatGLM-6B's own α = √56: init_from rewrites stage 1's weights exactly for it (about 50 minutes);
#   5. the held-out evaluations and the copy into glmkit/assets/glm-tiny with its model card.
# Rerunning resumes an interrupted stage from its last checkpoint.
set -euo pipefail
cd "$(dirname "$0")/.."
DATA=${DATA:-../shared/data/corpus}
WORK=${WORK:-out/glm-tiny}
PY=${PYTHON:-python}
mkdir -p "$WORK"

# Tang poems 39000.. are held out: neither the tokenizer nor the model sees them.
head -n 39000 "$DATA/tang-poems.jsonl" > "$WORK/tang-train.jsonl"
tail -n +39001 "$DATA/tang-poems.jsonl" > "$WORK/tang-heldout.jsonl"
# A poem's body: its lines after the title and author, joined into one line.
$PY - "$WORK" "$DATA/../finetune/poem-gen/dev.json" <<'PYEOF'
import json, sys
work, poem_gen = sys.argv[1], sys.argv[2]
def write(path, texts):
    with open(path, "w", encoding="utf-8") as f:
        f.writelines(json.dumps({"text": t}, ensure_ascii=False) + "\n" for t in texts if t)
for split in ("train", "heldout"):
    rows = [json.loads(line)["text"] for line in open(f"{work}/tang-{split}.jsonl", encoding="utf-8")]
    write(f"{work}/tang-bodies-{split}.jsonl", ["".join(t.split("\n")[2:]) for t in rows])
write(f"{work}/poem-gen-dev-bodies.jsonl", [json.loads(line)["summary"] for line in open(poem_gen, encoding="utf-8")])
PYEOF

if [ ! -f "$WORK/tokenizer/ice_text.model" ]; then
  $PY -m glmkit tokenizer train --input "$WORK/tang-train.jsonl" "$DATA/song-ci.jsonl" "$DATA/classics.jsonl" \
    "$DATA/moby-dick.jsonl" "$DATA/state-of-the-union.jsonl" --vocab-size 10240 --family chatglm \
    --output "$WORK/tokenizer"
fi

start=$(date +%s)
$PY -m glmkit pretrain --config configs/glm-tiny.yaml tokenizer="$WORK/tokenizer" train.out_dir="$WORK/run" \
  model.alpha_num_layers=4
$PY -m glmkit pretrain --config configs/glm-tiny-bodies.yaml tokenizer="$WORK/tokenizer" \
  train.out_dir="$WORK/run-bodies" train.init_from="$WORK/run/final"
echo "pretraining wall time this invocation: $(( $(date +%s) - start )) s"

for name in bodies:tang-bodies-heldout full:tang-heldout poem-gen:poem-gen-dev-bodies; do
  $PY -m glmkit eval ppl --model "$WORK/run-bodies/final" --data "$WORK/${name#*:}.jsonl" --unigram-corpus "$DATA" \
    --json "$WORK/eval-${name%%:*}.json"
done

$PY scripts/glm_tiny_card.py --model "$WORK/run-bodies/final" --runs "$WORK/run" "$WORK/run-bodies" \
  --eval-bodies "$WORK/eval-bodies.json" --eval-full "$WORK/eval-full.json" \
  --eval-poem-gen "$WORK/eval-poem-gen.json" --output glmkit/assets/glm-tiny
