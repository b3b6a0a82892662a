"""`glmkit finetune` (P-tuning, LoRA, full) and `glmkit quantize --calibrate` killed with SIGKILL at a random
(seeded) moment after their first saved state, then started again with the same command: the result equals an
uninterrupted run to the last bit (same data order, same RNG streams)."""

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tests.helpers.chat_models import POEMS, tiny_chatglm_with_tokenizer

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[2]
ENV = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    root = tmp_path_factory.mktemp("base")
    _, _, folder = tiny_chatglm_with_tokenizer(root, std=0.2, seed=0)
    rows = [{"content": p[:8], "summary": p[8:24]} for p in POEMS] * 6
    (root / "train.json").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), "utf-8")
    return {"model": folder, "train": root / "train.json"}


def run_killed(cmd: list[str], ready: Path, seed: int, max_delay: float) -> bool:
    """Starts cmd, waits for `ready` to exist, kills it with SIGKILL after a random delay; True if it was still
    running when killed."""
    proc = subprocess.Popen(cmd, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 240
    while not ready.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    time.sleep(random.Random(seed).random() * max_delay)
    alive = proc.poll() is None
    proc.send_signal(signal.SIGKILL)
    _, err = proc.communicate()
    assert alive or proc.returncode == 0, err.decode()[-3000:]
    return alive


def run(cmd: list[str]) -> None:
    proc = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]


WEIGHTS = {"ptuning": "pytorch_model.bin", "lora": "adapter_model.safetensors", "full": "model.safetensors"}


def _tensors(path: Path) -> dict:
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    return torch.load(path, map_location="cpu", weights_only=True)


@pytest.mark.parametrize("method", ["ptuning", "lora", "full"])
def test_finetune_killed_and_restarted_equals_uninterrupted(base, tmp_path, method, seed):
    steps = 5

    def cmd(out):
        extra = {"ptuning": ["--pre_seq_len", "4", "--learning_rate", "2e-2"],
                 "lora": ["--method", "lora", "--lora_dropout", "0.1", "--learning_rate", "1e-2"],
                 "full": ["--method", "full", "--learning_rate", "1e-3"]}[method]
        return [sys.executable, "-m", "glmkit", "finetune", "--do_train", "--train_file", str(base["train"]),
                "--model_name_or_path", str(base["model"]), "--output_dir", str(out), "--disable_tqdm",
                "--max_source_length", "16", "--max_target_length", "24", "--per_device_train_batch_size", "4",
                "--save_steps", "1", "--max_steps", str(steps), "--num_threads", "1",
                "--resume_from_checkpoint", "last", *extra]

    ref, out = tmp_path / "ref", tmp_path / "out"
    run(cmd(ref))
    run_killed(cmd(out), out / "checkpoint-1" / "trainer_state.json", seed, max_delay=3.0)
    run(cmd(out))  # the same command again: continues from the newest complete checkpoint
    a, b = _tensors(ref / f"checkpoint-{steps}" / WEIGHTS[method]), _tensors(out / f"checkpoint-{steps}" /
                                                                            WEIGHTS[method])
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    ref_log = json.loads((ref / f"checkpoint-{steps}" / "trainer_state.json").read_text())["log_history"]
    out_log = json.loads((out / f"checkpoint-{steps}" / "trainer_state.json").read_text())["log_history"]
    assert [e["loss"] for e in ref_log] == [e["loss"] for e in out_log]


def test_calibrated_quantize_killed_and_restarted_equals_uninterrupted(base, tmp_path, seed):
    from glmkit.loading.checkpoint_ops import calibration_progress_dir

    def cmd(out):
        return [sys.executable, "-m", "glmkit", "quantize", str(base["model"]), str(out), "--bits", "4",
                "--calibrate", "--calibration-samples", "4", "--calibration-length", "32"]

    ref, out = tmp_path / "ref", tmp_path / "out"
    run(cmd(ref))
    progress = calibration_progress_dir(out)
    run_killed(cmd(out), progress / "progress.json", seed, max_delay=1.5)
    run(cmd(out))
    assert (ref / "model.safetensors").read_bytes() == (out / "model.safetensors").read_bytes()
    assert not progress.exists(), "the progress folder is removed once the output is complete"
