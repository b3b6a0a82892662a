"""Sampling functions and the streaming loop's contracts."""

from __future__ import annotations

import torch

from glmkit.core.generate import apply_repetition_penalty, invalid_score_guard, sample, warp


def test_greedy_and_temperature_zero():
    scores = torch.tensor([[0.1, 2.0, 0.3], [5.0, -1.0, 0.0]])
    assert sample(scores).tolist() == [1, 0]
    assert sample(scores, do_sample=True, temperature=0).tolist() == [1, 0]


def test_top_k_keeps_k_best():
    scores = torch.tensor([[1.0, 4.0, 3.0, 2.0]])
    out = warp(scores, top_k=2)
    assert torch.isinf(out[0, [0, 3]]).all() and torch.isfinite(out[0, [1, 2]]).all()


def test_top_p_matches_transformers_semantics():
    transformers = __import__("pytest").importorskip("transformers")
    from transformers.generation.logits_process import TopPLogitsWarper

    g = torch.Generator().manual_seed(0)
    for p in (0.1, 0.5, 0.9):
        scores = torch.randn(4, 50, generator=g)
        ref = TopPLogitsWarper(p)(None, scores.clone())
        assert torch.equal(torch.isinf(warp(scores, top_p=p)), torch.isinf(ref))


def test_top_p_always_keeps_one_token():
    out = warp(torch.tensor([[0.0, 10.0, 0.0]]), top_p=0.0)
    assert torch.isfinite(out).sum() == 1 and torch.isfinite(out[0, 1])


def test_repetition_penalty_matches_transformers():
    transformers = __import__("pytest").importorskip("transformers")
    from transformers.generation.logits_process import RepetitionPenaltyLogitsProcessor

    ids = torch.tensor([[1, 3, 3, 0]])
    scores = torch.tensor([[1.0, -2.0, 0.5, 3.0, -1.0]])
    ref = RepetitionPenaltyLogitsProcessor(1.3)(ids, scores.clone())
    torch.testing.assert_close(apply_repetition_penalty(ids, scores, 1.3), ref)


def test_seeded_sampling_is_reproducible_and_respects_filters():
    scores = torch.randn(1, 100, generator=torch.Generator().manual_seed(1))
    picks = [int(sample(scores, do_sample=True, top_k=3, generator=torch.Generator().manual_seed(s))) for s in range(30)]
    allowed = set(torch.topk(scores, 3).indices[0].tolist())
    assert set(picks) <= allowed and len(set(picks)) > 1
    again = [int(sample(scores, do_sample=True, top_k=3, generator=torch.Generator().manual_seed(s))) for s in range(30)]
    assert picks == again


def test_invalid_score_guard():
    scores = torch.tensor([[0.0, float("nan"), 1.0, 2.0, 3.0, 4.0, 5.0]])
    out = invalid_score_guard(None, scores)
    assert out.argmax().item() == 5 and out[0, 5] == 5e4
    ok = torch.tensor([[0.0, 1.0]])
    assert torch.equal(invalid_score_guard(None, ok), ok)


def test_generate_rejects_bad_arguments(chatglm_v2_dir):
    import pytest

    import glmkit

    model = glmkit.load_model(chatglm_v2_dir)
    with pytest.raises(ValueError, match="temperature"):
        model.generate(torch.tensor([[64, 65, 5]]), max_new_tokens=2, temperature=-1)
    with pytest.raises(ValueError, match="non-empty"):
        model.generate(torch.zeros(1, 0, dtype=torch.long), max_new_tokens=2)
    assert model.generate(torch.tensor([[64, 65, 5]]), max_length=2).shape == (1, 0)


def test_beam_search_matches_transformers(tmp_path):
    import pytest

    transformers = pytest.importorskip("transformers")
    import glmkit
    from glmkit.core.generate import beam_search

    torch.manual_seed(0)
    cfg = transformers.GlmConfig(vocab_size=60, hidden_size=32, intermediate_size=40, num_hidden_layers=2,
                                 num_attention_heads=4, num_key_value_heads=2, head_dim=8, pad_token_id=0,
                                 eos_token_id=[1])
    ref = transformers.GlmForCausalLM(cfg).eval()
    for p in ref.parameters():
        torch.nn.init.normal_(p, std=0.3)
    ref.save_pretrained(tmp_path / "m")
    ours = glmkit.load_model(tmp_path / "m")
    for seed in range(3):
        ids = torch.randint(2, 60, (1, 6), generator=torch.Generator().manual_seed(seed))
        theirs = ref.generate(ids, num_beams=3, do_sample=False, max_new_tokens=8, eos_token_id=1,
                              pad_token_id=0)[0, 6:].tolist()
        mine = beam_search(ours, ids, num_beams=3, max_new_tokens=8, eos_token_id=1, pad_token_id=0)[0].tolist()
        while theirs and theirs[-1] == 0 and len(theirs) > len(mine):
            theirs.pop()
        assert mine == theirs[: len(mine)] and len(mine) == len(theirs)


def test_beam_search_with_one_beam_is_greedy(chatglm_v1_dir):
    import glmkit
    from glmkit.core.generate import beam_search

    model = glmkit.load_model(chatglm_v1_dir)
    ids = torch.tensor([[5, 6, 7, 151, 154]])
    assert beam_search(model, ids, num_beams=1, max_new_tokens=6, eos_token_id=[]).tolist() == \
        model.generate(ids, max_new_tokens=6, eos_token_id=[]).tolist()


def test_presence_and_frequency_penalties_are_openais():
    from glmkit.core.generate import apply_presence_frequency_penalty

    generated = torch.tensor([[2, 2, 4], [0, 1, 1]])
    scores = torch.tensor([[1.0, 1.0, 1.0, 1.0, 1.0], [0.0, -1.0, 2.0, 3.0, 4.0]])
    out = apply_presence_frequency_penalty(generated, scores, presence=0.5, frequency=0.25)
    want = scores.clone()
    for b, row in enumerate(generated.tolist()):  # OpenAI's formula, token by token
        for t in set(row):
            want[b, t] -= 0.25 * row.count(t) + 0.5
    torch.testing.assert_close(out, want)
    assert apply_presence_frequency_penalty(generated, scores, 0.0, 0.0) is scores


def test_penalties_count_the_answer_not_the_prompt(chatglm_v2_dir):
    """generate_stream with penalties equals a plain loop that subtracts them over the generated tokens only."""
    from glmkit.core.generate import generate
    from glmkit.loading.loader import load_model

    model = load_model(chatglm_v2_dir, dtype="float32").eval()
    prompt = [5, 9, 9, 9, 11]
    out = generate(model, torch.tensor([prompt]), max_new_tokens=12, frequency_penalty=1.5, presence_penalty=0.7,
                   eos_token_id=[])[0].tolist()
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(12):
            logits = model(torch.tensor([ids]))[0, -1].float()
            for t in set(ids[len(prompt):]):
                logits[t] -= 1.5 * ids[len(prompt):].count(t) + 0.7
            ids.append(int(logits.argmax()))
    assert out == ids[len(prompt):]
    plain = generate(model, torch.tensor([prompt]), max_new_tokens=12, eos_token_id=[])[0].tolist()
    assert plain != out  # the penalties changed the greedy answer of this model
