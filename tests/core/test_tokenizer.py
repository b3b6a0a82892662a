"""Tokenizers the tests train themselves, in each family's published layout (no downloads)."""

from __future__ import annotations

import functools
import hashlib
import json
import re
import time
from collections import Counter
from pathlib import Path

import pytest
import sentencepiece as spm
import torch
from sentencepiece import sentencepiece_model_pb2 as pb

import glmkit
from glmkit.commands.tokenizer import cli_main
from glmkit.core.tokenizer import (
    ChatGLM2Tokenizer,
    ChatGLMTokenizer,
    GLM4Tokenizer,
    TokenizerError,
    load_tokenizer,
    write_tiktoken_ranks,
)
from glmkit.core.tokenizer.base import GLM4_SPECIAL_TOKENS, KEEP_SPACES, STRIP_BOTH, SplitRule, split_on
from glmkit.training.tokenizer import train_tokenizer
from tests.helpers.common import REPO, SHARED_DATA

CORPUS_LINES = [
    "床前明月光，疑是地上霜。举头望明月，低头思故乡。",
    "白日依山尽，黄河入海流。欲穷千里目，更上一层楼。",
    "春眠不觉晓，处处闻啼鸟。夜来风雨声，花落知多少。",
    "你好，我是一个语言模型。今天天气很好，我们去公园散步吧！",
    "人工智能的发展离不开大量的数据和计算资源。",
    "Call me Ishmael. Some years ago, never mind how long precisely, having little money in my purse.",
    "It is a way I have of driving off the spleen and regulating the circulation.",
    "The state of the union is strong, and the people of this nation are its strength.",
    "Hello world! This tokenizer handles English, 中文 and mixed text: 模型 model 123 4567.",
    "def main():\n    print('hello')\n\treturn 0",
]
TEXTS = {
    "chinese": "你好！今天天气很好，我们去公园散步吧。床前明月光，疑是地上霜。",
    "english": "Hello, world! Call me Ishmael; some years ago... Never mind how long.",
    "mixed": "模型 model 的 tokenizer 要处理 mixed 文本：123，4567 and 中文English混排。",
    "whitespace": "a\nb\n\nc\td\t\te  f   g" + " " * 100 + "h\n  \n\t \n" + " " * 161 + "end  ",
    "emoji": "😀 emoji 🤖 测试 👍🏽 ok 🇨🇳",
    "leading_trailing": "  leading and trailing  ",
    "rare_chars": "鱻龘靐 ǅ ẞ ﬃ Ω ½ ½",
    "empty": "",
}


def _corpus(path: Path, copies: int = 30) -> Path:
    rows = [{"text": line} for _ in range(copies) for line in CORPUS_LINES]
    path.write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in rows) + "\n", encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def corpus_file(tmp_path_factory) -> Path:
    return _corpus(tmp_path_factory.mktemp("corpus") / "train.jsonl")


@pytest.fixture(scope="module")
def v1_dir(tmp_path_factory, corpus_file) -> Path:
    out = tmp_path_factory.mktemp("chatglm")
    train_tokenizer([corpus_file], 700, "chatglm", out)
    return out


@pytest.fixture(scope="module")
def v2_dir(tmp_path_factory, corpus_file) -> Path:
    out = tmp_path_factory.mktemp("chatglm2")
    train_tokenizer([corpus_file], 600, "chatglm2", out)
    return out


@pytest.fixture(scope="module")
def v3_dir(tmp_path_factory, corpus_file) -> Path:
    out = tmp_path_factory.mktemp("chatglm3")
    train_tokenizer([corpus_file], 600, "chatglm3", out, model_type="unigram")
    return out


# ---------------------------------------------------------------------------------------------- GLM-4 fixture
def _train_byte_bpe(texts: list[str], n_merges: int) -> dict[bytes, int]:
    """A minimal byte-level BPE (the 256 bytes, then merges by pair frequency within whitespace-split words)."""
    ranks = {bytes([b]): b for b in range(256)}
    words = Counter()
    for t in texts:
        for w in re.findall(r"\s?\S+|\s+", t):
            words[tuple(bytes([b]) for b in w.encode("utf-8"))] += 1
    for _ in range(n_merges):
        pairs = Counter()
        for w, n in words.items():
            for a, b in zip(w, w[1:]):
                pairs[a, b] += n
        if not pairs:
            break
        (a, b), _ = pairs.most_common(1)[0]
        ranks[a + b] = len(ranks)
        merged = Counter()
        for w, n in words.items():
            out, i = [], 0
            while i < len(w):
                if i + 1 < len(w) and w[i] == a and w[i + 1] == b:
                    out.append(a + b)
                    i += 2
                else:
                    out.append(w[i])
                    i += 1
            merged[tuple(out)] += n
        words = merged
    return ranks


@pytest.fixture(scope="module")
def glm4_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("glm4")
    ranks = _train_byte_bpe(CORPUS_LINES * 3, 300)
    write_tiktoken_ranks(ranks, out / "tokenizer.model")
    n = len(ranks)
    config = {
        "added_tokens_decoder": {str(n + i): {"content": t, "special": True} for i, t in enumerate(GLM4_SPECIAL_TOKENS)},
        "eos_token": "<|endoftext|>", "pad_token": "<|endoftext|>", "tokenizer_class": "ChatGLM4Tokenizer",
    }
    (out / "tokenizer_config.json").write_text(json.dumps(config), encoding="utf-8")
    return out


# ---------------------------------------------------------------------------------------------- ChatGLM-6B layout
def _reference_chatglm_ids(model_file: Path, text: str) -> list[int]:
    """ChatGLM-6B's encode written independently: whitespace runs cut into blanks of at most 80 from the left,
    raw SentencePiece, then [gMASK] <sop> (num_image_tokens 0)."""
    sp = spm.SentencePieceProcessor(model_file=str(model_file))

    def blanks(m: re.Match) -> str:
        n, out = len(m.group(0)), ""
        while n >= 2:
            k = min(n, 80)
            out += f"<|blank_{k}|>"
            n -= k
        return out + " " * n

    text = text.replace("\n", "<n>").replace("\t", "<|tab|>")
    text = re.sub(r" {2,}", blanks, text)
    return sp.encode(text) + [sp.piece_to_id("[gMASK]"), sp.piece_to_id("<sop>")]


def test_chatglm_layout_follows_the_published_piece_order(v1_dir):
    proto = pb.ModelProto()
    proto.ParseFromString((v1_dir / "ice_text.model").read_bytes())
    pieces = [(p.piece, p.type) for p in proto.pieces]
    assert [p for p, _ in pieces[:5]] == ["<unk>", "<s>", "</s>", "<pad>", "<n>"]
    tail = pieces[-(8 + 1 + 79 + 256):]
    assert [p for p, _ in tail[:8]] == ["[MASK]", "[gMASK]", "[sMASK]", "<unused_0>", "<sop>", "<eop>", "<ENC>",
                                        "<dBLOCK>"]
    assert all(t == pb.ModelProto.SentencePiece.CONTROL for _, t in tail[:8])
    assert [p for p, _ in tail[8:88]] == ["<|tab|>"] + [f"<|blank_{k}|>" for k in range(2, 81)]
    assert all(t == pb.ModelProto.SentencePiece.USER_DEFINED for _, t in tail[8:88])
    assert [p for p, _ in tail[88:]] == [f"<0x{b:02X}>" for b in range(256)]
    assert proto.trainer_spec.byte_fallback
    cfg = json.loads((v1_dir / "tokenizer_config.json").read_text())
    assert cfg["num_image_tokens"] == 0 and cfg["bos_token"] == "<sop>" and cfg["eos_token"] == "<eop>"


@pytest.mark.parametrize("name", sorted(TEXTS))
def test_chatglm_encode_matches_reference(v1_dir, name):
    tok = load_tokenizer(v1_dir)
    assert isinstance(tok, ChatGLMTokenizer) and tok.family == "chatglm"
    assert tok.encode(TEXTS[name]) == _reference_chatglm_ids(v1_dir / "ice_text.model", TEXTS[name])


@pytest.mark.parametrize("name", sorted(TEXTS))
def test_chatglm_round_trip(v1_dir, name):
    tok = load_tokenizer(v1_dir)
    ids = tok.encode(TEXTS[name])
    assert ids[-2:] == [tok.gmask_token_id, tok.sop_token_id]
    assert tok.decode(ids) == TEXTS[name]  # [gMASK] and <sop> are control pieces: they decode to nothing
    assert tok.decode(ids[:-2] + [tok.eos_token_id, tok.pad_token_id]) == TEXTS[name]


def test_chatglm_whitespace_and_newline_tokens(v1_dir):
    tok = load_tokenizer(v1_dir)
    pieces = tok.tokenize("a\nb\tc    d" + " " * 100 + "e")
    assert "<n>" in pieces and "<|tab|>" in pieces and "<|blank_4|>" in pieces
    assert pieces[-3:-1] == ["<|blank_80|>", "<|blank_20|>"]
    # without the dummy prefix: encoded after "<n>" and the first two pieces dropped
    assert tok.sp_encode("hello", add_dummy_prefix=False) == tok.sp_encode("<n>hello")[2:]
    assert tok.tokenize("hello")[0].startswith("▁")  # SentencePiece's dummy prefix is kept, as the original does


def test_chatglm_special_ids_come_from_the_model(v1_dir):
    tok = load_tokenizer(v1_dir)
    sp = spm.SentencePieceProcessor(model_file=str(v1_dir / "ice_text.model"))
    assert tok.gmask_token_id == sp.piece_to_id("[gMASK]")
    assert tok.mask_token_id == sp.piece_to_id("[MASK]")
    assert tok.smask_token_id == sp.piece_to_id("[sMASK]")
    assert tok.bos_token_id == tok.sop_token_id == sp.piece_to_id("<sop>")
    assert tok.eos_token_id == tok.eop_token_id == sp.piece_to_id("<eop>")
    assert tok.pad_token_id == 3
    assert len(tok) == tok.vocab_size == sp.get_piece_size()
    assert tok.convert_ids_to_tokens(tok.encode("")) == ["[gMASK]", "<sop>"]
    assert tok.get_command("[gMASK]") == tok.gmask_token_id
    with pytest.raises(KeyError, match="role"):
        tok.get_command("<|user|>")


def test_chatglm_num_image_tokens_offsets_every_id(v1_dir, tmp_path):
    tok0 = load_tokenizer(v1_dir)
    (tmp_path / "ice_text.model").write_bytes((v1_dir / "ice_text.model").read_bytes())
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"num_image_tokens": 20000}))
    tok = load_tokenizer(tmp_path)
    text = TEXTS["mixed"]
    assert tok.encode(text) == [i + 20000 for i in tok0.encode(text)]
    assert tok.gmask_token_id == tok0.gmask_token_id + 20000 and len(tok) == len(tok0) + 20000
    assert tok.decode(tok.encode(text)) == text
    assert tok.convert_ids_to_tokens(7) == "<image_7>" and tok.convert_tokens_to_ids("<image_7>") == 7


def test_chatglm_special_strings_in_text_are_split_out(v1_dir):
    tok = load_tokenizer(v1_dir)
    ids = tok.encode("x [MASK] y", add_special_tokens=False)
    assert tok.mask_token_id in ids
    # transformers 4.27 strips the whitespace on both sides of a special token given as a string: "x" and "y" are
    # encoded on their own, each with SentencePiece's dummy prefix.
    assert ids == tok.encode("x", add_special_tokens=False) + [tok.mask_token_id] + tok.encode(
        "y", add_special_tokens=False)


def test_chatglm_decode_skip_special_tokens(v1_dir):
    tok = load_tokenizer(v1_dir)
    ids = tok.encode("你好", add_special_tokens=False)
    assert tok.decode([tok.unk_token_id] + ids, skip_special_tokens=True) == "你好"
    assert "⁇" in tok.decode([tok.unk_token_id] + ids)  # SentencePiece's rendering of <unk>


# ---------------------------------------------------------------------------------------------- ChatGLM2 / 3 layout
@pytest.mark.parametrize("name", sorted(TEXTS))
def test_chatglm2_encode_and_round_trip(v2_dir, name):
    tok = load_tokenizer(v2_dir)
    assert isinstance(tok, ChatGLM2Tokenizer) and tok.family == "chatglm2"
    sp = spm.SentencePieceProcessor(model_file=str(v2_dir / "tokenizer.model"))
    text = TEXTS[name]
    ids = tok.encode(text)
    assert ids == [sp.get_piece_size() + 1, sp.get_piece_size() + 3] + sp.encode(text)
    assert tok.decode(ids) == text
    assert tok.decode(ids + [tok.eos_token_id]) == text  # eos and the command tokens decode to nothing


def test_chatglm2_layout_and_special_ids(v2_dir):
    tok = load_tokenizer(v2_dir)
    sp = spm.SentencePieceProcessor(model_file=str(v2_dir / "tokenizer.model"))
    n = sp.get_piece_size()
    assert [sp.id_to_piece(i) for i in range(3)] == ["<unk>", "<s>", "</s>"]
    assert [sp.id_to_piece(i) for i in (3, 13, 258)] == ["<0x00>", "<0x0A>", "<0xFF>"]  # bytes right after
    assert (tok.mask_token_id, tok.gmask_token_id, tok.smask_token_id, tok.sop_token_id, tok.eop_token_id) == (
        n, n + 1, n + 2, n + 3, n + 4)
    assert tok.eos_token_id == sp.eos_id() == 2 and tok.pad_token_id == sp.unk_id() == 0
    assert len(tok) == n + 5 == 600
    with pytest.raises(KeyError):
        tok.get_command("<|user|>")
    assert "\n" in tok.decode(tok.encode("a\nb"))  # newlines go through byte fallback


def test_chatglm3_role_tokens(v3_dir):
    tok = load_tokenizer(v3_dir)
    assert tok.family == "chatglm3"
    n = tok.sp.get_piece_size()
    roles = [tok.get_command(r) for r in ("<|system|>", "<|user|>", "<|assistant|>", "<|observation|>")]
    assert roles == [n + 5, n + 6, n + 7, n + 8] and len(tok) == n + 9
    ids = [tok.get_command("<|user|>")] + tok.sp_encode("你好")
    assert tok.decode(ids) == "<|user|>你好"
    assert tok.decode(ids, skip_special_tokens=True) == "你好"
    assert load_tokenizer(v3_dir, family="chatglm2").family == "chatglm2"


# ---------------------------------------------------------------------------------------------- GLM-4
@pytest.mark.parametrize("name", sorted(TEXTS))
def test_glm4_round_trip(glm4_dir, name):
    tok = load_tokenizer(glm4_dir)
    assert isinstance(tok, GLM4Tokenizer) and tok.family == "glm4"
    ids = tok.encode(TEXTS[name])
    assert ids[:2] == [tok.gmask_token_id, tok.sop_token_id]
    assert tok.decode(ids, skip_special_tokens=True) == TEXTS[name]
    assert tok.decode(ids) == "[gMASK]<sop>" + TEXTS[name]


def test_glm4_special_tokens_from_config_and_regex(glm4_dir):
    tok = load_tokenizer(glm4_dir)
    n = tok.n_words
    assert tok.eos_token_id == tok.pad_token_id == n  # <|endoftext|>
    assert tok.get_command("<|user|>") == n + 7 and tok.get_command("<|observation|>") == n + 9
    ids = tok.encode("<|user|>\n你好<|assistant|>", add_special_tokens=False)
    assert ids[0] == n + 7 and ids[-1] == n + 8
    assert tok.decode(ids[1:-1]) == "\n你好"
    # the split regex keeps digits in groups of at most three and never merges across "Hello| world"
    digits = tok.tokenize("4567 1234567")
    assert "".join(digits) == "4567 1234567" and all(len(t.strip()) <= 3 for t in digits)
    cuts = [sum(len(t) for t in tok.tokenize("Hello world")[:i]) for i in range(len(tok.tokenize("Hello world")))]
    assert 5 in cuts


# ------------------------------------------------------------------- special-token strings inside text (golden)
GOLDEN = REPO / "tests" / "data" / "special_tokens" / "golden.json"


@functools.cache
def _golden() -> dict:
    """Ids of the ORIGINAL tokenization_chatglm.py files (see the file's header and make_golden.py beside it)."""
    return json.loads(GOLDEN.read_text(encoding="utf-8"))


@pytest.mark.parametrize("case", sorted(_golden()["cases"]))
def test_special_token_strings_match_the_original(case):
    """encode / tokenize / decode of texts holding special-token strings at the start, middle and end, with and
    without whitespace around them, against what the original code gave under its transformers version."""
    golden = _golden()["cases"][case]
    folder = REPO / golden["folder"]
    bundled = golden["folder"].startswith("glmkit/")
    if bundled and not folder.is_dir():  # the package's assets may move; the sha256 below says whether it is the same
        folder = next(iter(sorted(Path(glmkit.__file__).parent.rglob(folder.name))), folder)
    if bundled and not folder.is_dir():
        pytest.skip(f"bundled {golden['folder']} not found")
    model = next(p for p in folder.iterdir() if p.name in ("ice_text.model", "tokenizer.model"))
    files_same = (hashlib.sha256(model.read_bytes()).hexdigest() == golden["model_sha256"]
                  and hashlib.sha256((folder / "tokenizer_config.json").read_bytes()).hexdigest()
                  == golden["config_sha256"])
    if not files_same:
        if bundled:  # a bundled asset that was retrained
            pytest.skip(f"{folder} changed since golden.json was made; rerun tests/data/special_tokens/make_golden.py")
        pytest.fail(f"{folder} is not the folder golden.json was made from; rerun make_golden.py")
    tok = load_tokenizer(folder)
    fields = golden["fields"]
    wrong = []
    for row in golden["rows"]:
        want = dict(zip(fields, row))
        text, ids = want["text"], want["ids"]
        got = {"ids": tok.encode(text)}
        n_prefix = 0 if tok.family == "chatglm" else 2
        plain = ids[n_prefix:len(ids) - (2 if tok.family == "chatglm" else 0)]
        got["plain"] = tok.encode(text, add_special_tokens=False)
        if "tokens" in want:
            got["tokens"] = tok.tokenize(text)
        if "decoded" in want:
            got["decoded"] = tok.decode(ids)
        expected = {**want, "plain": plain}
        bad = {k: (expected[k], v) for k, v in got.items() if v != expected[k]}
        if bad:
            wrong.append((text, bad))
    assert not wrong, f"{len(wrong)} of {len(golden['rows'])} texts differ from {golden['original']}: {wrong[:3]}"


def test_chatglm_mask_then_text_is_segmented_as_the_original(v1_dir):
    """The reported defect: "[MASK] in text" gave "[MASK] ▁ in ..." (the space after [MASK] kept as a lone piece)."""
    tok = load_tokenizer(v1_dir)
    mask = tok.mask_token_id
    expected = [mask] + tok.encode("in text", add_special_tokens=False)
    for text in ("[MASK] in text", "[MASK]in text", "[MASK]   in text", "[MASK]\tin text", "[MASK]\n\nin text"):
        assert tok.encode(text, add_special_tokens=False) == expected, repr(text)
    assert tok.tokenize("[MASK] in text") == ["[MASK]"] + tok.tokenize("in text")
    assert tok.tokenize("[MASK] in text")[1] != "▁"
    assert tok.encode("text [MASK]", add_special_tokens=False) == tok.encode("text", add_special_tokens=False) + [mask]
    # <sop> <eop> <unk> <pad> [MASK] are transformers' special tokens for this class; [gMASK] [sMASK] </s> are not:
    # they stay text for SentencePiece, whitespace included (control pieces, so spelled out here).
    for special in ("<sop>", "<eop>", "<unk>", "<pad>"):
        assert tok.encode(f"a {special} b", add_special_tokens=False) == (
            tok.encode("a", add_special_tokens=False) + [tok.convert_tokens_to_ids(special)]
            + tok.encode("b", add_special_tokens=False))
    for text_token in ("[gMASK]", "[sMASK]", "</s>"):
        text = f"a {text_token} b"
        assert tok.encode(text, add_special_tokens=False) == tok.sp_encode(text)
        assert tok.convert_tokens_to_ids(text_token) not in tok.encode(text, add_special_tokens=False)


def test_split_on_follows_transformers_whitespace_rules():
    both = {"[MASK]": STRIP_BOTH, "<sop>": STRIP_BOTH}
    assert split_on("a [MASK] b", both) == [("a", False), ("[MASK]", True), ("b", False)]
    assert split_on(" \t[MASK]\n ", both) == [("[MASK]", True)]
    assert split_on("[MASK] <sop>", both) == [("[MASK]", True), ("<sop>", True)]
    assert split_on("x\u3000[MASK]\u00a0y", both) == [("x", False), ("[MASK]", True), ("y", False)]  # str.strip
    assert split_on("a [MASK] b", {"[MASK]": KEEP_SPACES}) == [("a ", False), ("[MASK]", True), (" b", False)]
    assert split_on("a [MASK] b", {"[MASK]": SplitRule(rstrip=True)}) == [("a ", False), ("[MASK]", True),
                                                                          ("b", False)]
    assert split_on("a [MASK] b", {"[MASK]": SplitRule(lstrip=True)}) == [("a", False), ("[MASK]", True),
                                                                          (" b", False)]
    # single_word: glued to a word, the token is plain text of that chunk
    assert split_on("a[MASK] b", {"[MASK]": SplitRule(single_word=True)}) == [("a[MASK]", False), (" b", False)]
    assert split_on("a [MASK] b", {"[MASK]": SplitRule(single_word=True)}) == [("a ", False), ("[MASK]", True),
                                                                               (" b", False)]
    # the longest token wins where two start at the same place; no token, no split
    assert split_on("<|user|>x", {"<|user": KEEP_SPACES, "<|user|>": KEEP_SPACES}) == [("<|user|>", True),
                                                                                         ("x", False)]
    assert split_on("plain", both) == [("plain", False)] and split_on("", both) == []


def test_chatglm2_and_3_never_split_and_map_pieces_to_command_ids():
    """ChatGLM2/3 leave special-token strings to SentencePiece; a piece spelled like a command token ("sop",
    "[MASK]", "<|user|>") gets the command's id, as the original's convert_token_to_id does."""
    folder = REPO / "tests" / "data" / "special_tokens" / "chatglm3_pieces"
    tok = load_tokenizer(folder)
    assert tok.family == "chatglm3"
    assert tok.tokenize("xsop") == ["▁", "x", "sop"] and tok.sp.PieceToId("sop") < tok.sp.get_piece_size()
    assert tok.encode("xsop", add_special_tokens=False)[-1] == tok.sop_token_id
    assert tok.sp_encode("xsop")[-1] == tok.sp.PieceToId("sop")  # SPTokenizer.encode (chat turns) stays raw
    assert tok.encode("eop", add_special_tokens=False) == [tok.sp.PieceToId("▁"), tok.eop_token_id]
    assert tok.encode("<|user|>", add_special_tokens=False)[-1] == tok.get_command("<|user|>")
    plain = load_tokenizer(REPO / "tests" / "data" / "special_tokens" / "chatglm2")
    text = "a [gMASK] <|user|> sop b"
    assert plain.encode(text, add_special_tokens=False) == plain.sp.encode(text)


def test_glm4_splits_only_the_tokens_its_config_declares(glm4_dir, tmp_path):
    tok = load_tokenizer(glm4_dir)
    n = tok.n_words
    assert tok.encode(" <|user|> hi", add_special_tokens=False)[1] == n + 7  # whitespace kept around it
    assert tok.encode(" <|user|> hi", add_special_tokens=False) == (
        tok.sp_encode(" ") + [n + 7] + tok.sp_encode(" hi"))
    # ranks without a tokenizer_config.json: the original has no added tokens, so nothing is split out
    (tmp_path / "tokenizer.model").write_bytes((glm4_dir / "tokenizer.model").read_bytes())
    bare = load_tokenizer(tmp_path)
    assert bare.encode("<|user|>hi", add_special_tokens=False) == bare.sp_encode("<|user|>hi")
    # a config naming only eos_token: that one is split (transformers adds it as a special token)
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|endoftext|>"}))
    eos_only = load_tokenizer(tmp_path)
    assert eos_only.encode("a<|endoftext|><|user|>", add_special_tokens=False) == (
        eos_only.sp_encode("a") + [eos_only.eos_token_id] + eos_only.sp_encode("<|user|>"))


# ---------------------------------------------------------------------------------------------- shared surface
@pytest.mark.parametrize("fixture", ["v1_dir", "v2_dir", "glm4_dir"])
def test_left_padded_batches(request, fixture):
    tok = load_tokenizer(request.getfixturevalue(fixture))
    texts = ["你好", "a much longer English text, with punctuation!", TEXTS["mixed"]]
    batch = tok(texts, padding=True, return_tensors="pt")
    ids, mask = batch["input_ids"], batch["attention_mask"]
    assert ids.dtype == torch.long and ids.shape == mask.shape and ids.shape[0] == 3
    for row, text in enumerate(texts):
        enc = tok.encode(text)
        n_pad = ids.shape[1] - len(enc)
        assert ids[row, n_pad:].tolist() == enc
        assert ids[row, :n_pad].tolist() == [tok.pad_token_id] * n_pad
        assert mask[row].tolist() == [0] * n_pad + [1] * len(enc)
    single = tok("你好")
    assert single["input_ids"] == tok.encode("你好") and single["attention_mask"] == [1] * len(tok.encode("你好"))
    unpadded = tok(texts, padding=False)
    assert [len(r) for r in unpadded["input_ids"]] == [len(tok.encode(t)) for t in texts]
    with pytest.raises(ValueError, match="padding"):
        tok(texts, padding=False, return_tensors="pt")


@pytest.mark.parametrize("fixture", ["v1_dir", "v2_dir", "v3_dir", "glm4_dir"])
def test_save_pretrained_round_trip(request, fixture, tmp_path):
    tok = load_tokenizer(request.getfixturevalue(fixture))
    written = tok.save_pretrained(tmp_path / "saved")
    assert {Path(p).name for p in written} == {tok.vocab_file_name, "tokenizer_config.json"}
    again = load_tokenizer(tmp_path / "saved")
    assert type(again) is type(tok) and again.family == tok.family and len(again) == len(tok)
    for text in TEXTS.values():
        assert again.encode(text) == tok.encode(text)
    assert (again.eos_token_id, again.pad_token_id, again.gmask_token_id) == (
        tok.eos_token_id, tok.pad_token_id, tok.gmask_token_id)


# ---------------------------------------------------------------------------------------------- errors
def test_missing_and_corrupt_folders_fail_clearly(tmp_path, v2_dir, glm4_dir):
    with pytest.raises(FileNotFoundError, match="neither a folder"):
        load_tokenizer(tmp_path / "does-not-exist")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no tokenizer in"):
        load_tokenizer(tmp_path / "empty")
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "tokenizer.model").write_bytes(b"\x00\x01 definitely not a model")
    with pytest.raises(TokenizerError, match="not a SentencePiece model"):
        load_tokenizer(bad)
    (bad / "tokenizer.model").write_bytes(b"")
    with pytest.raises(TokenizerError, match="empty"):
        load_tokenizer(bad)
    cfg_bad = tmp_path / "cfg"
    cfg_bad.mkdir()
    (cfg_bad / "tokenizer.model").write_bytes((v2_dir / "tokenizer.model").read_bytes())
    (cfg_bad / "tokenizer_config.json").write_text("{not json")
    with pytest.raises(TokenizerError, match="not valid JSON"):
        load_tokenizer(cfg_bad)
    ranks = tmp_path / "ranks"
    ranks.mkdir()
    lines = (glm4_dir / "tokenizer.model").read_bytes().splitlines()
    (ranks / "tokenizer.model").write_bytes(b"\n".join(lines[:5] + [b"!!notbase64 7"]) + b"\n")
    with pytest.raises(TokenizerError, match="base64"):
        load_tokenizer(ranks)
    (ranks / "tokenizer.model").write_bytes((glm4_dir / "tokenizer.model").read_bytes())
    # without tokenizer_config.json GLM-4's special tokens follow the ranks in their published order
    assert load_tokenizer(ranks).get_command("<|user|>") == len(lines) + GLM4_SPECIAL_TOKENS.index("<|user|>")
    (ranks / "tokenizer_config.json").write_text(json.dumps({"added_tokens_decoder": {str(len(lines)): {
        "content": "<|endoftext|>"}}}))
    with pytest.raises(TokenizerError, match="lacks"):  # a config that omits GLM-4's chat tokens
        load_tokenizer(ranks)
    with pytest.raises(TokenizerError, match="is a file"):
        load_tokenizer(v2_dir / "tokenizer.model")


def test_hub_id_offline_names_the_id(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(FileNotFoundError, match="no-such-org/no-such-model"):
        load_tokenizer("no-such-org/no-such-model")


def test_bundled_name():
    bundled = Path(glmkit.__file__).parent / "assets" / "glm-tiny"
    if bundled.exists():
        assert len(load_tokenizer("glm-tiny")) > 0
    else:
        with pytest.raises(FileNotFoundError, match="glm-tiny"):
            load_tokenizer("glm-tiny")


def test_chatglm3_detected_from_the_model_config(v2_dir, tmp_path):
    (tmp_path / "tokenizer.model").write_bytes((v2_dir / "tokenizer.model").read_bytes())
    assert load_tokenizer(tmp_path).family == "chatglm2"
    (tmp_path / "config.json").write_text(json.dumps({"_name_or_path": "THUDM/chatglm3-6b"}))
    assert load_tokenizer(tmp_path).family == "chatglm3"


# ---------------------------------------------------------------------------------------------- training
def test_cli_train_plain_text_and_errors(tmp_path, capsys):
    txt = tmp_path / "train.txt"
    txt.write_text("\n".join(CORPUS_LINES * 20), encoding="utf-8")
    out = tmp_path / "tok"
    assert cli_main(["train", "--input", str(txt), "--vocab-size", "500", "--family", "chatglm2",
                     "--output", str(out)]) == 0
    assert "chatglm2" in capsys.readouterr().out
    tok = load_tokenizer(out)
    assert tok.family == "chatglm2" and tok.decode(tok.encode(CORPUS_LINES[0])) == CORPUS_LINES[0]
    assert cli_main(["train", "--input", str(txt), "--vocab-size", "100", "--family", "chatglm",
                     "--output", str(tmp_path / "small")]) == 2
    assert "too small" in capsys.readouterr().err
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"content": "no text field"}\n')
    with pytest.raises(ValueError, match="'text' field"):
        train_tokenizer([bad], 500, "chatglm2", tmp_path / "x")
    with pytest.raises(SystemExit):
        cli_main(["train", "--help"])


def test_train_on_the_shared_corpus_is_fast_and_exact(tmp_path):
    corpus = SHARED_DATA / "corpus"
    files = [corpus / "tang-poems.jsonl", corpus / "moby-dick.jsonl"]
    if not all(f.exists() for f in files):
        pytest.skip(f"shared corpus not found under {corpus}")
    t0 = time.time()
    tok = train_tokenizer(files, 8000, "chatglm", tmp_path / "tok", max_sentences=100_000)
    assert time.time() - t0 < 60
    assert len(tok) <= 8000 and tok.pad_token_id == 3
    rows = [json.loads(line)["text"] for f in files for line in f.open(encoding="utf-8").readlines()[:20]]
    for text in rows:
        assert tok.decode(tok.encode(text), clean_up_tokenization_spaces=False) == text
        assert tok.encode(text) == _reference_chatglm_ids(tmp_path / "tok" / "ice_text.model", text)


def test_chatglm_decode_cleans_up_spaces_as_transformers_4_27():
    """ChatGLM-6B's decode passes its keyword arguments to transformers 4.27's, which cleans up tokenization spaces
    by default (output of the original code on this text and glm-tiny's tokenizer)."""
    tok = glmkit.load_tokenizer("glm-tiny")
    ids = tok.encode("Hello , world . It is n't ok ?")
    assert tok.decode(ids) == "Hello, world. It isn't ok?"
    assert tok.decode(ids, skip_special_tokens=True) == "Hello, world. It isn't ok?"
    assert tok.decode(ids, clean_up_tokenization_spaces=False) == "Hello , world . It is n't ok ?"
