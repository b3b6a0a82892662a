"""FinetuneArgs: the options of glmkit.training.finetune.finetune, named as ChatGLM-6B's ptuning/main.py flags.

Every field is the `glmkit finetune` flag (and YAML key) of the same name with the same default (`--learning_rate
2e-2` is `FinetuneArgs(learning_rate=2e-2, ...)`); glmkit.core.options builds the parser from the fields, and a
field's `metadata["help"]` is that flag's help text. validate() and resolve_method() are the checks finetune() runs
before loading anything.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

METHODS = ("ptuning", "lora", "full")
QUANTIZATION_BITS = (4, 8)
DTYPES = ("float32", "bfloat16", "float16")
STAGES = ("sft", "rm", "dpo", "grpo", "pairs")
PREF_LOSSES = ("sigmoid", "ipo", "simpo")
GRPO_LOSS_TYPES = ("dapo", "grpo", "bnpo", "dr_grpo")
SCALE_REWARDS = ("group", "batch", "none")
# the flag each do_* switch needs
INPUT_FILES = {"do_train": "train_file", "do_eval": "validation_file", "do_predict": "test_file"}


def _opt(default: Any = None, help: str | None = None) -> Any:
    return field(default=default, metadata={"help": help} if help is not None else {})


@dataclass(kw_only=True)
class FinetuneArgs:
    """What to do (do_train / do_eval / do_predict), the model and method, the data, the training loop and
    generation; only model_name_or_path and output_dir are required.

    The method is P-tuning v2 when pre_seq_len is given, else full fine-tuning (as main.py), unless `method` says
    otherwise. Some fields (overwrite_cache, preprocessing_num_workers, fp16, report_to, deepspeed, local_rank) are
    accepted so main.py's scripts run unchanged and do nothing more than a note.
    """

    # ---- what to do
    do_train: bool = _opt(False, "train on --train_file")
    do_eval: bool = _opt(False, "evaluate on --validation_file (eval_* metrics)")
    do_predict: bool = _opt(False, "predict on --test_file (predict_* metrics)")
    predict_with_generate: bool = _opt(
        False, "generate answers and score them with ROUGE/BLEU; without it --do_eval reports the loss "
               "(--do_predict always generates: main.py without it writes no predictions or scores)")

    # ---- model
    model_name_or_path: str = field(metadata={"help": "base model folder, bundled name or HF id"})
    ptuning_checkpoint: str | None = _opt(None, "P-tuning checkpoint folder to load on the base")
    adapter: str | None = _opt(None, "P-tuning or LoRA folder to load on the base")
    method: Literal["ptuning", "lora", "full"] | None = _opt(None, "default: ptuning when --pre_seq_len is given, "
                                                                   "else full")
    pre_seq_len: int | None = _opt(None, "P-tuning v2 prefix length")
    prefix_projection: bool = _opt(False, "P-tuning v2 with the two-layer MLP reparam.")
    quantization_bit: Literal[4, 8] | None = _opt(None, "load the base as INT4/INT8 (frozen; P-tuning and LoRA "
                                                        "train through it)")
    lora_rank: int = _opt(8, "LoRA rank r")
    lora_alpha: float = _opt(32.0, "LoRA scale numerator: updates are scaled by alpha / r")
    lora_dropout: float = _opt(0.1, "dropout on the LoRA input")
    lora_target: str = _opt("attn.qkv", "comma-separated modules: attn.qkv, attn.proj, mlp.fc, mlp.proj (or THUDM "
                                        "names), or all")
    dtype: Literal["float32", "bfloat16", "float16"] = _opt("float32", "dtype of the loaded base weights")
    device: str | None = _opt(None, "cpu, cuda, cuda:1 ... (default: cuda if available)")
    num_threads: int | None = _opt(None, "CPU threads for torch (default: the cores not already busy, at least 1; on "
                                         "a shared, oversubscribed CPU extra threads make small models many times "
                                         "slower)")

    # ---- data (JSON Lines files; one object per line)
    train_file: str | None = _opt(None, "training rows (JSON Lines)")
    validation_file: str | None = _opt(None, "rows for --do_eval")
    test_file: str | None = _opt(None, "rows for --do_predict")
    prompt_column: str = _opt("content", "the key of the prompt in each row")
    response_column: str = _opt("summary", "the key of the answer in each row")
    history_column: str | None = _opt(None, "list of [query, response] pairs (multi-turn data)")
    source_prefix: str = _opt("", "text put before every prompt")
    max_source_length: int = _opt(64, "prompt tokens kept")
    max_target_length: int = _opt(128, "answer tokens kept")
    val_max_target_length: int | None = _opt(None, "default: --max_target_length")
    max_train_samples: int | None = _opt(None, "use the first N training rows")
    max_eval_samples: int | None = _opt(None, "use the first N evaluation rows")
    max_predict_samples: int | None = _opt(None, "use the first N prediction rows")
    ignore_pad_token_for_loss: bool = _opt(True, "padding positions carry no loss")
    overwrite_cache: bool = _opt(False, "accepted for main.py compatibility (no cache)")
    preprocessing_num_workers: int | None = _opt(None, "accepted for compatibility")

    # ---- training (HF Trainer's defaults)
    output_dir: str = field(metadata={"help": "checkpoint-N folders and *_results.json go here"})
    overwrite_output_dir: bool = _opt(False, "allow an --output_dir with checkpoints")
    per_device_train_batch_size: int = _opt(8, "rows per micro-batch per process")
    per_device_eval_batch_size: int = _opt(8, "rows per evaluation/generation batch")
    gradient_accumulation_steps: int = _opt(1, "micro-batches per optimizer step")
    learning_rate: float = _opt(5e-5, "peak learning rate (AdamW), decayed linearly to 0")
    weight_decay: float = _opt(0.0, "AdamW weight decay")
    adam_beta1: float = _opt(0.9, "AdamW beta1")
    adam_beta2: float = _opt(0.999, "AdamW beta2")
    adam_epsilon: float = _opt(1e-8, "AdamW epsilon")
    max_grad_norm: float = _opt(1.0, "gradient clipping norm (0 = off)")
    max_steps: int = _opt(-1, "optimizer steps; -1 = --num_train_epochs")
    num_train_epochs: float = _opt(3.0, "passes over the training rows (when --max_steps is -1)")
    warmup_steps: int = _opt(0, "linear learning-rate warmup steps")
    logging_steps: int = _opt(10, "steps between log lines")
    save_steps: int = _opt(500, "steps between checkpoint-N folders (one is always written at the end)")
    seed: int = _opt(42, "seed of the data order, dropout and sampling")
    bf16: bool = _opt(False, "bfloat16 autocast for forward/backward")
    fp16: bool = _opt(False, "accepted for compatibility; use --bf16 on CPU")
    gradient_checkpointing: bool = _opt(False, "recompute activations in backward")
    resume_from_checkpoint: str | None = _opt(None, "an OUT/checkpoint-N folder to continue from, or "
                                                   "'last': the newest one in --output_dir (none yet: start)")
    report_to: str | None = _opt(None, "accepted for compatibility (logs go to stdout)")
    deepspeed: str | None = _opt(None, "accepted for ds_train_finetune.sh compatibility; use torchrun")
    local_rank: int = _opt(-1, "set by launchers; torchrun's LOCAL_RANK is used")
    disable_tqdm: bool = _opt(False, "no progress bars")

    # ---- generation (predict_with_generate; defaults as main.py)
    generation_max_length: int | None = _opt(None, "prompt + answer tokens (default as main.py: "
                                                   "max_source_length + max_target_length + 1)")
    do_sample: bool = _opt(True, "sample (false: greedy)")
    top_p: float = _opt(0.7, "nucleus sampling mass")
    temperature: float = _opt(0.95, "sampling temperature")

    # ---- alignment (--stage rm / dpo / grpo / pairs; docs/alignment.md)
    stage: Literal["sft", "rm", "dpo", "grpo", "pairs"] = _opt("sft", "sft (supervised, main.py's), rm (reward model), dpo (preference pairs), grpo (online "
                             "RL with a reward), pairs (sample on-policy pairs for dpo into OUTPUT_DIR/pairs.json)")
    chosen_column: str = _opt("chosen", "rm/dpo: the preferred answer (text or an assistant message list); "
                                        "for rm/dpo/grpo --prompt_column's default content means prompt")
    rejected_column: str = _opt("rejected", "rm/dpo: the other answer")
    pref_loss: Literal["sigmoid", "ipo", "simpo"] = _opt("sigmoid", "dpo: sigmoid (DPO), ipo, or simpo (reference-free)")
    beta: float | None = _opt(None, "dpo: β of the loss (default 0.1; simpo: try 2.0); grpo: the KL penalty "
                                    "(default 0.04)")
    label_smoothing: float = _opt(0.0, "dpo sigmoid/simpo: conservative-DPO label smoothing in [0, 0.5)")
    simpo_gamma: float = _opt(0.5, "simpo: the target reward margin γ")
    rpo_alpha: float | None = _opt(None, "dpo: add this times the chosen answers' NLL per token (TRL's RPO)")
    reward_model: str | None = _opt(None, "grpo/pairs: a reward-model folder (from --stage rm) scoring the answers")
    reward_function: str | None = _opt(None, "grpo/pairs: FILE.py:NAME, a function (prompts, completions) -> "
                                             "rewards, or poem_form (built in)")
    num_generations: int = _opt(8, "grpo/pairs: answers sampled per prompt (the group)")
    sample_temperature: float = _opt(1.0, "grpo/pairs: sampling temperature")
    sample_top_p: float = _opt(1.0, "grpo/pairs: sampling top-p")
    sample_top_k: int = _opt(0, "grpo/pairs: sampling top-k (0 = off)")
    epsilon: float = _opt(0.2, "grpo: the ratio clip ε")
    epsilon_high: float | None = _opt(None, "grpo: the upper clip (default: --epsilon)")
    grpo_loss_type: Literal["dapo", "grpo", "bnpo", "dr_grpo"] = _opt("dapo", "grpo: dapo (TRL's default), grpo, bnpo or dr_grpo aggregation")
    scale_rewards: Literal["group", "batch", "none"] = _opt("group", "grpo: group (std per group, TRL's default), batch or none")


def validate(args: FinetuneArgs) -> None:
    """ValueError, naming the flag, for options that cannot work together (before anything is loaded)."""
    if args.method is not None and args.method not in METHODS:
        raise ValueError(f"--method must be one of {', '.join(METHODS)}, got {args.method!r}")
    if args.quantization_bit is not None and args.quantization_bit not in QUANTIZATION_BITS:
        raise ValueError(f"--quantization_bit must be 4 or 8, got {args.quantization_bit}")
    if args.dtype not in DTYPES:
        raise ValueError(f"--dtype must be one of {', '.join(DTYPES)}, got {args.dtype!r}")
    if not (args.do_train or args.do_eval or args.do_predict or args.stage == "pairs"):
        raise ValueError("nothing to do: pass --do_train, --do_eval and/or --do_predict")
    for flag, file_field in INPUT_FILES.items():
        if getattr(args, flag) and not getattr(args, file_field):
            raise ValueError(f"--{flag} requires --{file_field}")
    for name in ("per_device_train_batch_size", "per_device_eval_batch_size", "gradient_accumulation_steps",
                 "logging_steps", "save_steps"):
        if getattr(args, name) <= 0:
            raise ValueError(f"--{name} must be positive, got {getattr(args, name)}")
    if args.pre_seq_len is not None and args.pre_seq_len < 0:
        raise ValueError(f"--pre_seq_len must be >= 0, got {args.pre_seq_len}")
    if args.do_train and args.max_steps <= 0 and args.num_train_epochs <= 0:
        raise ValueError("set --max_steps or a positive --num_train_epochs")
    if args.ptuning_checkpoint and args.adapter:
        raise ValueError("pass either --ptuning_checkpoint or --adapter, not both")
    validate_stage(args)


def validate_stage(args: FinetuneArgs) -> None:
    """The alignment options (--stage and what it needs)."""
    for name, allowed in (("stage", STAGES), ("pref_loss", PREF_LOSSES), ("grpo_loss_type", GRPO_LOSS_TYPES),
                          ("scale_rewards", SCALE_REWARDS)):
        if getattr(args, name) not in allowed:
            raise ValueError(f"--{name} must be one of {', '.join(allowed)}, got {getattr(args, name)!r}")
    if (args.stage == "grpo" and args.do_train) or args.stage == "pairs":
        if bool(args.reward_model) == bool(args.reward_function):
            raise ValueError(f"--stage {args.stage} needs one reward: --reward_model DIR or --reward_function "
                             "FILE.py:NAME")
        if args.num_generations < 2:
            raise ValueError(f"--num_generations must be at least 2 (answers are compared within a group), "
                             f"got {args.num_generations}")
        if args.stage == "pairs" and not args.train_file:
            raise ValueError("--stage pairs needs --train_file (its prompts)")
    if args.stage not in ("grpo", "pairs") and (args.reward_model or args.reward_function):
        raise ValueError("--reward_model / --reward_function are for --stage grpo and pairs")
    if args.beta is not None and args.beta < 0:
        raise ValueError(f"--beta must be >= 0, got {args.beta}")
    if args.stage == "dpo" and args.beta is not None and args.beta == 0:
        raise ValueError("--beta must be positive for dpo")


def stage_prompt_column(args: FinetuneArgs) -> str:
    """--prompt_column, where main.py's default (content) means TRL's (prompt) for the alignment stages."""
    return "prompt" if args.stage != "sft" and args.prompt_column == "content" else args.prompt_column


def resolve_method(args: FinetuneArgs) -> str:
    """ptuning, lora or full: --method, else ptuning when --pre_seq_len is given, else full (as main.py)."""
    method = args.method or ("ptuning" if args.pre_seq_len is not None else "full")
    if method == "ptuning" and args.pre_seq_len is None and args.ptuning_checkpoint is None and args.do_train:
        raise ValueError("--method ptuning needs --pre_seq_len (the prefix length, e.g. 128)")
    if method != "ptuning" and args.pre_seq_len is not None:
        raise ValueError(f"--pre_seq_len is a P-tuning option but --method is {method}")
    if method == "full" and args.quantization_bit and args.do_train:
        raise ValueError("full fine-tuning cannot train INT4/INT8 weights; use --method ptuning or lora with "
                         "--quantization_bit, or drop --quantization_bit")
    return method
