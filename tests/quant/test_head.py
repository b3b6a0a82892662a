"""The quantized output layer and embedding (glmkit.quant.quantize.QuantizedEmbedding, a spec's `head`): one table
serves the lookup and the logits, tied models keep one table, quantize-on-load equals quantize_model, the error an
INT8 / INT4 head adds, saving and loading it back, bad input."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import glmkit
import glmkit.quant.quantize as Q
from glmkit.quant import formats
from glmkit.quant.quantize import QuantizedEmbedding, QuantizedLinear
from tests.helpers.checkpoints import CHATGLM_V1_HF, thudm_v1_state_dict, write_folder
from tests.helpers.common import rel_err

IDS = torch.tensor([[5, 6, 7, 8, 9, 151, 154, 11, 12]])  # prompt [gMASK] <sop> answer (CHATGLM_V1_HF ids)


def folder_of(tmp_path, tied: bool):
    hf = dict(CHATGLM_V1_HF)
    sd = thudm_v1_state_dict(hf, std=0.1)
    if tied:  # as ChatGLM-6B: the output layer is the embedding (glmkit ties when lm_head is absent)
        del sd["lm_head.weight"]
    return write_folder(tmp_path / ("tied" if tied else "untied"), hf, sd, fmt="safetensors")


@pytest.mark.parametrize("head", ["int8", "int4"])
@pytest.mark.parametrize("vocab", [160, 256])  # INT4: rows padded to whole blocks of the CPU layout, or not
def test_one_table_serves_lookup_and_logits(head, vocab):
    torch.manual_seed(0)
    w = torch.randn(vocab, 64) * 0.1
    table = QuantizedEmbedding.from_weight(w, Q.head_spec(head))
    assert (table.num_embeddings, table.embedding_dim, table.bits) == (vocab, 64, 8 if head == "int8" else 4)
    deq = table.dequantized_weight()
    assert rel_err(deq, w) < (0.01 if head == "int8" else 0.1)
    ids = torch.tensor([[0, vocab - 1, 3], [7, 7, vocab // 2]])
    torch.testing.assert_close(table(ids), deq[ids], rtol=0, atol=0)  # integer input: the rows, exactly
    x = torch.randn(2, 3, 64)
    torch.testing.assert_close(table(x), x @ deq.t(), rtol=1e-5, atol=1e-5)  # float input: the logits
    table.to(torch.bfloat16)
    assert table(ids).dtype == torch.bfloat16 and torch.equal(table(ids), deq[ids].bfloat16())
    assert rel_err(table(x.bfloat16()), x @ deq.t()) < 2e-2
    with pytest.raises(IndexError, match="token ids must lie"):
        table(torch.tensor([vocab]))


@pytest.mark.parametrize("tied", [True, False])
def test_quantize_on_load_quantizes_the_head_as_quantize_model_does(tmp_path, tied):
    folder = folder_of(tmp_path, tied)
    float_model = glmkit.load_model(folder)
    assert (float_model.lm_head.weight is float_model.wte.weight) == tied
    errs = {}
    for head in ("none", "int8", "int4"):
        model = glmkit.load_model(folder, quantize="int4", quantize_head=None if head == "int8" else head)
        expected = Q.quantize_model(copy.deepcopy(float_model), 4, head=head)
        for m in (model, expected):
            if head == "none":
                assert type(m.wte) is nn.Embedding and type(m.lm_head) is nn.Linear
            else:
                assert isinstance(m.wte, QuantizedEmbedding) and isinstance(m.lm_head, QuantizedLinear)
                assert (m.lm_head is m.wte) == tied  # a tied model keeps one table
                assert m.lm_head.bits == (8 if head == "int8" else 4)
        with torch.no_grad():
            torch.testing.assert_close(model(IDS), expected(IDS), rtol=1e-5, atol=1e-5)
            errs[head] = rel_err(model(IDS), float_model(IDS))
        assert model.config.extra["quantization"]["head"] == Q.head_spec(head)
    # what the head adds to the INT4 layers' error: a little for INT8, much more for INT4 (this random model, none /
    # INT8 / INT4 head: 0.0115 / 0.0138 / 0.0961 tied, 0.0134 / 0.0155 / 0.1069 untied)
    assert errs["none"] < errs["int8"] < 1.3 * errs["none"] < 3 * errs["none"] < errs["int4"], errs


def test_generate_and_grad_modes_with_a_tied_quantized_table(tmp_path):
    model = glmkit.load_model(folder_of(tmp_path, tied=True), quantize="int4", dtype=torch.bfloat16)
    assert model.lm_head is model.wte and model.wte.compute_dtype == torch.bfloat16
    first = model.generate(IDS, max_new_tokens=4, eos_token_id=[])
    with torch.no_grad():
        logits = model(IDS)
    assert logits.dtype == torch.bfloat16 or logits.dtype == torch.float32
    assert torch.equal(model.generate(IDS, max_new_tokens=4, eos_token_id=[]), first)
    model.train()
    model(IDS).float().logsumexp(-1).mean().backward()  # the input gradient flows back through the table
    assert model.h[0].ln_1.weight.grad is not None and model.h[0].ln_1.weight.grad.abs().sum() > 0


def test_save_and_load_back_a_quantized_head(tmp_path, monkeypatch):
    for tied in (True, False):
        model = glmkit.load_model(folder_of(tmp_path, tied), quantize="int4", quantize_head="int4")
        out = Q.save_quantized(model, tmp_path / f"q-{tied}")
        from safetensors import safe_open

        with safe_open(str(out / "model.safetensors"), framework="pt") as f:
            keys = set(f.keys())
        assert any(k.startswith("transformer.word_embeddings.") for k in keys)
        assert any(k.startswith("lm_head.") for k in keys) == (not tied)  # a tied table is written once

        monkeypatch.setattr(formats, "quantize_group", lambda *a, **k: pytest.fail("loaded without requantizing"))
        monkeypatch.setattr(formats, "quantize_rowwise", lambda *a, **k: pytest.fail("loaded without requantizing"))
        back = glmkit.load_model(out)
        monkeypatch.undo()
        assert isinstance(back.wte, QuantizedEmbedding) and (back.lm_head is back.wte) == tied
        with torch.no_grad():
            torch.testing.assert_close(back(IDS), model(IDS), rtol=0, atol=0)


def test_head_options_and_bad_input(tmp_path):
    assert Q.head_spec(None) == Q.head_spec("int8") == {"bits": 8, "scheme": "rowwise", "group_size": None,
                                                        "symmetric": True}
    assert Q.head_spec("int4") == {"bits": 4, "scheme": "group", "group_size": 32, "symmetric": False}
    assert Q.head_spec("none") is None
    with pytest.raises(ValueError, match="head must be one of"):
        Q.head_spec("int2")
    folder = folder_of(tmp_path, tied=True)
    with pytest.raises(ValueError, match="head must be one of"):
        glmkit.load_model(folder, quantize="int4", quantize_head="fp8")
    with pytest.raises(ValueError, match="quantize_head= applies when quantizing"):
        glmkit.load_model(folder, quantize_head="int4")
    assert Q.head_spec(None, bits=8) is None  # INT8 layers keep the head in floating point, as quantize(8) does
    assert Q.head_spec(None, bits=4) == Q.head_spec("int8")
    assert isinstance(glmkit.load_model(folder, quantize="int8").lm_head, torch.nn.Linear)
    model = glmkit.load_model(folder, quantize="int8", quantize_head="int8")  # the opt-in
    with pytest.raises(ValueError, match="already quantized"):
        Q.quantize_head(model, "int8")
    with pytest.raises(RuntimeError, match="before its weights were loaded"):
        QuantizedEmbedding(10, 64)(torch.tensor([1]))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.get_device_capability() < (8, 0),
                    reason="needs a CUDA GPU with compute capability 8.0+ (torch's INT4 kernel); not run here")
def test_cuda_bf16_model_takes_the_int4_kernel_and_matches_cpu(tmp_path):
    folder = folder_of(tmp_path, tied=True)
    cpu = glmkit.load_model(folder, quantize="int4", dtype=torch.bfloat16)
    gpu = glmkit.load_model(folder, quantize="int4", dtype=torch.bfloat16, device="cuda")
    assert gpu.h[0].mlp.fc.layout == "tinygemm" and gpu.h[0].mlp.fc.qweight.is_cuda
    assert gpu.lm_head is gpu.wte and gpu.wte.layout == "int8" and gpu.wte.qweight.is_cuda
    with torch.no_grad():
        assert rel_err(gpu(IDS.cuda()).float().cpu(), cpu(IDS).float()) < 3e-2
    tokens = gpu.generate(IDS, max_new_tokens=4, eos_token_id=[])
    assert tokens.shape == (1, 4)
    torch.testing.assert_close(gpu.h[0].mlp.fc.dequantized_weight().cpu(), cpu.h[0].mlp.fc.dequantized_weight())
    back = gpu.cpu()
    assert back.h[0].mlp.fc.layout == "int4pack" or kernels_missing()


def kernels_missing() -> bool:
    from glmkit.quant import kernels

    return kernels.int4pack_block_n() is None


def test_quantize_command_head_option(tmp_path, capsys):
    from glmkit.commands.quantize import cli_main as quantize_command

    folder = folder_of(tmp_path, tied=True)
    assert quantize_command([str(folder), str(tmp_path / "h4"), "--bits", "4", "--head", "int4"]) == 0
    assert "output layer int4" in capsys.readouterr().out
    model = glmkit.load_model(tmp_path / "h4")
    assert model.lm_head is model.wte and model.wte.bits == 4 and model.wte.scheme == "group"
    assert quantize_command([str(folder), str(tmp_path / "hn"), "--bits", "8", "--head", "none"]) == 0
    model = glmkit.load_model(tmp_path / "hn")
    assert type(model.wte) is nn.Embedding and model.lm_head.weight is model.wte.weight
    with pytest.raises(SystemExit):
        quantize_command([str(folder), str(tmp_path / "x"), "--bits", "4", "--head", "int2"])


def test_chatglm2_layout_output_layer_saves_and_loads_back(tmp_path):
    """ChatGLM2/3 and GLM-4 keep a separate output layer (transformer.output_layer): quantized as its own
    QuantizedLinear beside the quantized embedding, written under THUDM's names and read back as they were."""
    from tests.helpers.checkpoints import CHATGLM_V2_HF, thudm_v2_state_dict

    hf = dict(CHATGLM_V2_HF, ffn_hidden_size=96)  # INT4 groups of 32 need in_features divisible by 32
    folder = write_folder(tmp_path / "v2", hf, thudm_v2_state_dict(hf, std=0.1), fmt="safetensors")
    ids = torch.tensor([[5, 6, 7, 8, 9, 10]])
    model = glmkit.load_model(folder, quantize="int4")
    assert isinstance(model.wte, QuantizedEmbedding) and type(model.lm_head) is QuantizedLinear
    with torch.no_grad():  # this random model is chaotic: INT4 layers alone 0.219, with the INT8 head 0.220
        float_logits = glmkit.load_model(folder)(ids)
        layers_only = rel_err(glmkit.load_model(folder, quantize="int4", quantize_head="none")(ids), float_logits)
        assert rel_err(model(ids), float_logits) < 1.05 * layers_only
    out = Q.save_quantized(model, tmp_path / "v2-q4")
    from safetensors import safe_open

    with safe_open(str(out / "model.safetensors"), framework="pt") as f:
        keys = set(f.keys())
    assert {"transformer.output_layer.weight", "transformer.embedding.word_embeddings.weight"} <= keys
    back = glmkit.load_model(out)
    with torch.no_grad():
        torch.testing.assert_close(back(ids), model(ids), rtol=0, atol=0)
