"""Fine-tuning the original GLM as THUDM/GLM's seq2seq fine-tuning / the hub's build_inputs_for_generation(targets=)
lay it out: Part A = [CLS] source <|endoftext|> (bidirectional), Part B = <|startofpiece|> target <|endofpiece|> at
the blank's position, loss on Part B only; checked against the hub code's logits for that layout."""

from __future__ import annotations

import json

import pytest
import torch

import glmkit
from glmkit.commands.finetune import cli_main
from glmkit.training.data.finetune import IGNORE_INDEX, Columns, Lengths, collate_train, eval_example, train_example
from glmkit.training.finetune_loop import lm_loss
from tests.helpers.goldens import GLM_DATA, glm_golden, glm_logits_case


@pytest.fixture(scope="module")
def zh():
    return glmkit.load_model(GLM_DATA / "chinese"), glmkit.load_tokenizer(GLM_DATA / "chinese")


def test_train_example_is_the_hub_seq2seq_layout(zh):
    model, tok = zh
    text = glm_golden()["fixtures"]["chinese"]["fill"][0]["text"]  # 清华大学位于[MASK]。
    ex = train_example(tok, {"content": text, "summary": "北京"}, Columns(), Lengths(64, 16))
    a = tok.encode(text)
    b = tok.encode("北京", add_special_tokens=False) + [tok.eop_token_id]
    mask_pos = a.index(tok.mask_token_id)
    assert ex["input_ids"] == a + [tok.sop_token_id] + b and ex["context"] == len(a)
    assert ex["labels"] == [IGNORE_INDEX] * (len(a) + 1) + b  # logits[t] predicts labels[t + 1]: Part B only
    assert ex["position_ids"] == [list(range(len(a))) + [mask_pos] * (len(b) + 1),
                                  [0] * len(a) + list(range(1, len(b) + 2))]
    # the hub's logits for its build_inputs_for_generation(targets=["北京", ...]) batch, row 0
    kwargs, columns, _ = glm_logits_case("chinese", "seq2seq_batch")
    hub_ids = kwargs["input_ids"][0].tolist()
    s = hub_ids.index(tok.sop_token_id)
    ours = list(range(len(a))) + list(range(len(a), len(a) + len(b)))  # all but our trailing <|endofpiece|>
    hub = list(range(len(a))) + list(range(s, s + len(b)))
    assert [ex["input_ids"][i] for i in ours] == [hub_ids[j] for j in hub]
    batch = collate_train([ex], tok.pad_token_id)
    with torch.no_grad():
        logits = model(batch["input_ids"], position_ids=batch["position_ids"], attention_mask=batch["attention_mask"])
    torch.testing.assert_close(logits[0, ours, ::7], columns[0, hub], atol=3e-4, rtol=0)


def test_source_rules_and_loss_on_the_blank_part(zh):
    model, tok = zh
    ex = train_example(tok, {"content": "白日依山尽", "summary": "黄河入海流"}, Columns(), Lengths(64, 4))
    a = tok.encode("白日依山尽[gMASK]")  # no blank: [gMASK] appended
    assert ex["input_ids"][: len(a)] == a and ex["input_ids"][-1] == tok.eop_token_id
    assert len(ex["input_ids"]) == len(a) + 1 + 4  # the target cut to max_target_length - 1, then <|endofpiece|>
    cut = train_example(tok, {"content": "一二三四五六七八九十" * 3 + "[MASK]", "summary": "x"}, Columns(),
                        Lengths(8, 4))
    assert cut["context"] == 8 and cut["input_ids"][0] == tok.cls_token_id  # cut on the left, blank kept
    with pytest.raises(ValueError, match="lost its blank"):
        train_example(tok, {"content": "[MASK]" + "一二三四五六七八九十" * 3, "summary": "x"}, Columns(),
                      Lengths(8, 4))
    with pytest.raises(ValueError, match="no chat format"):
        train_example(tok, {"content": "a", "summary": "b", "h": [["q", "r"]]}, Columns(history="h"),
                      Lengths(64, 8))
    batch = collate_train([ex, train_example(tok, {"content": "今天[MASK]", "summary": "好"}, Columns(),
                                             Lengths(64, 8))], tok.pad_token_id)
    layout = {k: batch[k] for k in ("position_ids", "attention_mask")}
    loss, n = lm_loss(model, batch["input_ids"], batch["labels"], **layout)
    full, m = lm_loss(model, batch["input_ids"], batch["labels"], select_positions=False, **layout)
    assert n == m == 5 + 2 and torch.allclose(loss, full, atol=1e-4)
    ev = eval_example(tok, {"content": "今天[MASK]", "summary": "好"}, Columns(), Lengths(64, 8))
    assert ev["input_ids"] == tok.encode("今天[MASK]") + [tok.sop_token_id] and ev["label"] == "好"


def test_finetune_command_lora_and_ptuning(tmp_path):
    rows = [{"content": f"清华大学位于[MASK]。{i}", "summary": "北京"} for i in range(6)]
    data = tmp_path / "train.json"
    data.write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in rows), encoding="utf-8")
    for method, extra in (("lora", ["--lora_rank", "4", "--learning_rate", "1e-2", "--lora_target", "all"]),
                          ("ptuning", ["--pre_seq_len", "4", "--learning_rate", "3e-2"])):
        out = tmp_path / method
        assert cli_main(["--do_train", "--do_predict", "--train_file", str(data), "--test_file", str(data),
                         "--model_name_or_path", str(GLM_DATA / "chinese"), "--output_dir", str(out),
                         "--method", method, "--max_steps", "12", "--per_device_train_batch_size", "3",
                         "--logging_steps", "4", "--save_steps", "12", "--max_source_length", "24",
                         "--max_target_length", "6", "--disable_tqdm", "--do_sample", "false", *extra]) == 0
        state = json.loads((out / "checkpoint-12" / "trainer_state.json").read_text())
        losses = [e["loss"] for e in state["log_history"] if "loss" in e]
        assert losses[-1] < losses[0], (method, losses)
        preds = (out / "generated_predictions.txt").read_text(encoding="utf-8").splitlines()
        assert len(preds) == 6 and json.loads(preds[0])["labels"] == "北京"
    # the adapter loads back onto the base and fills the blank the way the predictions did
    model = glmkit.load_model(GLM_DATA / "chinese", adapter=tmp_path / "lora" / "checkpoint-12")
    tok = glmkit.load_tokenizer(GLM_DATA / "chinese")
    predicted = json.loads((tmp_path / "lora" / "generated_predictions.txt").read_text(encoding="utf-8")
                           .splitlines()[0])
    answer = glmkit.fill.fill(model, tok, rows[0]["content"], max_new_tokens=6).answers[0]
    assert answer.strip() == predicted["predict"]
