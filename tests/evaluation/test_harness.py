"""glmkit as an lm-evaluation-harness backend (glmkit.evaluation.harness): lm-eval's own command line, through
`glmkit eval harness`, on a local custom YAML task gives the numbers `glmkit eval run` gives on the same data; the
three request types against plain forwards and greedy decoding; `lm_eval.simple_evaluate(model=<GLMKitLM>)`."""

from __future__ import annotations

import json
import math

import lm_eval
import pytest
import torch
from lm_eval.api.instance import Instance
from lm_eval.api.registry import get_model
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

import glmkit
from glmkit.commands.eval import cli_main
from glmkit.core.scoring import score_choices_batch
from glmkit.evaluation.harness import GLMKitLM
from glmkit.evaluation.predict import generate_texts
from glmkit.evaluation.run import evaluate_tasks
from tests.helpers.chat_models import build_tiny_chat_model

ROWS = [
    {"inputs_pretokenized": "床前明月光，疑是地上霜。\n", "choices_pretokenized": ["舉頭望明月，", "白日依山盡，", "春"], "label": 0},
    {"inputs_pretokenized": "白日依山盡，", "choices_pretokenized": ["黃河入海流。", "花落知多少。"], "label": 0},
    {"inputs_pretokenized": "Call me Ishmael. Some years ago", "choices_pretokenized": [", never", " the sea"],
     "label": 0},
    {"inputs_pretokenized": "春眠不覺曉，處處聞啼", "choices_pretokenized": ["鳥。", "花。", "月。"], "label": 1},
    {"inputs_pretokenized": "It was the best of times", "choices_pretokenized": [", it was", " and"], "label": 0},
]


@pytest.fixture(autouse=True)
def offline(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))


@pytest.fixture(scope="module")
def tiny():
    return glmkit.load_model("glm-tiny", dtype="float32").eval(), glmkit.load_tokenizer("glm-tiny")


def _req(kind: str, *args) -> Instance:
    return Instance(request_type=kind, doc={}, arguments=tuple(args), idx=0)


def test_backend_is_registered():
    assert get_model("glmkit") is GLMKitLM


def test_cli_custom_task_matches_glmkit_eval(tmp_path, tiny, blank="[MASK]", use_task_mask=False):
    data = tmp_path / "data" / "test.jsonl"
    data.parent.mkdir()
    data.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in ROWS), encoding="utf-8")
    (tmp_path / "lmeval").mkdir()
    (tmp_path / "lmeval" / "nextline.yaml").write_text(f"""task: nextline_local
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{inputs_pretokenized}}}}"
doc_to_choice: "{{{{choices_pretokenized}}}}"
doc_to_target: label
target_delimiter: ""
metric_list:
  - metric: acc
""", encoding="utf-8")
    (tmp_path / "glmkit.yaml").write_text(f"name: nextline\ntype: mul\npath: data\nfile-pattern: test.jsonl\n"
                                          f"use_task_mask: {str(use_task_mask).lower()}\n", encoding="utf-8")
    out = tmp_path / "out"
    rc = cli_main(["harness", "--model", "glmkit", "--model_args", f"pretrained=glm-tiny,dtype=float32,blank={blank}",
                   "--tasks", "nextline_local", "--include_path", str(tmp_path / "lmeval"), "--output_path",
                   str(out), "--log_samples", "--batch_size", "2"])
    assert rc == 0
    results = json.loads(next(out.rglob("results_*.json")).read_text())
    samples = sorted((json.loads(line) for line in next(out.rglob("samples_*.jsonl")).open()),
                     key=lambda s: s["doc_id"])
    model, tok = tiny
    ours = evaluate_tasks(model, tok, [tmp_path / "glmkit.yaml"], progress=False, output_dir=tmp_path / "g")
    acc = ours["tasks"]["nextline"]["overall"]["Accuracy"]["average"]
    assert results["results"]["nextline_local"]["acc,none"] * 100 == pytest.approx(acc)
    cached = [json.loads(line)["r"]["lp"] for line in next((tmp_path / "g" / "cache").rglob("*.jsonl")).open()]
    for s, lp in zip(samples, cached):
        assert [float(r[0]) for r in s["filtered_resps"]] == pytest.approx(lp, abs=1e-4)


def test_loglikelihood_packs_shared_contexts_and_flags_greedy(tiny):
    model, tok = tiny
    lm = GLMKitLM(model=model, tokenizer=tok, batch_size=2)
    reqs = [_req("loglikelihood", "白日依山盡，", "黃河"), _req("loglikelihood", "Call me", " Ishmael"),
            _req("loglikelihood", "白日依山盡，", "花")]
    got = lm.loglikelihood(reqs, disable_tqdm=True)
    for r, (lp, greedy) in zip(reqs, got):
        (one,), = score_choices_batch(model, tok, [(r.args[0] + "[gMASK]", [r.args[1]])])
        assert lp == pytest.approx(one.logprob, abs=1e-4) and greedy is one.greedy
    masked = GLMKitLM(model=model, tokenizer=tok, blank="MASK").loglikelihood(reqs[:1], disable_tqdm=True)[0][0]
    assert masked == pytest.approx(glmkit.score_choices(model, tok, "白日依山盡，[MASK]", ["黃河"])[0], abs=1e-4)
    assert masked != pytest.approx(got[0][0], abs=1e-4)  # [MASK] and [gMASK] are different layouts


@torch.inference_mode()
def test_rolling_windows_against_plain_forwards(tmp_path):
    folder = build_tiny_chat_model(tmp_path / "c2", family="chatglm2")
    model, tok = glmkit.load_model(folder), glmkit.load_tokenizer(folder)
    lm = GLMKitLM(model=model, tokenizer=tok, max_length=8, batch_size=3)
    text = "the cat runs fast and the dog runs slow , hello world the model"
    total = lm.loglikelihood_rolling([_req("loglikelihood_rolling", text)], disable_tqdm=True)[0]
    ids = tok.encode(text, add_special_tokens=False)
    prefix = tok.encode("")
    expected, scored = 0.0, []
    for ctx, pred in map(make_disjoint_window, get_rolling_token_windows(ids, -1, 8 - len(prefix), 1)):
        ctx = [t for t in ctx if t != -1]
        row = prefix + ctx + pred[:-1]
        logp = torch.log_softmax(model(torch.tensor([row]))[0].float(), -1)
        start = len(prefix) + len(ctx) - 1
        expected += float(logp[torch.arange(start, start + len(pred)), torch.tensor(pred)].sum())
        scored += pred
    assert scored == ids and len(ids) > 8  # several windows, every token once
    assert total == pytest.approx(expected, abs=1e-3)


def test_generate_until_and_simple_evaluate(tmp_path, tiny):
    model, tok = tiny
    lm = GLMKitLM(model=model, tokenizer=tok, batch_size=2)
    prompts = ["白日依山盡，", "Call me Ishmael. Some years ago"]
    got = lm.generate_until([_req("generate_until", p, {"until": ["。", "\n"], "max_gen_toks": 8}) for p in prompts],
                            disable_tqdm=True)
    assert got == generate_texts(model, tok, prompts, max_new_tokens=8, stop=["。", "\n"])
    with pytest.raises(ValueError, match="greedily"):
        lm.generate_until([_req("generate_until", "x", {"do_sample": True})], disable_tqdm=True)
    with pytest.raises(ValueError, match="unknown model_args"):
        GLMKitLM(model=model, tokenizer=tok, temperature=1)
    # simple_evaluate with the LM instance, on a local generation task
    data = tmp_path / "gen.jsonl"
    data.write_text("".join(json.dumps({"q": p, "a": a}, ensure_ascii=False) + "\n"
                            for p, a in zip(prompts, [got[0], "no"])), encoding="utf-8")
    task = {"task": "gen_local", "dataset_path": "json", "dataset_kwargs": {"data_files": {"test": str(data)}},
            "test_split": "test", "output_type": "generate_until", "doc_to_text": "{{q}}", "doc_to_target": "{{a}}",
            "generation_kwargs": {"until": ["。", "\n"], "max_gen_toks": 8, "do_sample": False},
            "metric_list": [{"metric": "exact_match"}]}
    res = lm_eval.simple_evaluate(model=lm, tasks=[task])
    em = res["results"]["gen_local"]["exact_match,none"]
    assert em == pytest.approx((1 + float(got[1] == "no")) / 2)
    assert not math.isnan(em)
