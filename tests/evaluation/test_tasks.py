"""GLM-130B's task files and data layout (glmkit.evaluation.tasks): its own YAML files parse as its configs.py reads
them, and the language-model windows and generation prompts match what its evaluation/dataset.py builds
(tests/data/glm130b_eval/golden.json, from the original code)."""

from __future__ import annotations

import json

import pytest
import torch

from glmkit.evaluation.predict import generation_prompt
from glmkit.evaluation.tasks import (
    TaskError,
    file_groups,
    find_task_files,
    lm_documents,
    lm_windows,
    load_task_config,
    mul_item,
    read_items,
    task_config,
)
from tests.helpers.chat_models import tiny_chatglm_with_tokenizer
from tests.helpers.common import REPO

DATA = REPO / "tests" / "data" / "glm130b_eval"
GOLDEN = json.loads((DATA / "golden.json").read_text(encoding="utf-8"))


def test_glm130b_task_files_parse_unchanged():
    lam = load_task_config(DATA / "tasks" / "lambada.yaml")
    assert (lam.name, lam.type, lam.behaviour, lam.path) == ("LAMBADA", "gen", "lambada", "lambada/lambada")
    assert lam.file_pattern == {"test": "**/test.jsonl", "validation": "**/validation.jsonl"}  # `file-pattern`
    assert lam.sampling_strategy == "BeamSearchStrategy" and lam.num_beams == 16 and lam.max_gen_length == 5
    assert lam.use_task_mask and lam.metrics == ["Accuracy"]
    mmlu = load_task_config(DATA / "tasks" / "mmlu.yaml")
    assert mmlu.behaviour == "mmlu" and mmlu.micro_batch_size == 1 and set(mmlu.file_pattern) == {
        "stem", "social_sciences", "humanities", "other"}
    afqmc = load_task_config(DATA / "tasks" / "afqmc.yaml")
    assert afqmc.micro_batch_size == 16 and afqmc.file_pattern == "**/*.json*" and afqmc.metrics == ["Accuracy"]
    wiki = load_task_config(DATA / "tasks" / "wikitext-2.yaml")
    assert (wiki.type, wiki.generation_length, wiki.metrics) == ("lm", 256, ["PPL"])
    assert load_task_config(DATA / "tasks" / "stereoset.yaml").metrics == ["SS_ICAT"]
    assert load_task_config(DATA / "tasks" / "pile.yaml").behaviour == "pile"
    assert load_task_config(DATA / "tasks" / "glue_cola.yaml").micro_batch_size == 30
    gen = task_config({"name": "x", "type": "gen", "path": "p"})
    assert (gen.metrics, gen.num_beams, gen.no_repeat_ngram_size, gen.max_gen_length) == (["EM", "F1"], 4, 3, 128)


def test_bad_task_files_say_what_is_wrong(tmp_path):
    with pytest.raises(TaskError, match="unknown field 'sampling'"):
        task_config({"name": "x", "type": "gen", "path": "p", "sampling": 1})
    with pytest.raises(TaskError, match="missing field"):
        task_config({"name": "x", "type": "gen"})
    with pytest.raises(TaskError, match="type must be one of"):
        task_config({"name": "x", "type": "cls", "path": "p"})
    with pytest.raises(TaskError, match="not a task class glmkit knows"):
        task_config({"name": "x", "type": "mul", "path": "p", "module": "tasks.my.Task"})
    with pytest.raises(TaskError, match="unidirectional"):
        task_config({"name": "x", "type": "gen", "path": "p", "unidirectional": True})
    with pytest.raises(TaskError, match="does not exist"):
        find_task_files([tmp_path / "nope.yaml"])
    cfg = task_config({"name": "x", "type": "mul", "path": "d"})
    with pytest.raises(TaskError, match="does not exist"):
        file_groups(cfg, tmp_path / "d")
    (tmp_path / "d").mkdir()
    with pytest.raises(TaskError, match="no data files"):
        file_groups(cfg, tmp_path / "d")
    bad = tmp_path / "d" / "a.jsonl"
    bad.write_text('{"inputs_pretokenized": "q", "choices_pretokenized": ["a"], "label": 0}\nnot json\n')
    with pytest.raises(TaskError, match="a.jsonl:2: not JSON"):
        read_items(bad)
    with pytest.raises(TaskError, match="icetk"):
        mul_item({"inputs": [1, 2], "choices_pretokenized": ["a"], "label": 0}, "x")


def test_file_groups_glob_recursively(tmp_path):
    for rel in ("p1/test.jsonl", "p2/test.jsonl", "p1/validation.jsonl"):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text("{}\n")
    cfg = task_config({"name": "x", "type": "mul", "path": ".",
                       "file-pattern": {"test": "**/test.jsonl", "validation": "**/validation.jsonl"}})
    groups = file_groups(cfg, tmp_path)
    assert [p.relative_to(tmp_path).as_posix() for p in groups["test"]] == ["p1/test.jsonl", "p2/test.jsonl"]
    assert len(groups["validation"]) == 1
    (tmp_path / "arr.json").write_text('[{"a": 1}, {"a": 2}]')
    assert read_items(tmp_path / "arr.json") == [{"a": 1}, {"a": 2}]


@pytest.mark.parametrize("case", GOLDEN["lm"], ids=[c["name"] for c in GOLDEN["lm"]])
def test_lm_windows_match_glm130b(case):
    """Each original window is prompt + [gMASK] + [sop] + text[:-1] with the loss on text only."""
    toks, cmd = case["tokens"], GOLDEN["commands"]
    ours = lm_windows(len(toks), case["max_seq_length"], case["generation_length"], case["unidirectional"])
    assert len(ours) == len(case["windows"])
    for (ps, ts, te), w in zip(ours, case["windows"]):
        prompt, text = toks[ps:ts], toks[ts:te]
        assert prompt + [cmd["[gMASK]"], cmd["sop"]] + text[:-1] == w["tokens"]
        assert w["loss_masks"] == [0] * (len(prompt) + 1) + [1] * len(text)


def test_lm_documents(tmp_path):
    (tmp_path / "a.txt").write_text("one two\nthree")
    assert lm_documents(tmp_path / "a.txt") == [{"text": "one two\nthree", "meta": {}}]
    (tmp_path / "b.jsonl").write_text('{"text_pretokenized": "x", "meta": {"pile_set_name": "A"}}\n{"text": ""}\n')
    assert lm_documents(tmp_path / "b.jsonl") == [{"text": "x", "meta": {"pile_set_name": "A"}}]


def _shape(ids: list[int], names: dict[int, str]) -> list[str]:
    """Token ids as symbols: special tokens by name, each run of text tokens as one 'text'."""
    out: list[str] = []
    for t in ids:
        sym = names.get(int(t), "text")
        if not (sym == "text" and out and out[-1] == "text"):
            out.append(sym)
    return out


def test_generation_prompt_matches_glm130b_layout(tmp_path):
    """GLM-130B's build_generation_sample: text + blank + sop (a blank in the text: text + sop), the context seen
    bidirectionally up to context_length - 1, Part B at a [MASK]; unidirectional: [gMASK] sop + text, causal.
    glm-tiny's prompts have the same tokens, context and [MASK] position; its positions are 2-D and, by ChatGLM-6B's
    rule, Part B stays at a [gMASK] too, where GLM-130B's 1-D positions count on."""
    model, tok, _ = tiny_chatglm_with_tokenizer(tmp_path, std=0.3, seed=1)
    cmd = GOLDEN["commands"]
    theirs_names = {cmd["[MASK]"]: "[MASK]", cmd["[gMASK]"]: "[gMASK]", cmd["sop"]: "sop"}
    ours_names = {tok.mask_token_id: "[MASK]", tok.gmask_token_id: "[gMASK]", tok.sop_token_id: "sop"}
    ours = {"mask": generation_prompt(model, tok, "白日依山盡", blank="[MASK]"),
            "gmask": generation_prompt(model, tok, "白日依山盡", blank="[gMASK]"),
            "gmask_unidirectional": generation_prompt(model, tok, "白日依山盡", unidirectional=True),
            "blank_in_text": generation_prompt(model, tok, "床前[MASK]明月", blank="[gMASK]")}
    for ref in GOLDEN["gen"]:
        row, sample = ours[ref["name"]], ref["sample"]
        assert _shape(row.ids, ours_names) == _shape(sample["token"], theirs_names), ref["name"]
        mask = torch.tensor(sample["attention_mask"])  # 1 = may attend
        seen_by_all = int(mask.all(dim=0).long().cumprod(0).sum())  # leading columns every row sees
        # the context everything sees: all before <sop> (its [gMASK] only, when unidirectional)
        their_sop, our_sop = sample["token"].index(cmd["sop"]), row.ids.index(tok.sop_token_id)
        assert seen_by_all == (1 if ref["unidirectional"] else their_sop)
        assert row.context_end == (1 if ref["unidirectional"] else our_sop)
        blank_at = next(i for i, t in enumerate(sample["token"]) if t in (cmd["[MASK]"], cmd["[gMASK]"]))
        our_blank = next(i for i, t in enumerate(row.ids) if t in (tok.mask_token_id, tok.gmask_token_id))
        assert row.positions[0][our_sop] == our_blank and row.positions[1][our_sop] == 1  # <sop>: blank, block 1
        if ref["use_task_mask"]:
            assert sample["position_id"][their_sop] == their_sop  # GLM-130B's [gMASK]: positions go on
        else:
            assert sample["position_id"][their_sop] == blank_at
