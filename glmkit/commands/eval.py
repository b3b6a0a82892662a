"""`glmkit eval`: evaluation from the command line.

- `eval ppl`: glmkit.evaluation.perplexity.perplexity_report (per-token loss, perplexity, per-character CE);
- `eval run`: glmkit.evaluation.run.run_eval (GLM-130B task files: mul / gen / lm; results JSON + markdown table);
- `eval compare`: glmkit.evaluation.run.compare_precisions (the same tasks at bf16 / INT8 / INT4, with deltas);
- `eval harness ARGS`: glmkit.evaluation.harness.run_harness (lm-evaluation-harness's command line, ARGS unchanged,
  with the `glmkit` model backend registered).
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass

from glmkit.commands.common import parse_options
from glmkit.core import options
from glmkit.core.atomic import write_json
from glmkit.core.extras import require_extra
from glmkit.core.options import option
from glmkit.core.tokenizer import load_tokenizer
from glmkit.evaluation.perplexity import perplexity_report, read_texts
from glmkit.evaluation.run import BUNDLED_TASKS, PRECISIONS, compare_precisions, results_markdown, run_eval
from glmkit.evaluation.tasks import TaskError
from glmkit.loading.loader import load_model


PPL_HELP = "per-token loss and perplexity (plus per-character CE) on a text file"


@dataclass(kw_only=True)
class PerplexityOptions:
    model: str = option("glm-tiny", help="model folder, bundled name or hub id (default glm-tiny)")
    data: str = option(help=".jsonl ({\"text\": ...} per line), .txt or a folder of them")
    key: str = option("text", help="JSON field holding the text (default text)")
    limit: int | None = option(None, help="score only the first N documents")
    batch_size: int = 8
    max_tokens: int | None = option(None, help="cut documents to this many tokens (default: model max)")
    dtype: str = option("float32", help="float32 (default), bfloat16 or float16")
    unigram_corpus: list[str] | None = option(None, nargs="+", type=str, metavar="PATH",
                                              help="also report a character unigram model fitted on these "
                                                   "files/folders")
    json: str | None = option(None, metavar="FILE", help="write the numbers to this JSON file")
    no_progress: bool = option(False, help="no progress bar")


def build_ppl_parser() -> argparse.ArgumentParser:
    return options.build_parser(
        PerplexityOptions, prog="glmkit eval ppl", dashes=True,
        description="Scores every document of --data as a continuation of tokenizer.encode('') (ChatGLM-6B: "
                    "[gMASK] <sop>) and prints per-token loss, perplexity and per-character cross-entropy (nats).")


def build_parser() -> argparse.ArgumentParser:
    """`glmkit eval`: run and compare (argparse subcommands: the task list is a variable-length positional, which
    leaves no room for key=value overrides), ppl (its own options parser) and harness (lm-eval's own)."""
    p = argparse.ArgumentParser(prog="glmkit eval", description="Evaluate a model.")
    sub = p.add_subparsers(dest="command", required=True)
    sub.add_parser("ppl", help=PPL_HELP, add_help=False)  # parsed by build_ppl_parser

    for name in ("run", "compare"):
        help_ = ("evaluate GLM-130B-style task files (mul/gen/lm): results JSON and markdown table" if name == "run"
                 else "run the same tasks at several precisions (default bf16, int8, int4) and print the deltas")
        r = sub.add_parser(name, help=help_, description=help_ + ". Task files use GLM-130B's YAML format "
                           "(tasks/**.yaml of THUDM/GLM-130B run unchanged with --data-path); glmkit's bundled "
                           "tasks are the folder `bundled`.")
        r.add_argument("tasks", nargs="+", help="task YAML files or folders of them (`bundled`: glmkit's own tasks)")
        r.add_argument("--model", default="glm-tiny", help="model folder, bundled name or hub id (default glm-tiny)")
        r.add_argument("--data-path", help="folder the tasks' `path` fields are relative to (GLM-130B's "
                                           "DATA_PATH; default: each YAML file's folder)")
        r.add_argument("--batch-size", type=int, help="rows per forward (default: the task's micro_batch_size)")
        r.add_argument("--limit", type=int, help="only the first N items (lm: documents) of each data file")
        r.add_argument("--output", help="folder for results-<precision>.json/.md and the resume cache")
        r.add_argument("--device", default="cpu")
        r.add_argument("--no-progress", action="store_true", help="no progress bar")
        if name == "run":
            r.add_argument("--precision", choices=sorted(PRECISIONS),
                           help="fp32 | bf16 | fp16 | int8 | int4 (int8/int4: bf16 activations); default: the "
                                "checkpoint's dtype")
            r.add_argument("--dtype", help="float32 | bfloat16 | float16 (overrides the precision's)")
            r.add_argument("--quantize", choices=["int8", "int4"], help="quantize the layers while loading")
        else:
            r.add_argument("--precisions", default="bf16,int8,int4",
                           help="comma-separated, the first is the baseline (default bf16,int8,int4)")
    sub.add_parser("harness", help="lm-evaluation-harness's command line with the glmkit backend: "
                                   "glmkit eval harness --model glmkit --model_args pretrained=glm-tiny --tasks ...",
                   add_help=False)
    return p


def _tasks(paths: list[str]) -> list[str]:
    return [str(BUNDLED_TASKS) if p == "bundled" else p for p in paths]


def cli_main(argv: list[str]) -> int:
    if argv and argv[0] == "harness":  # lm-eval parses its own arguments
        require_extra("eval")
        from glmkit.evaluation.harness import run_harness

        return run_harness(argv[1:])
    if argv and argv[0] == "ppl":
        return _perplexity(parse_options(PerplexityOptions, build_ppl_parser(), argv[1:]))
    return _run(build_parser().parse_args(argv))


def _perplexity(args: PerplexityOptions) -> int:
    try:
        texts = read_texts(args.data, args.key, args.limit)
        model = load_model(args.model, dtype=args.dtype)
        tokenizer = load_tokenizer(args.model)
    except (ValueError, FileNotFoundError) as e:
        print(f"glmkit eval ppl: {e}", file=sys.stderr)
        return 2
    model.eval()
    out = {"model": str(args.model), "data": str(args.data),
           **perplexity_report(model, tokenizer, texts, batch_size=args.batch_size, max_tokens=args.max_tokens,
                               unigram_corpus=args.unigram_corpus, key=args.key, progress=not args.no_progress)}
    print(f"documents {out['documents']}  tokens {out['tokens']}  characters {out['characters']}")
    print(f"per-token loss {out['token_loss']:.4f} nats  perplexity {out['perplexity']:.2f}")
    print(f"per-character cross-entropy {out['char_ce']:.4f} nats/char")
    if "unigram_char_ce" in out:
        print(f"character unigram CE {out['unigram_char_ce']:.4f} nats/char  ->  model is "
              f"{100 * out['reduction_vs_unigram']:.1f}% lower")
    if args.json:
        write_json(args.json, out)
    return 0


def _run(args) -> int:
    try:
        if args.command == "run":
            results = run_eval(args.model, _tasks(args.tasks), precision=args.precision, dtype=args.dtype,
                               quantize=args.quantize, data_path=args.data_path, batch_size=args.batch_size,
                               limit=args.limit, output_dir=args.output, device=args.device,
                               progress=not args.no_progress)
            print(f"{args.model} ({results['precision']})")
            print(results_markdown(results), end="")
        else:
            precisions = [p.strip() for p in args.precisions.split(",") if p.strip()]
            bad = [p for p in precisions if p not in PRECISIONS]
            if bad or not precisions:
                print(f"glmkit eval compare: precisions must be of {sorted(PRECISIONS)}, got {args.precisions!r}",
                      file=sys.stderr)
                return 2
            out = compare_precisions(args.model, _tasks(args.tasks), precisions=precisions,
                                     data_path=args.data_path, batch_size=args.batch_size, limit=args.limit,
                                     output_dir=args.output, device=args.device, progress=not args.no_progress)
            print(out["table"], end="")
    except (TaskError, ValueError, FileNotFoundError) as e:
        print(f"glmkit eval {args.command}: {e}", file=sys.stderr)
        return 2
    if args.output:
        print(f"results in {args.output}", file=sys.stderr)
    return 0
