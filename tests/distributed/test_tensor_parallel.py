"""Tensor-parallel inference on 2 processes (real torchrun, gloo on loopback): GLM-130B checkpoints loaded with
tensor_parallel=True reproduce the original code's logits and greedy tokens, each rank holding about half of the
model; `glmkit generate` under torchrun prints what one process prints."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

import glmkit
from tests.helpers.common import REPO, free_port
from tests.helpers.goldens import glm130b_sat_state_dict, sat_reshard, write_sat_checkpoint

TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr", "127.0.0.1"]


def torchrun(args: list[str], timeout: int = 300) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    return subprocess.run(TORCHRUN + ["--master-port", str(free_port())] + args, capture_output=True, text=True,
                          timeout=timeout, env=env, cwd=REPO,
                          check=False)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("tp")
    sd = glm130b_sat_state_dict()
    out = {"tp1_fp16": write_sat_checkpoint(root / "tp1_fp16", [sd]),
           "tp2_fp16": write_sat_checkpoint(root / "tp2_fp16", sat_reshard([sd], 2)),
           "tp1_int8": write_sat_checkpoint(root / "tp1_int8", sat_reshard([sd], 1, bits=8)),
           "tp2_int4": write_sat_checkpoint(root / "tp2_int4", sat_reshard([sd], 2, bits=4))}
    return out


@pytest.mark.slow
def test_two_ranks_reproduce_the_original(checkpoints):
    """TP=2 from a TP=1 folder (split while loading), a TP=2 folder (each rank reads its own file), INT8 split from
    one shard and INT4 with per-shard scales: logits within 3e-4 of the original, the same greedy tokens."""
    proc = torchrun([str(REPO / "tests" / "distributed" / "tp_worker.py")]
                    + [f"{k}={v}" for k, v in checkpoints.items()])
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = next(x for x in proc.stdout.splitlines() if x.startswith("RESULTS "))
    results = json.loads(line[len("RESULTS "):])
    full = glmkit.load_model(checkpoints["tp1_fp16"], dtype="float32")
    full_bytes = sum(p.numel() * p.element_size() for p in full.parameters())
    for variant, r in results.items():
        assert r["world"] == 2 and r["heads"] == 1, variant
        assert r["max_abs_err"] < 3e-4, (variant, r)
        assert r["greedy_equal"], variant
    # the vocabulary-sized table dominates this toy model: each rank holds half of it
    assert results["tp2_fp16"]["local_bytes"] < 0.55 * full_bytes


@pytest.mark.slow
def test_generate_command_under_torchrun(checkpoints, tmp_path):
    folder = tmp_path / "with_tokenizer"
    shutil.copytree(checkpoints["tp2_fp16"], folder)
    shutil.copy(REPO / "glmkit" / "assets" / "glm-tiny" / "ice_text.model", folder / "ice_text.model")
    args = ["-m", "glmkit", "generate", "the cat [MASK] home", "--model", str(folder), "--max-new-tokens", "5",
            "--temperature", "0", "--device", "cpu"]
    single = subprocess.run([sys.executable, *args], capture_output=True, text=True, cwd=REPO, timeout=300,
                            env=dict(os.environ, PYTHONPATH=str(REPO)), check=False)
    assert single.returncode == 0, single.stderr[-2000:]
    proc = torchrun(args)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip() == single.stdout.strip() != ""  # rank 0 prints, the other rank only follows


def test_tensor_parallel_needs_torchrun(checkpoints, monkeypatch):
    for var in ("RANK", "WORLD_SIZE"):
        monkeypatch.delenv(var, raising=False)
    with pytest.raises(RuntimeError, match="torchrun"):
        glmkit.load_model(checkpoints["tp2_fp16"], tensor_parallel=True)


def test_grouped_kv_heads_are_refused():
    from glmkit.core.config import GLMConfig
    from glmkit.distributed.tp import _check_splittable

    with pytest.raises(ValueError, match="per-head qkv layout"):
        _check_splittable(GLMConfig.from_name("chatglm2-6b"), 2)
    with pytest.raises(ValueError, match="does not split over 3"):
        _check_splittable(GLMConfig.from_name("glm-130b"), 3)
    _check_splittable(GLMConfig.from_name("glm-130b"), 8)
    assert torch.__version__  # (the DeviceMesh / parallelize_module API of the pinned torch)


@pytest.mark.slow
def test_serve_under_torchrun_rank0_serves_the_others_follow(checkpoints, tmp_path):
    """`glmkit serve` under torchrun: rank 0 answers HTTP (the continuous engine), rank 1 mirrors its model calls; the
    answer is the single-process model's greedy answer."""
    import time
    import urllib.request

    from glmkit.core.chat import chat
    from glmkit.core.tokenizer import load_tokenizer

    folder = tmp_path / "served"
    shutil.copytree(checkpoints["tp2_fp16"], folder)
    shutil.copy(REPO / "glmkit" / "assets" / "glm-tiny" / "ice_text.model", folder / "ice_text.model")
    port = free_port()
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    proc = subprocess.Popen(TORCHRUN + ["--master-port", str(free_port()), "-m", "glmkit", "serve", "--model",
                                        str(folder), "--port", str(port), "--device", "cpu"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=REPO,
                            start_new_session=True)
    try:
        url = f"http://127.0.0.1:{port}"
        for _ in range(240):
            try:
                urllib.request.urlopen(url + "/v1/models", timeout=2).read()
                break
            except OSError:
                if proc.poll() is not None:
                    raise AssertionError(proc.stdout.read()[-3000:]) from None
                time.sleep(0.5)
        body = json.dumps({"model": "x", "messages": [{"role": "user", "content": "the cat [MASK] home"}],
                           "temperature": 0, "max_tokens": 4}).encode()
        req = urllib.request.Request(url + "/v1/chat/completions", data=body,
                                     headers={"Content-Type": "application/json"})
        answer = json.loads(urllib.request.urlopen(req, timeout=120).read())["choices"][0]["message"]["content"]
    finally:
        os.killpg(proc.pid, 15)
        proc.wait(timeout=60)
    model = glmkit.load_model(folder, dtype="float32")
    expected, _ = chat(model, load_tokenizer(folder), "the cat [MASK] home", do_sample=False, max_new_tokens=4)
    assert answer == expected
