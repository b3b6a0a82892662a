"""A write into a full filesystem (a real small tmpfs mounted by the test) fails with a clear error and leaves the
previous output as it was."""

import subprocess
import uuid

import pytest
import torch

from glmkit.core.atomic import OutputError, write_json
from glmkit.loading.loader import load_model, save_model
from tests.helpers.faults import tiny_model


@pytest.fixture
def small_fs(tmp_path):
    mnt = tmp_path / f"fs-{uuid.uuid4().hex[:6]}"
    mnt.mkdir()
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=3m", "tmpfs", str(mnt)], capture_output=True,
                          text=True)
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here (needs root or CAP_SYS_ADMIN): {proc.stderr.strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def test_full_disk_keeps_the_previous_output(small_fs):
    small, big = tiny_model(0, vocab_size=512), tiny_model(1, vocab_size=8192)  # ~0.4 MB and ~2.5 MB of weights
    out = small_fs / "model"
    save_model(small, out)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    with pytest.raises(OutputError, match="disk is full"):
        save_model(big, out)  # needs the old and the new folder at once: more than 3 MB
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert not [p for p in small_fs.iterdir() if p.name.startswith(".")], "the temporary folder was not removed"
    loaded = load_model(out).state_dict()
    assert all(torch.equal(loaded[k], v) for k, v in small.state_dict().items() if k in loaded)

    results = small_fs / "results.json"
    write_json(results, {"ok": 1})
    with open(small_fs / "fill", "wb") as f:  # fill what is left
        try:
            while True:
                f.write(b"\0" * 65536)
                f.flush()
        except OSError:
            pass
    with pytest.raises(OutputError, match="disk is full"):
        write_json(results, {"rows": list(range(100_000))})
    assert results.read_text() == '{\n  "ok": 1\n}\n'
