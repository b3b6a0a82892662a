"""GLM-130B's architecture and prompt rules in glmkit's one model file (the original's numbers are checked in
tests/loading/test_glm130b_loading.py): GeGLU gating the second half, rotary over the whole head, the generation
mask order [MASK] > [sMASK] > [gMASK] (the reverse of ChatGLM-6B's), frozen positions while generating."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from glmkit.core.causal_lm import GLMForCausalLM
from glmkit.core.config import GLMConfig
from glmkit.core.model import GLM

MASK, GMASK, SMASK, SOP, EOP, EOS = 150000, 150001, 150002, 150004, 150005, 20002


def tiny(**kw) -> GLM:
    config = GLMConfig.from_name("glm-130b", hidden_size=16, num_layers=2, num_heads=2, ffn_hidden_size=24,
                                 max_seq_len=64, torch_dtype="float32", rope_fp16="inv_freq", **kw)
    model = GLMForCausalLM(config)
    model.init_weights(std=0.3, generator=torch.Generator().manual_seed(0))
    return model.eval()


def test_preset_is_glm130b_as_published():
    c = GLMConfig.from_name("glm-130b")
    assert (c.num_layers, c.hidden_size, c.num_heads, c.ffn_hidden_size, c.vocab_size) == (70, 12288, 96, 32768,
                                                                                        150528)
    assert c.deepnorm_alpha == math.sqrt(140) and c.rotary_dim == 128 and c.tie_word_embeddings


def test_geglu_activates_the_second_half():
    model = tiny()
    mlp = model.h[0].mlp
    x = torch.randn(3, 16)
    h = mlp.fc(x)
    expected = mlp.proj(h[:, :24] * F.gelu(h[:, 24:]))  # exact (erf) GELU on x2, x1 passes
    torch.testing.assert_close(mlp(x), expected)


def test_rotary_rotates_the_whole_head_in_half_split_layout():
    model = tiny()
    cos, _ = model.rotary.cos_sin(torch.tensor([[0, 3]]))
    assert cos.shape == (1, 2, 8)
    assert torch.equal(cos[0, 0], torch.ones(8)) and torch.equal(cos[..., :4], cos[..., 4:])


def rows(model, *seqs):
    return [model.default_position_ids(torch.tensor([s]))[0].tolist() for s in seqs]


def test_generation_mask_order_is_mask_then_smask_then_gmask():
    model = tiny()
    a = [20100, 20101, 20102]
    assert rows(model, a + [GMASK, SOP, 20103]) == [[0, 1, 2, 3, 4, 5]]  # [gMASK]: positions keep counting
    assert rows(model, a + [MASK, EOS, SOP, 20103]) == [[0, 1, 2, 3, 4, 3, 3]]  # frozen at [MASK]
    # [gMASK] earlier and [sMASK] later: [sMASK] is generated, positions freeze at it
    assert rows(model, [GMASK] + a + [SMASK, SOP]) == [[0, 1, 2, 3, 4, 4]]
    # [sMASK] and [MASK]: [MASK] first
    assert rows(model, [SMASK, 20100, MASK, SOP]) == [[0, 1, 2, 2]]
    assert rows(model, a + [MASK]) == [[0, 1, 2, 3]]  # no sop: nothing to freeze
    frozen = model.frozen_position_rows(torch.tensor([a + [GMASK, SOP], a + [MASK, SOP]]))
    assert frozen.tolist() == [False, True]
    # ChatGLM-6B keeps its own gMASK-first rule
    chatglm = GLM(GLMConfig.from_name("chatglm-6b", hidden_size=16, num_layers=1, num_heads=2, ffn_hidden_size=16,
                                      vocab_size=130528))
    pos = chatglm.default_position_ids(torch.tensor([[5, 130000, 6, 130001, 130004, 7]]))
    assert pos[0, 0].tolist() == [0, 1, 2, 3, 3, 3]


def test_prefix_is_bidirectional_up_to_sop_and_left_padding_is_skipped():
    model = tiny()
    ids = torch.tensor([[0, 0, 20100, MASK, SOP, 20101], [20100, 20102, 20103, MASK, SOP, 20101]])
    am = torch.tensor([[0, 0, 1, 1, 1, 1], [1] * 6])
    mask = model.default_attention_mask(ids, am)[:, 0]
    assert mask[1, 0].tolist() == [True, True, True, True, False, False]  # everything before sop sees the prefix
    assert mask[1, 4].tolist() == [True] * 5 + [False]
    assert model.default_position_ids(ids, am).tolist() == [[0, 0, 0, 1, 1, 1], [0, 1, 2, 3, 3, 3]]


def test_generated_tokens_keep_the_frozen_position():
    """Greedy decoding with the KV cache equals decoding by full recomputation with glmkit's default positions
    (every new token at the [MASK]'s index), and rows of a left-padded batch get what they get alone."""
    model = tiny()
    prompts = [[20100, 20101, MASK, 20102, EOS, SOP], [20105, GMASK, SOP]]
    alone = [model.generate(torch.tensor([p]), max_new_tokens=5, eos_token_id=[]) for p in prompts]
    no_cache = model.generate(torch.tensor([prompts[0]]), max_new_tokens=5, eos_token_id=[], use_cache=False)
    assert torch.equal(alone[0], no_cache)
    batch = torch.tensor([prompts[0], [0, 0, 0] + prompts[1]])
    am = torch.tensor([[1] * 6, [0, 0, 0, 1, 1, 1]])
    out = model.generate(batch, am, max_new_tokens=5, eos_token_id=[])
    assert torch.equal(out[0], alone[0][0]) and torch.equal(out[1], alone[1][0])
