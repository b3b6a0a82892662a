"""The `glmkit` console script: each subcommand is a module of glmkit.commands that parses its arguments and calls
one library function.

Modules are imported lazily so `glmkit --help` is instant and one command never pays for another's imports.
Every module listed here exposes `cli_main(argv: list[str]) -> int`, which owns its argparse parser. A command's
module and its `--help` import no optional package; a command that needs an extra (glmkit.core.extras) checks for
it after parsing its arguments, and the MissingExtraError it raises is printed here as the pip command to run.
"""

from __future__ import annotations

import importlib
import os
import sys

from glmkit.core.extras import MissingExtraError

# name -> (module, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "generate": ("glmkit.commands.generate", "generate text from a prompt (streams to stdout)"),
    "chat": ("glmkit.commands.chat", "chat in the terminal, streaming; 'clear' empties history, 'stop' quits"),
    "serve": ("glmkit.commands.serve", "OpenAI-compatible HTTP API plus ChatGLM-6B's POST / route"),
    "web": ("glmkit.commands.web", "browser chat UI (Gradio)"),
    "fill": ("glmkit.commands.fill", "fill [MASK]/[sMASK]/[gMASK] blanks in a text"),
    "pretrain": ("glmkit.commands.pretrain", "GLM blank-infilling pretraining (single process or torchrun/FSDP)"),
    "finetune": ("glmkit.commands.finetune", "P-tuning v2 / LoRA / full fine-tuning with ChatGLM-6B's train.sh arguments"),
    "merge-lora": ("glmkit.commands.merge_lora", "fold a LoRA adapter into its base model"),
    "eval": ("glmkit.commands.eval", "evaluate a model (eval run/compare: GLM-130B task files; eval harness: "
                                     "lm-evaluation-harness; eval ppl: perplexity)"),
    "quantize": ("glmkit.commands.quantize", "write an INT8/INT4 weight-only quantized checkpoint"),
    "convert": ("glmkit.commands.convert", "merge a GLM-130B SwissArmyTransformer checkpoint into a safetensors folder"),
    "memory-plan": ("glmkit.commands.memory_plan", "per-device memory of a model over tensor-parallel devices"),
    "bench": ("glmkit.commands.bench", "decode/prefill speed and memory benchmark"),
    "tokenizer": ("glmkit.commands.tokenizer", "tokenizer tools (tokenizer train)"),
}


def _usage() -> str:
    width = max(map(len, COMMANDS))
    lines = ["usage: glmkit COMMAND [options]   (glmkit COMMAND --help for a command's options)", "", "commands:"]
    lines += [f"  {name:<{width}}  {help_}" for name, (_, help_) in COMMANDS.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(_usage())
        return 0
    if argv[0] in ("-V", "--version"):
        # the package itself is always imported before its subpackages (and it is a layer above this one)
        print(f"glmkit {sys.modules['glmkit'].__version__}")
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"glmkit: unknown command {name!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    try:
        module = importlib.import_module(COMMANDS[name][0])
        code = int(module.cli_main(rest) or 0)
    except MissingExtraError as err:
        print(f"glmkit {name}: {err}", file=sys.stderr)
        return 1
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:  # under torchrun (imported only there: torch.distributed's cost)
        from glmkit.distributed.tp import finish_leader

        finish_leader(code)  # rank 0 of a tensor-parallel run releases the other ranks; otherwise nothing
    return code


if __name__ == "__main__":
    sys.exit(main())
