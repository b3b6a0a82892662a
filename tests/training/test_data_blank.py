"""The blank-infilling sample builder (glmkit/training/data/blank.py) and the streaming corpus dataset (data/corpus.py),
checked against the rules of shared/docs/glm-family.md §1.4-1.5 and §3.4."""

from __future__ import annotations

import json
import random
import statistics

import pytest
import torch

from glmkit.core.config import GLMConfig
from glmkit.core.model import GLM
from glmkit.training.data.blank import (
    IGNORE_INDEX,
    BlankBuilder,
    BlankConfig,
    SpecialIds,
    attention_mask_for_segments,
    pack_samples,
    poisson_length_weights,
    sample_spans,
    sentence_end_ids_from_tokenizer,
)
from glmkit.training.data.corpus import BlankInfillingDataset, Source, iter_documents
from tests.helpers.chat_models import POEMS

SP = SpecialIds(mask=1000, smask=1001, gmask=1002, sop=1003, eop=1004, pad=0)
END = 999  # a sentence-end token id in the integer documents below


def random_doc(rng: random.Random, n: int, sentence_every: int = 0) -> list[int]:
    doc = [rng.randrange(1, 900) for _ in range(n)]
    if sentence_every:
        for i in range(sentence_every - 1, n, sentence_every):
            doc[i] = END
    return doc


def rebuild(sample) -> tuple[list[int], list[int]]:
    """Part A with each mask replaced by its span's targets (the document), and all masked tokens in target order."""
    part_a = sample.input_ids[: sample.sep]
    spans: dict[int, list[int]] = {}
    targets_seen: list[int] = []
    for i in range(sample.sep, len(sample)):
        if sample.input_ids[i] == SP.sop:
            current = spans.setdefault(sample.position_ids[i], [])
            assert current == [], "two Part B spans point at the same mask"
        if sample.labels[i] != SP.eop:
            current.append(sample.labels[i])
            targets_seen.append(sample.labels[i])
    doc = []
    for i, tok in enumerate(part_a):
        if tok in (SP.mask, SP.smask, SP.gmask):
            assert i in spans, f"mask at {i} has no Part B span"
            doc += spans.pop(i)
        else:
            doc.append(tok)
    assert not spans, "Part B spans whose position is not a mask"
    return doc, targets_seen


# ----------------------------------------------------------------------------------------------- the §1.4 example
def test_worked_example_of_glm_family_1_4():
    # [CLS] x1 .. x6 with spans (3,4)={x3} and (5,7)={x5,x6}, shuffled to (5,7),(3,4)
    CLS, x = 99, [None, 11, 12, 13, 14, 15, 16]
    tokens = [CLS, x[1], x[2], x[3], x[4], x[5], x[6]]
    s = BlankBuilder(SP).assemble(tokens, [(3, 4), (5, 7)], SP.mask, "bert", order=[(5, 7), (3, 4)])
    assert s.input_ids == [CLS, 11, 12, SP.mask, 14, SP.mask, SP.sop, 15, 16, SP.sop, 13]
    assert s.labels == [IGNORE_INDEX] * 6 + [15, 16, SP.eop, 13, SP.eop]
    assert s.position_ids == [0, 1, 2, 3, 4, 5, 5, 5, 5, 3, 3]
    assert s.block_ids == [0, 0, 0, 0, 0, 0, 1, 2, 3, 1, 2]
    assert s.sep == 6
    # §1.5: Part A sees Part A only (bidirectional); Part B sees Part A plus a causal view of Part B.
    m = attention_mask_for_segments([(0, s.sep, len(s))], len(s))
    T = len(s)
    expected = torch.ones(T, T, dtype=torch.bool).tril()
    expected[:, : s.sep] = True
    assert torch.equal(m, expected)


def test_gmask_sample_is_chatglm6b_inference_layout():
    """`text [gMASK] <sop> continuation` with exactly ChatGLM-6B's get_position_ids and prefix-LM mask."""
    rng = random.Random(3)
    doc = random_doc(rng, 40)
    s = BlankBuilder(SP, BlankConfig(bert_prob=0, sentence_prob=0)).build(doc, rng)
    m = s.sep - 1  # index of [gMASK]
    assert s.objective == "gpt"
    assert s.input_ids == doc[:m] + [SP.gmask, SP.sop] + doc[m:]
    assert s.labels[s.sep:] == doc[m:] + [SP.eop]
    assert 0.5 * len(doc) <= len(doc) - m <= len(doc)

    config = GLMConfig.from_name("chatglm-6b", vocab_size=1010, hidden_size=16, num_layers=1, num_heads=2,
                                 ffn_hidden_size=32, bos_token_id=SP.sop, eos_token_id=SP.eop, pad_token_id=SP.pad,
                                 mask_token_id=SP.mask, gmask_token_id=SP.gmask)
    model = GLM(config)
    ids = torch.tensor([s.input_ids])
    ref_pos = model.default_position_ids(ids)[0]
    assert ref_pos[0].tolist() == s.position_ids
    assert ref_pos[1].tolist() == s.block_ids
    ref_mask = model.default_attention_mask(ids)[0, 0]
    assert torch.equal(ref_mask, attention_mask_for_segments([(0, s.sep, len(s))], len(s)))


def test_whole_document_gmask_is_encode_empty_prefix():
    rng = random.Random(0)
    doc = random_doc(rng, 12)
    s = BlankBuilder(SP, BlankConfig(bert_prob=0, sentence_prob=0, gpt_full_prob=1.0)).build(doc, rng)
    assert s.input_ids == [SP.gmask, SP.sop] + doc
    assert s.position_ids == [0] * (len(doc) + 2)
    assert s.block_ids == [0] + list(range(1, len(doc) + 2))


# ------------------------------------------------------------------------------------- invariants on many samples
@pytest.mark.parametrize("objective", ["bert", "sentence", "gpt"])
def test_targets_rebuild_the_text_and_cover_each_masked_token_once(objective):
    builder = BlankBuilder(SP, BlankConfig(), sentence_end_ids=[END])
    rng = random.Random(objective)
    for trial in range(300):
        doc = random_doc(rng, rng.randint(1, 120), sentence_every=rng.choice([0, 5, 9]))
        s = builder.build(doc, rng, objective=objective)
        rebuilt, targets = rebuild(s)
        assert rebuilt == doc
        masked = sum(e - st for st, e in s.spans)
        assert len(targets) == masked  # every masked token is a Part B target exactly once
        assert sorted(targets) == sorted(t for st, e in s.spans for t in doc[st:e])
        n_spans = len(s.spans)
        assert s.sep == len(doc) - masked + n_spans
        assert len(s) == len(doc) + 2 * n_spans
        assert s.labels.count(SP.eop) == n_spans
        assert all(lab == IGNORE_INDEX for lab in s.labels[: s.sep])  # loss on Part B only
        assert all(lab != IGNORE_INDEX for lab in s.labels[s.sep:])


@pytest.mark.parametrize("objective", ["bert", "sentence", "gpt"])
def test_positions_blocks_and_shift(objective):
    builder = BlankBuilder(SP, BlankConfig(), sentence_end_ids=[END])
    rng = random.Random(7)
    mask_id = {"bert": SP.mask, "sentence": SP.smask, "gpt": SP.gmask}[objective]
    for _ in range(200):
        doc = random_doc(rng, rng.randint(2, 80), sentence_every=6)
        s = builder.build(doc, rng, objective=objective)
        assert s.position_ids[: s.sep] == list(range(s.sep))
        assert s.block_ids[: s.sep] == [0] * s.sep
        block = 0
        for i in range(s.sep, len(s)):
            if s.input_ids[i] == SP.sop:
                block = 1
                mask_pos = s.position_ids[i]
                assert s.input_ids[mask_pos] == mask_id  # Part B sits at its mask's index in Part A
            else:
                block += 1
                assert s.input_ids[i] == s.labels[i - 1]  # teacher forcing: input = previous target
            assert s.block_ids[i] == block
            assert s.position_ids[i] == mask_pos
        # masks in Part A appear in document order, Part B follows the (shuffled) span order
        mask_positions = [i for i, t in enumerate(s.input_ids[: s.sep]) if t == mask_id]
        assert len(mask_positions) == len(s.spans)


def test_spans_keep_a_gap_and_follow_sample_spans():
    rng = random.Random(11)
    for _ in range(500):
        n = rng.randint(5, 200)
        lengths = [rng.randint(1, 4) for _ in range(rng.randint(1, 5))]
        if sum(lengths) + len(lengths) - 1 > n:
            continue
        spans = sample_spans(lengths, n, rng)
        assert [e - s for s, e in spans] == lengths
        assert spans[0][0] >= 0 and spans[-1][1] <= n
        assert all(b[0] - a[1] >= 1 for a, b in zip(spans, spans[1:]))
    with pytest.raises(ValueError, match="do not fit"):
        sample_spans([5, 5], 10, rng)


def test_ratio_statistics():
    builder = BlankBuilder(SP, BlankConfig(), sentence_end_ids=[END])
    rng = random.Random(2024)
    n = 400
    covered, lengths, gpt_ratios, sent_cov = [], [], [], []
    for _ in range(400):
        doc = random_doc(rng, n, sentence_every=10)
        b = builder.build(doc, rng, objective="bert")
        covered.append(sum(e - s for s, e in b.spans) / n)
        lengths += [e - s for s, e in b.spans]
        g = builder.build(doc, rng, objective="gpt")
        gpt_ratios.append((g.spans[0][1] - g.spans[0][0]) / n)
        st = builder.build(doc, rng, objective="sentence")
        sent_cov.append(sum(e - s for s, e in st.spans) / n)
        assert all((e - s) == 10 for s, e in st.spans)  # whole sentences only
    # [MASK]: until >= 15% covered, overshoot at most one span
    assert min(covered) >= 0.15
    assert statistics.mean(covered) < 0.15 + 5 / n
    # span lengths: Poisson(3) truncated to 1..39
    w = poisson_length_weights(3, 40)
    expected_mean = sum((k + 1) * p for k, p in enumerate(w)) / sum(w)
    assert min(lengths) >= 1 and max(lengths) <= 39
    assert abs(statistics.mean(lengths) - expected_mean) < 0.15
    assert abs(lengths.count(1) / len(lengths) - w[0] / sum(w)) < 0.03
    # [gMASK]: suffix of 50-100%, uniform
    assert min(gpt_ratios) >= 0.5 and max(gpt_ratios) <= 1.0
    assert abs(statistics.mean(gpt_ratios) - 0.75) < 0.03
    # [sMASK]: >= 15% of tokens in whole sentences
    assert min(sent_cov) >= 0.15 and statistics.mean(sent_cov) < 0.15 + 10 / n


def test_objective_mixture_frequencies():
    builder = BlankBuilder(SP, BlankConfig(bert_prob=0.5, sentence_prob=0.3), sentence_end_ids=[END])
    rng = random.Random(5)
    counts = {"bert": 0, "sentence": 0, "gpt": 0}
    for _ in range(4000):
        counts[builder.choose_objective(rng)] += 1
    assert abs(counts["bert"] / 4000 - 0.5) < 0.03
    assert abs(counts["sentence"] / 4000 - 0.3) < 0.03
    assert abs(counts["gpt"] / 4000 - 0.2) < 0.03


def test_config_validation():
    with pytest.raises(ValueError, match="bert_prob"):
        BlankConfig(bert_prob=1.5)
    with pytest.raises(ValueError, match="<= 1"):
        BlankConfig(bert_prob=0.7, sentence_prob=0.5)
    with pytest.raises(ValueError, match="empty document"):
        BlankBuilder(SP).build([], random.Random(0))


# ------------------------------------------------------------------------------------------------------- packing
def test_packing_is_block_diagonal_and_padded():
    builder = BlankBuilder(SP, BlankConfig(), sentence_end_ids=[END])
    rng = random.Random(1)
    samples = [builder.build(random_doc(rng, rng.randint(5, 30)), rng) for _ in range(12)]
    rows = list(pack_samples(samples, 64, SP.pad))
    flat = [s for r in rows for s in r.segments]
    assert len(flat) == len(samples)
    k = 0
    for row in rows:
        t = row.tensors()
        assert t["input_ids"].shape == (64,) and t["position_ids"].shape == (2, 64)
        mask = t["attention_mask"][0]
        for start, sep, end in row.segments:
            s = samples[k]
            k += 1
            assert row.input_ids[start:end] == s.input_ids and row.labels[start:end] == s.labels
            assert row.position_ids[start:end] == s.position_ids  # positions restart in every sample
            assert torch.equal(mask[start:end, start:end], attention_mask_for_segments([(0, s.sep, len(s))], len(s)))
            assert not mask[start:end, :start].any() and not mask[start:end, end:].any()
        used = row.segments[-1][2]
        assert all(i == SP.pad for i in row.input_ids[used:])
        assert all(lab == IGNORE_INDEX for lab in row.labels[used:])
        assert torch.equal(mask[used:, used:], torch.eye(64 - used, dtype=torch.bool))
    with pytest.raises(ValueError, match="does not fit"):
        list(pack_samples(samples[:1], 4, SP.pad))


# ------------------------------------------------------------------------------------- streaming dataset, real tokenizer


@pytest.fixture(scope="module")
def corpus_and_tokenizer(tmp_path_factory):
    from glmkit.training.tokenizer import train_tokenizer

    root = tmp_path_factory.mktemp("corpus")
    rows = [f"{p}（{i}）" for i in range(40) for p in POEMS]
    (root / "a.jsonl").write_text("".join(json.dumps({"text": t}, ensure_ascii=False) + "\n" for t in rows),
                                  encoding="utf-8")
    (root / "txt").mkdir()
    (root / "txt" / "b.txt").write_text("\n\n".join(POEMS) + "\n", encoding="utf-8")
    tok = train_tokenizer([root / "a.jsonl"], 480, "chatglm", root / "tok")
    return root, tok


def _dataset(root, tok, **kw):
    special = SpecialIds.from_tokenizer(tok)
    args = dict(seq_len=64, sentence_end_ids=sentence_end_ids_from_tokenizer(tok), seed=0, shuffle_buffer=16)
    args.update(kw)
    return BlankInfillingDataset([{"path": str(root / "a.jsonl"), "weight": 3}, str(root / "txt")], tok, special,
                                 BlankConfig(bert_prob=0.4, sentence_prob=0.3), **args)


def _take(ds, n):
    out = []
    for row in ds:
        out.append(row)
        if len(out) == n:
            break
    return out


def test_readers_and_line_ranges(corpus_and_tokenizer):
    root, _ = corpus_and_tokenizer
    docs = list(iter_documents(Source(str(root / "a.jsonl"), lines="150:")))
    assert len(docs) == 10 and docs[0] == f"{POEMS[2]}（37）"
    assert list(iter_documents(Source(str(root / "txt")))) == POEMS
    with pytest.raises(FileNotFoundError):
        list(iter_documents(Source(str(root / "missing.jsonl"))))
    with pytest.raises(ValueError, match="start:end"):
        Source("x", lines="3-4").line_range()


def test_sentence_end_ids_from_tokenizer(corpus_and_tokenizer):
    _, tok = corpus_and_tokenizer
    ends = sentence_end_ids_from_tokenizer(tok)
    for mark in ("。", "<n>"):
        assert tok.convert_tokens_to_ids(mark) in ends
    assert tok.convert_tokens_to_ids("月") not in ends


def test_dataset_is_deterministic_and_shards_by_rank(corpus_and_tokenizer):
    root, tok = corpus_and_tokenizer
    a = _take(_dataset(root, tok), 12)
    b = _take(_dataset(root, tok), 12)
    assert all(torch.equal(x["input_ids"], y["input_ids"]) and torch.equal(x["attention_mask"], y["attention_mask"])
               for x, y in zip(a, b))
    c = _take(_dataset(root, tok, seed=1), 12)
    assert any(not torch.equal(x["input_ids"], y["input_ids"]) for x, y in zip(a, c))
    r0 = _take(_dataset(root, tok, rank=0, world_size=2), 6)
    r1 = _take(_dataset(root, tok, rank=1, world_size=2), 6)
    assert all(torch.equal(a[2 * i]["input_ids"], r0[i]["input_ids"]) for i in range(6))
    assert all(torch.equal(a[2 * i + 1]["input_ids"], r1[i]["input_ids"]) for i in range(6))
    skipped = _take(_dataset(root, tok, skip_rows=5), 7)  # the data position of a resumed run
    assert all(torch.equal(a[5 + i]["labels"], skipped[i]["labels"]) for i in range(7))


def test_dataset_rows_rebuild_documents(corpus_and_tokenizer):
    root, tok = corpus_and_tokenizer
    known = {tuple(tok.encode(t, add_special_tokens=False)) for t in [f"{p}（{i}）" for i in range(40)
                                                                        for p in POEMS] + POEMS}
    special = SpecialIds.from_tokenizer(tok)
    for row in _take(_dataset(root, tok), 10):
        ids, labels = row["input_ids"].tolist(), row["labels"].tolist()
        pos = row["position_ids"][0].tolist()
        seps = [i for i in range(len(ids)) if ids[i] == special.sop]
        assert seps, "every row carries Part B targets"
        n_targets = sum(lab != IGNORE_INDEX and lab != special.eop for lab in labels)
        n_masks = sum(i in (special.mask, special.smask, special.gmask) for i in ids)
        assert n_targets > 0 and n_masks == len(seps)
        assert max(pos) < len(ids)
    # with one objective and no packing neighbours, a row is one document we can rebuild
    ds = BlankInfillingDataset([str(root / "txt")], tok, special, BlankConfig(bert_prob=1.0), seq_len=120,
                               sentence_end_ids=[], cycle=False)
    for row in ds:
        ids, labels = row["input_ids"].tolist(), row["labels"].tolist()
        sep = ids.index(special.sop)
        spans: dict[int, list[int]] = {}
        for i in range(sep, len(ids)):
            if labels[i] == IGNORE_INDEX:
                break
            if ids[i] == special.sop:
                cur = spans.setdefault(int(row["position_ids"][0, i]), [])
            if labels[i] != special.eop:
                cur.append(labels[i])
        doc = []
        for i, t in enumerate(ids[:sep]):
            doc += spans[i] if t == special.mask else [t]
        assert tuple(doc) in known
