"""Fault-injection harness: tiny inputs for every writer, a loop that rewrites one output between two versions, and
the check that what a kill -9 left is one of them (or a clear error, or nothing yet).

`python tests/helpers/faults.py ROOT SEED` builds the inputs under ROOT, then for each writer forks a child that
rewrites ROOT/<writer> forever, alternating version 0 and 1, and kills it with SIGKILL at a random (seeded) moment
after its first complete write; it writes ROOT/killed.json ({writer: kill delay in seconds}). The test process then
checks each output with `check(writer, ROOT)`. Forked children share the parent's imports, so a kill costs
milliseconds rather than a new interpreter; torch runs one thread so that fork is safe.
"""

from __future__ import annotations

import json
import os
import random
import signal
import sys
import time
from pathlib import Path

import torch

ROOT_DIR = Path(__file__).resolve().parents[2]
if str(ROOT_DIR) not in sys.path:
    sys.path.insert(0, str(ROOT_DIR))

WRITERS = ("save_model", "save_sharded", "quantized", "lora", "ptuning", "tokenizer", "results", "convert")


# ------------------------------------------------------------------------------------------------------ inputs
def tiny_config(vocab_size: int = 2048):
    from glmkit.core.config import GLMConfig

    return GLMConfig.from_name("chatglm-6b", vocab_size=vocab_size, hidden_size=64, num_layers=2, num_heads=2,
                               ffn_hidden_size=128, max_seq_len=128, torch_dtype="float32")


def tiny_model(seed: int, vocab_size: int = 2048):
    from glmkit.core.model import GLM

    model = GLM(tiny_config(vocab_size))
    model.init_weights(std=0.2, generator=torch.Generator().manual_seed(seed))
    return model.eval()


def corpus(root: Path) -> Path:
    path = root / "corpus.jsonl"
    if not path.exists():
        rows = [f"第{i}行：床前明月光，疑是地上霜。The quick brown fox {i} jumps over the lazy dog." for i in range(200)]
        path.write_text("".join(json.dumps({"text": t}, ensure_ascii=False) + "\n" for t in rows), encoding="utf-8")
    return path


def sat_source(root: Path) -> Path:
    from tests.helpers.goldens import glm130b_sat_state_dict, sat_reshard, write_sat_checkpoint

    folder = root / "sat"
    if not (folder / "latest").exists():
        write_sat_checkpoint(folder, sat_reshard([glm130b_sat_state_dict(seed=0)], 2))
    return folder


class Versions:
    """The two versions each writer alternates between, built once before forking."""

    def __init__(self, root: Path) -> None:
        from glmkit.adapters.lora import apply_lora
        from glmkit.adapters.ptuning import attach_prefix
        from glmkit.quant.quantize import quantize_model

        self.root = root
        self.models = [tiny_model(0), tiny_model(1)]
        self.quantized = [quantize_model(tiny_model(s), bits=8) for s in (0, 1)]
        self.lora = []
        self.ptuning = []
        for s in (0, 1):
            m = tiny_model(0)
            apply_lora(m, rank=4, alpha=8, dropout=0.0)
            with torch.no_grad():
                g = torch.Generator().manual_seed(10 + s)
                for n, p in m.named_parameters():
                    if "lora_" in n:
                        p.copy_(torch.randn(p.shape, generator=g) * 0.1)
            self.lora.append(m)
            m = tiny_model(0)
            attach_prefix(m, 4 + s, False)
            with torch.no_grad():
                m.prefix_encoder.embedding.weight.normal_(generator=torch.Generator().manual_seed(20 + s))
            self.ptuning.append(m)
        self.results = [{"tasks": {"t": {"groups": {"g": {"stats": {"accuracy": {"average": 0.25 + 0.5 * s}},
                                                          "files": ["a"]}},
                                         "rows": list(range(5000))}}} for s in (0, 1)]
        self.corpus = corpus(root)
        self.sat = sat_source(root)

    def write(self, writer: str, v: int, out: Path) -> None:
        from glmkit.adapters.lora import save_lora_adapter
        from glmkit.adapters.ptuning import save_ptuning_checkpoint
        from glmkit.core.sat import convert_sat_checkpoint
        from glmkit.evaluation.run import write_results
        from glmkit.loading.loader import save_model
        from glmkit.quant.quantize import save_quantized
        from glmkit.training.tokenizer import train_tokenizer

        if writer == "save_model":
            save_model(self.models[v], out)
        elif writer == "save_sharded":
            save_model(self.models[v], out, max_shard_bytes=400_000 + 300_000 * v)
        elif writer == "quantized":
            save_quantized(self.quantized[v], out)
        elif writer == "lora":
            save_lora_adapter(self.lora[v], out)
        elif writer == "ptuning":
            save_ptuning_checkpoint(self.ptuning[v], out)
        elif writer == "tokenizer":
            train_tokenizer([self.corpus], 480 + 40 * v, "chatglm", out, num_threads=1)
        elif writer == "results":
            write_results(self.results[v], out)
        elif writer == "convert":
            convert_sat_checkpoint(self.sat, out, max_shard_bytes=200_000 * (1 + v))
        else:
            raise ValueError(writer)


# ------------------------------------------------------------------------------------------------------ checks
def references(root: Path, writer: str) -> list[Path]:
    """Each version written once, uninterrupted, into ROOT/ref/<writer>-v<i> (built on first use)."""
    refs = [root / "ref" / f"{writer}-v{v}" for v in (0, 1)]
    if not all(r.exists() for r in refs):
        versions = VERSIONS_CACHE.setdefault(root, Versions(root))
        for v, r in enumerate(refs):
            versions.write(writer, v, r)
    return refs


def _files(folder: Path) -> dict[str, bytes]:
    """A folder's files and bytes, without the temporary files a killed atomic_file write leaves (.NAME.tmp-*)."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file() and not (p.name.startswith(".") and ".tmp-" in p.name)}


def check(writer: str, root: Path) -> str:
    """What a kill left in ROOT/<writer>: byte for byte one of the two complete versions ("v0"/"v1"), which then
    loads; leftovers of the killed process go with the next write. Anything else raises."""
    from glmkit.core.atomic import remove_leftovers
    from glmkit.core.tokenizer import load_tokenizer
    from glmkit.loading.loader import load_adapter, load_model

    out = root / writer
    files = _files(out)
    refs = [_files(ref) for ref in references(root, writer)]
    if writer == "results":  # results.json and results.md are each written whole (the folder holds other runs)
        labels = {name: next((f"v{v}" for v, ref in enumerate(refs) if ref.get(name) == data), None)
                  for name, data in files.items()}
        assert files.keys() == refs[0].keys() and None not in labels.values(), f"{out}: {labels}"
        label = "/".join(sorted(set(labels.values())))
    else:
        label = next((f"v{v}" for v, ref in enumerate(refs) if ref == files), None)
        assert label is not None, f"{out} is neither complete version: {sorted(files)}"
    if writer in ("save_model", "save_sharded", "quantized", "convert"):
        load_model(out)
    elif writer in ("lora", "ptuning"):
        load_adapter(tiny_model(0), out)
    elif writer == "tokenizer":
        tok = load_tokenizer(out)
        assert tok.decode(tok.encode("床前明月光 fox")).replace(" ", "") == "床前明月光fox"
    elif writer == "results":
        json.loads((out / "results.json").read_text(encoding="utf-8"))
    for p in [out, *out.iterdir()]:
        remove_leftovers(p)
    left = [p.name for p in [*out.parent.glob(f".{writer}.*"), *out.glob(".*.tmp-*")]]
    assert not left, f"leftovers of the killed writer remain: {left}"
    return label


VERSIONS_CACHE: dict[Path, Versions] = {}


# ------------------------------------------------------------------------------------------------------ killing
def kill_all(root: Path, seed: int, writers=WRITERS, max_delay: float = 1.0) -> dict[str, float]:
    """For each writer: fork a child rewriting ROOT/<writer> (v0, v1, v0, ...); once its first write is complete,
    SIGKILL it after a random delay in [0, max_delay) seconds. Returns {writer: delay}."""
    torch.set_num_threads(1)
    versions = Versions(root)
    rng = random.Random(seed)
    killed = {}
    for writer in writers:
        out = root / writer
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:  # the child: write forever, report the first complete write
            os.close(r)
            try:
                versions.write(writer, 0, out)
                os.write(w, b"1")
                v = 1
                while True:
                    versions.write(writer, v, out)
                    v ^= 1
            except BaseException:
                import traceback

                traceback.print_exc()
            finally:
                os._exit(1)
        os.close(w)
        first = os.read(r, 1)
        os.close(r)
        delay = rng.random() * max_delay
        if first:
            time.sleep(delay)
        os.kill(pid, signal.SIGKILL)
        _, status = os.waitpid(pid, 0)
        if not first:
            raise RuntimeError(f"the {writer} writer died before its first write (status {status})")
        killed[writer] = round(delay, 4)
    return killed


if __name__ == "__main__":
    root, seed = Path(sys.argv[1]), int(sys.argv[2])
    writers = sys.argv[3].split(",") if len(sys.argv) > 3 else WRITERS
    root.mkdir(parents=True, exist_ok=True)
    result = kill_all(root, seed, writers, float(os.environ.get("GLMKIT_FAULT_MAX_DELAY", "1.0")))
    (root / "killed.json").write_text(json.dumps(result))
