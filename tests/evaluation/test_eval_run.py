"""glmkit.evaluation.run on small task files: each metric against a value computed here by other means (plain
forwards, glmkit.score_choices one item at a time, glmkit fill's greedy decoding), LAMBADA's whole-word rule,
resuming after an interruption, the results files and the precision comparison."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

import glmkit
from glmkit.core.chat import build_chat_input
from glmkit.evaluation import run as run_mod
from glmkit.evaluation.metrics import normalize_answer
from glmkit.evaluation.predict import PromptRow, answer_letter_ids, first_word, last_word_correct, letter_logits
from glmkit.evaluation.run import comparison_markdown, evaluate_tasks, results_markdown, write_results
from glmkit.evaluation.tasks import lm_windows
from glmkit.fill import fill
from tests.helpers.chat_models import build_tiny_chat_model
from tests.helpers.common import REPO


@pytest.fixture(scope="module")
def tiny():
    return glmkit.load_model("glm-tiny", dtype="float32").eval(), glmkit.load_tokenizer("glm-tiny")


def write_task(root: Path, name: str, fields: dict, rows: list[dict] | None = None, text: str | None = None) -> Path:
    data = root / "data" / name
    data.mkdir(parents=True, exist_ok=True)
    if rows is not None:
        (data / "test.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows),
                                         encoding="utf-8")
    if text is not None:
        (data / "test.txt").write_text(text, encoding="utf-8")
    lines = [f"name: {name}", f"path: data/{name}"] + [f"{k}: {json.dumps(v, ensure_ascii=False)}"
                                                        for k, v in fields.items()]
    path = root / f"{name}.yaml"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


MUL_ROWS = [
    {"inputs_pretokenized": "床前明月光，疑是地上霜。\n", "choices_pretokenized": ["舉頭望明月，", "白日依山盡，", "春"], "label": 0},
    {"inputs_pretokenized": "白日依山盡，", "choices_pretokenized": ["黃河入海流。", "花落知多少。"], "label": 0},
    {"inputs_pretokenized": "Call me Ishmael. Some years ago, never mind how long", "choices_pretokenized":
        [" precisely", " the sea", " a whale of a time"], "label": 0},
    {"inputs_pretokenized": "春眠不覺曉，處處聞啼[MASK]。", "choices_pretokenized": ["鳥", "花", "月"], "label": 1},
]


def test_mul_accuracy_equals_score_choices_one_by_one(tmp_path, tiny):
    model, tok = tiny
    task = write_task(tmp_path, "mul", {"type": "mul", "length_normalization": ["token", "char"]}, MUL_ROWS)
    res = evaluate_tasks(model, tok, [task], batch_size=3, progress=False)["tasks"]["mul"]
    picks, picks_tok, picks_char = [], [], []
    for r in MUL_ROWS:
        ctx = r["inputs_pretokenized"] if "[MASK]" in r["inputs_pretokenized"] else r["inputs_pretokenized"] + "[MASK]"
        scores = glmkit.score_choices(model, tok, ctx, r["choices_pretokenized"])
        ntok = [len(tok.encode(c, add_special_tokens=False)) for c in r["choices_pretokenized"]]
        picks.append(max(range(len(scores)), key=scores.__getitem__))
        picks_tok.append(max(range(len(scores)), key=lambda k: scores[k] / ntok[k]))
        picks_char.append(max(range(len(scores)), key=lambda k: scores[k] / len(r["choices_pretokenized"][k])))
    metrics = res["groups"]["all"]["files"]["test.jsonl"]["metrics"]
    labels = [r["label"] for r in MUL_ROWS]
    assert metrics["Accuracy"] == pytest.approx(100 * sum(p == y for p, y in zip(picks, labels)) / 4)
    assert metrics["Accuracy_norm_token"] == pytest.approx(100 * sum(p == y for p, y in zip(picks_tok, labels)) / 4)
    assert metrics["Accuracy_norm_char"] == pytest.approx(100 * sum(p == y for p, y in zip(picks_char, labels)) / 4)
    assert res["overall"]["Accuracy"]["average"] == metrics["Accuracy"]


def test_gen_em_f1_against_greedy_fill(tmp_path, tiny):
    model, tok = tiny
    prompts = ["白日依山盡，", "Call me Ishmael. Some years ago, never mind how long"]
    greedy = [fill(model, tok, p, gmask_max_new_tokens=6).answers[0] for p in prompts]
    rows = [{"inputs_pretokenized": prompts[0], "targets_pretokenized": ["nothing like it", greedy[0]]},
            {"inputs_pretokenized": prompts[1], "targets_pretokenized": ["zzz " + greedy[1]]}]
    task = write_task(tmp_path, "gen", {"type": "gen", "use_task_mask": True, "max_gen_length": 6,
                                        "metrics": ["EM", "F1"]}, rows)
    out = tmp_path / "out"
    res = evaluate_tasks(model, tok, [task], batch_size=2, progress=False, output_dir=out)["tasks"]["gen"]
    metrics = res["groups"]["all"]["files"]["test.jsonl"]["metrics"]
    assert metrics["EM"] == pytest.approx(50.0)  # the first matches a target exactly, the second does not
    n = len(normalize_answer(greedy[1]).split())
    f1 = 2 * n / (2 * n + 1) if n else 0.0  # precision n/n, recall n/(n+1): the target has "zzz" too
    assert metrics["F1"] == pytest.approx((100 + 100 * f1) / 2, abs=1e-6)
    cached = [json.loads(line)["r"]["text"] for line in next((out / "cache" / "gen").glob("*.jsonl")).open()]
    assert cached == greedy


def test_lambada_needs_the_whole_word(tmp_path, tiny):
    """Greedy (glmkit fill) produces word W after the context: target W is right; a longer word that W is only
    a prefix of is wrong; so is a target W is longer than."""
    model, tok = tiny
    contexts = ["Call me Ishmael. Some years ago, never mind how long precisely, having little money in my",
                "白日依山盡，黃河入海流。欲窮千里目，更上一層", "It was the best of times, it was the worst of",
                "春眠不覺曉，處處聞啼鳥。夜來風雨聲，花落知多"]
    words = [first_word(fill(model, tok, c, gmask_max_new_tokens=6).answers[0]) for c in contexts]
    usable = [(c, w) for c, w in zip(contexts, words) if len(w) >= 2]
    assert usable, f"greedy gave no word of two or more characters: {words}"
    ctx, word = usable[0]
    rows = [{"inputs_pretokenized": ctx, "targets_pretokenized": [word]},  # produced: right
            {"inputs_pretokenized": ctx, "targets_pretokenized": [word + "xq"]},  # only a prefix produced: wrong
            {"inputs_pretokenized": ctx, "targets_pretokenized": [word[:-1]]}]  # a longer word produced: wrong
    task = write_task(tmp_path, "lam", {"type": "gen", "module": "tasks.lambada.task.LAMBADA", "use_task_mask": True,
                                        "max_gen_length": 6}, rows)
    res = evaluate_tasks(model, tok, [task], progress=False)["tasks"]["lam"]
    assert res["groups"]["all"]["files"]["test.jsonl"]["metrics"]["Accuracy"] == pytest.approx(100 / 3)
    assert last_word_correct(" Bob. And", "Bob") and not last_word_correct("Bo", "Bob")
    assert not last_word_correct("Bobby", "Bob") and last_word_correct("霜。\n舉頭", "霜")


@torch.inference_mode()
def test_lm_perplexity_against_plain_forwards(tmp_path, tiny):
    model, tok = tiny
    text = "床前明月光，疑是地上霜。\n舉頭望明月，低頭思故鄉。\n\nCall me Ishmael. Some years ago, never mind."
    task = write_task(tmp_path, "lm", {"type": "lm", "use_task_mask": True, "max_seq_length": 16,
                                       "generation_length": 5, "file-pattern": "*.txt",
                                       "metrics": ["PPL", "TokenPPL", "BPB"]}, text=text)
    res = evaluate_tasks(model, tok, [task], batch_size=4, progress=False)["tasks"]["lm"]
    ids = tok.encode(text, add_special_tokens=False)
    total, count = 0.0, 0
    for ps, ts, te in lm_windows(len(ids), 16, 5):
        prompt, body = ids[ps:ts], ids[ts:te]
        row = prompt + [tok.gmask_token_id, tok.sop_token_id] + body[:-1]  # GLM-130B's window, ChatGLM-6B's positions
        logits = model(torch.tensor([row]))[0]
        logp = torch.log_softmax(logits[len(prompt) + 1:].float(), dim=-1)
        total -= float(logp[torch.arange(len(body)), torch.tensor(body)].sum())
        count += len(body)
    assert count == len(ids)  # every token scored once
    m = res["groups"]["all"]["files"]["test.txt"]["metrics"]
    assert m["TokenPPL"] == pytest.approx(math.exp(total / count), rel=1e-4)
    assert m["BPB"] == pytest.approx(total / len(text.encode()) / math.log(2), rel=1e-4)
    assert m["PPL"] == pytest.approx(math.exp(min(20, total / len(text.strip().split(" ")))), rel=1e-4)


def test_resume_after_interruption(tmp_path, tiny, monkeypatch):
    model, tok = tiny
    rows = MUL_ROWS * 5  # 20 items
    task = write_task(tmp_path, "mul", {"type": "mul"}, rows)
    out = tmp_path / "out"
    first = evaluate_tasks(model, tok, [task], batch_size=1, progress=False, output_dir=out)
    cache = next((out / "cache" / "mul").glob("*.jsonl"))
    lines = cache.read_text().splitlines()
    assert len(lines) == 20
    cache.write_text("\n".join(lines[:7]) + "\n" + lines[7][:10])  # stopped while writing item 7
    seen = []
    real = run_mod._predict

    def counting(model_, tok_, config, items, *a, **k):
        seen.extend(items)
        return real(model_, tok_, config, items, *a, **k)

    monkeypatch.setattr(run_mod, "_predict", counting)
    second = evaluate_tasks(model, tok, [task], batch_size=1, progress=False, output_dir=out)
    assert len(seen) == 13  # items 7..19 only
    assert second["tasks"]["mul"]["overall"] == first["tasks"]["mul"]["overall"]
    seen.clear()
    evaluate_tasks(model, tok, [task], batch_size=1, progress=False, output_dir=out)
    assert not seen  # all cached


def test_results_files_and_comparison(tmp_path, tiny):
    model, tok = tiny
    task = write_task(tmp_path, "mul", {"type": "mul", "file-pattern": {"a": "test.jsonl", "b": "*.jsonl"}}, MUL_ROWS)
    res = evaluate_tasks(model, tok, [task], progress=False, model_name="glm-tiny", precision="fp32")
    js, md = write_results(res, tmp_path / "r")
    assert json.loads(js.read_text())["tasks"]["mul"]["groups"]["a"]["files"]["test.jsonl"]["n"] == 4
    table = md.read_text()
    assert table.startswith("| task | group | metric |") and "| mul | a | Accuracy |" in table
    assert results_markdown(res) == table
    other = json.loads(json.dumps(res))
    other["tasks"]["mul"]["groups"]["b"]["stats"]["Accuracy"]["average"] -= 25.0
    cmp = comparison_markdown({"bf16": res, "int4": other})
    assert cmp.splitlines()[0] == "| task | group | metric | bf16 | int4 | Δ int4 |"
    b_row = next(line for line in cmp.splitlines() if line.startswith("| mul | b | Accuracy |"))
    assert b_row.endswith("| -25.000 |")
    assert any(line.startswith("| mul | all | Accuracy |") for line in cmp.splitlines())  # several groups


def test_compare_precisions_runs_each(tmp_path):
    task = write_task(tmp_path, "mul", {"type": "mul"}, MUL_ROWS[:2])
    out = run_mod.compare_precisions("glm-tiny", [task], precisions=("fp32", "int8"), progress=False,
                                     output_dir=tmp_path / "o")
    assert set(out["runs"]) == {"fp32", "int8"} and "Δ int8" in out["table"]
    assert (tmp_path / "o" / "compare.md").read_text() == out["table"]
    assert (tmp_path / "o" / "results-int8.json").exists()


@torch.inference_mode()
def test_answer_letters_are_read_from_each_tokenizer(tmp_path):
    c2 = build_tiny_chat_model(tmp_path / "c2", family="chatglm2")
    tok = glmkit.load_tokenizer(c2)
    # this tiny vocabulary spells "A" as the word-start piece + "A": the first id (what a script taking
    # encode(letter)[0] reads) is the same for every letter; the letter's own token is not
    naive = [tok.encode(x, add_special_tokens=False)[0] for x in "ABCD"]
    assert len(set(naive)) == 1
    ids = answer_letter_ids(tok, "ABCD")
    assert [tok.decode([i]) for i in ids] == list("ABCD")
    with pytest.raises(ValueError, match="share tokens"):
        answer_letter_ids(tok, "AA")
    with pytest.raises(ValueError, match="letters must be one token"):
        answer_letter_ids(tok, "Ж")  # not in the vocabulary: several byte tokens
    v1 = glmkit.load_tokenizer("glm-tiny")
    ids = answer_letter_ids(v1, "ABCD")
    assert ids == [v1.encode(x, add_special_tokens=False)[-1] for x in "ABCD"] and len(set(ids)) == 4
    assert [v1.decode([i]) for i in ids] == list("ABCD")
    # the logits read are the model's at the answer position of the chat prompt
    m1 = glmkit.load_model("glm-tiny", dtype="float32").eval()
    queries = ["問：A or B?\n答案：", "白日依山盡\nA. 黃河\nB. 長江\n答案："]
    rows = [PromptRow(list(build_chat_input(v1, q)), None, None) for q in queries]
    got = letter_logits(m1, rows, ids[:2], batch_size=2)
    for q, g in zip(queries, got):
        logits = m1(torch.tensor([build_chat_input(v1, q)]))[0, -1]
        assert g == pytest.approx(logits[ids[:2]].tolist(), abs=1e-4)


def test_letters_task(tmp_path, tiny):
    """C-Eval style on glm-tiny (ChatGLM-6B's chat prompt: the bare query + [gMASK] <sop>): the prediction is the
    argmax of the letter tokens' logits after the prompt."""
    model, tok = tiny
    rows = [{"inputs_pretokenized": f"{q}\nA. 黃河\nB. 長江\nC. 明月\n答案：", "choices_pretokenized": ["A", "B", "C"],
             "label": y} for q, y in (("白日依山盡", 0), ("床前明月光", 2), ("春眠不覺曉", 1), ("Call me", 1))]
    task = write_task(tmp_path, "abc", {"type": "mul", "prompt": "chat", "scoring": "letters"}, rows)
    res = evaluate_tasks(model, tok, [task], batch_size=3, progress=False)["tasks"]["abc"]
    ids = [tok.encode(x, add_special_tokens=False)[-1] for x in "ABC"]
    right = 0
    with torch.inference_mode():
        for r in rows:
            logits = model(torch.tensor([build_chat_input(tok, r["inputs_pretokenized"])]))[0, -1]
            right += int(int(logits[ids].argmax()) == r["label"])
    assert res["groups"]["all"]["files"]["test.jsonl"]["metrics"]["Accuracy"] == pytest.approx(100 * right / 4)


def test_chat_prompt_mul_on_a_causal_chat_model(tmp_path):
    folder = build_tiny_chat_model(tmp_path / "c3", family="chatglm3")
    model, tok = glmkit.load_model(folder), glmkit.load_tokenizer(folder)
    rows = [{"inputs_pretokenized": "the cat", "choices_pretokenized": [" runs", " dog"], "label": 0}]
    task = write_task(tmp_path, "chatmul", {"type": "mul", "prompt": "chat"}, rows)
    res = evaluate_tasks(model, tok, [task], progress=False)["tasks"]["chatmul"]
    prompt = list(build_chat_input(tok, "the cat"))  # <|user|> ... <|assistant|>: the choices follow
    scores = []
    with torch.inference_mode():
        for c in (" runs", " dog"):
            ids = tok.encode(c, add_special_tokens=False)
            logits = model(torch.tensor([prompt + ids[:-1]]))[0]
            lp = torch.log_softmax(logits[len(prompt) - 1:].float(), -1)
            scores.append(float(lp[torch.arange(len(ids)), torch.tensor(ids)].sum()))
    expected = 100.0 if scores[0] > scores[1] else 0.0
    assert res["groups"]["all"]["files"]["test.jsonl"]["metrics"]["Accuracy"] == expected


def test_glm130b_task_files_run_unchanged_on_their_data_layout(tmp_path, tiny):
    """GLM-130B's own mmlu.yaml, lambada.yaml (beam search, 16 beams) and wikitext-2.yaml, with a data folder laid
    out as theirs expects (--data-path)."""
    model, tok = tiny
    tasks = REPO / "tests" / "data" / "glm130b_eval" / "tasks"
    for group in ("stem", "humanities"):
        (tmp_path / "MMLU" / group).mkdir(parents=True)
        (tmp_path / "MMLU" / group / "x.json").write_text(
            "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in MUL_ROWS[:2]), encoding="utf-8")
    (tmp_path / "lambada" / "lambada" / "p1").mkdir(parents=True)
    (tmp_path / "lambada" / "lambada" / "p1" / "test.jsonl").write_text(
        json.dumps({"inputs_pretokenized": "白日依山盡，黃河入海", "targets_pretokenized": ["流"]}, ensure_ascii=False)
        + "\n", encoding="utf-8")
    (tmp_path / "wikitext-2").mkdir()
    (tmp_path / "wikitext-2" / "wiki.test.tokens").write_text(" = Valkyria = \n Call me Ishmael . \n", encoding="utf-8")
    res = evaluate_tasks(model, tok, [tasks / "mmlu.yaml", tasks / "lambada.yaml", tasks / "wikitext-2.yaml"],
                         data_path=tmp_path, batch_size=4, progress=False)["tasks"]
    assert set(res["MMLU"]["groups"]) == {"stem", "humanities"}  # groups without files are left out
    assert res["MMLU"]["overall"]["Accuracy"]["average"] == res["MMLU"]["groups"]["stem"]["stats"]["Accuracy"]["max"]
    assert set(res["LAMBADA"]["groups"]["test"]["stats"]) == {"Accuracy"}
    ppl = res["WikiText-2"]["groups"]["test"]["stats"]["PPL"]["average"]
    assert 1.0 < ppl <= math.exp(20)
