"""`glmkit fill`: blanks filled left to right with GLM's Part A / Part B layout, through glmkit.core.generate."""

from __future__ import annotations

import pytest
import torch

from glmkit.commands.fill import cli_main
from glmkit.core.fill import _BlankView, _encode_piece, fill
from tests.helpers.chat_models import tiny_chatglm_with_tokenizer
from tests.helpers.common import REPO

BUNDLED = REPO / "glmkit" / "assets" / "glm-tiny"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A random tiny ChatGLM-6B-layout model + tokenizer, saved and loaded through glmkit's own loader."""
    root = tmp_path_factory.mktemp("fill")
    # peaky logits: greedy is stable
    return tiny_chatglm_with_tokenizer(root, std=0.5, seed=0)


def manual_greedy(model, ids: list[int], mask_pos: int, n: int, eop: int) -> list[int]:
    """Greedy decoding written out with explicit 2D positions and the prefix-LM mask, no KV cache."""
    ctx = len(ids) - 1  # index of <sop>
    out: list[int] = []
    for _ in range(n):
        seq = ids + out
        T = len(seq)
        pos = torch.tensor([list(range(ctx)) + [mask_pos] * (T - ctx), [0] * ctx + list(range(1, T - ctx + 1))])
        mask = torch.ones(T, T, dtype=torch.bool).tril()
        mask[:, :ctx] = True
        with torch.no_grad():
            logits = model(torch.tensor([seq]), position_ids=pos[None], attention_mask=mask[None, None])
        nxt = int(logits[0, -1].argmax())
        if nxt == eop:
            break
        out.append(nxt)
    return out


def test_mask_blank_matches_explicit_layout(tiny):
    model, tok, _ = tiny
    res = fill(model, tok, "床前明月[MASK]，疑是地上霜。", max_new_tokens=4)
    head = _encode_piece(tok, "床前明月", first=True)
    tail = _encode_piece(tok, "，疑是地上霜。", first=False)
    ids = head + [tok.mask_token_id] + tail + [tok.sop_token_id]
    expected = manual_greedy(model, ids, len(head), 4, tok.eop_token_id)
    assert res.answers == [tok.decode(expected)]
    assert res.text == "床前明月" + res.answers[0] + "，疑是地上霜。"


def test_blanks_are_filled_left_to_right_at_their_own_positions(tiny):
    model, tok, _ = tiny
    # The [sMASK] sits left of a [gMASK]: ChatGLM-6B's default rule would freeze Part B at the [gMASK].
    text = "白日[sMASK]黃河入海流。[MASK]千里目，[gMASK]"
    res = fill(model, tok, text, max_new_tokens=3, gmask_max_new_tokens=3)
    assert len(res.answers) == 3
    segs = [_encode_piece(tok, s, first=i == 0) for i, s in enumerate(["白日", "黃河入海流。", "千里目，"])]
    # first blank: later blanks are still masks
    ids = segs[0] + [tok.smask_token_id] + segs[1] + [tok.mask_token_id] + segs[2] + [tok.gmask_token_id]
    first = manual_greedy(model, ids + [tok.sop_token_id], len(segs[0]), 3, tok.eop_token_id)
    assert res.answers[0] == tok.decode(first)
    # second blank: the first one is filled in with its generated ids
    ids2 = segs[0] + first + segs[1]
    pos2 = len(ids2)
    ids2 += [tok.mask_token_id] + segs[2] + [tok.gmask_token_id, tok.sop_token_id]
    second = manual_greedy(model, ids2, pos2, 3, tok.eop_token_id)
    assert res.answers[1] == tok.decode(second)
    assert "[MASK]" not in res.text and "[sMASK]" not in res.text and "[gMASK]" not in res.text
    assert res.text.startswith("白日" + res.answers[0] + "黃河入海流。")


def test_no_blank_means_continue(tiny):
    model, tok, _ = tiny
    res = fill(model, tok, "春眠不覺曉，", gmask_max_new_tokens=3)
    ids = _encode_piece(tok, "春眠不覺曉，", first=True)
    expected = manual_greedy(model, ids + [tok.gmask_token_id, tok.sop_token_id], len(ids), 3, tok.eop_token_id)
    assert res.answers == [tok.decode(expected)]
    assert res.text == "春眠不覺曉，" + res.answers[0]


def test_blank_view_positions(tiny):
    model, tok, _ = tiny
    ids = torch.tensor([[5, 6, tok.smask_token_id, 7, tok.mask_token_id, tok.sop_token_id, 8, 9]])
    pos = _BlankView(model, 2).default_position_ids(ids)
    assert pos[0, 0].tolist() == [0, 1, 2, 3, 4, 2, 2, 2]
    assert pos[0, 1].tolist() == [0, 0, 0, 0, 0, 1, 2, 3]


def test_sampling_is_seeded(tiny):
    model, tok, _ = tiny
    a = fill(model, tok, "舉頭[MASK]", max_new_tokens=4, do_sample=True, top_p=0.9, seed=3)
    b = fill(model, tok, "舉頭[MASK]", max_new_tokens=4, do_sample=True, top_p=0.9, seed=3)
    assert a == b


def test_cli(tiny, capsys):
    _, _, folder = tiny
    assert cli_main(["床前明月[MASK]，疑是地上霜。", "--model", str(folder), "--max-new-tokens", "3",
                     "--show-blanks"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("床前明月") and out[0].endswith("，疑是地上霜。") and out[1].startswith("[1] ")
    assert cli_main(["x", "--model", str(folder / "missing")]) == 2


@pytest.mark.skipif(not (BUNDLED / "config.json").exists(), reason="the bundled glm-tiny is not built yet")
def test_bundled_model_fills():
    from glmkit.core.tokenizer import load_tokenizer
    from glmkit.loading.loader import load_model

    model = load_model("glm-tiny", dtype="float32").eval()
    tok = load_tokenizer("glm-tiny")
    res = fill(model, tok, "床前明月[MASK]，疑是地上霜。", max_new_tokens=8)
    assert res.answers[0] and res.text.startswith("床前明月") and res.text.endswith("，疑是地上霜。")


def test_max_new_tokens_caps_every_blank_gmask_included(tiny):
    """fill(max_new_tokens=N) stops a [gMASK] blank at N, as the original's generate(max_length=len(ids) + N) does;
    gmask_max_new_tokens is only an explicit override, and with neither a [gMASK] blank keeps its longer default."""
    model, tok, _ = tiny
    ids = _encode_piece(tok, "春眠不覺曉，", first=True)
    prompt = ids + [tok.gmask_token_id, tok.sop_token_id]
    longest = manual_greedy(model, prompt, len(ids), 70, tok.eop_token_id)
    assert len(longest) > 64, "the fixture must write past the caps checked here"
    for text in ("春眠不覺曉，", "春眠不覺曉，[gMASK]"):
        assert fill(model, tok, text, max_new_tokens=5).answers == [tok.decode(longest[:5])]
    assert fill(model, tok, "春眠不覺曉，", max_new_tokens=5, gmask_max_new_tokens=7).answers == [tok.decode(longest[:7])]
    assert fill(model, tok, "春眠不覺曉，").answers[0].startswith(tok.decode(longest[:66]))  # default: 128 for [gMASK]
    with pytest.raises(ValueError, match="max_new_tokens"):
        fill(model, tok, "春眠不覺曉，", max_new_tokens=0)


def test_cli_max_new_tokens_caps_a_gmask_blank(tiny, capsys):
    model, tok, folder = tiny
    ids = _encode_piece(tok, "春眠不覺曉，", first=True)
    expected = manual_greedy(model, ids + [tok.gmask_token_id, tok.sop_token_id], len(ids), 4, tok.eop_token_id)
    assert len(expected) == 4
    assert cli_main(["春眠不覺曉，", "--model", str(folder), "--max-new-tokens", "4", "--show-blanks"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == "春眠不覺曉，" + tok.decode(expected)
