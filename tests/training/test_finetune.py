"""`glmkit finetune` and glmkit.training.data.finetune: main.py's data rules token by token, the training loop's
guarantees (frozen base, adapter-only checkpoints, exact resume), prediction files, and the CLI end to end.

Everything runs on tiny tokenizers and models these tests train/initialise themselves (no shared data needed)."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from glmkit.commands.finetune import cli_main, parse_args
from glmkit.training.data.finetune import (
    IGNORE_INDEX,
    Columns,
    Lengths,
    collate_prompts,
    collate_train,
    eval_example,
    train_example,
)
from glmkit.training.finetune import load_for_finetune
from glmkit.training.finetune_loop import linear_schedule, lm_loss, train
from tests.helpers.common import free_port

CHARS = "春花秋月何時了往事知多少小樓昨夜又東風故國不堪回首明中雕欄玉砌應猶在只是朱顏改問君能有幾愁恰似一江水向流问答"


def _sentences(n: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    return ["".join(rng.choice(CHARS) for _ in range(rng.randint(4, 24))) for _ in range(n)]


def _make_tokenizer(folder: Path, family: str):
    from glmkit.training.tokenizer import train_tokenizer

    text = folder / "text.txt"
    text.parent.mkdir(parents=True, exist_ok=True)
    lines = _sentences(300, 0) + ["[Round 0]", "[Round 1]", "问：", "答：", "作者#體裁#題目"]
    text.write_text("\n".join(lines), encoding="utf-8")
    vocab = 460 if family == "chatglm" else 420
    return train_tokenizer([text], vocab, family, folder / "tok", character_coverage=1.0)


def _make_model_dir(folder: Path, tok, seed: int = 0) -> Path:
    from glmkit.core.causal_lm import GLMForCausalLM
    from glmkit.core.config import GLMConfig
    from glmkit.loading.loader import save_model

    if tok.family == "chatglm":
        cfg = GLMConfig(vocab_size=len(tok), hidden_size=32, num_layers=2, num_heads=4, ffn_hidden_size=64,
                        max_seq_len=512, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                        pad_token_id=tok.pad_token_id, mask_token_id=tok.mask_token_id,
                        gmask_token_id=tok.gmask_token_id, family="chatglm")
    else:
        cfg = GLMConfig.from_name("chatglm2-6b", vocab_size=len(tok), hidden_size=32, num_layers=2, num_heads=4,
                                  num_kv_heads=2, head_dim=8, ffn_hidden_size=48, max_seq_len=512,
                                  eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                                  torch_dtype="float32")
    torch.manual_seed(seed)
    model = GLMForCausalLM(cfg)
    model.init_weights(std=0.1, generator=torch.Generator().manual_seed(seed))
    return save_model(model, folder / "model", tokenizer=tok)


def _write_rows(path: Path, n: int, seed: int, chat: bool = False) -> Path:
    rng = random.Random(seed)
    sents = _sentences(3 * n, seed)
    with open(path, "w", encoding="utf-8") as f:
        for i in range(n):
            if chat:
                row = {"prompt": sents[3 * i], "response": sents[3 * i + 1],
                       "history": [[sents[3 * i + 2][:5], sents[3 * i + 2][5:] or "春"]] if i % 2 else []}
            else:
                row = {"content": "作者#" + sents[3 * i][:6], "summary": sents[3 * i + 1]}
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
        del rng
    return path


@pytest.fixture(scope="module")
def v1(tmp_path_factory):
    root = tmp_path_factory.mktemp("v1")
    tok = _make_tokenizer(root, "chatglm")
    return {"tok": tok, "model": _make_model_dir(root, tok), "train": _write_rows(root / "train.json", 48, 1),
            "dev": _write_rows(root / "dev.json", 6, 2), "chat": _write_rows(root / "chat.json", 16, 3, chat=True)}


@pytest.fixture(scope="module")
def v2(tmp_path_factory):
    root = tmp_path_factory.mktemp("v2")
    tok = _make_tokenizer(root, "chatglm2")
    return {"tok": tok, "model": _make_model_dir(root, tok), "train": _write_rows(root / "train.json", 24, 1),
            "dev": _write_rows(root / "dev.json", 4, 2)}


def _args(*argv: str):
    return parse_args(argv)


def _common(env: dict, out: Path, *extra: str) -> list[str]:
    return ["--model_name_or_path", str(env["model"]), "--output_dir", str(out), "--disable_tqdm",
            "--max_source_length", "16", "--max_target_length", "24", *extra]


# ------------------------------------------------------------------------------------------------ data rules
def test_chatglm_train_example_token_by_token(v1):
    tok = v1["tok"]
    row = {"content": "春花秋月何時了往事知多少", "summary": "小樓昨夜又東風故國不堪回首月明中"}
    a = tok.encode(row["content"], add_special_tokens=False)
    b = tok.encode(row["summary"], add_special_tokens=False)
    assert len(a) > 5 and len(b) > 6, "the example must exercise truncation"
    gmask, sop, eop = tok.gmask_token_id, tok.sop_token_id, tok.eop_token_id
    ex = train_example(tok, row, Columns("content", "summary"), Lengths(max_source_length=6, max_target_length=8))
    # main.py: a[:src-1] + [gMASK, <sop>] + b[:tgt-2] + [<eop>]; labels -100 up to <sop>, then the ids themselves
    assert ex["input_ids"] == a[:5] + [gmask, sop] + b[:6] + [eop]
    assert ex["labels"] == [IGNORE_INDEX] * 6 + [sop] + b[:6] + [eop]
    # eval: tokenizer(prompt, max_length=src, truncation) = a[:src-2] + [gMASK, <sop>]; label text = decode(b[:tgt-2])
    ev = eval_example(tok, row, Columns("content", "summary"), Lengths(max_source_length=6, max_target_length=8))
    assert ev["input_ids"] == a[:4] + [gmask, sop]
    assert ev["label_ids"] == b[:6] and ev["label"] == tok.decode(b[:6]).strip()


def test_chatglm_history_template(v1):
    tok = v1["tok"]
    cols = Columns("prompt", "response", "history")
    lengths = Lengths(max_source_length=200, max_target_length=50)
    row = {"prompt": "春花", "response": "秋月", "history": [["何時", "了往事"], ["知多", "少"]]}
    text = "[Round 0]\n问：何時\n答：了往事\n[Round 1]\n问：知多\n答：少\n[Round 2]\n问：春花\n答："
    a = tok.encode(text, add_special_tokens=False)
    ex = train_example(tok, row, cols, lengths)
    assert ex["input_ids"][: len(a) + 2] == a + [tok.gmask_token_id, tok.sop_token_id]
    assert eval_example(tok, row, cols, lengths)["input_ids"] == a + [tok.gmask_token_id, tok.sop_token_id]
    # main.py quirk kept: with --history_column, training templates even an empty history; evaluation does not
    empty = {"prompt": "春花", "response": "秋月", "history": []}
    a0 = tok.encode("[Round 0]\n问：春花\n答：", add_special_tokens=False)
    assert train_example(tok, empty, cols, lengths)["input_ids"][: len(a0)] == a0
    assert eval_example(tok, empty, cols, lengths)["input_ids"] == tok.encode("春花", add_special_tokens=False) + [
        tok.gmask_token_id, tok.sop_token_id]


def test_chatglm2_example_token_by_token(v2):
    tok = v2["tok"]
    assert tok.family == "chatglm2"
    cols = Columns("prompt", "response", "history")
    row = {"prompt": "春花秋月", "response": "何時了往事知多少小樓昨夜", "history": [["東風", "故國"]]}
    text = "[Round 1]\n\n问：東風\n\n答：故國\n\n[Round 2]\n\n问：春花秋月\n\n答："
    a = tok.encode(text, add_special_tokens=False)
    b = tok.encode(row["response"], add_special_tokens=False)
    src, tgt = 10, 5
    assert len(a) > src - 2 and len(b) > tgt
    ex = train_example(tok, row, cols, Lengths(max_source_length=src, max_target_length=tgt))
    prefix = [tok.gmask_token_id, tok.sop_token_id]
    # ChatGLM2 main.py: encode(prompt, add_special_tokens=True, max_length=src) = [gMASK, sop] + a[:src-2];
    # b = encode(answer, max_length=tgt); labels = pad * len(a) + b + [eos], pads -> -100
    assert ex["input_ids"] == prefix + a[: src - 2] + b[:tgt] + [tok.eos_token_id]
    assert ex["labels"] == [IGNORE_INDEX] * src + b[:tgt] + [tok.eos_token_id]
    ev = eval_example(tok, row, cols, Lengths(max_source_length=src, max_target_length=tgt))
    assert ev["input_ids"] == prefix + a[: src - 2] and ev["label_ids"] == b[: tgt - 2]


def test_rows_without_prompt_or_response_are_skipped(v1):
    cols, lengths = Columns(), Lengths()
    assert train_example(v1["tok"], {"content": "", "summary": "春"}, cols, lengths) is None
    assert eval_example(v1["tok"], {"content": "春", "summary": ""}, cols, lengths) is None


def test_collators_pad_right_for_training_and_left_for_prompts():
    b = collate_train([{"input_ids": [5, 6, 7], "labels": [-100, 6, 7]}, {"input_ids": [8], "labels": [8]}], 3)
    assert b["input_ids"].tolist() == [[5, 6, 7], [8, 3, 3]]
    assert b["labels"].tolist() == [[-100, 6, 7], [8, -100, -100]]
    p = collate_prompts([[5, 6, 7], [8]], 3)
    assert p["input_ids"].tolist() == [[5, 6, 7], [3, 3, 8]]
    assert p["attention_mask"].tolist() == [[1, 1, 1], [0, 0, 1]]


# ------------------------------------------------------------------------------------------------ loop pieces
def test_selected_positions_loss_equals_full_logits_loss(v1):
    from glmkit.loading.loader import load_model

    model = load_model(v1["model"])
    ids = torch.randint(5, 300, (2, 12))
    labels = ids.clone()
    labels[:, :7] = IGNORE_INDEX
    labels[1, 10:] = IGNORE_INDEX
    a, n = lm_loss(model, ids, labels)
    b, m = lm_loss(model, ids, labels, select_positions=False)
    assert n == m == 5 + 3  # labels at positions 7..11 and 7..9
    torch.testing.assert_close(a, b)


def test_linear_schedule_matches_hf_default():
    f = linear_schedule(0, 10)
    assert [f(s) for s in (0, 1, 5, 10, 12)] == [1.0, 0.9, 0.5, 0.0, 0.0]
    g = linear_schedule(2, 10)
    assert [g(s) for s in (0, 1, 2, 6)] == [0.0, 0.5, 1.0, 0.5]


def test_ptuning_trains_only_the_prefix(v1, tmp_path):
    args = _args(*_common(v1, tmp_path, "--do_train", "--train_file", str(v1["train"]), "--pre_seq_len", "4",
                          "--max_steps", "3", "--learning_rate", "5e-2", "--per_device_train_batch_size", "4"))
    model, tok = load_for_finetune(args, "ptuning")
    base = {k: v.clone() for k, v in model.state_dict().items() if not k.startswith("prefix_encoder")}
    prefix = model.prefix_encoder.embedding.weight.detach().clone()
    from glmkit.training.data.finetune import build_examples, read_rows

    examples = build_examples(tok, read_rows(args.train_file), Columns(), Lengths(16, 24), train=True)
    metrics = train(model, tok, examples, args, "ptuning", torch.device("cpu"))
    assert metrics["global_step"] == 3
    after = model.state_dict()
    for k, v in base.items():
        assert torch.equal(after[k], v), f"frozen weight {k} changed"
    assert not torch.equal(model.prefix_encoder.embedding.weight, prefix)


def test_ptuning_prefix_trains_in_fp32_over_a_bf16_base(v1, tmp_path):
    # main.py: model.half(), then prefix_encoder.float(). A bf16 prefix would round away Adam's steps of about lr
    # on elements of magnitude ~1 (bf16 spacing there is 2^-7), so the prefix would stop learning as lr decays.
    lr = 1e-3
    args = _args(*_common(v1, tmp_path, "--do_train", "--train_file", str(v1["train"]), "--pre_seq_len", "4",
                          "--max_steps", "1", "--learning_rate", str(lr), "--per_device_train_batch_size", "4",
                          "--dtype", "bfloat16"))
    model, tok = load_for_finetune(args, "ptuning")
    assert model.h[0].attn.qkv.weight.dtype == torch.bfloat16
    assert all(p.dtype == torch.float32 for p in model.prefix_encoder.parameters())
    before = model.prefix_encoder.embedding.weight.detach().clone()
    from glmkit.training.data.finetune import build_examples, read_rows

    examples = build_examples(tok, read_rows(args.train_file), Columns(), Lengths(16, 24), train=True)
    train(model, tok, examples, args, "ptuning", torch.device("cpu"))
    step = (model.prefix_encoder.embedding.weight.detach() - before).abs()
    # Adam's first step moves every element with a gradient by lr (prefix dropout may zero a few gradients)
    assert float(((step > 0.5 * lr) & (step < 1.5 * lr)).float().mean()) > 0.9


def test_zero_length_prefix_equals_base(v1):
    from glmkit.adapters.ptuning import attach_prefix
    from glmkit.loading.loader import load_model

    model = load_model(v1["model"])
    ids = torch.tensor([v1["tok"].encode("春花秋月", add_special_tokens=False) + [v1["tok"].gmask_token_id,
                                                                                v1["tok"].sop_token_id, 20, 21]])
    before = model(ids)
    attach_prefix(model, 0)
    torch.testing.assert_close(model(ids), before, rtol=0, atol=0)


# ------------------------------------------------------------------------------------------------ CLI end to end
def test_ptuning_checkpoints_resume_and_predict(v1, tmp_path):
    train_args = ["--do_train", "--train_file", str(v1["train"]), "--pre_seq_len", "4", "--learning_rate", "2e-2",
                  "--per_device_train_batch_size", "4", "--gradient_accumulation_steps", "2", "--save_steps", "2",
                  "--logging_steps", "1", "--max_steps", "4", "--seed", "7"]
    a, b = tmp_path / "a", tmp_path / "b"
    assert cli_main(_common(v1, a, *train_args)) == 0
    assert sorted(p.name for p in a.iterdir() if p.name.startswith("checkpoint")) == ["checkpoint-2", "checkpoint-4"]
    ckpt = a / "checkpoint-4"
    sd = torch.load(ckpt / "pytorch_model.bin", weights_only=True)
    assert set(sd) == {"transformer.prefix_encoder.embedding.weight"}  # prefix only, THUDM's key
    assert json.loads((ckpt / "config.json").read_text())["pre_seq_len"] == 4
    state = json.loads((ckpt / "trainer_state.json").read_text())
    lrs = [e["learning_rate"] for e in state["log_history"]]
    assert lrs == pytest.approx([2e-2 * (1 - s / 4) for s in (1, 2, 3, 4)])
    assert all(e["tokens_per_second"] > 0 for e in state["log_history"])

    # resuming from step 2 (prefix dropout draws from the restored RNG) reproduces step 4 exactly
    assert cli_main(_common(v1, b, *train_args, "--resume_from_checkpoint", str(a / "checkpoint-2"))) == 0
    resumed = torch.load(b / "checkpoint-4" / "pytorch_model.bin", weights_only=True)
    assert torch.equal(resumed["transformer.prefix_encoder.embedding.weight"],
                       sd["transformer.prefix_encoder.embedding.weight"])
    def losses(history):
        return [(e["step"], e["loss"], e["learning_rate"]) for e in history]

    resumed_state = json.loads((b / "checkpoint-4" / "trainer_state.json").read_text())
    assert losses(resumed_state["log_history"])[-2:] == losses(state["log_history"])[-2:]

    # predict with the checkpoint, as evaluate.sh does (pre_seq_len read from the checkpoint)
    pred = tmp_path / "pred"
    assert cli_main(_common(v1, pred, "--do_predict", "--test_file", str(v1["dev"]), "--predict_with_generate",
                            "--ptuning_checkpoint", str(ckpt), "--generation_max_length", "48")) == 0
    results = json.loads((pred / "predict_results.json").read_text())
    for k in ("predict_rouge-1", "predict_rouge-2", "predict_rouge-l", "predict_bleu-4"):
        assert 0.0 <= results[k] <= 100.0
    lines = [json.loads(x) for x in (pred / "generated_predictions.txt").read_text(encoding="utf-8").splitlines()]
    dev = [json.loads(x) for x in v1["dev"].read_text(encoding="utf-8").splitlines()]
    assert len(lines) == len(dev) and all(set(x) == {"labels", "predict"} for x in lines)
    assert [x["labels"] for x in lines] == [v1["tok"].decode(v1["tok"].encode(r["summary"], False)).strip()
                                            for r in dev]


def test_generation_length_is_main_pys_source_plus_target_plus_one(v1, v2):
    # ChatGLM-6B's main.py (since its May 2023 fix) and ChatGLM2's generate up to max_source_length +
    # max_target_length + 1 tokens in all; the first release's fixed 512 is gone from both
    from glmkit.training.finetune_predict import generation_length

    for env in (v1, v2):
        args = _args("--model_name_or_path", str(env["model"]), "--output_dir", "x", "--do_predict", "--test_file",
                     "t.json", "--max_source_length", "64", "--max_target_length", "128")
        assert generation_length(args, env["tok"]) == 193
        args.generation_max_length = 300
        assert generation_length(args, env["tok"]) == 300


def test_prefix_projection_checkpoint_keys(v1, tmp_path):
    assert cli_main(_common(v1, tmp_path, "--do_train", "--train_file", str(v1["train"]), "--pre_seq_len", "3",
                            "--prefix_projection", "--max_steps", "1", "--per_device_train_batch_size", "2")) == 0
    sd = torch.load(tmp_path / "checkpoint-1" / "pytorch_model.bin", weights_only=True)
    assert set(sd) == {"transformer.prefix_encoder.embedding.weight", "transformer.prefix_encoder.trans.0.weight",
                       "transformer.prefix_encoder.trans.0.bias", "transformer.prefix_encoder.trans.2.weight",
                       "transformer.prefix_encoder.trans.2.bias"}


def test_lora_finetune_cli(v1, tmp_path):
    out = tmp_path / "lora"
    assert cli_main(_common(v1, out, "--do_train", "--do_eval", "--predict_with_generate", "--train_file",
                            str(v1["train"]), "--validation_file", str(v1["dev"]), "--method", "lora",
                            "--lora_rank", "4", "--lora_target", "attn.qkv,mlp.fc", "--learning_rate", "1e-2",
                            "--max_steps", "2", "--per_device_train_batch_size", "4", "--do_sample", "false",
                            "--generation_max_length", "40")) == 0
    ckpt = out / "checkpoint-2"
    from safetensors.torch import load_file

    keys = set(load_file(str(ckpt / "adapter_model.safetensors")))
    assert keys == {f"base_model.model.h.{i}.{m}.lora_{x}.weight" for i in range(2) for m in ("attn.qkv", "mlp.fc")
                    for x in "AB"}
    eval_metrics = json.loads((out / "eval_results.json").read_text())
    # predicting with the saved adapter (greedy) reproduces the in-memory evaluation exactly
    pred = tmp_path / "pred"
    assert cli_main(_common(v1, pred, "--do_predict", "--test_file", str(v1["dev"]), "--predict_with_generate",
                            "--adapter", str(ckpt), "--do_sample", "false", "--generation_max_length", "40")) == 0
    pred_metrics = json.loads((pred / "predict_results.json").read_text())
    for k in ("rouge-1", "rouge-l", "bleu-4"):
        assert pred_metrics[f"predict_{k}"] == eval_metrics[f"eval_{k}"]


def test_full_finetune_checkpoint_is_a_model_folder(v1, tmp_path):
    from glmkit.loading.loader import load_model

    out = tmp_path / "full"
    assert cli_main(_common(v1, out, "--do_train", "--train_file", str(v1["train"]), "--learning_rate", "1e-3",
                            "--max_steps", "2", "--per_device_train_batch_size", "4")) == 0
    ckpt = out / "checkpoint-2"
    base, tuned = load_model(v1["model"]), load_model(ckpt)
    changed = [n for n, p in tuned.named_parameters() if not torch.equal(p, base.get_parameter(n))]
    assert "h.0.attn.qkv.weight" in changed and "wte.weight" in changed
    from glmkit.core.tokenizer import load_tokenizer

    assert load_tokenizer(ckpt).encode("春花") == v1["tok"].encode("春花")


def test_multi_turn_training_with_history_column(v1, tmp_path):
    assert cli_main(_common(v1, tmp_path, "--do_train", "--train_file", str(v1["chat"]), "--prompt_column",
                            "prompt", "--response_column", "response", "--history_column", "history",
                            "--pre_seq_len", "2", "--max_steps", "2", "--per_device_train_batch_size", "4")) == 0
    assert (tmp_path / "checkpoint-2" / "pytorch_model.bin").is_file()


def test_chatglm2_ptuning_runs(v2, tmp_path):
    assert cli_main(_common(v2, tmp_path, "--do_train", "--do_predict", "--predict_with_generate", "--train_file",
                            str(v2["train"]), "--test_file", str(v2["dev"]), "--pre_seq_len", "2", "--max_steps",
                            "2", "--per_device_train_batch_size", "4")) == 0
    assert json.loads((tmp_path / "predict_results.json").read_text())["predict_samples"] == 4


def test_cli_errors(v1, tmp_path, capsys):
    assert cli_main(_common(v1, tmp_path, "--train_file", str(v1["train"]))) == 2
    assert "nothing to do" in capsys.readouterr().err
    assert cli_main(_common(v1, tmp_path, "--do_train")) == 2
    assert "--do_train requires --train_file" in capsys.readouterr().err
    assert cli_main(_common(v1, tmp_path, "--do_train", "--train_file", str(v1["train"]), "--prompt_column",
                            "nope", "--pre_seq_len", "2")) == 2
    assert "no column(s) ['nope']" in capsys.readouterr().err


@pytest.mark.slow
@pytest.mark.skipif(sys.platform != "linux", reason="torchrun with gloo is exercised on Linux")
def test_full_finetune_under_torchrun_fsdp(v1, tmp_path):
    out = tmp_path / "fsdp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
           str(free_port()), "-m", "glmkit.commands.finetune",
           *_common(v1, out, "--do_train", "--train_file", str(v1["train"]), "--learning_rate", "1e-3",
                    "--max_steps", "2", "--per_device_train_batch_size", "2", "--device", "cpu")]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=240, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    from glmkit.loading.loader import load_model

    tuned, base = load_model(out / "checkpoint-2"), load_model(v1["model"])
    assert not torch.equal(tuned.h[0].attn.qkv.weight, base.h[0].attn.qkv.weight)
    assert json.loads((out / "checkpoint-2" / "trainer_state.json").read_text())["world_size"] == 2


def test_ptuning_over_an_int8_base(v1, tmp_path):
    args = _args(*_common(v1, tmp_path, "--do_train", "--train_file", str(v1["train"]), "--pre_seq_len", "4",
                          "--quantization_bit", "8", "--max_steps", "2", "--learning_rate", "5e-2",
                          "--per_device_train_batch_size", "4"))
    model, tok = load_for_finetune(args, "ptuning")
    assert type(model.h[0].attn.qkv).__name__ == "QuantizedLinear"
    frozen = {k: v.clone() for k, v in model.state_dict().items() if not k.startswith("prefix_encoder")}
    prefix = model.prefix_encoder.embedding.weight.detach().clone()
    from glmkit.training.data.finetune import build_examples, read_rows

    examples = build_examples(tok, read_rows(args.train_file), Columns(), Lengths(16, 24), train=True)
    train(model, tok, examples, args, "ptuning", torch.device("cpu"))
    after = model.state_dict()
    assert all(torch.equal(after[k], v) for k, v in frozen.items())
    assert not torch.equal(model.prefix_encoder.embedding.weight, prefix)  # gradients flowed through INT8 layers


def test_lora_resume_continues_identically(v1, tmp_path):
    from safetensors.torch import load_file

    args = ["--do_train", "--train_file", str(v1["train"]), "--method", "lora", "--lora_dropout", "0.1",
            "--learning_rate", "1e-2", "--per_device_train_batch_size", "4", "--save_steps", "2", "--max_steps", "4"]
    a, b = tmp_path / "a", tmp_path / "b"
    assert cli_main(_common(v1, a, *args)) == 0
    assert cli_main(_common(v1, b, *args, "--resume_from_checkpoint", str(a / "checkpoint-2"))) == 0
    wa = load_file(str(a / "checkpoint-4" / "adapter_model.safetensors"))
    wb = load_file(str(b / "checkpoint-4" / "adapter_model.safetensors"))
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    w2 = load_file(str(a / "checkpoint-2" / "adapter_model.safetensors"))
    assert not all(torch.equal(wa[k], w2[k]) for k in wa)  # steps 3-4 did change the adapter
