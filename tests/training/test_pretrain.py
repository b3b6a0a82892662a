"""`glmkit pretrain`: the loop, exact resume, and 2-process FSDP (gloo) matching the single-process run."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from glmkit.training.pretrain import config_from_dict, fit, load_config, lr_lambda, setup
from tests.helpers.common import REPO, free_port

POEMS = ["床前明月光，疑是地上霜。\n舉頭望明月，低頭思故鄉。", "白日依山盡，黃河入海流。\n欲窮千里目，更上一層樓。",
         "Call me Ishmael. Some years ago, never mind how long precisely, I thought I would sail about a little.",
         "春眠不覺曉，處處聞啼鳥。\n夜來風雨聲，花落知多少。"]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    from glmkit.training.tokenizer import train_tokenizer

    root = tmp_path_factory.mktemp("pretrain")
    rows = [f"{p}（{i}）" for i in range(40) for p in POEMS]
    (root / "train.jsonl").write_text("".join(json.dumps({"text": t}, ensure_ascii=False) + "\n" for t in rows),
                                      encoding="utf-8")
    (root / "eval.jsonl").write_text("".join(json.dumps({"text": t}, ensure_ascii=False) + "\n" for t in POEMS),
                                     encoding="utf-8")
    train_tokenizer([root / "train.jsonl"], 480, "chatglm", root / "tok")
    return root


def tiny_config(root: Path, out: str, world: int = 1, mode: str = "fsdp", **train) -> dict:
    return dict(
        model=dict(hidden_size=32, num_layers=2, num_heads=2, ffn_hidden_size=64, max_seq_len=128),
        tokenizer=str(root / "tok"),
        data=dict(train=[str(root / "train.jsonl")], eval=[str(root / "eval.jsonl")], seq_len=64, shuffle_buffer=8,
                  blank=dict(bert_prob=0.4, sentence_prob=0.2)),
        train={**dict(out_dir=str(root / out), max_steps=6, micro_batch_size=4 // world, grad_accum=2,
                      warmup_steps=2, lr=3e-3, precision="fp32", save_every=3, num_threads=1, progress=False,
                      distributed=mode if world > 1 else "none"), **train},
        eval=dict(every=3, max_rows=4),
    )


def _worker(rank: int, world: int, port: int, raw: dict, queue) -> None:
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        state = setup(config_from_dict(raw))
        history = fit(state)
        if rank == 0:
            queue.put([(h["loss"], h.get("eval_loss")) for h in history])
        dist.barrier()  # both ranks finished before gloo is torn down: a peer leaving early can abort the other
    finally:
        dist.destroy_process_group()
    # Leave without interpreter teardown: gloo's background threads occasionally abort a normal exit
    # ("terminate called without an active exception") after the work is done and reported.
    queue.close()
    queue.join_thread()
    os._exit(0)


@pytest.fixture(scope="module")
def single_run(workdir):
    return fit(setup(config_from_dict(tiny_config(workdir, "single"))))


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["fsdp", "ddp"])
def test_two_processes_match_single_process(workdir, single_run, mode):
    """2 processes on gloo (FSDP = fully_shard/ZeRO-3, or DDP), half the rows each: the same losses."""
    single = single_run
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    mp.start_processes(_worker, args=(2, free_port(), tiny_config(workdir, mode, world=2, mode=mode), queue),
                       nprocs=2, start_method="spawn", join=True)
    sharded = queue.get(timeout=5)
    assert len(sharded) == len(single) == 6
    for (loss, eval_loss), h in zip(sharded, single):
        assert loss == pytest.approx(h["loss"], rel=1e-5, abs=1e-5)
        assert (eval_loss is None) == ("eval_loss" not in h)  # both runs evaluate at the same steps
        if eval_loss is not None:
            assert eval_loss == pytest.approx(h["eval_loss"], rel=1e-5)
    assert sum(eval_loss is not None for _, eval_loss in sharded) == 2  # eval.every=3 over 6 steps
    assert single[-1]["loss"] < single[0]["loss"]  # it learns
    # the sharded run wrote the same kind of outputs
    for name in ("checkpoint.pt", "log.csv", "final/config.json", "final/model.safetensors", "final/ice_text.model"):
        assert (workdir / mode / name).exists(), name


def test_interrupted_run_resumes_to_the_same_result(workdir):
    full_state = setup(config_from_dict(tiny_config(workdir, "full", save_every=0)))
    full = fit(full_state)

    cfg = tiny_config(workdir, "interrupted", save_every=0)
    first = setup(config_from_dict(cfg))
    fit(first, stop_after=4)  # "killed" after step 4 (a checkpoint is written where it stops)
    del first
    resumed = setup(config_from_dict(cfg))
    assert resumed.step == 4
    rest = fit(resumed)
    assert [h["loss"] for h in rest] == [h["loss"] for h in full[4:]]
    a, b = full_state.raw_model.state_dict(), resumed.raw_model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    log = (workdir / "interrupted" / "log.csv").read_text().splitlines()
    assert log[0].startswith("step,tokens,loss,eval_loss,lr")


def test_exported_model_loads_and_matches(workdir):
    from glmkit.core.tokenizer import load_tokenizer
    from glmkit.loading.loader import load_model

    state = setup(config_from_dict(tiny_config(workdir, "export", export_dtype="float32", max_steps=2)))
    fit(state)
    folder = workdir / "export" / "final"
    hf = json.loads((folder / "config.json").read_text())
    assert hf["model_type"] == "chatglm" and hf["position_encoding_2d"] is True
    tok = load_tokenizer(folder)
    assert hf["gmask_token_id"] == tok.gmask_token_id and hf["bos_token_id"] == tok.sop_token_id
    from safetensors import safe_open

    with safe_open(str(folder / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
    assert "transformer.layers.0.attention.query_key_value.weight" in keys and "lm_head.weight" in keys
    loaded = load_model(folder, dtype="float32")
    ids = torch.tensor([tok.encode("床前明月光")])
    state.raw_model.eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids), state.raw_model(ids), rtol=1e-5, atol=1e-5)


def test_lr_schedule_warmup_then_cosine():
    assert lr_lambda(0, 10, 100, 0.1) == pytest.approx(0.1)
    assert lr_lambda(9, 10, 100, 0.1) == pytest.approx(1.0)
    assert lr_lambda(55, 10, 100, 0.1) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert lr_lambda(100, 10, 100, 0.1) == pytest.approx(0.1)


def test_config_file_overrides_and_errors(tmp_path, capsys):
    from glmkit.commands.pretrain import cli_main

    path = tmp_path / "c.yaml"
    path.write_text("train:\n  max_steps: 7\ndata:\n  seq_len: 32\n", encoding="utf-8")
    cfg = load_config(path, ["train.lr=3e-4", "data.blank.bert_prob=0.2", "train.betas=[0.9, 0.99]"])
    assert cfg.train.max_steps == 7 and cfg.train.lr == 3e-4 and cfg.data.seq_len == 32
    assert cfg.data.blank == {"bert_prob": 0.2} and cfg.train.betas == (0.9, 0.99)
    with pytest.raises(ValueError, match="unknown train options"):
        load_config(path, ["train.max_stepz=3"])
    with pytest.raises(ValueError, match="section.key=value"):
        load_config(path, ["oops"])
    with pytest.raises(FileNotFoundError):
        load_config(tmp_path / "nope.yaml")
    assert cli_main(["--config", str(path), "--print-config"]) == 0
    assert '"max_steps": 7' in capsys.readouterr().out
    assert cli_main(["--config", str(tmp_path / "nope.yaml")]) == 2


def test_shipped_config_parses():
    cfg = load_config(REPO / "configs" / "glm-tiny.yaml")
    assert cfg.model["preset"] == "chatglm-6b"
    assert any("39000" in str(s) for s in cfg.data.eval)


def test_gradient_accumulation_is_the_same_update(workdir, single_run):
    """4 rows x 2 micro-batches or 2 rows x 4: the loss of a step is normalised by its whole token count."""
    cfg = tiny_config(workdir, "accum", micro_batch_size=2, grad_accum=4)
    history = fit(setup(config_from_dict(cfg)))
    assert [h["loss"] for h in history] == pytest.approx([h["loss"] for h in single_run], rel=1e-5)


def test_cli_export_of_a_checkpoint(workdir, capsys):
    from glmkit.commands.pretrain import cli_main

    cfg = tiny_config(workdir, "single")
    path = workdir / "single.yaml"
    import yaml

    path.write_text(yaml.safe_dump(cfg, allow_unicode=True), encoding="utf-8")
    assert cli_main(["--config", str(path), "--export", str(workdir / "exported")]) == 0
    assert "exported step 6" in capsys.readouterr().out
    assert (workdir / "exported" / "model.safetensors").exists()
    assert cli_main(["--config", str(path), "train.out_dir=" + str(workdir / "none"), "--export", "x"]) == 2


def test_init_from_continues_a_model_and_reparametrizes_deepnorm_alpha(workdir):
    """train.init_from starts from a model folder; one trained with another DeepNorm α (here √4) is rewritten
    exactly for the config's α (ChatGLM-6B's √56): same logits before any step."""
    import glmkit

    first = tiny_config(workdir, "init-a", max_steps=2)
    first["model"]["alpha_num_layers"] = 2
    state = setup(config_from_dict(first))
    fit(state)
    source = glmkit.load_model(workdir / "init-a" / "final", dtype="float32")
    assert source.config.deepnorm_alpha == 2.0
    second = tiny_config(workdir, "init-b", max_steps=2, init_from=str(workdir / "init-a" / "final"))
    continued = setup(config_from_dict(second))
    assert continued.raw_model.config.deepnorm_alpha == 56 ** 0.5
    ids = torch.tensor([source.config.gmask_token_id, source.config.bos_token_id, 40, 41, 42])[None]
    with torch.no_grad():
        continued.raw_model.config.rope_fp16 = source.config.rope_fp16
        torch.testing.assert_close(continued.raw_model.eval()(ids), source(ids), atol=2e-4, rtol=1e-4)
    bad = tiny_config(workdir, "init-c", init_from=str(workdir / "init-a" / "final"))
    bad["model"]["ffn_hidden_size"] = 96
    with pytest.raises(ValueError, match="ffn_hidden_size"):
        setup(config_from_dict(bad))
