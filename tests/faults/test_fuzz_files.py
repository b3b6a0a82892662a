"""Checkpoint, adapter, SAT and tokenizer files truncated at random offsets or with random bytes overwritten: loading
either works or fails with a clear error (CheckpointError / ValueError / FileNotFoundError), never a crash, a hang or
a huge allocation; a safetensors header claiming a terabyte is refused before anything is allocated; .bin files load
with weights_only=True, so a crafted pickle runs no code. The tokenizers take random bytes and unpaired surrogates."""

import json
import os
import pickle
import random
import shutil
from pathlib import Path

import pytest
import torch

from glmkit.core.checkpoint import CheckpointError
from glmkit.core.tokenizer import load_tokenizer
from glmkit.loading.loader import load_adapter, load_model
from tests.helpers.faults import Versions, tiny_model

CLEAR = (CheckpointError, ValueError, FileNotFoundError)
N_CASES = 6 * int(os.environ.get("GLMKIT_FAULT_SEEDS", "1"))


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("fuzz")
    v = Versions(root)
    out = {}
    for writer in ("save_model", "save_sharded", "lora", "ptuning", "tokenizer", "convert"):
        v.write(writer, 0, root / "good" / writer)
        out[writer] = root / "good" / writer
    out["sat"] = v.sat
    return out


def _mutate(path: Path, rng: random.Random) -> str:
    data = bytearray(path.read_bytes())
    if rng.random() < 0.5 or len(data) < 2:
        cut = rng.randrange(0, max(1, len(data)))
        path.write_bytes(bytes(data[:cut]))
        return f"truncated at {cut}/{len(data)}"
    # flip bytes, mostly near the start where the headers are
    spots = [rng.randrange(0, min(len(data), 4096)) if rng.random() < 0.7 else rng.randrange(len(data))
             for _ in range(rng.randint(1, 8))]
    for i in spots:
        data[i] = rng.randrange(256)
    path.write_bytes(bytes(data))
    return f"bytes overwritten at {spots}"


def _load(kind: str, folder: Path):
    if kind in ("save_model", "save_sharded", "convert", "sat"):
        return load_model(folder)
    if kind in ("lora", "ptuning"):
        return load_adapter(tiny_model(0), folder)
    tok = load_tokenizer(folder)
    return tok.decode(tok.encode("床前明月光 fox"))


@pytest.mark.parametrize("kind", ["save_model", "save_sharded", "lora", "ptuning", "tokenizer", "convert", "sat"])
def test_corrupt_files_give_a_clear_error(folders, tmp_path, kind):
    rng = random.Random(f"fuzz-{kind}")
    src = folders[kind]
    files = sorted(p.relative_to(src) for p in src.rglob("*") if p.is_file())
    for case in range(N_CASES):
        work = tmp_path / f"{kind}-{case}"
        shutil.copytree(src, work)
        name = rng.choice(files)
        how = _mutate(work / name, rng)
        try:
            _load(kind, work)
        except CLEAR:
            pass
        except Exception as e:  # anything else is an unclear error
            raise AssertionError(f"{kind}/{name} {how}: {type(e).__name__}: {e}") from e
        shutil.rmtree(work)


def test_a_header_claiming_a_terabyte_is_refused_before_allocating(folders, tmp_path):
    work = tmp_path / "m"
    shutil.copytree(folders["save_model"], work)
    path = work / "model.safetensors"
    data = path.read_bytes()
    n = int.from_bytes(data[:8], "little")
    header = json.loads(data[8:8 + n])
    name = next(k for k in header if k != "__metadata__")
    header[name]["shape"] = [1 << 20, 1 << 18]  # 2^38 floats: 1 TiB
    header[name]["data_offsets"] = [0, (1 << 38) * 4]
    raw = json.dumps(header).encode()
    path.write_bytes(len(raw).to_bytes(8, "little") + raw + data[8 + n:])
    with pytest.raises(CheckpointError, match="offset"):
        load_model(work)
    path.write_bytes((1 << 40).to_bytes(8, "little") + data[8:])  # a header length of 1 TiB
    with pytest.raises(CheckpointError, match="header"):
        load_model(work)


class _Boom:
    def __reduce__(self):
        return (os.system, ("touch /tmp/glmkit-pwned-by-pickle",))


def test_a_crafted_pickle_runs_no_code(folders, tmp_path):
    marker = Path("/tmp/glmkit-pwned-by-pickle")
    marker.unlink(missing_ok=True)
    work = tmp_path / "p"
    shutil.copytree(folders["ptuning"], work)
    with open(work / "pytorch_model.bin", "wb") as f:
        pickle.dump({"transformer.prefix_encoder.embedding.weight": _Boom()}, f)
    with pytest.raises(CheckpointError):
        load_adapter(tiny_model(0), work)
    assert not marker.exists()


def test_tokenizers_take_random_bytes_and_unpaired_surrogates(folders):
    tok = load_tokenizer(folders["tokenizer"])
    rng = random.Random(0)
    texts = [bytes(rng.randrange(256) for _ in range(rng.randint(0, 64))).decode("utf-8", "replace")
             for _ in range(20 * N_CASES)]
    texts += ["\ud800", "a\udfffb", "\udc00\ud800" * 3, "床\ud83d前", "\x00\x01\x7f", "\u200b\ufeff" * 5]
    for text in texts:
        try:
            ids = tok.encode(text, add_special_tokens=False)
        except ValueError:
            continue  # a clear refusal is fine
        assert all(isinstance(i, int) and 0 <= i < len(tok) for i in ids)
        tok.decode(ids)  # decodes without an exception
    # ids outside the vocabulary: an error, not a crash
    with pytest.raises((ValueError, IndexError)):
        tok.decode([len(tok) + 5])
