"""On-policy preference pairs (`glmkit.training.pairs.build_preference_pairs`, `glmkit finetune --stage pairs`):
best vs worst of k sampled answers by the reward, deterministic under a seed, in the format `--stage dpo` reads."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import glmkit
from glmkit.commands.finetune import cli_main
from glmkit.training.data.finetune import Lengths
from glmkit.training.data.preference import PreferenceColumns, build_prompts
from glmkit.training.pairs import build_preference_pairs, write_pairs

FORMS = ["五言絕句", "七言絕句", "五言律詩", "七言律詩"]
PROMPTS = [f"作者#某{i}*體裁#{form}*題目#題{i}" for i, form in enumerate(FORMS * 2)]


def shortest(prompts, completions):
    return [-float(len(c)) for c in completions]


@pytest.fixture(scope="module")
def tiny():
    model, tok = glmkit.load_model("glm-tiny"), glmkit.load_tokenizer("glm-tiny")
    prompts = build_prompts(tok, [{"prompt": p} for p in PROMPTS], PreferenceColumns(),
                            Lengths(40, 24, "", True))
    return model, tok, prompts


def test_pairs_are_best_versus_worst_and_deterministic(tiny):
    model, tok, prompts = tiny
    kw = dict(max_new_tokens=24, temperature=1.0, top_p=1.0, batch_size=3, seed=7)
    rows, stats = build_preference_pairs(model, tok, prompts, shortest, 4, **kw)
    again, _ = build_preference_pairs(model, tok, prompts, shortest, 4, **kw)
    assert rows == again  # batch b is sampled with seed + b
    assert stats["prompts"] == 8 and stats["answers"] == 32 and stats["pairs"] == len(rows) > 0
    assert not model.training  # glm-tiny loads in eval mode and stays so
    for row in rows:
        assert row["prompt"] in PROMPTS
        assert row["chosen_reward"] == -len(row["chosen"]) and row["rejected_reward"] == -len(row["rejected"])
        assert row["chosen_reward"] > row["rejected_reward"] and row["chosen"] != row["rejected"]
    # a reward that never differs gives no pair; min_margin drops pairs that differ by no more than it
    assert build_preference_pairs(model, tok, prompts, lambda p, c: [1.0] * len(c), 2, **kw)[0] == []
    gap = min(r["chosen_reward"] - r["rejected_reward"] for r in rows)
    fewer, _ = build_preference_pairs(model, tok, prompts, shortest, 4, min_margin=gap, **kw)
    assert len(fewer) < len(rows)
    with pytest.raises(ValueError, match="k must be at least 2"):
        build_preference_pairs(model, tok, prompts, shortest, 1, **kw)
    with pytest.raises(ValueError, match="returned 1 rewards for"):
        build_preference_pairs(model, tok, prompts, lambda p, c: [0.0], 2, **kw)


def test_conversational_prompts_give_assistant_messages(tiny, tmp_path):
    model, tok, _ = tiny
    msgs = [[{"role": "user", "content": p}] for p in PROMPTS[:2]]
    prompts = build_prompts(tok, [{"prompt": m} for m in msgs], PreferenceColumns(), Lengths(40, 16, "", True))
    rows, _ = build_preference_pairs(model, tok, prompts, shortest, 4, max_new_tokens=16, seed=1)
    assert rows and all(r["prompt"] in msgs and r["chosen"][0]["role"] == "assistant" for r in rows)
    path = write_pairs(rows, tmp_path / "p" / "pairs.json")
    assert [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()] == rows


def _args(out: Path, *extra: str) -> list[str]:
    return ["--model_name_or_path", "glm-tiny", "--output_dir", str(out), "--disable_tqdm", "--max_source_length",
            "40", "--max_target_length", "24", "--num_threads", "1", "--method", "lora", *extra]


def test_stage_pairs_then_dpo(tmp_path, capsys):
    (tmp_path / "r.py").write_text("def shortest(prompts, completions):\n    return [-len(c) for c in completions]\n")
    prompts = tmp_path / "prompts.json"
    prompts.write_text("".join(json.dumps({"prompt": p}, ensure_ascii=False) + "\n" for p in PROMPTS), "utf-8")
    pairs = ["--stage", "pairs", "--train_file", str(prompts), "--reward_function", f"{tmp_path / 'r.py'}:shortest",
             "--num_generations", "3", "--per_device_train_batch_size", "4", "--seed", "3"]
    a, b = tmp_path / "a", tmp_path / "b"
    assert cli_main(_args(a, *pairs)) == 0 and cli_main(_args(b, *pairs)) == 0
    text = (a / "pairs.json").read_text(encoding="utf-8")
    assert text == (b / "pairs.json").read_text(encoding="utf-8") and text
    results = json.loads((a / "pairs_results.json").read_text())
    assert results["pairs_answers"] == 24 and results["pairs_pairs"] == len(text.splitlines())
    out = tmp_path / "dpo"
    assert cli_main(_args(out, "--stage", "dpo", "--do_train", "--train_file", str(a / "pairs.json"),
                          "--per_device_train_batch_size", "2", "--max_steps", "1")) == 0
    assert (out / "checkpoint-1" / "adapter_config.json").is_file()
    capsys.readouterr()
    assert cli_main(_args(tmp_path / "x", "--stage", "pairs", "--train_file", str(prompts))) == 2
    assert "--stage pairs needs one reward" in capsys.readouterr().err
    assert cli_main(_args(tmp_path / "x", "--stage", "pairs", "--train_file", str(prompts), "--reward_function",
                          "poem_form", "--num_generations", "1")) == 2
    assert "--num_generations must be at least 2" in capsys.readouterr().err
