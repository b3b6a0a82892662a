#!/usr/bin/env bash
# Builds glmkit's wheel and installs it, alone (no extras, not editable), into a scratch venv that cannot see this
# source tree; then the base commands run on the bundled glm-tiny from another folder, and `glmkit serve` names the
# extra it lacks. torch==2.13.0 (the CPU wheel) is installed first, as scripts/setup.sh does.
# Usage: bash scripts/check_wheel.sh [SCRATCH_DIR]   (default: a new temporary folder, removed at the end)
set -euo pipefail
REPO="$(cd "$(dirname "$0")/.." && pwd)"
PY=${PYTHON:-python3}
SCRATCH=${1:-$(mktemp -d)}
[ -n "${1:-}" ] || trap 'rm -rf "$SCRATCH"' EXIT
mkdir -p "$SCRATCH"
unset PYTHONPATH
step() { echo "== $*"; }

step "build the wheel"
"$PY" -m pip wheel -q --no-deps -w "$SCRATCH/dist" "$REPO"
WHEEL=$(ls "$SCRATCH"/dist/glmkit-*.whl)
echo "$WHEEL ($(du -h "$WHEEL" | cut -f1))"

step "scratch venv: torch==2.13.0 first, then the wheel alone"
"$PY" -m venv "$SCRATCH/venv"
VPY="$SCRATCH/venv/bin/python"
"$VPY" -m pip install -q --upgrade pip
"$VPY" -m pip install -q "torch==2.13.0"
"$VPY" -m pip install -q "$WHEEL"
export PATH="$SCRATCH/venv/bin:$PATH"

cd "$SCRATCH"  # nowhere near the source tree
step "installed from the wheel, not the source tree; no extra's package present"
"$VPY" - "$REPO" <<'EOF'
import importlib.util, pathlib, sys
import glmkit
where = pathlib.Path(glmkit.__file__).resolve()
assert pathlib.Path(sys.argv[1]) not in where.parents, f"glmkit imported from the source tree: {where}"
assert (where.parent / "assets" / "glm-tiny" / "model.safetensors").is_file(), "glm-tiny is not in the wheel"
assert (where.parent / "py.typed").is_file(), "py.typed is not in the wheel"
extras = ["fastapi", "uvicorn", "prometheus_client", "gradio", "peft", "transformers", "tensorboard",
          "rouge_chinese", "jieba", "nltk", "lm_eval"]
present = [m for m in extras if importlib.util.find_spec(m) is not None]
assert not present, f"the base install pulled in {present}"
print(f"glmkit {glmkit.__version__} from {where.parent}")
EOF
glmkit --version
glmkit --help > /dev/null
for cmd in generate chat serve web fill pretrain finetune merge-lora eval quantize convert memory-plan bench tokenizer; do
  glmkit "$cmd" --help > /dev/null
done
echo "every command's --help: ok"

step "glmkit generate"
out=$(glmkit generate "春眠不覺曉，" --max-new-tokens 24 --seed 0); echo "$out"; [ -n "$out" ]
step "glmkit generate --quantize int4"
out=$(glmkit generate "春眠不覺曉，" --max-new-tokens 24 --seed 0 --quantize int4); echo "$out"; [ -n "$out" ]
step "glmkit fill"
glmkit fill "床前明月[MASK]，疑是地上霜。" --seed 0
step "glmkit chat (through a pipe)"
out=$(printf '作者#李白*體裁#五言絕句*題目#靜夜思\n' | glmkit chat --seed 0); echo "$out"; [ -n "$out" ]
step "glmkit quantize, then generate from the quantized folder"
glmkit quantize glm-tiny "$SCRATCH/q4" --bits 4
out=$(glmkit generate "春眠不覺曉，" --model "$SCRATCH/q4" --max-new-tokens 16 --seed 0); echo "$out"; [ -n "$out" ]

step "glmkit serve without the serve extra"
set +e
err=$(glmkit serve 2>&1 >/dev/null); rc=$?
set -e
echo "$err (exit $rc)"
[ "$rc" -ne 0 ] && grep -qF "pip install 'glmkit[serve]'" <<<"$err"
echo "check_wheel: ok"
