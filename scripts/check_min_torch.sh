#!/usr/bin/env bash
# Checks pyproject's lower bound on torch: installs the oldest torch it admits into a scratch venv, glmkit from this
# checkout (not editable, base install only) with pytest, then runs a smoke subset that touches every torch API
# the bound rests on:
#   torch.distributed.fsdp.fully_shard (public in 2.6: pretraining/fine-tuning with train.distributed=fsdp),
#   torch.distributed.tensor + DeviceMesh + parallelize_module + functional collectives (tensor parallelism),
#   torch.serialization.safe_globals (2.5), aten._weight_int4pack_mm_for_cpu / _convert_weight_to_int4pack_for_cpu
#   (2.6; glmkit falls back to a portable path where they are missing), aten._weight_int8pack_mm.
#
# Only PyPI is reachable from the development machines, and PyPI's Linux torch wheels are CUDA builds: the CUDA
# wheel of the old release is installed with its nvidia-* dependencies (about 3 GB) and runs on the CPU. The
# CPU-only wheels live on download.pytorch.org; where that index is reachable, TORCH_INDEX=https://download.
# pytorch.org/whl/cpu makes the download ten times smaller.
# Usage: bash scripts/check_min_torch.sh [SCRATCH_DIR]   (MIN_TORCH=2.6.0 by default)
set -euo pipefail
REPO="$(cd "$(dirname "$0")/.." && pwd)"
PY=${PYTHON:-python3}
MIN_TORCH=${MIN_TORCH:-2.6.0}
SCRATCH=${1:-$(mktemp -d)}
[ -n "${1:-}" ] || trap 'rm -rf "$SCRATCH"' EXIT
mkdir -p "$SCRATCH"
unset PYTHONPATH

grep -q "\"torch>=${MIN_TORCH%.0}\"" "$REPO/pyproject.toml" \
  || echo "note: pyproject.toml's torch bound is not >=${MIN_TORCH%.0}; checking torch==$MIN_TORCH anyway"

echo "== scratch venv with torch==$MIN_TORCH"
cd "$SCRATCH"  # away from the checkout, so `python -c` imports the installed glmkit
"$PY" -m venv "$SCRATCH/venv"
VPY="$SCRATCH/venv/bin/python"
"$VPY" -m pip install -q --upgrade pip
# The development machines cap torch with a constraints file; the old release is below that cap.
"$VPY" -m pip install -q ${TORCH_INDEX:+--index-url "$TORCH_INDEX"} "torch==$MIN_TORCH"
# serve: the tensor-parallel server test; protobuf: the tokenizer the pretraining test trains
"$VPY" -m pip install -q "$REPO[serve]" protobuf pytest httpx
"$VPY" -c "import torch, glmkit; print('torch', torch.__version__, '| glmkit', glmkit.__version__, glmkit.__file__)"
"$VPY" -c "import torch; assert torch.__version__.startswith('$MIN_TORCH'), torch.__version__"
export PATH="$SCRATCH/venv/bin:$PATH"

echo "== the base commands on glm-tiny"
glmkit generate "春眠不覺曉，" --max-new-tokens 16 --seed 0
glmkit generate "春眠不覺曉，" --max-new-tokens 16 --seed 0 --quantize int4
glmkit fill "床前明月[MASK]，疑是地上霜。" --seed 0
printf '床前明月光\n' | glmkit chat --seed 0 --max-new-tokens 16

echo "== smoke subset of the tests (model, quantization kernels, tensor parallelism, DDP/FSDP pretraining)"
cd "$REPO"  # the tests import this checkout's glmkit (pytest puts the root on sys.path): the same code, on the old torch
"$VPY" -m pytest -q -p no:cacheprovider \
  tests/core/test_model.py tests/quant/test_kernels.py tests/quant/test_quantize.py \
  tests/distributed/test_tensor_parallel.py "tests/training/test_pretrain.py::test_two_processes_match_single_process"
echo "check_min_torch: torch==$MIN_TORCH ok"
