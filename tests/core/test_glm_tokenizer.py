"""The original GLM's tokenizers (GLMChineseTokenizer over cog-pretrain.model, GLMGPT2Tokenizer over GPT-2 BPE) against
the hub's tokenization_glm.py: ids, pieces and decodes of ~80 texts per tokenizer, written by that code under
transformers 4.26.1 (tests/data/glm/make_golden.py; 4.27.1 and 4.30.2 give the same)."""

from __future__ import annotations

import json
import shutil

import pytest

import glmkit
from glmkit.core.tokenizer import GLMChineseTokenizer, GLMGPT2Tokenizer, TokenizerError, load_tokenizer
from tests.helpers.goldens import GLM_DATA, glm_golden

FIXTURES = ("chinese", "gpt2")


def _rows(fixture):
    return [(fixture, i) for i in range(len(glm_golden()["fixtures"][fixture]["tokenizer"]))]


@pytest.fixture(scope="module")
def toks():
    return {name: load_tokenizer(GLM_DATA / name) for name in FIXTURES}


def test_classes_and_special_ids(toks):
    assert isinstance(toks["chinese"], GLMChineseTokenizer) and isinstance(toks["gpt2"], GLMGPT2Tokenizer)
    for name, tok in toks.items():
        golden = glm_golden()["fixtures"][name]
        for attr, value in golden["special_ids"].items():
            assert getattr(tok, attr) == value, attr
        assert len(tok) == golden["len"] and tok.family == "glm"
        assert tok.vocab_size == len(tok) - len(tok.added_tokens_encoder)  # the hub's: the base vocabulary
    # the Chinese numbering of glm-large-chinese's files: <|endoftext|> first after the pieces, [gMASK] last
    zh = toks["chinese"]
    n = zh.sp.GetPieceSize()
    assert (zh.eos_token_id, zh.cls_token_id, zh.mask_token_id, zh.sop_token_id, zh.eop_token_id,
            zh.smask_token_id, zh.gmask_token_id) == (n, n + 2, n + 3, n + 6, n + 7, n + 8, n + 9)
    assert zh.mask_token_ids == [zh.mask_token_id, zh.smask_token_id, zh.gmask_token_id]


@pytest.mark.parametrize("fixture,i", _rows("chinese") + _rows("gpt2"))
def test_ids_and_decodes_match_the_hub_tokenizer(toks, fixture, i):
    row = glm_golden()["fixtures"][fixture]["tokenizer"][i]
    tok = toks[fixture]
    text = row["text"]
    if "error" in row:  # the original cannot encode it either
        with pytest.raises(KeyError):
            tok.encode(text)
        return
    assert tok.encode(text) == row["ids"]
    assert tok(text)["input_ids"] == row["ids"]
    assert tok.encode(text, add_special_tokens=False) == row["ids_no_special"]
    assert tok.tokenize(text) == row["tokens"]
    assert tok.decode(row["ids"]) == row["decoded"]
    assert tok.decode(row["ids"], skip_special_tokens=True) == row["decoded_skip"]


def test_batches_pad_on_the_right_as_the_hub_tokenizer(toks):
    tok = toks["gpt2"]
    out = tok(["Hello world", "a"], return_tensors="pt")
    short = tok.encode("a")
    assert out["input_ids"][1].tolist() == short + [tok.pad_token_id] * (out["input_ids"].shape[1] - len(short))
    assert out["attention_mask"][1].tolist()[: len(short)] == [1] * len(short)


def test_decode_rejects_ids_past_the_vocabulary(toks):
    with pytest.raises(IndexError, match="outside this GLM tokenizer's vocabulary"):
        toks["chinese"].decode([5, len(toks["chinese"]) + 3])


def test_save_pretrained_round_trip(tmp_path, toks):
    for name, tok in toks.items():
        out = tmp_path / name
        tok.save_pretrained(out)
        again = load_tokenizer(out)
        assert type(again) is type(tok)
        assert json.loads((out / "added_tokens.json").read_text()) == tok.added_tokens_encoder
        for row in glm_golden()["fixtures"][name]["tokenizer"][:40]:
            if "error" not in row:
                assert again.encode(row["text"]) == row["ids"]
                assert again.decode(row["ids"]) == row["decoded"]


def test_public_loader_and_clear_errors(tmp_path):
    assert isinstance(glmkit.load_tokenizer(str(GLM_DATA / "chinese")), GLMChineseTokenizer)
    gap = tmp_path / "gap"
    shutil.copytree(GLM_DATA / "chinese", gap)
    added = json.loads((gap / "added_tokens.json").read_text())
    added["[gMASK]"] += 5
    (gap / "added_tokens.json").write_text(json.dumps(added))
    with pytest.raises(TokenizerError, match="non-consecutive added token '\\[gMASK\\]'"):
        load_tokenizer(gap)
    bert = tmp_path / "bert"
    shutil.copytree(GLM_DATA / "gpt2", bert)
    cfg = json.loads((bert / "tokenizer_config.json").read_text())
    (bert / "tokenizer_config.json").write_text(json.dumps({**cfg, "tokenizer_class": "GLMBertTokenizer"}))
    with pytest.raises(TokenizerError, match="GLMBertTokenizer"):
        load_tokenizer(bert)
    with pytest.raises(ValueError, match="original GLM tokenizer"):
        load_tokenizer(GLM_DATA / "gpt2", family="chatglm2")
    no_merges = tmp_path / "no_merges"
    shutil.copytree(GLM_DATA / "gpt2", no_merges)
    (no_merges / "merges.txt").unlink()
    with pytest.raises(FileNotFoundError, match="merges.txt"):
        load_tokenizer(no_merges)
