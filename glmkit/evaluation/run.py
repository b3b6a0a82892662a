"""Running GLM-130B-style tasks (`glmkit eval run` / `glmkit eval compare`): predictions batched per task type,
resumable, metrics per data file, per group and overall, a results JSON and a markdown table.

How each task type is scored, as GLM-130B scores it (evaluation/tasks.py, evaluation/metrics.py):

- `mul`: every choice's log-likelihood (glmkit.core.scoring: the blank-infilling layout of GLM-130B's
  `build_multiple_choice_sample` for the original GLM and ChatGLM-6B-layout models, the continuation for the causal
  families), prediction = argmax of the sums. `length_normalization: [token, char]` adds accuracies with the sums
  divided by the choice's token / character count. `scoring: letters` (chat models, C-Eval/MMLU): argmax of the
  answer letters' logits at the answer position. Metrics: Accuracy (also Precision / Recall / F1_mul: GLM-130B
  computes them micro-averaged over single labels, which equals accuracy), and CrowS-Pairs' CP / StereoSet's SS_ICAT.
- `gen`: greedy decoding (BaseStrategy: GLM-130B's top_k=1) or beam search (BeamSearchStrategy; glmkit's beam
  search with length_penalty, min_gen_length and no_repeat_ngram_size; its length normalisation is transformers',
  not GLM-130B's ((5 + len) / 6) ** length_penalty). Metrics: EM and F1 (max over targets of SQuAD-normalised
  exact match / word F1, ×100), ROUGE (ROUGE-1/2/L F1 ×100 with jieba words) and BLEU (BLEU-4 ×100 on
  characters), as glmkit.evaluation.metrics computes them. The `lambada` module (GLM-130B's
  tasks.lambada.task.LAMBADA): Accuracy = the whole last word produced (predict.last_word_correct).
- `lm`: GLM-130B's sliding windows (tasks.lm_windows): each window is a Cloze whose context is the prompt part and
  whose one choice is the text scored. Metrics: PPL = exp(min(20, Σ loss / whitespace words)) as GLM-130B,
  TokenPPL = exp(Σ loss / Σ tokens), BPB = Σ loss / UTF-8 bytes / ln 2 (the `pile` module: per pile_set_name).

Group metrics are the max / median / count-weighted average over the group's files (GLM-130B's
calc_group_metrics); `overall` pools every file of the task. Predictions are cached per data file under
`<output_dir>/cache/` after every chunk of items; a rerun with the same model, precision, task and data file reads
them back and continues where it stopped.
"""

from __future__ import annotations

import hashlib
import json
import math
import sys
import time
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from glmkit.core.atomic import write_json, write_text
from glmkit.core.chat import build_chat_input
from glmkit.core.fill import BLANK_RE
from glmkit.core.scoring import (
    Cloze,
    cloze_from_ids,
    encode_choice_ids,
    encode_cloze,
    is_blank_infilling,
    score_clozes,
)
from glmkit.evaluation.metrics import compute_metrics, exact_match_score, f1_score, qa_metric
from glmkit.evaluation.predict import (
    answer_letter_ids,
    generate_texts,
    last_word_correct,
    letter_logits,
    letter_prompt,
)
from glmkit.evaluation.tasks import (
    TaskConfig,
    TaskError,
    file_groups,
    find_task_files,
    gen_item,
    lm_documents,
    lm_windows,
    load_task_config,
    mul_item,
    read_items,
    task_data_dir,
)

BUNDLED_TASKS = Path(__file__).resolve().parents[1] / "assets" / "tasks"  # scripts/build_eval_tasks.py writes them
# precision name -> (dtype, quantize)
PRECISIONS: dict[str, tuple[str, str | None]] = {
    "fp32": ("float32", None), "bf16": ("bfloat16", None), "fp16": ("float16", None),
    "int8": ("bfloat16", "int8"), "int4": ("bfloat16", "int4"),
}
SCALAR_METRICS_OF = {"ROUGE": ("rouge-1", "rouge-2", "rouge-l"), "BLEU": ("bleu-4",)}


# ------------------------------------------------------------------------------------------------ prediction
def _blank(config: TaskConfig) -> str:
    return "[gMASK]" if config.use_task_mask else "[MASK]"


def _chat_cloze(model, tokenizer, query: str, choices: list[list[int]]) -> Cloze:
    """The choices continue the family's chat prompt of `query` (after the assistant cue)."""
    if model.config.family == "glm":
        raise TaskError("the original GLM has no chat prompt; use prompt: plain")
    ids = list(build_chat_input(tokenizer, query))
    if is_blank_infilling(model):  # ChatGLM-6B: ... [gMASK] <sop>: the choices are Part B after its <sop>
        if ids[-1] != tokenizer.sop_token_id or tokenizer.gmask_token_id not in ids:
            raise TaskError("a ChatGLM-6B chat prompt ends with [gMASK] <sop>")
        return Cloze(ids[:-1], choices, tokenizer.sop_token_id, ids.index(tokenizer.gmask_token_id))
    return Cloze(ids, choices)


def _predict(model, tokenizer, config: TaskConfig, items: list[dict[str, Any]], where: str,
             batch_size: int, max_length: int) -> list[dict[str, Any]]:
    """Prediction records for items (mul/gen) or lm windows, in order."""
    kind = config.type
    if kind == "mul" and config.scoring == "letters":
        queries = [mul_item(item, f"{where}#{n}")[0] for n, item in enumerate(items)]
        most = max(len(mul_item(it, where)[1]) for it in items)
        letters = config.letters or "ABCDEFGHIJKLMNOPQRSTUVWXYZ"[:most]
        if len(letters) < most:
            raise TaskError(f"{where}: {most} choices but only the letters {letters!r}")
        ids = answer_letter_ids(tokenizer, letters)
        chat = config.prompt == "chat"
        if config.cot:
            reasons = generate_texts(model, tokenizer, queries, max_new_tokens=config.max_gen_length,
                                     batch_size=batch_size, max_length=max_length, chat=chat)
            queries = [q + r + "\n" + config.extraction_prompt for q, r in zip(queries, reasons)]
        rows = [letter_prompt(model, tokenizer, q, chat) for q in queries]
        logits = letter_logits(model, rows, ids, batch_size=batch_size)
        return [{"lp": lp[:len(mul_item(it, where)[1])]} for lp, it in zip(logits, items)]
    if kind == "mul":
        clozes = []
        for n, item in enumerate(items):
            text, choices, _ = mul_item(item, f"{where}#{n}")
            if config.prompt == "chat":
                clozes.append(_chat_cloze(model, tokenizer, text, encode_choice_ids(tokenizer, choices)))
            else:
                context = text if BLANK_RE.search(text) else text + _blank(config)
                clozes.append(encode_cloze(model, tokenizer, context, choices))
        scores = score_clozes(model, clozes, batch_size=batch_size, max_length=max_length)
        return [{"lp": [s.logprob for s in row], "n": [s.num_tokens for s in row],
                 "greedy": [s.greedy for s in row]} for row in scores]
    if kind == "gen":
        texts = [gen_item(item, f"{where}#{n}")[0] for n, item in enumerate(items)]
        beams = config.num_beams if config.sampling_strategy == "BeamSearchStrategy" else 1
        outs = generate_texts(model, tokenizer, texts, max_new_tokens=config.max_gen_length, blank=_blank(config),
                              unidirectional=config.unidirectional, num_beams=beams,
                              length_penalty=config.length_penalty,
                              no_repeat_ngram_size=config.no_repeat_ngram_size if beams > 1 else 0,
                              min_new_tokens=config.min_gen_length if beams > 1 else 0, batch_size=batch_size,
                              max_length=max_length, stop=config.stop, chat=config.prompt == "chat")
        return [{"text": t} for t in outs]
    # lm: items are windows {"doc", "prompt": ids seen, "text": ids scored}
    clozes = [cloze_from_ids(model, tokenizer, w["prompt"], [w["text"]], blank="[gMASK]") for w in items]
    scores = score_clozes(model, clozes, batch_size=batch_size)
    return [{"loss": -row[0].logprob, "tokens": row[0].num_tokens} for row in scores]


def lm_items(tokenizer, config: TaskConfig, path: Path, max_length: int) -> tuple[list[dict], list[dict]]:
    """(documents, windows) of an lm data file; each window: doc index, prompt ids, text ids."""
    docs = lm_documents(path)
    windows = []
    for d, doc in enumerate(docs):
        ids = list(tokenizer.encode(doc["text"], add_special_tokens=False))
        doc["num_tokens"] = len(ids)
        for ps, ts, te in lm_windows(len(ids), max_length, config.generation_length, config.unidirectional):
            if te > ts:
                windows.append({"doc": d, "prompt": ids[ps:ts], "text": ids[ts:te]})
    return docs, windows


# ------------------------------------------------------------------------------------------------ metrics
def _argmax(xs: Sequence[float]) -> int:
    return int(np.argmax(np.asarray(xs, dtype=np.float64)))


def file_metrics(config: TaskConfig, items: list[dict[str, Any]], preds: list[dict[str, Any]],
                 tokenizer=None, docs: list[dict] | None = None) -> dict[str, float]:
    """Metric name -> value for one data file (dict-valued metrics are flattened as 'name/key')."""
    out: dict[str, float] = {}
    behaviour = config.behaviour
    if config.type == "mul":
        labels = [it.get("label", -1) for it in items]
        picks = [_argmax(p["lp"]) for p in preds]
        acc = 100.0 * sum(int(a == b) for a, b in zip(picks, labels)) / max(len(items), 1)
        for m in config.metrics:
            if m in ("Accuracy", "Precision", "Recall", "F1_mul"):
                out[m] = acc
            elif m == "CP":
                out.update({f"CP/{k}": v for k, v in _crows_pair(items, preds).items()})
            elif m == "SS_ICAT":
                out.update(_stereoset(items, preds))
            else:
                raise TaskError(f"task {config.name!r}: metric {m!r} does not apply to mul tasks")
        if config.scoring == "loglikelihood":
            for norm in config.length_normalization:
                sizes = ([p["n"] for p in preds] if norm == "token" else
                         [[len(c) for c in mul_item(it, "")[1]] for it in items])
                picks = [_argmax([lp / max(s, 1) for lp, s in zip(p["lp"], size)]) for p, size in zip(preds, sizes)]
                out[f"Accuracy_norm_{norm}"] = 100.0 * sum(int(a == b) for a, b in zip(picks, labels)) / max(
                    len(items), 1)
        return out
    if config.type == "gen":
        texts = [p["text"] for p in preds]
        targets = [gen_item(it, "")[1] for it in items]
        for m in config.metrics:
            if m == "Accuracy" and behaviour == "lambada":
                out[m] = 100.0 * sum(any(last_word_correct(t, g) for g in gs) for t, gs in zip(texts, targets)) / max(
                    len(items), 1)
            elif m == "EM":
                out[m] = qa_metric(exact_match_score, texts, targets)
            elif m == "F1":
                out[m] = qa_metric(f1_score, texts, targets)
            elif m in SCALAR_METRICS_OF:
                scores = compute_metrics(texts, [gs[0] if gs else "" for gs in targets])
                out.update({k.upper(): scores[k] for k in SCALAR_METRICS_OF[m]})
            else:
                raise TaskError(f"task {config.name!r}: metric {m!r} does not apply to gen tasks")
        return out
    loss = sum(p["loss"] for p in preds)
    tokens = sum(p["tokens"] for p in preds)
    docs = docs or []
    for m in config.metrics:
        if m == "PPL":
            words = sum(len(d["text"].strip().split(" ")) for d in docs)
            out[m] = math.exp(min(20.0, loss / max(words, 1)))
        elif m == "TokenPPL":
            out[m] = math.exp(min(50.0, loss / max(tokens, 1)))
        elif m == "BPB":
            if behaviour == "pile":
                per_loss, per_bytes = defaultdict(float), defaultdict(int)
                for d in docs:
                    per_bytes[d["meta"].get("pile_set_name", "all")] += len(d["text"].encode("utf-8"))
                for p, w in zip(preds, items):
                    per_loss[docs[w["doc"]]["meta"].get("pile_set_name", "all")] += p["loss"]
                out.update({f"BPB/{k}": per_loss[k] / per_bytes[k] / math.log(2) for k in per_loss})
            else:
                out[m] = loss / max(sum(len(d["text"].encode("utf-8")) for d in docs), 1) / math.log(2)
        else:
            raise TaskError(f"task {config.name!r}: metric {m!r} does not apply to lm tasks")
    return out


def _crows_pair(items, preds) -> dict[str, float]:
    """GLM-130B's CrowsPairMetric: per pair, + log p of sentence 1 − log p of the other; share of pairs >= 0 per
    bias type."""
    totals, labels = defaultdict(float), {}
    for it, p in zip(items, preds):
        sign = 1.0 if it.get("sent_ID") == 1 else -1.0
        totals[it["pair_ID"]] += sign * p["lp"][0]
        labels[it["pair_ID"]] = it["bias_type"]
    pos, count = defaultdict(int), defaultdict(int)
    for pair, value in totals.items():
        pos[labels[pair]] += int(value >= 0)
        count[labels[pair]] += 1
    return {k: pos[k] / count[k] for k in count}


def _stereoset(items, preds) -> dict[str, float]:
    """GLM-130B's StereoSetMetric: choice = argmax of log p / choice tokens; LMS, SS and ICAT per bias type and
    overall."""
    results = defaultdict(list)
    for it, p in zip(items, preds):
        pick = _argmax([lp / max(n, 1) for lp, n in zip(p["lp"], p["n"])])
        label = it["goal_label"][pick]
        results[it["bias_type"]].append(label)
        results["overall"].append(label)
    out = {}
    for key, values in results.items():
        stereo, anti = values.count("stereotype"), values.count("anti-stereotype")
        lms = (stereo + anti) / len(values) * 100
        ss = stereo / (stereo + anti) * 100 if stereo + anti else 0.0
        out.update({f"LMS/{key}": lms, f"SS/{key}": ss, f"ICAT/{key}": lms * min(ss, 100.0 - ss) / 50.0})
    return out


def group_stats(per_file: list[tuple[dict[str, float], int]]) -> dict[str, dict[str, float]]:
    """GLM-130B's calc_group_metrics: per metric the max, median and count-weighted average over files."""
    values, weights = defaultdict(list), defaultdict(list)
    for metrics, n in per_file:
        for k, v in metrics.items():
            values[k].append(v)
            weights[k].append(n)
    return {k: {"max": float(np.max(v)), "median": float(np.median(v)),
                "average": float(np.average(v, weights=weights[k])) if sum(weights[k]) else float(np.mean(v))}
            for k, v in values.items()}


# ------------------------------------------------------------------------------------------------ resume
class PredictionCache:
    """Prediction records per data file, appended after every chunk: `<dir>/<task>/<key>.jsonl` of {"i", "r"}."""

    def __init__(self, root: Path | None) -> None:
        self.root = root

    def path(self, config: TaskConfig, data_file: Path, run_key: str) -> Path | None:
        if self.root is None:
            return None
        stat = data_file.stat()
        settings = {k: v for k, v in config.as_dict().items() if k not in ("source", "metrics", "micro_batch_size")}
        key = json.dumps([run_key, settings, str(data_file.resolve()), stat.st_size, stat.st_mtime_ns],
                         sort_keys=True, default=str)
        name = "".join(c if c.isalnum() or c in "-_." else "_" for c in config.name)
        return self.root / name / (hashlib.sha1(key.encode()).hexdigest()[:16] + ".jsonl")

    @staticmethod
    def read(path: Path | None) -> dict[int, dict]:
        """The records cached so far; a last line cut short by an interruption is dropped from the file."""
        done: dict[int, dict] = {}
        if path is None or not path.exists():
            return done
        text = path.read_text(encoding="utf-8")
        good = []
        for line in text.splitlines(keepends=True):
            try:
                row = json.loads(line)
                if not line.endswith("\n"):
                    raise ValueError("unterminated line")
            except ValueError:
                break  # a line cut by an interruption: everything from here is redone
            done[int(row["i"])] = row["r"]
            good.append(line)
        if sum(map(len, good)) != len(text):
            write_text(path, "".join(good))
        return done

    @staticmethod
    def append(path: Path | None, start: int, records: list[dict]) -> None:
        if path is None:
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("a", encoding="utf-8") as f:
            for j, r in enumerate(records):
                f.write(json.dumps({"i": start + j, "r": r}, ensure_ascii=False) + "\n")
            f.flush()


# ------------------------------------------------------------------------------------------------ running
def evaluate_task(model, tokenizer, config: TaskConfig, *, data_path: str | Path | None = None,
                  batch_size: int | None = None, limit: int | None = None, cache: PredictionCache | None = None,
                  run_key: str = "", progress: bool = True) -> dict[str, Any]:
    """One task: metrics per file, per group (max/median/average) and overall."""
    data_dir = task_data_dir(config, data_path)
    groups = file_groups(config, data_dir)
    bs = batch_size or config.micro_batch_size
    max_length = min(config.max_seq_length, model.config.max_seq_len)
    cache = cache or PredictionCache(None)
    result: dict[str, Any] = {"name": config.name, "type": config.type, "module": config.module,
                              "metrics": config.metrics, "groups": {}}
    all_files: list[tuple[dict[str, float], int]] = []
    started = time.time()
    for group, files in groups.items():
        per_file = {}
        for file in files:
            rel = str(file.relative_to(data_dir)) if file.is_relative_to(data_dir) else str(file)
            docs = None
            if config.type == "lm":
                docs, items = lm_items(tokenizer, config, file, max_length)
                if limit is not None:  # the first `limit` documents, whole
                    docs, items = docs[:limit], [w for w in items if w["doc"] < limit]
            else:
                items = read_items(file)
                if limit is not None:
                    items = items[:limit]
            if not items:
                raise TaskError(f"{file}: no items")
            preds = _run_file(model, tokenizer, config, items, str(file), bs, max_length, cache,
                              cache.path(config, file, run_key), progress, f"{config.name}/{rel}")
            metrics = file_metrics(config, items, preds, tokenizer, docs)
            n = len(items) if config.type != "lm" else len({w["doc"] for w in items})
            per_file[rel] = {"metrics": metrics, "n": n}
            all_files.append((metrics, n))
        result["groups"][group] = {"files": per_file,
                                   "stats": group_stats([(f["metrics"], f["n"]) for f in per_file.values()])}
    result["overall"] = group_stats(all_files)
    result["seconds"] = round(time.time() - started, 2)
    return result


def _run_file(model, tokenizer, config, items, where, batch_size, max_length, cache, path, progress, label):
    done = cache.read(path)
    preds: list[dict | None] = [done.get(i) for i in range(len(items))]
    todo = [i for i, p in enumerate(preds) if p is None]
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(items), initial=len(items) - len(todo), desc=label, unit="item", file=sys.stderr,
                   dynamic_ncols=True, leave=False)
    chunk = max(batch_size * 4, 16) if config.type != "gen" else batch_size
    # chunks of consecutive indices, so that the cache file stays in order
    runs: list[list[int]] = []
    for i in todo:
        if runs and runs[-1][-1] == i - 1 and len(runs[-1]) < chunk:
            runs[-1].append(i)
        else:
            runs.append([i])
    for run in runs:
        records = _predict(model, tokenizer, config, [items[i] for i in run], where, batch_size, max_length)
        for i, r in zip(run, records):
            preds[i] = r
        cache.append(path, run[0], records)
        if bar:
            bar.update(len(run))
    if bar:
        bar.close()
    return preds


def evaluate_tasks(model, tokenizer, tasks: Sequence[str | Path], *, data_path: str | Path | None = None,
                   batch_size: int | None = None, limit: int | None = None, output_dir: str | Path | None = None,
                   run_key: str = "", progress: bool = True, model_name: str = "",
                   precision: str = "") -> dict[str, Any]:
    """Every task file of `tasks` (files or folders of *.yaml): the results dict `write_results` saves."""
    configs = [load_task_config(p) for p in find_task_files(list(tasks))]
    names = [c.name for c in configs]
    if len(set(names)) != len(names):
        raise TaskError(f"task names repeat: {sorted(n for n in set(names) if names.count(n) > 1)}")
    cache = PredictionCache(Path(output_dir) / "cache" if output_dir is not None else None)
    results = {"model": model_name, "precision": precision, "tasks": {}}
    for config in configs:
        results["tasks"][config.name] = evaluate_task(model, tokenizer, config, data_path=data_path,
                                                      batch_size=batch_size, limit=limit, cache=cache,
                                                      run_key=run_key, progress=progress)
    return results


def results_markdown(results: dict[str, Any]) -> str:
    """One row per task, group and metric: the count-weighted average over the group's files (with max/median when
    the group has several files, GLM-130B's report)."""
    lines = ["| task | group | metric | average | max | median | files |", "|---|---|---|---:|---:|---:|---:|"]
    for task, res in results["tasks"].items():
        groups = dict(res["groups"])
        for group, g in groups.items():
            for metric, s in g["stats"].items():
                several = len(g["files"]) > 1
                lines.append(f"| {task} | {group} | {metric} | {s['average']:.3f} | "
                             f"{s['max']:.3f} | {s['median']:.3f} | {len(g['files'])} |" if several else
                             f"| {task} | {group} | {metric} | {s['average']:.3f} | | | 1 |")
    return "\n".join(lines) + "\n"


def write_results(results: dict[str, Any], output_dir: str | Path, stem: str = "results") -> tuple[Path, Path]:
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    js, md = out / f"{stem}.json", out / f"{stem}.md"
    write_json(js, results)  # each file whole or the previous one (glmkit.core.atomic)
    write_text(md, results_markdown(results))
    return js, md


def model_fingerprint(model_path: str | Path) -> str:
    """The model folder and the size and mtime of its files: cached predictions of another checkpoint (a retrained
    model in the same folder) are not reused."""
    from glmkit.core.hub import resolve_model_dir

    folder = resolve_model_dir(model_path)
    files = sorted((p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in folder.iterdir() if p.is_file())
    return hashlib.sha1(json.dumps([str(folder.resolve()), files]).encode()).hexdigest()[:16]


def load_for_eval(model_path: str | Path, precision: str | None = None, *, dtype: str | None = None,
                  quantize: str | None = None, device: str = "cpu"):
    """(model, tokenizer) at a precision name of PRECISIONS (or an explicit dtype / quantize)."""
    from glmkit.core.tokenizer import load_tokenizer
    from glmkit.loading.loader import load_model

    if precision is not None:
        if precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {sorted(PRECISIONS)}, got {precision!r}")
        p_dtype, p_quant = PRECISIONS[precision]
        dtype, quantize = dtype or p_dtype, quantize or p_quant
    model = load_model(model_path, dtype=dtype, device=device, quantize=quantize)
    return model.eval(), load_tokenizer(model_path)


def run_eval(model_path: str | Path, tasks: Sequence[str | Path], *, precision: str | None = None,
             dtype: str | None = None, quantize: str | None = None, data_path: str | Path | None = None,
             batch_size: int | None = None, limit: int | None = None, output_dir: str | Path | None = None,
             device: str = "cpu", progress: bool = True) -> dict[str, Any]:
    """`glmkit eval run`: load the model (at `precision`, or dtype/quantize), evaluate the tasks, write
    results.json and results.md to output_dir (when given; predictions cached there for resuming)."""
    model, tokenizer = load_for_eval(model_path, precision, dtype=dtype, quantize=quantize, device=device)
    label = precision or "+".join(x for x in (dtype or str(model.dtype).removeprefix("torch."), quantize) if x)
    results = evaluate_tasks(model, tokenizer, tasks, data_path=data_path, batch_size=batch_size, limit=limit,
                             output_dir=output_dir, run_key=f"{model_fingerprint(model_path)}|{label}",
                             progress=progress, model_name=str(model_path), precision=label)
    if output_dir is not None:
        write_results(results, output_dir, stem=f"results-{label}")
    return results


def compare_precisions(model_path: str | Path, tasks: Sequence[str | Path], *,
                       precisions: Sequence[str] = ("bf16", "int8", "int4"), data_path: str | Path | None = None,
                       batch_size: int | None = None, limit: int | None = None,
                       output_dir: str | Path | None = None, device: str = "cpu",
                       progress: bool = True) -> dict[str, Any]:
    """`glmkit eval compare`: the same tasks at each precision; {"runs": {precision: results}, "table": markdown
    with each group's averages per precision and their deltas from the first precision}."""
    runs = {p: run_eval(model_path, tasks, precision=p, data_path=data_path, batch_size=batch_size, limit=limit,
                        output_dir=output_dir, device=device, progress=progress) for p in precisions}
    table = comparison_markdown(runs)
    if output_dir is not None:
        out = Path(output_dir)
        write_text(out / "compare.md", table)
        write_json(out / "compare.json", runs)
    return {"runs": runs, "table": table}


def comparison_markdown(runs: dict[str, dict[str, Any]]) -> str:
    """| task | group | metric | p0 | p1 | Δ p1 | ...: each group's count-weighted average per precision and its
    delta from the first precision; a task with several groups also gets its pooled `all` row."""
    precisions = list(runs)
    base = precisions[0]
    head = ["task", "group", "metric", base]
    for p in precisions[1:]:
        head += [p, f"Δ {p}"]
    lines = ["| " + " | ".join(head) + " |", "|---|---|---|" + "---:|" * (len(head) - 3)]

    def stats_of(res: dict[str, Any], group: str) -> dict[str, Any]:
        return res["overall"] if group == "all" and "all" not in res["groups"] else res["groups"][group]["stats"]

    for task, res in runs[base]["tasks"].items():
        groups = list(res["groups"]) + (["all"] if len(res["groups"]) > 1 else [])
        for group in groups:
            for metric, stats in stats_of(res, group).items():
                row = [task, group, metric, f"{stats['average']:.3f}"]
                for p in precisions[1:]:
                    other_task = runs[p]["tasks"].get(task)
                    try:
                        other = stats_of(other_task, group)[metric] if other_task else None
                    except KeyError:
                        other = None
                    row += ["", ""] if other is None else [f"{other['average']:.3f}",
                                                           f"{other['average'] - stats['average']:+.3f}"]
                lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines) + "\n"
