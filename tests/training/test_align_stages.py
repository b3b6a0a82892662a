"""`glmkit finetune --stage rm|dpo|grpo` end to end on glm-tiny (and the other families' tiny checkpoints): the
reward model's folder and pairwise accuracy, DPO from an SFT adapter with the reference = the start, GRPO with a
reward function and with a reward model, exact resume, P-tuning over an INT8 base, torchrun, bad data."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import glmkit
from glmkit.adapters.lora import apply_lora, save_lora_adapter
from glmkit.commands.finetune import cli_main
from glmkit.training.reward import load_reward_model, score
from tests.helpers.chat_models import build_tiny_chat_model
from tests.helpers.common import free_port
from tests.helpers.goldens import GLM_DATA

FORMS = ["五言絕句", "七言絕句", "五言律詩", "七言律詩"]
POEMS = {"五言絕句": "空山不見人，但聞人語響。返景入深林，復照青苔上。",
         "七言絕句": "朝辭白帝彩雲間，千里江陵一日還。兩岸猿聲啼不住，輕舟已過萬重山。",
         "五言律詩": "國破山河在，城春草木深。感時花濺淚，恨別鳥驚心。烽火連三月，家書抵萬金。白頭搔更短，渾欲不勝簪。",
         "七言律詩": "風急天高猿嘯哀，渚清沙白鳥飛回。無邊落木蕭蕭下，不盡長江滾滾來。萬里悲秋常作客，百年多病獨登臺。"
                     "艱難苦恨繁霜鬢，潦倒新停濁酒杯。"}


def _pairs_file(path: Path, n: int, offset: int = 0) -> Path:
    with open(path, "w", encoding="utf-8") as f:
        for i in range(n):
            form = FORMS[(i + offset) % 4]
            other = FORMS[(i + offset + 1) % 4]
            f.write(json.dumps({"prompt": f"作者#某{i}*體裁#{form}*題目#題{i}", "chosen": POEMS[form],
                                "rejected": POEMS[other]}, ensure_ascii=False) + "\n")
    return path


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("pairs")
    return {"train": _pairs_file(root / "train.json", 16), "dev": _pairs_file(root / "dev.json", 8, offset=1),
            "root": root}


@pytest.fixture(scope="module")
def sft_adapter(tmp_path_factory):
    """A LoRA adapter standing in for the SFT stage's checkpoint (random, so the start differs from the base)."""
    folder = tmp_path_factory.mktemp("sft")
    model = glmkit.load_model("glm-tiny")
    apply_lora(model, 4, 8, 0.0, "all")
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.02)
    save_lora_adapter(model, folder, base_model_name_or_path="glm-tiny")
    return folder


def _common(out: Path, *extra: str, model: str = "glm-tiny") -> list[str]:
    return ["--model_name_or_path", model, "--output_dir", str(out), "--disable_tqdm", "--max_source_length", "40",
            "--max_target_length", "80", "--per_device_train_batch_size", "2", "--per_device_eval_batch_size", "4",
            "--num_threads", "1", *extra]


def _history(ckpt: Path) -> list[dict]:
    return json.loads((ckpt / "trainer_state.json").read_text())["log_history"]


def test_reward_model_stage_trains_saves_and_scores(data, tmp_path):
    out = tmp_path / "rm"
    assert cli_main(_common(out, "--stage", "rm", "--do_train", "--do_eval", "--train_file", str(data["train"]),
                            "--validation_file", str(data["dev"]), "--method", "lora", "--lora_target", "all",
                            "--learning_rate", "5e-3", "--max_steps", "12", "--logging_steps", "4")) == 0
    results = json.loads((out / "all_results.json").read_text())
    assert 0.0 <= results["eval_accuracy"] <= 1.0 and results["eval_samples"] == 8
    log = _history(out / "checkpoint-12")
    assert {"loss", "accuracy", "rewards/chosen", "rewards/rejected", "rewards/margins"} <= set(log[-1])
    # the folder loads back on its own and scores the held-out pairs as the run's evaluation did
    rm, tok = load_reward_model(out / "checkpoint-12")
    rows = [json.loads(line) for line in data["dev"].read_text().splitlines()]
    good = score(rm, tok, [r["prompt"] for r in rows], [r["chosen"] for r in rows])
    bad = score(rm, tok, [r["prompt"] for r in rows], [r["rejected"] for r in rows])
    assert sum(g > b for g, b in zip(good, bad)) / len(rows) == pytest.approx(results["eval_accuracy"])
    assert sum(good) / len(good) == pytest.approx(results["eval_rewards_chosen"], abs=1e-3)
    assert (tmp_path / "rm" / "tensorboard").is_dir()


def test_dpo_from_an_sft_adapter(data, sft_adapter, tmp_path):
    out = tmp_path / "dpo"
    # two pairs, every step: DPO must move them apart (and --do_eval must see it on the same pairs)
    assert cli_main(_common(out, "--stage", "dpo", "--do_train", "--do_eval", "--train_file", str(data["train"]),
                            "--validation_file", str(data["train"]), "--max_train_samples", "2",
                            "--max_eval_samples", "2", "--method", "lora", "--adapter", str(sft_adapter),
                            "--learning_rate", "5e-3", "--max_steps", "6", "--logging_steps", "1")) == 0
    log = _history(out / "checkpoint-6")
    # step 1: the policy is the start = the reference, so the loss is log 2 and the rewards are 0
    assert log[0]["loss"] == pytest.approx(0.6931, abs=1e-3)
    assert log[0]["rewards/chosen"] == pytest.approx(0.0, abs=1e-4)
    assert {"rewards/accuracies", "rewards/margins", "logps/chosen", "logps/rejected"} <= set(log[0])
    assert log[-1]["rewards/margins"] > 0 and log[-1]["loss"] < 0.6931
    results = json.loads((out / "all_results.json").read_text())
    assert results["eval_rewards_margins"] > 0 and results["eval_rewards_accuracies"] == 1.0
    # the checkpoint is the continued SFT adapter: loads like any adapter, differs from the start
    tok = glmkit.load_tokenizer("glm-tiny")
    ids = torch.tensor([tok.encode("作者#某*體裁#五言絕句*題目#題")])
    with torch.no_grad():
        start = glmkit.load_model("glm-tiny", adapter=sft_adapter)(ids)
        tuned = glmkit.load_model("glm-tiny", adapter=out / "checkpoint-6")(ids)
    assert not torch.allclose(start, tuned, atol=1e-4)


@pytest.mark.parametrize("loss", ["ipo", "simpo"])
def test_other_preference_losses_run(data, tmp_path, loss):
    out = tmp_path / loss
    assert cli_main(_common(out, "--stage", "dpo", "--pref_loss", loss, "--do_train", "--train_file",
                            str(data["train"]), "--method", "lora", "--learning_rate", "5e-3", "--max_steps", "2",
                            "--logging_steps", "1", "--beta", "2.0" if loss == "simpo" else "0.1")) == 0
    assert (out / "checkpoint-2" / "adapter_model.safetensors").is_file()


def test_dpo_resume_continues_identically(data, sft_adapter, tmp_path):
    args = ["--stage", "dpo", "--do_train", "--train_file", str(data["train"]), "--method", "lora", "--adapter",
            str(sft_adapter), "--learning_rate", "5e-3", "--save_steps", "2", "--max_steps", "4",
            "--logging_steps", "1"]
    a, b = tmp_path / "a", tmp_path / "b"
    assert cli_main(_common(a, *args)) == 0
    assert cli_main(_common(b, *args, "--resume_from_checkpoint", str(a / "checkpoint-2"))) == 0
    wa = load_file(str(a / "checkpoint-4" / "adapter_model.safetensors"))
    wb = load_file(str(b / "checkpoint-4" / "adapter_model.safetensors"))
    assert wa.keys() == wb.keys() and all(torch.allclose(wa[k], wb[k], atol=1e-7) for k in wa)
    # the resumed run's reference is still the SFT start: its logged rewards match the uninterrupted run's
    assert _history(b / "checkpoint-4")[-1]["rewards/margins"] == pytest.approx(
        _history(a / "checkpoint-4")[-1]["rewards/margins"], abs=1e-4)


def test_grpo_with_the_poem_form_reward_and_resume(data, tmp_path):
    args = ["--stage", "grpo", "--do_train", "--train_file", str(data["train"]), "--method", "lora",
            "--reward_function", "poem_form", "--num_generations", "4", "--max_target_length", "24",
            "--learning_rate", "5e-3", "--save_steps", "1", "--max_steps", "2", "--logging_steps", "1"]
    a, b = tmp_path / "a", tmp_path / "b"
    assert cli_main(_common(a, *args)) == 0
    log = _history(a / "checkpoint-2")
    assert {"reward", "reward_std", "kl", "clip_ratio", "completion_length"} <= set(log[0])
    assert log[0]["kl"] == pytest.approx(0.0, abs=1e-6)  # step 1 samples from the reference itself
    assert cli_main(_common(b, *args, "--resume_from_checkpoint", str(a / "checkpoint-1"))) == 0
    wa = load_file(str(a / "checkpoint-2" / "adapter_model.safetensors"))
    wb = load_file(str(b / "checkpoint-2" / "adapter_model.safetensors"))
    assert all(torch.allclose(wa[k], wb[k], atol=1e-7) for k in wa)  # the same samples after resuming


def test_grpo_with_a_reward_model_and_a_reward_file(data, tmp_path):
    rm_out = tmp_path / "rm"
    assert cli_main(_common(rm_out, "--stage", "rm", "--do_train", "--train_file", str(data["train"]), "--method",
                            "lora", "--max_steps", "1")) == 0
    out = tmp_path / "grpo"
    assert cli_main(_common(out, "--stage", "grpo", "--do_train", "--train_file", str(data["train"]), "--method",
                            "lora", "--reward_model", str(rm_out / "checkpoint-1"), "--num_generations", "2",
                            "--max_target_length", "16", "--max_steps", "1", "--logging_steps", "1")) == 0
    assert "reward" in _history(out / "checkpoint-1")[0]
    (tmp_path / "r.py").write_text("def shortest(prompts, completions):\n    return [-len(c) for c in completions]\n")
    out = tmp_path / "grpo-file"
    assert cli_main(_common(out, "--stage", "grpo", "--do_train", "--train_file", str(data["train"]), "--pre_seq_len",
                            "4", "--quantization_bit", "8", "--reward_function", f"{tmp_path / 'r.py'}:shortest",
                            "--num_generations", "2", "--max_target_length", "16", "--max_steps", "1",
                            "--learning_rate", "1e-2")) == 0
    assert (out / "checkpoint-1" / "pytorch_model.bin").is_file()  # a P-tuning checkpoint over the INT8 base


@pytest.mark.parametrize("family", ["chatglm3", "glm"])
def test_dpo_and_grpo_on_other_families(tmp_path, family):
    if family == "chatglm3":
        model, prompt, good, bad = str(build_tiny_chat_model(tmp_path / "m", "chatglm3")), "the cat", "runs", "a dog"
    else:  # the original GLM's blank layout (max_sequence_length 40)
        model, prompt, good, bad = str(GLM_DATA / "chinese"), "清华大学位于[MASK]。", "北京", "上海市"
    train = tmp_path / "pairs.json"
    train.write_text("".join(json.dumps({"prompt": prompt, "chosen": good, "rejected": bad}, ensure_ascii=False)
                             + "\n" for _ in range(4)), encoding="utf-8")
    (tmp_path / "r.py").write_text("def shortest(prompts, completions):\n    return [-len(c) for c in completions]\n")
    for stage, extra in (("dpo", []), ("grpo", ["--reward_function", f"{tmp_path / 'r.py'}:shortest",
                                                 "--num_generations", "2"])):
        out = tmp_path / stage
        assert cli_main(_common(out, "--stage", stage, "--do_train", "--train_file", str(train), "--method", "lora",
                                "--max_steps", "1", "--max_source_length", "16", "--max_target_length", "8", *extra,
                                model=model)) == 0
        assert (out / "checkpoint-1" / "adapter_config.json").is_file()


def test_bad_data_and_options_say_what_is_wrong(data, tmp_path, capsys):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"prompt": "p", "chosen": "a"}) + "\n", encoding="utf-8")
    assert cli_main(_common(tmp_path / "x", "--stage", "dpo", "--do_train", "--train_file", str(bad),
                            "--method", "lora")) == 2
    assert "row 1 has no column(s) ['rejected']" in capsys.readouterr().err
    assert cli_main(_common(tmp_path / "x", "--stage", "grpo", "--do_train", "--train_file", str(data["train"]),
                            "--method", "lora")) == 2
    assert "needs one reward" in capsys.readouterr().err
    assert cli_main(_common(tmp_path / "x", "--stage", "dpo", "--do_train", "--train_file", str(data["train"]),
                            "--method", "lora", "--max_source_length", "8")) == 2
    assert "row 1: the prompt is" in capsys.readouterr().err


@pytest.mark.slow
@pytest.mark.skipif(sys.platform != "linux", reason="torchrun with gloo is exercised on Linux")
def test_dpo_under_torchrun_two_processes(data, sft_adapter, tmp_path):
    out = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
           str(free_port()), "-m", "glmkit.commands.finetune",
           *_common(out, "--stage", "dpo", "--do_train", "--train_file", str(data["train"]), "--method", "lora",
                    "--adapter", str(sft_adapter), "--max_steps", "2", "--logging_steps", "1", "--device", "cpu")]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    state = json.loads((out / "checkpoint-2" / "trainer_state.json").read_text())
    assert state["world_size"] == 2
    assert state["log_history"][0]["loss"] == pytest.approx(0.6931, abs=1e-3)
    glmkit.load_model("glm-tiny", adapter=out / "checkpoint-2")
