"""Incremental detokenization (glmkit.serving.detokenize): for random answers of every family's tokenizer that the
tests build, the streamed text is at every step a prefix of the one-shot decode of all the tokens, it never shrinks,
and what it holds back is only a short tail that may still change; ChatService streams what it did before."""

import random

import pytest

from glmkit.core.tokenizer import load_tokenizer
from glmkit.serving.detokenize import IncrementalDetokenizer
from tests.helpers.chat_models import TOOL_DATA

CORPUS = ["你好，世界！今天天气很好。", "the cat runs fast , isn't it ? we 're here .", "床前明月光，疑是地上霜。",
          "emoji 😀 and ü é ß 한국어 ∑ ≤", "tabs\tand  double  spaces\nnew lines\n\n",
          "<n> < n > <|tab|> ' s 've"]


@pytest.fixture(scope="module")
def tokenizers(tmp_path_factory):
    from glmkit.training.tokenizer import train_tokenizer

    root = tmp_path_factory.mktemp("detok")
    rng = random.Random(0)
    corpus = root / "corpus.txt"
    corpus.write_text("\n".join(" ".join(rng.choice(CORPUS) for _ in range(4)) for _ in range(400)),
                      encoding="utf-8")
    out = {family: train_tokenizer([corpus], 900 if family == "chatglm" else 700, family, root / family)
           for family in ("chatglm", "chatglm2", "chatglm3")}
    out["glm4"] = load_tokenizer(TOOL_DATA / "glm4")
    return out


def answers(tok, rng, n):
    """Random answers: uniform ids (specials, byte pieces, blanks), and encodings of text cut at random places."""
    ids = [i for i in range(len(tok)) if _decodes(tok, i)]
    for _ in range(n):
        yield [rng.choice(ids) for _ in range(rng.randint(1, 60))]
        text = " ".join(rng.choice(CORPUS) for _ in range(3))
        enc = tok.encode(text, add_special_tokens=False)
        cut = rng.randint(0, len(enc))
        yield enc[:cut] + [rng.choice(ids) for _ in range(rng.randint(0, 4))] + enc[cut:]


def _decodes(tok, i):
    try:
        tok.decode([i])
        return True
    except (IndexError, KeyError):
        return False


@pytest.mark.parametrize("family", ["chatglm", "chatglm2", "chatglm3", "glm4"])
def test_streamed_text_is_the_one_shot_decode(tokenizers, family):
    tok = tokenizers[family]
    rng = random.Random(family)
    held = 0
    for tokens in answers(tok, rng, 150):
        detok = IncrementalDetokenizer(tok)
        final = tok.decode(tokens)
        previous = ""
        for k, token in enumerate(tokens, 1):
            text = detok.push(token)
            now = tok.decode(tokens[:k])
            assert text.startswith(previous), (family, tokens[:k])
            assert now.startswith(text) and final.startswith(text), (family, tokens[:k], text, now)
            assert detok.current() == now, (family, tokens[:k])
            if text != now:
                held += 1
            previous = text
        # what is held back at the end is a short tail: the window never grew past a few tokens
        assert len(detok.tokens) - detok.prefix <= 12, (family, tokens)
    assert held > 0  # the random answers did exercise the holdback


def test_byte_pieces_are_held_until_whole(tokenizers):
    tok = tokenizers["glm4"]
    byte_ids = [tok.mergeable_ranks[bytes([b])] for b in "😀".encode()]
    detok = IncrementalDetokenizer(tok)
    texts = [detok.push(i) for i in tok.encode("你好", add_special_tokens=False) + byte_ids]
    assert texts[-1] == "你好😀" and all("\ufffd" not in t for t in texts)
    assert texts[-2] == "你好"  # three of four bytes of the emoji: nothing shown yet


@pytest.mark.parametrize("family", ["chatglm2", "glm4"])
def test_invalid_bytes_still_stream(tokenizers, family):
    """A model that emits bytes that never make a character (a random model can) still streams, a few characters
    late, and what it streams stays a prefix of the final decode."""
    tok = tokenizers[family]
    byte = tok.mergeable_ranks[b"\xc0"] if family == "glm4" else tok.convert_tokens_to_ids("<0xC0>")
    detok = IncrementalDetokenizer(tok)
    texts = [detok.push(byte) for _ in range(10)]
    final = tok.decode([byte] * 10)
    assert texts[-1] and all(final.startswith(t) for t in texts)
    assert len(final) - len(texts[-1]) <= 3
