"""glmkit against chatglm.cpp (the C++/ggml engine ChatGLM users pick for CPUs) on the same weights, side by side.

    python benchmarks/vs_chatglm_cpp.py --layers 8 --repeats 2      # first run builds chatglm-cpp: ~15 min
    python benchmarks/vs_chatglm_cpp.py --layers 28 --repeats 2 --glmkit int4 --chatglm-cpp q4_0

What it does, in order:

1. Installs chatglm-cpp (default 0.4.2, built from PyPI's source with its default flags: AVX2, no AVX-512) with
   `pip install --target` into its own cache folder (default ~/.cache/glmkit/bench/), once.
2. Writes a random ChatGLM-6B-shaped checkpoint (vocab 130528, hidden 4096, 32 heads, inner 16384; `--layers` of
   them) in THUDM's names and fp16, the output layer tied to the embedding as in the real model (no separate
   `lm_head.weight`), plus glm-tiny's tokenizer files. Matrices are N(0, 0.02^2), norms 1, biases 0. Cached by
   shape and seed.
3. Converts it with chatglm.cpp's own converter (`chatglm_cpp.convert.ChatGLMConverter`: its tokenizer/config/
   weight dumping and its q4_0/q8_0 quantizers) to each asked ggml type. The converter's `convert()` entry point
   loads the model through transformers with THUDM's remote modeling code, which this script does not download:
   the converter is handed the checkpoint's tensors directly (read one at a time from the safetensors file, the
   output layer as the embedding it is tied to) and an object holding the tokenizer's SentencePiece model.
4. Runs each configuration in its own process, rounds interleaved (`--repeats`), best round per figure: a prompt
   of `--prompt-tokens` random ids ending in [gMASK] <sop>, then `--decode-tokens` greedy tokens. Prefill
   tokens/s = prompt tokens / time to the first token; decode tokens/s = tokens after the first / their time.
   chatglm.cpp through its Python binding (`Pipeline`, `generate_next_token` as its streaming generator calls it);
   glmkit through `glmkit.load_model(dir, quantize=...)` with its defaults and `model.stream_generate` (what
   `model.generate` runs). Each process also reports its load time and peak RSS (VmHWM).
5. Accuracy of every configuration (benchmarks/quant_formats.py; `--no-accuracy` skips it): the relative logits
   error against the float model on this same checkpoint (a 32-token prompt; chatglm.cpp's types as ggml's
   reference quantizers produce them, reimplemented there, applied to the same tensors chatglm.cpp quantizes), and
   glm-tiny's held-out cross-entropy delta and logits error under the same format (random weights have no
   meaningful cross-entropy). The reference is the fp32 model when it fits in memory, else bf16 (printed).
6. Prints one table with ratios against chatglm.cpp q4_0, weight bytes read per decoded token, the accuracy
   columns, and the machine's load average before and after. `--no-speed` prints bytes and accuracy alone (no
   chatglm-cpp build).

Threads: chatglm.cpp uses as many as the machine has cores up to 4 (half above that), glmkit torch's default (the
core count) unless `--threads` sets it; both are printed. Not part of CI (it needs a compiler, ~15 min and GBs).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "glmkit" / "assets" / "glm-tiny"
SHAPE = dict(vocab_size=130528, hidden_size=4096, num_attention_heads=32, inner_hidden_size=16384,
             max_sequence_length=2048)
GMASK, SOP = 130001, 130004  # ChatGLM-6B's ids (positions only depend on the prompt ending in [gMASK] <sop>)


# ------------------------------------------------------------------------------------------------ setup


def ensure_chatglm_cpp(cache: Path, version: str) -> Path:
    """The folder holding the chatglm_cpp package (built from source into cache/chatglm-cpp-VERSION once)."""
    site = cache / f"chatglm-cpp-{version}"
    if not list((site / "chatglm_cpp").glob("_C*.so")):
        print(f"building chatglm-cpp {version} from PyPI into {site} (takes ~15 min the first time)", flush=True)
        site.mkdir(parents=True, exist_ok=True)
        # CMake 4 (what pip's build environment gets) refuses the cmake_minimum_required(< 3.5) of the bundled
        # sentencepiece unless told the minimum policy; the flags are otherwise chatglm-cpp's defaults. Its setup.py
        # runs `make -j` (no limit: ~150 compilers at once); -l holds new jobs while the load is above the cores.
        env = dict(os.environ, CMAKE_ARGS=(os.environ.get("CMAKE_ARGS", "") + " -DCMAKE_POLICY_VERSION_MINIMUM=3.5"),
                   MAKEFLAGS=f"-l{os.cpu_count() or 2}")
        subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--upgrade", "--target", str(site),
                        f"chatglm-cpp=={version}", "tabulate"], check=True, env=env)
    return site


def hf_config(layers: int) -> dict:
    return {"architectures": ["ChatGLMModel"], "model_type": "chatglm", **SHAPE, "num_layers": layers,
            "layernorm_epsilon": 1e-5, "position_encoding_2d": True, "bos_token_id": SOP, "eos_token_id": 130005,
            "mask_token_id": 130000, "gmask_token_id": GMASK, "pad_token_id": 3, "torch_dtype": "float16",
            "use_cache": True}


def tensor_specs(layers: int) -> list[tuple[str, tuple[int, ...]]]:
    h, ffn, v = SHAPE["hidden_size"], SHAPE["inner_hidden_size"], SHAPE["vocab_size"]
    specs = [("transformer.word_embeddings.weight", (v, h))]
    for i in range(layers):
        p = f"transformer.layers.{i}."
        specs += [(p + "input_layernorm.weight", (h,)), (p + "input_layernorm.bias", (h,)),
                  (p + "attention.query_key_value.weight", (3 * h, h)), (p + "attention.query_key_value.bias", (3 * h,)),
                  (p + "attention.dense.weight", (h, h)), (p + "attention.dense.bias", (h,)),
                  (p + "post_attention_layernorm.weight", (h,)), (p + "post_attention_layernorm.bias", (h,)),
                  (p + "mlp.dense_h_to_4h.weight", (ffn, h)), (p + "mlp.dense_h_to_4h.bias", (ffn,)),
                  (p + "mlp.dense_4h_to_h.weight", (h, ffn)), (p + "mlp.dense_4h_to_h.bias", (h,))]
    return specs + [("transformer.final_layernorm.weight", (h,)), ("transformer.final_layernorm.bias", (h,))]


def write_checkpoint(folder: Path, layers: int, seed: int) -> Path:
    """The random fp16 checkpoint, streamed to one safetensors file tensor by tensor (it never is in memory whole)."""
    import torch

    if (folder / "model.safetensors").exists() and (folder / "config.json").exists():
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    specs = tensor_specs(layers)
    header, offset = {"__metadata__": {"format": "pt"}}, 0
    for name, shape in specs:
        nbytes = 2 * int(torch.Size(shape).numel())
        header[name] = {"dtype": "F16", "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    raw = json.dumps(header).encode()
    raw += b" " * (-(8 + len(raw)) % 8)
    tmp = folder / "model.safetensors.tmp"
    with open(tmp, "wb") as f:
        f.write(len(raw).to_bytes(8, "little"))
        f.write(raw)
        for i, (name, shape) in enumerate(specs):
            if len(shape) == 2:
                gen = torch.Generator().manual_seed(seed * 100003 + i)
                t = torch.empty(shape, dtype=torch.float32).normal_(0.0, 0.02, generator=gen).half()
            else:
                t = torch.full(shape, 1.0 if name.endswith("layernorm.weight") else 0.0, dtype=torch.float16)
            f.write(memoryview(t.view(-1).view(torch.uint8).numpy()))
            del t
    tmp.replace(folder / "model.safetensors")
    (folder / "config.json").write_text(json.dumps(hf_config(layers), indent=2) + "\n")
    for name in ("ice_text.model", "tokenizer_config.json"):
        (folder / name).write_bytes((TINY / name).read_bytes())
    return folder


def convert(site: Path, folder: Path, ggml_type: str) -> Path:
    out = folder / f"chatglm-ggml-{ggml_type}.bin"
    if not out.exists():
        print(f"converting with chatglm.cpp's converter to {ggml_type}", flush=True)
        run_child({"kind": "convert", "folder": str(folder), "type": ggml_type, "out": str(out)}, site)
    return out


# ------------------------------------------------------------------------------------------------ children


def child_convert(job: dict) -> dict:
    from collections.abc import Mapping
    from types import SimpleNamespace

    import torch
    from chatglm_cpp.convert import ChatGLMConverter, GGMLType
    from safetensors import safe_open

    folder = Path(job["folder"])
    cfg = json.loads((folder / "config.json").read_text())

    class TiedStateDict(Mapping):
        """The checkpoint's tensors in fp32, read on demand; lm_head.weight is the embedding it is tied to."""

        def __init__(self):
            self.file = safe_open(str(folder / "model.safetensors"), framework="pt")
            self.names = list(self.file.keys()) + ["lm_head.weight"]

        def __getitem__(self, name):
            key = "transformer.word_embeddings.weight" if name == "lm_head.weight" else name
            return self.file.get_tensor(key).float()

        def __iter__(self):
            return iter(self.names)

        def __len__(self):
            return len(self.names)

    state = TiedStateDict()
    config = SimpleNamespace(position_encoding_2d=True, inner_hidden_size=cfg["inner_hidden_size"],
                             hidden_size=cfg["hidden_size"], vocab_size=cfg["vocab_size"],
                             num_attention_heads=cfg["num_attention_heads"], num_layers=cfg["num_layers"],
                             layernorm_epsilon=cfg["layernorm_epsilon"], pre_seq_len=None,
                             max_sequence_length=cfg["max_sequence_length"], eos_token_id=None,  # never stop
                             pad_token_id=cfg["pad_token_id"], quantization_bit=0)
    model = SimpleNamespace(config=config, state_dict=lambda: state)
    proto = (folder / "ice_text.model").read_bytes()
    sp = SimpleNamespace(serialized_model_proto=lambda: proto)
    tokenizer = SimpleNamespace(sp_tokenizer=SimpleNamespace(text_tokenizer=SimpleNamespace(sp=sp)))
    with open(job["out"], "wb") as f, torch.no_grad():
        ChatGLMConverter.convert(f, model, tokenizer, GGMLType[job["type"].upper()])
    return {}


def accuracy_formats(names: list[str]) -> dict:
    """Config name -> benchmarks/quant_formats.py format tuple (how its weights are stored)."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import quant_formats as QF

    out = {}
    for name in names:
        engine, _, what = name.partition(" ")
        if engine == "chatglm.cpp":
            if what not in QF.GGML_TYPES:
                raise ValueError(f"no reference quantizer for ggml type {what!r} (known: {list(QF.GGML_TYPES)})")
            out[name] = QF.GGML_TYPES[what]
            continue
        precision, _, head = what.partition(":head=")
        if precision == "bf16":
            out[name] = ("float", None, 16.0, 16.0)
        else:  # "saved" is the default INT4 written by `glmkit quantize` and mapped back: the same numbers
            out[name] = QF.glmkit_format("int4" if precision == "saved" else precision, quantize_head=head or None)
    return out


def child_accuracy(job: dict) -> dict:
    import torch

    sys.path.insert(0, str(ROOT / "benchmarks"))
    import quant_formats as QF

    torch.set_num_threads(job["threads"] or torch.get_num_threads())
    formats = accuracy_formats(job["names"])
    folder = Path(job["folder"])
    fp32_bytes = 4 * sum(int(torch.Size(shape).numel()) for _, shape in tensor_specs(job["layers"]))
    available = next((int(line.split()[1]) * 1024 for line in open("/proc/meminfo") if line.startswith("MemAvailable")),
                     0)
    dtype = torch.float32 if 1.6 * fp32_bytes < available else torch.bfloat16
    big = QF.big_table(folder, formats, dtype=dtype)
    tiny = QF.tiny_table({k: v for k, v in formats.items() if v[0] != "float"}, job["texts"])
    return {"reference": str(dtype).replace("torch.", ""), "big": big,
            "tiny": {k: v for k, v in tiny.items() if not k.startswith("_")}}


def prompt_ids(n: int, seed: int = 1) -> list[int]:
    import random

    rng = random.Random(seed)
    return [rng.randrange(100, 120000) for _ in range(n - 2)] + [GMASK, SOP]


def peak_rss() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return 0


def child_chatglm_cpp(job: dict) -> dict:
    import chatglm_cpp

    ids, n = prompt_ids(job["prompt_tokens"]), job["decode_tokens"] + 1
    t0 = time.perf_counter()
    pipe = chatglm_cpp.Pipeline(job["path"], max_length=len(ids) + n + 8)
    load_s, load_rss = time.perf_counter() - t0, peak_rss()

    def stream(prompt, count):
        config = chatglm_cpp._C.GenerationConfig(max_length=len(prompt) + count, max_new_tokens=count,
                                                 max_context_length=len(prompt), do_sample=False, top_k=0, top_p=1.0,
                                                 temperature=1.0, repetition_penalty=1.0)
        return pipe._stream_generate_ids(prompt, None, config)

    for _ in stream(ids[-16:], 3):  # warm-up
        pass
    start, stamps = time.perf_counter(), []
    for _ in stream(ids, n):
        stamps.append(time.perf_counter())
    return timing(job, start, stamps, load_s, load_rss)


def child_glmkit(job: dict) -> dict:
    import torch

    import glmkit

    if job.get("threads"):
        torch.set_num_threads(job["threads"])
    precision, _, head = job["precision"].partition(":head=")
    quantize = None if precision in ("bf16", "saved") else precision
    t0 = time.perf_counter()
    model = glmkit.load_model(job["path"], quantize=quantize, **({"quantize_head": head} if head else {}))
    load_s, load_rss = time.perf_counter() - t0, peak_rss()
    ids = torch.tensor([prompt_ids(job["prompt_tokens"])])
    n = job["decode_tokens"] + 1
    for _ in model.stream_generate(ids[:, -16:], max_new_tokens=3, eos_token_id=[]):  # warm-up
        pass
    start, stamps = time.perf_counter(), []
    for _ in model.stream_generate(ids, max_new_tokens=n, eos_token_id=[]):
        stamps.append(time.perf_counter())
    out = timing(job, start, stamps, load_s, load_rss)
    out["threads"] = torch.get_num_threads()
    return out


def timing(job: dict, start: float, stamps: list[float], load_s: float, load_rss: int) -> dict:
    """Speeds, load time, peak RSS after loading and at the end (VmHWM: resident memory, mapped file pages too)."""
    return {"prefill_tok_s": job["prompt_tokens"] / (stamps[0] - start),
            "decode_tok_s": (len(stamps) - 1) / (stamps[-1] - stamps[0]), "load_s": load_s, "load_rss": load_rss,
            "peak_rss": peak_rss(), "tokens": len(stamps)}


def run_child(job: dict, site: Path | None = None) -> dict:
    env = dict(os.environ)
    paths = [str(ROOT)] + ([str(site)] if site is not None else [])
    env["PYTHONPATH"] = os.pathsep.join(paths + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    proc = subprocess.run([sys.executable, __file__, "--child", json.dumps(job)], capture_output=True, text=True,
                          env=env)
    line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")), None)
    if proc.returncode or line is None:
        raise RuntimeError(f"{job['kind']} {job.get('precision', job.get('type', ''))} failed:\n{proc.stderr[-4000:]}")
    return json.loads(line[len("RESULT "):])


# ------------------------------------------------------------------------------------------------ main


def load_average() -> str:
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "?"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--layers", type=int, default=8, help="transformer layers (28 = the full ChatGLM-6B)")
    parser.add_argument("--prompt-tokens", type=int, default=128)
    parser.add_argument("--decode-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=2, help="interleaved rounds; each figure is its best")
    parser.add_argument("--glmkit", default="int4,int8,bf16", help="glmkit precisions (int4, int8, bf16; 'saved' = "
                        "the int4 model saved by `glmkit quantize` and loaded back; int4:head=int4 = another "
                        "output layer than the default)")
    parser.add_argument("--chatglm-cpp", default="q4_0,q8_0", help="chatglm.cpp ggml types (q4_0, q8_0, ...)")
    parser.add_argument("--threads", type=int, default=None, help="glmkit's torch threads (default: torch's)")
    parser.add_argument("--version", default="0.4.2", help="chatglm-cpp version to build")
    parser.add_argument("--cache", type=Path, default=Path.home() / ".cache" / "glmkit" / "bench")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-accuracy", action="store_true", help="skip the accuracy columns")
    parser.add_argument("--no-speed", action="store_true", help="bytes per token and accuracy only (no chatglm-cpp "
                        "build, no timing)")
    parser.add_argument("--texts", type=int, default=300, help="glm-tiny held-out poems for the CE delta")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        job = json.loads(args.child)
        fn = {"convert": child_convert, "chatglm_cpp": child_chatglm_cpp, "glmkit": child_glmkit,
              "accuracy": child_accuracy}[job["kind"]]
        print("RESULT " + json.dumps(fn(job)), flush=True)
        return 0

    print(f"load average before: {load_average()}", flush=True)
    types = [t for t in args.chatglm_cpp.split(",") if t]
    site = ensure_chatglm_cpp(args.cache, args.version) if types and not args.no_speed else None
    folder = write_checkpoint(args.cache / f"chatglm-6b-shape-{args.layers}l-seed{args.seed}", args.layers, args.seed)
    configs = []
    for t in types:
        path = "" if args.no_speed else str(convert(site, folder, t))
        configs.append((f"chatglm.cpp {t}", {"kind": "chatglm_cpp", "path": path}))
    for p in filter(None, args.glmkit.split(",")):
        path = folder
        if p == "saved" and not args.no_speed:  # `glmkit quantize` once, then the memory-mapped load of its output
            path = folder / "glmkit-int4"
            if not (path / "model.safetensors").exists():
                from glmkit.loading.checkpoint_ops import quantize_checkpoint

                quantize_checkpoint(folder, path, 4)
        configs.append((f"glmkit {p}", {"kind": "glmkit", "precision": p, "path": str(path)}))
    common = dict(prompt_tokens=args.prompt_tokens, decode_tokens=args.decode_tokens, threads=args.threads)
    accuracy = None
    if not args.no_accuracy:
        formats = accuracy_formats([name for name, _ in configs])  # unknown types fail before the long runs
        print("accuracy: " + ", ".join(formats), flush=True)
        accuracy = run_child({"kind": "accuracy", "folder": str(folder), "layers": args.layers, "threads": args.threads,
                              "texts": args.texts, "names": [name for name, _ in configs]})
    rounds: dict[str, list[dict]] = {name: [] for name, _ in configs}
    for r in range(0 if args.no_speed else args.repeats):
        for name, job in configs:
            result = run_child({**job, **common}, site if job["kind"] == "chatglm_cpp" else None)
            rounds[name].append(result)
            print(f"round {r + 1} {name}: prefill {result['prefill_tok_s']:.1f} tok/s, decode "
                  f"{result['decode_tok_s']:.2f} tok/s, load {result['load_s']:.1f} s", flush=True)
    best = {name: {"prefill_tok_s": max(x["prefill_tok_s"] for x in rs), "decode_tok_s": max(x["decode_tok_s"]
                   for x in rs), "load_s": min(x["load_s"] for x in rs), "peak_rss": max(x["peak_rss"] for x in rs),
                   "load_rss": max(x["load_rss"] for x in rs), "threads": rs[0].get("threads")}
            for name, rs in rounds.items() if rs}
    formats = accuracy_formats([name for name, _ in configs])
    if args.no_speed:
        print_accuracy(args, formats, accuracy)
        return 0
    base = best.get("chatglm.cpp q4_0")
    print(f"\nChatGLM-6B shape, {args.layers} layers, tied output layer, batch 1, {args.prompt_tokens}-token prompt, "
          f"{args.decode_tokens} greedy tokens, best of {args.repeats} interleaved rounds; chatglm-cpp "
          f"{args.version} ({os.cpu_count()} cores), glmkit threads {next((b['threads'] for b in best.values() if b['threads']), '-')}")
    print(f"load average after: {load_average()}")
    head = "| | prefill tok/s | decode tok/s | prefill vs q4_0 | decode vs q4_0 | load s | RSS after load GB | peak RSS GB |"
    print(head + "\n|---|---:|---:|---:|---:|---:|---:|---:|")
    for name, b in best.items():
        ratio = (lambda k: f"{b[k] / base[k]:.2f}x") if base else (lambda k: "-")
        print(f"| {name} | {b['prefill_tok_s']:.1f} | {b['decode_tok_s']:.2f} | {ratio('prefill_tok_s')} | "
              f"{ratio('decode_tok_s')} | {b['load_s']:.1f} | {b['load_rss'] / 1e9:.2f} | {b['peak_rss'] / 1e9:.2f} |")
    print_accuracy(args, formats, accuracy)
    return 0


def print_accuracy(args, formats: dict, accuracy: dict | None) -> None:
    """Weight bytes per decoded token and, unless skipped, the accuracy columns, one row per configuration."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import quant_formats as QF

    q4 = QF.bytes_per_token(4.5, 4.5, args.layers)
    ref = accuracy["reference"] if accuracy else "-"
    print(f"\nbytes: weights read per decoded token; logits error: relative L2 against the {ref} model on this "
          f"checkpoint; glm-tiny: held-out CE delta (nats/char) and logits error under the same format")
    print("| | bits/weight layers / head | GB/token | vs q4_0 | logits error | glm-tiny CE delta | glm-tiny logits error |")
    print("|---|---|---:|---:|---:|---:|---:|")
    for name, (_, _, lb, hb) in formats.items():
        gb = QF.bytes_per_token(lb, hb, args.layers)
        big = accuracy["big"].get(name) if accuracy else None
        tiny = accuracy["tiny"].get(name) if accuracy else None
        cells = [f"{big:.4f}" if big is not None else "-", f"{tiny['ce_delta']:+.4f}" if tiny else "-",
                 f"{tiny['logits_error']:.4f}" if tiny else "-"]
        print(f"| {name} | {lb:.2f} / {hb:.2f} | {gb / 1e9:.3f} | {gb / q4:.2f}x | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    sys.exit(main())
