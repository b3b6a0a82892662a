"""Fine-tuning with ChatGLM-6B's ptuning/main.py options: P-tuning v2, LoRA (PEFT layout) and full fine-tuning
(FSDP under torchrun), over full-precision or INT4/INT8 bases, then evaluation/prediction with ROUGE/BLEU.

    from glmkit.training.finetune import FinetuneArgs, finetune

    metrics = finetune(FinetuneArgs(do_train=True, train_file="poem-gen/train.json", model_name_or_path="glm-tiny",
                                    output_dir="out/pt", pre_seq_len=16, max_steps=300, learning_rate=2e-2))
    finetune(FinetuneArgs(do_predict=True, test_file="poem-gen/dev.json", model_name_or_path="glm-tiny",
                          ptuning_checkpoint="out/pt/checkpoint-300", output_dir="out/pt", predict_with_generate=True))

`glmkit finetune` (glmkit.commands.finetune) takes the same options as flags. The method is P-tuning v2 when
pre_seq_len is given, else full fine-tuning (as main.py), unless `method` says otherwise. Under torchrun
(WORLD_SIZE > 1) every process calls finetune(); the loop is in glmkit.training.finetune_loop.

Outputs (under output_dir): checkpoint-N/ every save_steps and at the end (P-tuning: config.json +
pytorch_model.bin with only transformer.prefix_encoder.*; LoRA: adapter_config.json + adapter_model.safetensors;
full: the whole model in the base's layout with its tokenizer), each with optimizer.pt, scheduler.pt,
rng_state.pth and trainer_state.json for resume_from_checkpoint; train_results.json; with do_eval /
do_predict and predict_with_generate: eval_results.json / predict_results.json (eval_rouge-1 ... bleu-4) and
generated_predictions.txt (JSON lines {"labels", "predict"}), as main.py writes them; all_results.json merges them.
"""

from __future__ import annotations

import json
import os
import random
from pathlib import Path
from typing import Any

import torch
from torch import nn

from glmkit.adapters.lora import apply_lora, has_lora, load_lora_adapter, mark_only_lora_as_trainable
from glmkit.adapters.ptuning import attach_prefix, mark_only_prefix_as_trainable
from glmkit.core.tokenizer import load_tokenizer
from glmkit.distributed.launch import init_process_group
from glmkit.loading.loader import load_adapter, load_model
from glmkit.training.data.finetune import IGNORE_INDEX, Columns, Lengths, build_examples, check_columns, read_rows
from glmkit.training.finetune_args import FinetuneArgs, resolve_method, validate
from glmkit.training.finetune_loop import train
from glmkit.training.trainer import log_line as log
from glmkit.training.finetune_predict import run_evaluation, save_metrics

__all__ = ["FinetuneArgs", "finetune", "load_adapter_folder", "load_for_finetune"]


# ------------------------------------------------------------------------------------------------------ entry point
def finetune(args: FinetuneArgs) -> dict[str, Any]:
    """Does what `args` asks (train, then eval and/or predict) and returns all metrics (train_loss, train_runtime,
    ..., eval_*/predict_*), as also written to OUTPUT_DIR/*_results.json.

    Raises ValueError for options that cannot work together and FileNotFoundError for missing files. Under torchrun
    the process group is destroyed before returning. torch's CPU thread count is restored afterwards."""
    threads = torch.get_num_threads()
    try:
        return _finetune(args)
    finally:
        torch.set_num_threads(threads)  # callers in the same process keep their setting


def _finetune(args: FinetuneArgs) -> dict[str, Any]:
    validate(args)
    method = resolve_method(args)
    device = _device(args)
    rank, world = init_process_group(device)
    if device.type == "cpu":
        threads = _set_cpu_threads(args.num_threads, world)
        log(f"device cpu, {threads} thread(s) per process", rank)
    out = Path(args.output_dir)
    if args.resume_from_checkpoint == "last":  # the same command, started again after a crash, continues
        last = last_checkpoint(out)
        args.resume_from_checkpoint = str(last) if last is not None else None
        log(f"resuming from {last}" if last is not None else f"no checkpoint in {out} yet: starting", rank)
    if args.do_train and rank == 0:
        existing = sorted(out.glob("checkpoint-*")) if out.is_dir() else []
        if existing and not args.overwrite_output_dir and not args.resume_from_checkpoint:
            log(f"warning: {out} already holds {', '.join(p.name for p in existing[:3])}; checkpoints of the "
                "same step will be overwritten (pass --overwrite_output_dir to silence this, or "
                "--resume_from_checkpoint to continue a run)")
    if args.fp16 and rank == 0:
        log("note: --fp16 is accepted for main.py compatibility; glmkit trains fp32 (or --bf16 autocast)")
    if args.deepspeed and rank == 0:
        log("note: --deepspeed is ignored; run multi-process fine-tuning with torchrun (FSDP for --method full)")
    out.mkdir(parents=True, exist_ok=True)

    random.seed(args.seed)
    torch.manual_seed(args.seed)
    model, tokenizer = load_for_finetune(args, method)
    model.to(device)
    columns = Columns(args.prompt_column, args.response_column, args.history_column)
    results: dict[str, Any] = {}

    reference = None
    if args.stage == "pairs":  # on-policy preference pairs for dpo (docs/alignment.md)
        from glmkit.training.align import run_pairs

        if world > 1:
            raise ValueError("--stage pairs runs on one process")
        results.update(run_pairs(model, tokenizer, args, device))
        save_metrics(out, "pairs", results)
        log(json.dumps(results, ensure_ascii=False))
        return results
    if args.stage != "sft":  # alignment: glmkit.training.align (docs/alignment.md)
        from glmkit.training.align import run_alignment, start_reference

        if args.do_train:
            model, metrics, reference = run_alignment(model, tokenizer, args, method, device, rank, world)
            if rank == 0:
                save_metrics(out, "train", metrics)
            results.update(metrics)
        elif args.stage == "rm":
            from glmkit.training.reward import RewardModel, load_reward_head

            model = RewardModel(model)
            load_reward_head(model, args.adapter or args.ptuning_checkpoint or args.model_name_or_path)
        elif args.stage == "dpo" and args.do_eval and args.pref_loss != "simpo":
            reference = start_reference(model, args, method)
    elif args.do_train:
        rows = read_rows(args.train_file, args.max_train_samples)
        check_columns(rows, columns, args.train_file)
        lengths = Lengths(args.max_source_length, args.max_target_length, args.source_prefix,
                          args.ignore_pad_token_for_loss)
        examples = build_examples(tokenizer, rows, columns, lengths, train=True)
        if rank == 0:
            e = examples[0]
            log(f"input_ids {e['input_ids']}\ninputs {tokenizer.decode(e['input_ids'])}\nlabel_ids {e['labels']}\n"
                f"labels {tokenizer.decode([t for t in e['labels'] if t != IGNORE_INDEX])}")
        metrics = train(model, tokenizer, examples, args, method, device, rank, world)
        if rank == 0:
            save_metrics(out, "train", metrics)
        results.update(metrics)

    do_eval, do_predict = args.do_eval, args.do_predict  # the caller's args stay as given
    if world > 1 and (do_eval or do_predict):
        if method == "full":
            log("evaluation after multi-process full fine-tuning: load OUT/checkpoint-N in a single process", rank)
            do_eval = do_predict = False
        elif rank != 0:
            do_eval = do_predict = False
    model.eval()
    for wanted, split, path, limit in ((do_eval, "eval", args.validation_file, args.max_eval_samples),
                                       (do_predict, "predict", args.test_file, args.max_predict_samples)):
        if not wanted:
            continue
        if args.stage in ("rm", "dpo") and split == "eval":  # held-out pairs: pairwise accuracy, reward metrics
            from glmkit.training.align import evaluate_pairs

            metrics = evaluate_pairs(model, tokenizer, args, device, split, reference)
        else:
            if args.stage == "rm":
                raise ValueError("--stage rm has no --do_predict; score answers with glmkit.training.reward.score")
            split_args = args
            if args.stage != "sft":  # the prompt column and the chosen answer as the reference text
                from glmkit.training.align import predict_args

                split_args = predict_args(args)
            split_columns = Columns(split_args.prompt_column, split_args.response_column, split_args.history_column)
            rows = read_rows(path, limit)
            check_columns(rows, split_columns, path)
            # main.py writes generated_predictions.txt for --do_predict only
            metrics = run_evaluation(model, tokenizer, rows, split_args, device, split,
                                     write_predictions=split == "predict")
        save_metrics(out, split, metrics)
        log(json.dumps(metrics, ensure_ascii=False))
        results.update(metrics)
    if world > 1:
        import torch.distributed as dist

        dist.barrier()
        dist.destroy_process_group()
    return results


# ------------------------------------------------------------------------------------------------------ model setup
def _device(args: FinetuneArgs) -> torch.device:
    """--device, else this process's GPU (LOCAL_RANK under torchrun), else the CPU."""
    if args.device:
        return torch.device(args.device)
    if torch.cuda.is_available():
        local = int(os.environ.get("LOCAL_RANK", "0"))
        return torch.device("cuda", local % torch.cuda.device_count())
    return torch.device("cpu")


def _set_cpu_threads(requested: int | None, world: int) -> int:
    """torch threads for this process: as asked, else the idle cores (per process under torchrun)."""
    cores = os.cpu_count() or 1
    if requested is None:
        try:
            busy = os.getloadavg()[0]
        except OSError:  # not available on this platform
            busy = 0.0
        requested = int(cores - busy + 0.5) // max(world, 1)
    n = max(1, min(int(requested), cores))
    torch.set_num_threads(n)
    return n


def last_checkpoint(out: Path) -> Path | None:
    """The checkpoint-N folder of `out` with the highest N (each is written whole; see glmkit.core.atomic)."""
    steps = [(int(p.name.split("-", 1)[1]), p) for p in out.glob("checkpoint-*")
             if p.is_dir() and p.name.split("-", 1)[1].isdigit() and (p / "trainer_state.json").is_file()]
    return max(steps)[1] if steps else None


def load_for_finetune(args: FinetuneArgs, method: str):
    """(model, tokenizer): the base model (+ adapter, + fresh trainable parts) and its tokenizer, as the method and
    flags say."""
    quantize = {4: "int4", 8: "int8"}.get(args.quantization_bit) if args.quantization_bit else None
    base = args.model_name_or_path
    if method == "full" and args.resume_from_checkpoint:
        base = args.resume_from_checkpoint  # a full checkpoint is a whole model folder
    model = load_model(base, dtype=args.dtype, quantize=quantize)
    tokenizer = load_tokenizer(base)
    adapter = args.ptuning_checkpoint or args.adapter
    resume = args.resume_from_checkpoint if method != "full" else None
    if resume:
        adapter = resume  # the checkpoint's adapter replaces any --ptuning_checkpoint / --adapter
    if adapter:
        load_adapter_folder(model, adapter, trainable=bool(args.do_train))

    if method == "ptuning" and args.do_train:
        if model.prefix_encoder is None:
            if args.pre_seq_len is None:
                raise ValueError("--method ptuning needs --pre_seq_len")
            attach_prefix(model, args.pre_seq_len, args.prefix_projection)
        elif args.pre_seq_len is not None and args.pre_seq_len != model.config.pre_seq_len:
            raise ValueError(f"--pre_seq_len {args.pre_seq_len} differs from the loaded prefix's "
                             f"{model.config.pre_seq_len}")
        model.prefix_encoder.float()  # as main.py: the prefix trains in fp32 over a half/quantized base
        mark_only_prefix_as_trainable(model)
    elif method == "lora" and args.do_train:
        if has_lora(model):
            mark_only_lora_as_trainable(model)
        else:
            apply_lora(model, args.lora_rank, args.lora_alpha, args.lora_dropout, args.lora_target)
        for n, p in model.named_parameters():
            if p.requires_grad and p.dtype != torch.float32:
                p.data = p.data.float()  # fp32 adapter weights over a half base
    elif method == "full" and args.do_train:
        for p in model.parameters():
            p.requires_grad_(True)
    if args.gradient_checkpointing:
        model.gradient_checkpointing = True
    return model, tokenizer


def load_adapter_folder(model: nn.Module, folder: str | Path, trainable: bool = False) -> nn.Module:
    """A LoRA folder (adapter_config.json) or a P-tuning folder (config.json with pre_seq_len, pytorch_model.bin
    with transformer.prefix_encoder.*), as main.py's --ptuning_checkpoint loads it."""
    folder = Path(folder)
    if (folder / "adapter_config.json").is_file():
        return load_lora_adapter(model, folder, trainable=trainable)

    load_adapter(model, folder)
    if model.prefix_encoder is not None:
        model.prefix_encoder.float()  # main.py: the prefix encoder runs in fp32 over a half/quantized base
    return model
