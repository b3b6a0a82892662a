"""glmkit.quant.calibrate: GPTQ rounding, the calibration batch, calibrated glm-tiny against round-to-nearest, and
`glmkit quantize --calibrate` writing a checkpoint that loads without quantizing again."""

from __future__ import annotations

import copy
import json

import pytest
import torch

import glmkit
import glmkit.quant.quantize as Q
from glmkit.commands.quantize import cli_main as quantize_command
from glmkit.quant.calibrate import calibrate_and_quantize, calibration_batch, gptq_quantize, quantize_calibrated
from tests.helpers.common import SHARED_DATA, rel_err


def test_gptq_with_an_identity_hessian_is_round_to_nearest():
    # uncorrelated inputs: no rounding error can be traded against another column
    w = torch.randn(64, 128, generator=torch.Generator().manual_seed(0))
    q, s, z = gptq_quantize(w, torch.eye(128), 4, "group", 32)
    rq, rs, rz = Q.quantize_group(w, 32, mse_fit=True)  # GPTQ picks each group's grid by the MSE fit
    assert q.equal(rq) and s.equal(rs) and z.equal(rz)
    q8, s8, z8 = gptq_quantize(w, torch.eye(128), 8, "rowwise")
    rq8, rs8 = Q.quantize_rowwise(w, 8)
    assert q8.equal(rq8) and s8.equal(rs8) and z8 is None


@pytest.mark.parametrize("bits,scheme,group", [(4, "group", 32), (4, "rowwise", None), (8, "rowwise", None)])
def test_gptq_lowers_the_error_on_correlated_inputs(bits, scheme, group):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(512, 16, generator=g) @ torch.randn(16, 128, generator=g) + 0.1 * torch.randn(512, 128, generator=g)
    w = torch.randn(48, 128, generator=g)
    q, s, z = gptq_quantize(w, x.t() @ x, bits, scheme, group)
    gptq_w = Q.dequantize(q, s, z, group)
    rtn = Q.quantize_rowwise(w, bits) if scheme == "rowwise" else Q.quantize_group(w, group)
    rtn_w = Q.dequantize(*rtn, group) if scheme == "group" else Q.dequantize(*rtn)
    assert int(q.min()) >= (-8 if scheme == "group" else -(2 ** (bits - 1) - 1))
    assert rel_err(x @ gptq_w.t(), x @ w.t()) < 0.7 * rel_err(x @ rtn_w.t(), x @ w.t())


def test_gptq_rejects_bad_input():
    with pytest.raises(ValueError, match="hessian"):
        gptq_quantize(torch.randn(4, 64), torch.eye(32), 4, "group", 32)
    with pytest.raises(ValueError, match="INT4"):
        gptq_quantize(torch.randn(4, 64), torch.eye(64), 8, "group", 32)


def test_calibration_batch_layout():
    tok = glmkit.load_tokenizer("glm-tiny")
    ids = calibration_batch(tok, num_sequences=5, seq_len=40)
    assert ids.shape == (5, 40)
    assert (ids[:, 19] == tok.gmask_token_id).all() and (ids[:, 20] == tok.sop_token_id).all()  # ChatGLM-6B
    assert len({tuple(r) for r in ids.tolist()}) == 5  # spread over the text
    with pytest.raises(ValueError, match="tokens"):
        calibration_batch(tok, "too short", seq_len=64)


def _held_out_poems(tok, n: int = 8, length: int = 48) -> torch.Tensor:
    path = SHARED_DATA / "corpus" / "tang-poems.jsonl"
    if not path.exists():
        pytest.skip("../shared/data is not available")
    rows = []
    for line in reversed(path.read_text(encoding="utf-8").splitlines()):  # the bundled sample is from the top
        ids = tok.encode(json.loads(line)["text"], add_special_tokens=False)
        if len(ids) >= length - 2:
            rows.append(ids[:length - 2] + [tok.gmask_token_id, tok.sop_token_id])
        if len(rows) == n:
            return torch.tensor(rows)
    raise AssertionError("not enough long poems")


def test_calibrated_glm_tiny_is_closer_to_the_float_model():
    tok = glmkit.load_tokenizer("glm-tiny")
    model = glmkit.load_model("glm-tiny", dtype=torch.float32)
    ids = _held_out_poems(tok)
    with torch.no_grad():
        ref = model(ids)
        for kw in (dict(bits=4), dict(bits=8)):
            rtn = rel_err(Q.quantize_model(copy.deepcopy(model), **kw)(ids), ref)
            gptq = rel_err(calibrate_and_quantize(copy.deepcopy(model), tok, progress=False, **kw)(ids), ref)
            assert gptq < 0.85 * rtn, (kw, gptq, rtn)  # measured 0.77x (INT4 g32) and 0.68x (INT8)


def test_quantize_calibrated_checks():
    model = glmkit.load_model("glm-tiny", dtype=torch.float32)
    ids = calibration_batch(glmkit.load_tokenizer("glm-tiny"), num_sequences=2, seq_len=32)
    Q.quantize_model(model, 4)
    with pytest.raises(ValueError, match="already quantized"):
        quantize_calibrated(model, ids, 4, progress=False)


def test_quantize_cli_calibrate_round_trip(tmp_path, capsys):
    dst = tmp_path / "q4"
    assert quantize_command(["glm-tiny", str(dst), "--bits", "4", "--calibrate", "--calibration-samples", "4",
                       "--calibration-length", "64"]) == 0
    assert "GPTQ-calibrated" in capsys.readouterr().out
    loaded = glmkit.load_model(dst)
    assert isinstance(loaded.h[0].mlp.fc, Q.QuantizedLinear) and loaded.h[0].mlp.fc.group_size == 32
    tok = glmkit.load_tokenizer(dst)
    expected = calibrate_and_quantize(glmkit.load_model("glm-tiny"), tok, 4, num_sequences=4, seq_len=64,
                                      progress=False)
    Q.quantize_head(expected)  # the command rounds the output layer and embedding to INT8 (its --head default)
    ids = calibration_batch(tok, num_sequences=2, seq_len=24)
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids), expected(ids), rtol=1e-5, atol=1e-5)
    with pytest.raises(SystemExit):
        quantize_command(["glm-tiny", str(tmp_path / "x"), "--bits", "4", "--calibration-samples", "4"])
    assert "need --calibrate" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        quantize_command(["glm-tiny", str(tmp_path / "x"), "--bits", "4", "--calibrate", "--calibration-file",
                    str(tmp_path / "missing.txt")])
    assert "cannot read --calibration-file" in capsys.readouterr().err
