"""Regenerates tests/data/glm130b/golden.json and golden_logits.pt: the ORIGINAL GLM-130B code's outputs on tiny
random SAT checkpoints. Not run by pytest (tests/loading/test_glm130b_loading.py reads what it writes).

What runs is the original code, not a transcription:
- SwissArmyTransformer 0.2.12 (the last 0.2.x release; GLM-130B's requirements.txt pins >=0.2.12,<0.3), from its
  PyPI wheel: GLM130B (model/official/glm130B_model.py), its mpu layers, BaseTransformer and RotaryEmbedding;
- THUDM/GLM-130B @ 212215c (github): tools/convert_tp.py writes the TP=2 and INT8/INT4 checkpoints,
  quantization/ (QuantizedColumnParallelLinear / QuantizedRowParallelLinear / W8A16Linear) runs the quantized
  layers, generate.py's get_masks_and_position_ids builds positions and masks, evaluation/model.py's
  batch_filling_sequence runs greedy decoding with SAT's mem_kv cache.

On a CPU, with three shims: torch.cuda.current_device() returns the CPU device (SAT 0.2.12 places the rotary table
and the score buffer there), `deepspeed` / `datasets` / `transformers` /
`torchvision` are empty modules (imported at module level, never called at
inference), and GLM-130B's `kernels` (CUDA fatbin) is replaced by CPU statements of cuda/quantization.cu:
int4WeightCompression (`(w[2i] << 4) | (w[2i+1] & 0xF)`) and int{4,8}WeightExtraction (`T(q) * scale[row]`, in the
scale's dtype: the Half kernel for the fp16 run, the Float one for the fp32 run). convert_tp.py's `.cuda()` is the
identity here.

fp32 run: GLM-130B builds GLM130B(args).half(); an fp32 run of the same code is `.float()` (the only way: SAT
creates dense_h_to_4h in fp16 whatever args.fp16 says). `.float()` would also turn the fp16 rotary inv_freq buffer to
fp32; GLM-130B was trained and is deployed only in fp16, so the fp32 run puts that buffer back to fp16 and SAT's
RotaryEmbedding builds the table it was trained with (fp16 positions, fp16 einsum, fp16 cos/sin), which the fp32
q and k then promote (glmkit uses this table in every load dtype). Its attention ends in `attention_probs.half()`
before the bmm with fp32 values, so during the fp32 forward Tensor.half returns fp32 (the softmax is fp32 either way).

Setup (from the repository root; /tmp paths are examples):

    python3 -m venv /tmp/satvenv && /tmp/satvenv/bin/pip install torch==2.13.0 numpy tensorboardX sentencepiece \
        protobuf requests filelock tqdm pytest
    pip download --no-deps SwissArmyTransformer==0.2.12 -d /tmp/sat && unzip the wheel into /tmp/sat/src
    git archive of THUDM/GLM-130B @ 212215c (tools quantization kernels evaluation generation generate.py
        initialize.py) into /tmp/glm130b_src
    /tmp/satvenv/bin/python tests/data/glm130b/make_golden.py /tmp/sat/src /tmp/glm130b_src

The checkpoints themselves are not stored: tests.helpers.goldens.glm130b_sat_state_dict (seeded) and sat_reshard (a
restatement of convert_tp.py) rebuild them, and this script asserts that sat_reshard writes exactly what the original
convert_tp.py writes.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import runpy
import sys
import tempfile
import types
from pathlib import Path

import torch
import torch.multiprocessing as mp

REPO = Path(__file__).resolve().parents[3]
OUT = Path(__file__).resolve().parent
sys.path.insert(0, str(REPO))

from tests.helpers.goldens import GLM130B_TINY, glm130b_sat_state_dict, sat_reshard

MASK, GMASK, SMASK, SOP, EOP, EOS = 150000, 150001, 150002, 150004, 150005, 20002
GEN_TOKENS = 6
VARIANTS = [(tp, bits) for bits in (None, 8, 4) for tp in (1, 2)]


# ----------------------------------------------------------------------------------------------------- shims
def install_shims(stub_dir: Path) -> None:
    torch.cuda.current_device = lambda: torch.device("cpu")
    stub_dir.mkdir(parents=True, exist_ok=True)
    ckpt = stub_dir / "deepspeed" / "runtime" / "activation_checkpointing"
    ckpt.mkdir(parents=True, exist_ok=True)
    for d in (stub_dir / "deepspeed", stub_dir / "deepspeed" / "runtime", ckpt):
        (d / "__init__.py").write_text("")
    (ckpt / "checkpointing.py").write_text(
        "def checkpoint(*a, **k):\n    raise RuntimeError('stub')\nget_cuda_rng_tracker = None\n"
        "def model_parallel_cuda_manual_seed(seed):\n    pass\n")
    (stub_dir / "datasets.py").write_text("def load_dataset(*a, **k):\n    raise RuntimeError('stub')\n")
    (stub_dir / "transformers.py").write_text("AutoTokenizer = None  # imported by SAT's tokenizer module, unused\n")
    (stub_dir / "torchvision").mkdir(exist_ok=True)
    (stub_dir / "torchvision" / "__init__.py").write_text("")
    (stub_dir / "torchvision" / "utils.py").write_text("save_image = None  # imported by SAT's generation utils\n")
    sys.path.insert(0, str(stub_dir))
    kernels = types.ModuleType("kernels")

    def compress_int4_weight(weight):  # int4WeightCompression
        return (weight[:, 0::2] << 4) | (weight[:, 1::2] & 0x0F)

    def extract_weight_to_half(weight, scale_list, source_bit_width):  # int{4,8}WeightExtraction{Half,Float}
        if source_bit_width == 4:
            high = weight >> 4
            low = (weight << 4) >> 4
            weight = torch.stack((high, low), dim=-1).flatten(-2)
        return weight.to(scale_list.dtype) * scale_list[:, None]

    kernels.compress_int4_weight = compress_int4_weight
    kernels.extract_weight_to_half = extract_weight_to_half
    sys.modules["kernels"] = kernels


# ----------------------------------------------------------------------------------------------------- checkpoints
def run_convert_tp(glm130b_src: Path, src: Path, dst: Path, target_tp: int, bits: int | None) -> None:
    argv = ["convert_tp.py", "--input-folder", str(src), "--output-folder", str(dst), "--target-tp", str(target_tp)]
    if bits is not None:
        argv += ["--quantization-bit-width", str(bits)]
    old_argv, old_cuda = sys.argv, torch.Tensor.cuda
    sys.argv, torch.Tensor.cuda = argv, lambda self, *a, **k: self
    try:
        runpy.run_path(str(glm130b_src / "tools" / "convert_tp.py"), run_name="__main__")
    finally:
        sys.argv, torch.Tensor.cuda = old_argv, old_cuda


def load_shards(folder: Path) -> list[dict]:
    it = (folder / "latest").read_text().strip()
    files = sorted((folder / it).glob("mp_rank_*_model_states.pt"))
    return [torch.load(f, map_location="cpu", weights_only=True)["module"] for f in files]


def make_checkpoints(glm130b_src: Path, root: Path) -> dict:
    base = root / "tp1"
    (base / "1000").mkdir(parents=True)
    (base / "latest").write_text("1000")
    sd = glm130b_sat_state_dict()
    torch.save({"module": sd}, base / "1000" / "mp_rank_00_model_states.pt")
    dirs = {}
    for tp, bits in VARIANTS:
        name = f"tp{tp}_{'fp16' if bits is None else f'int{bits}'}"
        if tp == 1 and bits is None:
            dirs[name] = base
            continue
        dirs[name] = root / name
        run_convert_tp(glm130b_src, base, dirs[name], tp, bits)
        mine = sat_reshard([sd], tp, bits)
        theirs = load_shards(dirs[name])
        assert len(mine) == len(theirs)
        for a, b in zip(mine, theirs):
            assert list(a) == list(b), (name, list(a), list(b))
            for k in a:
                assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), (name, k)
    return dirs


# ----------------------------------------------------------------------------------------------------- cases
def text_ids(n: int, seed: int) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return (torch.randint(20100, 149000, (n,), generator=g)).tolist()


def generate_cases() -> dict:
    """Prompts as GLM-130B's generate.py builds them (fill_blanks), plus an evaluation multiple-choice sample."""
    a, b = text_ids(5, 1), text_ids(3, 2)
    return {
        # text, [gMASK], eos, sop ([gMASK] keeps the positions counting; generate.py would add no eos after a
        # [gMASK] it appends itself, which changes nothing in the rules checked here)
        "gmask": {"seq": a + [GMASK, EOS], "generation_mask": GMASK, "use_gmask": True},
        # "text [MASK] text": MASK at index 5, eos, sop; positions from sop on frozen at 5
        "mask": {"seq": a + [MASK] + b + [EOS], "generation_mask": MASK, "use_gmask": False},
        # "text [sMASK]" (ends with a mask: no eos)
        "smask": {"seq": a + b + [SMASK], "generation_mask": SMASK, "use_gmask": False},
        # "text [gMASK] text [MASK] text": [MASK] is generated first and positions freeze (use_gmask False)
        "mixed": {"seq": a[:3] + [GMASK] + b + [MASK] + a[3:] + [EOS], "generation_mask": MASK, "use_gmask": False},
    }


def multiple_choice_sample() -> dict:
    """evaluation/dataset.py MultiChoiceTaskDataset.build_multiple_choice_sample (use_task_mask False, not unified,
    multi-token choices): context + [MASK], then per choice sop + choice[:-1] at the mask's position, attention
    block-diagonal (each choice causal, all see the context)."""
    text, choices = text_ids(4, 3), [text_ids(3, 4), text_ids(2, 5)]
    token, position = list(text) + [MASK], list(range(len(text))) + [len(text)]
    mask_position, division = len(text), len(text) + 1
    blocks = [torch.ones(division, division, dtype=torch.long)]
    targets = []
    for c in choices:
        position += [mask_position] * len(c)
        targets.append(list(range(len(token), len(token) + len(c))))
        blocks.append(torch.ones(len(c), len(c), dtype=torch.long).tril())
        token += [SOP] + c[:-1]
    visible = torch.block_diag(*blocks)
    visible[: len(token), :division] = 1
    return {"tokens": token, "position_ids": position, "visible": visible.tolist(), "choices": choices,
            "choice_targets": targets}


# ----------------------------------------------------------------------------------------------------- model
def worker(rank: int, tp: int, folder: str, bits, port: int, result_path: str, sat_src: str, glm130b_src: str,
           stub_dir: str) -> None:
    sys.path.insert(0, sat_src)
    sys.path.insert(0, glm130b_src)
    install_shims(Path(stub_dir))
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=tp)
    from SwissArmyTransformer import mpu

    mpu.initialize_model_parallel(tp)
    import generate as glm_generate  # GLM-130B's generate.py (get_masks_and_position_ids)
    from evaluation.model import batch_filling_sequence
    from quantization import quantize
    from SwissArmyTransformer.model import GLM130B
    from SwissArmyTransformer.model.position_embedding import RotaryEmbedding

    args = argparse.Namespace(
        num_layers=GLM130B_TINY["num_layers"], vocab_size=GLM130B_TINY["vocab_size"],
        hidden_size=GLM130B_TINY["hidden_size"], num_attention_heads=GLM130B_TINY["num_attention_heads"],
        max_sequence_length=GLM130B_TINY["max_sequence_length"], hidden_dropout=0.1, attention_dropout=0.1,
        inner_hidden_size=GLM130B_TINY["inner_hidden_size"], hidden_size_per_attention_head=None,
        checkpoint_activations=False, checkpoint_num_layers=1, layernorm_order="post", skip_init=True,
        use_gpu_initialization=False, fp16=True, model_parallel_size=tp)
    results = {}
    it = (Path(folder) / "latest").read_text().strip()
    sd = torch.load(Path(folder) / it / f"mp_rank_{rank:02d}_model_states.pt", map_location="cpu",
                    weights_only=True)["module"]
    for dtype in ("float32", "float16"):
        if dtype == "float16" and (bits is not None):
            continue  # fp16 goldens of the float checkpoint only (the quantized layers compute like the float ones)
        torch.manual_seed(0)
        model = GLM130B(args).half()  # initialize.py: GLM130B(args).half(), quantize, load
        if bits is not None:
            model = quantize(model, bits)
        model.load_state_dict(sd, strict=True)
        if dtype == "float32":
            model = model.float()
            for m in model.modules():  # the deployed fp16 rotary table (see the docstring)
                if isinstance(m, RotaryEmbedding):
                    m.inv_freq = m.inv_freq.half()
        model.eval()
        compute = torch.float32 if dtype == "float32" else torch.float16
        real_half = torch.Tensor.half

        def forward(*a, **k):
            torch.Tensor.half = (lambda self, *x, **y: self.to(compute)) if compute == torch.float32 else real_half
            try:
                with torch.no_grad():
                    return model(*a, **k)
            finally:
                torch.Tensor.half = real_half

        for name, case in generate_cases().items():
            seq = torch.tensor([case["seq"] + [SOP]])
            mask_position = case["seq"].index(case["generation_mask"])
            tokens, attention_mask, position_ids = glm_generate.get_masks_and_position_ids(
                seq, mask_position, 0, gmask=case["use_gmask"])
            logits = forward(tokens, position_ids, attention_mask)[0]
            results[f"{dtype}/{name}/logits"] = logits.float()
            results[f"{dtype}/{name}/position_ids"] = position_ids
            results[f"{dtype}/{name}/visible"] = ~attention_mask[:, 0]

            class Greedy:  # generation/strategies.BaseStrategy with top_k=1, as argmax (no numpy np.bool)
                is_done = False

                def forward(self, logits, tokens, mems):
                    pred = logits.view(-1, logits.size(-1)).float().argmax(dim=-1)
                    if int(pred[0]) in (EOP, EOS):
                        self.is_done = True
                    return torch.cat((tokens, pred.view(tokens.shape[:-1] + (1,))), dim=-1), mems

                def finalize(self, tokens, mems):
                    return tokens, mems

            import functools

            get_masks = functools.partial(glm_generate.get_masks_and_position_ids, mask_position=mask_position,
                                          max_gen_length=GEN_TOKENS, gmask=case["use_gmask"])
            torch.Tensor.half = (lambda self, *x, **y: self.to(compute)) if compute == torch.float32 else real_half
            try:
                with torch.no_grad():
                    out, _ = batch_filling_sequence(model, seq, torch.tensor([seq.shape[-1]]), strategy=Greedy(),
                                                    get_masks_and_position_ids=get_masks)
            finally:
                torch.Tensor.half = real_half
            results[f"{dtype}/{name}/greedy"] = out.reshape(-1)[seq.shape[-1]:]  # [batch, beams, T] -> new tokens

        mc = multiple_choice_sample()
        tokens = torch.tensor([mc["tokens"]])
        position_ids = torch.tensor([mc["position_ids"]])
        attention_mask = (torch.tensor(mc["visible"]) < 0.5)[None, None]  # evaluation/model.py process_data
        logits = forward(tokens, position_ids, attention_mask)[0]
        results[f"{dtype}/multiple_choice/logits"] = logits.float()
        scores = []
        logp = torch.log_softmax(logits.float(), dim=-1)[0]
        for choice, target in zip(mc["choices"], mc["choice_targets"]):
            scores.append(float(logp[target, choice].sum()))
        results[f"{dtype}/multiple_choice/scores"] = torch.tensor(scores)
    if rank == 0:
        torch.save(results, result_path)
    dist.barrier()
    dist.destroy_process_group()


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("sat_src", type=Path, help="folder holding the SwissArmyTransformer 0.2.12 package")
    parser.add_argument("glm130b_src", type=Path, help="a checkout of THUDM/GLM-130B")
    a = parser.parse_args()
    install_shims(Path(tempfile.mkdtemp()) / "stubs")
    sys.path.insert(0, str(a.glm130b_src))
    torch.set_num_threads(1)
    golden = {"source": {
        "SwissArmyTransformer": "0.2.12 (PyPI wheel)",
        "GLM-130B": "THUDM/GLM-130B @ 212215c54f8a9da2deed51455868305235664370",
        "torch": torch.__version__,
        "sha256": {p: sha256(a.sat_src / "SwissArmyTransformer" / p) for p in (
            "model/official/glm130B_model.py", "model/position_embedding/rotary_embeddings.py", "model/transformer.py",
            "transformer_defaults.py")} | {p: sha256(a.glm130b_src / p) for p in (
                "tools/convert_tp.py", "generate.py", "quantization/layers.py", "quantization/functional.py",
                "evaluation/model.py")},
    }, "rotary_table": "float16 in every run (SAT RotaryEmbedding, fp16 inv_freq)", "config": GLM130B_TINY, "eop": EOP, "eos": EOS, "gen_tokens": GEN_TOKENS,
        "convert_tp_matches_tests_conftest_sat_reshard": True}
    logits: dict[str, torch.Tensor] = {}
    columns = torch.tensor(sorted(set(range(0, GLM130B_TINY["vocab_size"], 997)) | {MASK, GMASK, SMASK, SOP, EOP,
                                                                                       EOS}))
    golden["columns"] = columns.tolist()
    golden["cases"] = {name: {"seq": c["seq"] + [SOP]} for name, c in generate_cases().items()}
    golden["multiple_choice"] = multiple_choice_sample()
    with tempfile.TemporaryDirectory() as tmp:
        dirs = make_checkpoints(a.glm130b_src, Path(tmp))
        stub_dir = str(Path(tmp) / "stubs2")
        for (tp, bits), (name, folder) in zip(VARIANTS, dirs.items()):
            result = Path(tmp) / f"{name}.pt"
            port = 29600 + len(logits) % 200
            mp.spawn(worker, args=(tp, str(folder), bits, port, str(result), str(a.sat_src), str(a.glm130b_src),
                                   stub_dir), nprocs=tp, join=True)
            res = torch.load(result, weights_only=True)
            for key, value in res.items():
                dtype, case, what = key.split("/")
                if what == "logits":
                    logits[f"{name}/{key}/columns"] = value[..., columns].contiguous()
                    logits[f"{name}/{key}/logsumexp"] = value.logsumexp(dim=-1)
                    logits[f"{name}/{key}/argmax"] = value.argmax(dim=-1)
                elif what == "scores":
                    golden.setdefault("scores", {})[f"{name}/{dtype}"] = value.tolist()
                elif what == "greedy":
                    golden.setdefault("greedy", {})[f"{name}/{dtype}/{case}"] = value.tolist()
                elif name == "tp1_fp16" and dtype == "float32":
                    golden["cases"][case][what] = value.long().tolist()
            print(name, "done", flush=True)
    torch.save(logits, OUT / "golden_logits.pt")
    (OUT / "golden.json").write_text(json.dumps(golden, indent=1) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
