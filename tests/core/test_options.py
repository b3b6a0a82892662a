"""glmkit.core.options: the one config system of the commands. Dataclasses in, typed values, YAML files and dotted
overrides, a generated parser; `glmkit finetune` still takes ChatGLM-6B's ptuning/train.sh arguments."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Literal

import pytest

from glmkit.core import options


@dataclass
class Inner:
    lr: float = 1e-3
    """peak learning rate"""
    betas: tuple[float, float] = (0.9, 0.95)
    mode: Literal["none", "ddp", "fsdp"] = "none"
    progress: bool = True


@dataclass
class Outer:
    name: str = field(metadata={"help": "what to call it"})
    steps: int | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    quick: bool = False
    bits: Literal[4, 8] | None = None
    inner: Inner = field(default_factory=Inner)


def test_types_follow_the_annotations():
    cfg = options.from_dict(Outer, {"name": 7, "steps": "12", "inner": {"lr": "3e-4", "betas": [0.8, 0.9],
                                                                        "progress": "false"}, "bits": "8"})
    assert cfg.name == "7" and cfg.steps == 12 and cfg.bits == 8
    assert cfg.inner == Inner(lr=3e-4, betas=(0.8, 0.9), progress=False)
    with pytest.raises(ValueError, match=r"inner.mode must be one of none, ddp, fsdp"):
        options.from_dict(Outer, {"name": "a", "inner": {"mode": "zero"}})
    with pytest.raises(ValueError, match="unknown inner options"):
        options.from_dict(Outer, {"name": "a", "inner": {"lrr": 1}})
    with pytest.raises(ValueError, match="missing required option.*name"):
        options.from_dict(Outer, {})
    with pytest.raises(ValueError, match="steps must be an integer"):
        options.from_dict(Outer, {"name": "a", "steps": "many"})


def test_file_overrides_and_flags_in_that_order(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("name: from-file\nsteps: 3\ninner:\n  lr: 0.5\n", encoding="utf-8")
    parser = options.build_parser(Outer, prog="t", description="d")
    cfg = options.parse(Outer, parser, ["--config", str(path), "steps=4", "inner.betas=[0.1, 0.2]",
                                        "extra.k=1", "--inner.lr", "0.25", "--quick"])
    assert cfg == Outer(name="from-file", steps=4, extra={"k": 1}, quick=True,
                        inner=Inner(lr=0.25, betas=(0.1, 0.2)))
    with pytest.raises(ValueError, match="key=value"):
        options.parse(Outer, parser, ["--name", "x", "oops"])
    with pytest.raises(FileNotFoundError):
        options.parse(Outer, parser, ["--config", str(tmp_path / "none.yaml")])
    with pytest.raises(SystemExit):
        options.parse(Outer, parser, ["--name", "x", "--inner.mode", "zero"])  # argparse: not a choice


def test_help_shows_each_fields_doc():
    text = options.build_parser(Outer, prog="t", description="d").format_help()
    assert "what to call it (required)" in text and "peak learning rate (default: 0.001)" in text
    assert "--inner.mode {none,ddp,fsdp}" in text


# ChatGLM-6B ptuning/train.sh, as published (python3 main.py replaced by glmkit finetune)
TRAIN_SH = """--do_train --train_file AdvertiseGen/train.json --validation_file AdvertiseGen/dev.json
    --preprocessing_num_workers 10 --prompt_column content --response_column summary --overwrite_cache
    --model_name_or_path THUDM/chatglm-6b --output_dir output/adgen-chatglm-6b-pt-128-2e-2 --overwrite_output_dir
    --max_source_length 64 --max_target_length 128 --per_device_train_batch_size 1 --per_device_eval_batch_size 1
    --gradient_accumulation_steps 16 --predict_with_generate --max_steps 3000 --logging_steps 10 --save_steps 1000
    --learning_rate 2e-2 --pre_seq_len 128 --quantization_bit 4""".split()


def test_finetune_takes_train_sh_arguments(tmp_path):
    from glmkit.commands.finetune import parse_args
    from glmkit.training.finetune_args import FinetuneArgs

    args = parse_args(TRAIN_SH)
    assert args == FinetuneArgs(
        do_train=True, train_file="AdvertiseGen/train.json", validation_file="AdvertiseGen/dev.json",
        preprocessing_num_workers=10, prompt_column="content", response_column="summary", overwrite_cache=True,
        model_name_or_path="THUDM/chatglm-6b", output_dir="output/adgen-chatglm-6b-pt-128-2e-2",
        overwrite_output_dir=True, max_source_length=64, max_target_length=128, per_device_train_batch_size=1,
        per_device_eval_batch_size=1, gradient_accumulation_steps=16, predict_with_generate=True, max_steps=3000,
        logging_steps=10, save_steps=1000, learning_rate=2e-2, pre_seq_len=128, quantization_bit=4)
    # the same options from a YAML file, a flag winning over the file
    import yaml

    path = tmp_path / "ft.yaml"
    path.write_text(yaml.safe_dump({k: v for k, v in dataclasses.asdict(args).items() if v is not None}),
                    encoding="utf-8")
    again = parse_args(["--config", str(path), "--learning_rate", "1e-2", "do_sample=false"])
    assert again == dataclasses.replace(args, learning_rate=1e-2, do_sample=False)
    with pytest.raises(SystemExit):
        parse_args(["--output_dir", "x"])  # --model_name_or_path is required
    with pytest.raises(SystemExit):
        parse_args([*TRAIN_SH, "--quantization_bit", "3"])
