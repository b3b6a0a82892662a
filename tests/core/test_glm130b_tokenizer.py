"""GLM-130B's tokenizer (icetk text ids + 20000, SAT's command ids from 150000), on a stand-in ice_text.model
(glm-tiny's: the real one is icetk's 130000-piece model, fetched by icetk from the network)."""

from __future__ import annotations

import json
import shutil

import pytest
import sentencepiece as spm

from glmkit.core.tokenizer import GLM130BTokenizer, load_tokenizer
from tests.helpers.common import REPO

ICE = REPO / "glmkit" / "assets" / "glm-tiny" / "ice_text.model"
MASK, GMASK, SMASK, SOP, EOP, EOS = 150000, 150001, 150002, 150004, 150005, 20002


@pytest.fixture(scope="module")
def tok():
    return GLM130BTokenizer(ICE)


def sp_ids(text):
    return [i + 20000 for i in spm.SentencePieceProcessor(model_file=str(ICE)).encode(text)]


def test_text_ids_are_sentencepiece_ids_plus_the_image_offset(tok):
    assert tok.text_ids("the cat runs") == sp_ids("the cat runs")
    assert tok.decode(sp_ids("the cat runs")) == "the cat runs"
    assert (tok.eos_token_id, tok.pad_token_id, tok.sop_token_id, tok.eop_token_id) == (EOS, 0, SOP, EOP)
    assert [tok.get_command(n) for n in ("[MASK]", "[gMASK]", "[sMASK]", "eod", "sop", "eop", "ENC", "dBLOCK")] == \
        list(range(150000, 150008))
    assert tok.vocab_size == 150008


def test_prompts_are_framed_as_generate_py_frames_them(tok):
    """fill_blanks: text split at the masks; [gMASK] appended when there is none (no eos then); eos when the text
    does not end with a mask; then sop."""
    assert tok.encode("the cat") == sp_ids("the cat") + [GMASK, SOP]
    assert tok.encode("the cat [MASK] home") == sp_ids("the cat ") + [MASK] + sp_ids(" home") + [EOS, SOP]
    assert tok.encode("the cat [sMASK]") == sp_ids("the cat ") + [SMASK, SOP]
    assert tok.encode("a [gMASK] b [MASK]", add_special_tokens=False) == (
        sp_ids("a ") + [GMASK] + sp_ids(" b ") + [MASK])


def test_decode_writes_commands_as_sat_detokenize_does(tok):
    ids = tok.encode("the cat [MASK] home")
    assert tok.decode(ids) == "the cat [[MASK]] home[</s>][sop]"
    assert tok.decode(ids, skip_special_tokens=True) == "the cat  home"
    assert tok.decode([5]) == "<image_5>"
    assert tok.token_bytes(EOP) == b""


def test_load_tokenizer_knows_a_glm130b_folder(tmp_path):
    sat = tmp_path / "sat"
    sat.mkdir()
    shutil.copy(ICE, sat / "ice_text.model")
    (sat / "model_config.json").write_text(json.dumps({"model_class": "GLM130B"}))
    assert isinstance(load_tokenizer(sat), GLM130BTokenizer)
    plain = tmp_path / "plain"
    plain.mkdir()
    shutil.copy(ICE, plain / "ice_text.model")
    assert not isinstance(load_tokenizer(plain), GLM130BTokenizer)  # ChatGLM-6B's reading of the same file
    assert isinstance(load_tokenizer(plain, family="glm130b"), GLM130BTokenizer)
    with pytest.raises(FileNotFoundError, match="icetk"):
        load_tokenizer(tmp_path / "sat" / "..", family="glm130b")
