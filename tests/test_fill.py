"""`glmkit fill`: blanks filled left to right with GLM's Part A / Part B layout, through glmkit.generate."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from glmkit.fill import _BlankView, _encode_piece, cli_main, fill

POEMS = ["床前明月光，疑是地上霜。\n舉頭望明月，低頭思故鄉。", "白日依山盡，黃河入海流。\n欲窮千里目，更上一層樓。",
         "Call me Ishmael. Some years ago, never mind how long precisely, I thought I would sail about a little.",
         "春眠不覺曉，處處聞啼鳥。\n夜來風雨聲，花落知多少。"]
BUNDLED = Path(__file__).resolve().parents[1] / "glmkit" / "assets" / "glm-tiny"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A random tiny ChatGLM-6B-layout model + tokenizer, saved and loaded through glmkit's own loader."""
    from glmkit.config import GLMConfig
    from glmkit.loader import load_model, save_model
    from glmkit.model import GLM
    from glmkit.tokenizer import load_tokenizer, train_tokenizer

    root = tmp_path_factory.mktemp("fill")
    rows = [f"{p}（{i}）" for i in range(40) for p in POEMS]
    (root / "c.jsonl").write_text("".join(json.dumps({"text": t}, ensure_ascii=False) + "\n" for t in rows),
                                  encoding="utf-8")
    tok = train_tokenizer([root / "c.jsonl"], 480, "chatglm", root / "tok")
    config = GLMConfig.from_name("chatglm-6b", vocab_size=len(tok), hidden_size=32, num_layers=2, num_heads=2,
                                 ffn_hidden_size=64, max_seq_len=256, bos_token_id=tok.sop_token_id,
                                 eos_token_id=tok.eop_token_id, pad_token_id=tok.pad_token_id,
                                 mask_token_id=tok.mask_token_id, gmask_token_id=tok.gmask_token_id,
                                 torch_dtype="float32")
    model = GLM(config)
    model.init_weights(std=0.5, generator=torch.Generator().manual_seed(0))  # peaky logits: greedy is stable
    save_model(model, root / "model", tokenizer=tok)
    loaded = load_model(root / "model", dtype="float32").eval()
    return loaded, load_tokenizer(root / "model"), root / "model"


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
    from glmkit.loader import load_model
    from glmkit.tokenizer import load_tokenizer

    model = load_model("glm-tiny", dtype="float32").eval()
    tok = load_tokenizer("glm-tiny")
    res = fill(model, tok, "床前明月[MASK]，疑是地上霜。", max_new_tokens=8)
    assert res.answers[0] and res.text.startswith("床前明月") and res.text.endswith("，疑是地上霜。")
