"""The training backbone (glmkit.training.trainer) with stages of its own: the loop is independent of GLM, the two
normalisation rules mean what they say, a stage's metrics reach the logs, and fine-tuning takes another stage."""

from __future__ import annotations

import csv

import pytest
import torch
from torch import nn

from glmkit.training.trainer import CSVLogger, LoopConfig, Stage, TrainState, fit


class Regression(Stage):
    """Squared error of a linear model over rows; a row is a loss unit. Micro-batch m holds rows `sizes[m]`."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor, sizes: list[int]) -> None:
        self.x, self.y, self.sizes = x, y, sizes

    def batches(self, state):
        start, m = 0, 0
        while True:
            n = self.sizes[m % len(self.sizes)]
            yield {"x": self.x[start:start + n], "y": self.y[start:start + n]}
            start, m = (start + n) % len(self.x), m + 1

    def units(self, batch):
        return len(batch["x"])

    def tokens(self, batch):
        return len(batch["x"])

    def loss(self, state, batch):
        err = state.model(batch["x"]).squeeze(-1) - batch["y"]
        return (err ** 2).sum(), {"mean_abs_err": float(err.detach().abs().mean())}


def _state(seed: int = 0) -> TrainState:
    torch.manual_seed(seed)
    model = nn.Linear(3, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    return TrainState(model=model, raw_model=model, optimizer=opt, scheduler=sched, device=torch.device("cpu"))


def _data():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(12, 3, generator=g)
    return x, x @ torch.tensor([1.0, -2.0, 0.5]) + 0.3


def test_global_normalisation_ignores_how_the_rows_are_split():
    x, y = _data()
    whole, split = _state(), _state()
    fit(whole, Regression(x, y, [6]), LoopConfig(max_steps=2, grad_accum=1, grad_clip=0, progress=False))
    fit(split, Regression(x, y, [2, 4]), LoopConfig(max_steps=2, grad_accum=2, grad_clip=0, progress=False))
    for a, b in zip(whole.model.parameters(), split.model.parameters()):
        torch.testing.assert_close(a, b)
    assert [h["loss"] for h in whole.history] == pytest.approx([h["loss"] for h in split.history])


def test_micro_normalisation_averages_micro_batch_means():
    x, y = _data()
    state = _state()
    before = state.model.weight.detach().clone(), state.model.bias.detach().clone()
    fit(state, Regression(x, y, [2, 4]), LoopConfig(max_steps=1, grad_accum=2, grad_clip=0, normalize="micro",
                                                    progress=False))
    # the same step by hand: mean over rows within each micro-batch, then the mean of the two means
    w, b = (t.clone().requires_grad_(True) for t in before)
    means = [((x[s] @ w.T).squeeze(-1) + b - y[s]).pow(2).mean() for s in (slice(0, 2), slice(2, 6))]
    ((means[0] + means[1]) / 2).backward()
    torch.testing.assert_close(state.model.weight, before[0] - 0.1 * w.grad)
    assert state.history[0]["loss"] == pytest.approx(float((means[0] + means[1]) / 2))


def test_stage_metrics_reach_history_and_csv(tmp_path):
    x, y = _data()
    state = _state()
    path = tmp_path / "log.csv"
    saved = []
    history = fit(state, Regression(x, y, [3]), LoopConfig(max_steps=4, log_every=2, save_every=3, progress=False),
                  save=lambda s: saved.append(s.step),
                  loggers=[CSVLogger(state, path, [("step", ""), ("loss", ".4f"), ("mean_abs_err", ".4f")])])
    assert [h["step"] for h in history] == [1, 2, 3, 4] and all("mean_abs_err" in h for h in history)
    assert saved == [3, 4]  # every save_every steps and where the run stops
    rows = list(csv.reader(path.open()))
    assert rows[0] == ["step", "loss", "mean_abs_err"] and [r[0] for r in rows[1:]] == ["2", "4"]


def test_stop_after_then_continue_is_one_run():
    x, y = _data()
    one, two = _state(), _state()
    fit(one, Regression(x, y, [4]), LoopConfig(max_steps=3, progress=False))
    fit(two, Regression(x, y, [4]), LoopConfig(max_steps=3, progress=False), stop_after=1)
    assert two.step == 1
    # the stage's batches(state) start from state.step: here a fresh stage resumes the data stream by position
    class Resumed(Regression):
        def batches(self, state):
            it = super().batches(state)
            for _ in range(state.step):
                next(it)
            return it

    fit(two, Resumed(x, y, [4]), LoopConfig(max_steps=3, progress=False))
    assert two.step == 3
    for a, b in zip(one.model.parameters(), two.model.parameters()):
        assert torch.equal(a, b)


def test_finetune_trains_a_stage_it_is_given(tmp_path):
    """train(make_stage=...) runs another stage with the method's wrapping, trainable parameters and checkpoint
    contents (P-tuning: the prefix only), and logs the stage's metrics in trainer_state.json."""
    import json

    from glmkit.commands.finetune import parse_args
    from glmkit.training.data.finetune import Columns, Lengths, build_examples
    from glmkit.training.finetune import load_for_finetune
    from glmkit.training.finetune_loop import AnswerLossStage, train
    from tests.conftest import REPO

    class Counted(AnswerLossStage):
        def loss(self, state, batch):
            loss_sum, _ = super().loss(state, batch)
            return loss_sum, {"answer_tokens": float(self.units(batch))}

    args = parse_args(["--do_train", "--train_file", "unused", "--model_name_or_path",
                       str(REPO / "glmkit/assets/glm-tiny"), "--output_dir", str(tmp_path), "--pre_seq_len", "2",
                       "--max_steps", "2", "--logging_steps", "1", "--per_device_train_batch_size", "2",
                       "--disable_tqdm", "--num_threads", "1"])
    model, tok = load_for_finetune(args, "ptuning")
    rows = [{"content": f"作者#李白{i}", "summary": "床前明月光，疑是地上霜。"} for i in range(4)]
    examples = build_examples(tok, rows, Columns(), Lengths(16, 16), train=True)
    made = []

    def make(ex, order):
        made.append(len(ex))
        return Counted(ex, order, tok.pad_token_id, 1)

    metrics = train(model, tok, examples, args, "ptuning", torch.device("cpu"), make_stage=make)
    assert made == [4] and metrics["global_step"] == 2
    log = json.loads((tmp_path / "checkpoint-2" / "trainer_state.json").read_text())["log_history"]
    assert [e["step"] for e in log] == [1, 2] and all(e["answer_tokens"] > 0 for e in log)
    sd = torch.load(tmp_path / "checkpoint-2" / "pytorch_model.bin", weights_only=True)
    assert set(sd) == {"transformer.prefix_encoder.embedding.weight"}
