"""GLM-130B's evaluation task files (YAML) and data layout, read as its `evaluation/configs.py` and
`evaluation/dataset.py` read them, so that GLM-130B's own `tasks/**.yaml` run unchanged given their data folder.

A task file:

    name: "LAMBADA"                 # task name
    type: "gen"                     # mul (multiple choice) | gen (generation) | lm (language modelling)
    path: "lambada/lambada"         # data folder, relative to --data-path (default: the YAML file's folder)
    module: "tasks.lambada.task.LAMBADA"   # optional: one of GLM-130B's task classes (BUILTIN_MODULES)
    file-pattern:                   # groups of data files (glob, recursive); a plain string = one group "all"
      test: "**/test.jsonl"
    use_task_mask: true             # the blank appended to an input without one: [gMASK] (true) or [MASK]
    unidirectional: false           # gen/lm: [gMASK] <sop> before the text, all causal
    max_seq_length: 2048
    micro-batch-size: 8
    # gen: sampling_strategy (BaseStrategy = greedy | BeamSearchStrategy), num_beams, length_penalty,
    #      no_repeat_ngram_size, min_gen_length, max_gen_length
    # lm: generation_length (the stride of the sliding windows)

Keys are read with `-` and `_` alike (GLM-130B's YAMLWizard does the same). glmkit adds, for chat models:
`prompt: chat` (each input goes through the family's chat prompt, glmkit.core.chat.build_chat_input), `scoring:
letters` (C-Eval/MMLU style: the answer letter is read from the logits of the letter tokens of the model's own
tokenizer at the answer position, `letters` default ABCD...), `cot: true` with `extraction_prompt` (ChatGLM2's
evaluate_ceval.py: reason first, then read the letter after the extraction prompt), and `length_normalization`
(`token` / `char`: mul also reports accuracy with per-token / per-character normalised scores) and `stop` (gen:
strings that end the generated text, as lm-evaluation-harness's `until`).

Data: JSON Lines, one item per line (`.json` files holding one JSON array are read too):
`{"inputs_pretokenized": str, "choices_pretokenized": [str, ...], "label": int}` for mul,
`{"inputs_pretokenized": str, "targets_pretokenized": [str, ...]}` for gen; for lm a text file is one document
(GLM-130B), a `.jsonl` file one document per line (`text_pretokenized` or `text`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields
from glob import glob
from pathlib import Path
from typing import Any

import yaml

from glmkit.loading.corpus import read_json_records

TASK_TYPES = ("mul", "gen", "lm")

# GLM-130B's task classes (its YAML `module`), done by glmkit's own code: name -> (glmkit behaviour, default metrics)
BUILTIN_MODULES: dict[str, tuple[str, list[str]]] = {
    "tasks.lambada.task.LAMBADA": ("lambada", ["Accuracy"]),
    "tasks.mmlu.task.MMLU": ("mmlu", ["Accuracy"]),
    "tasks.language-modeling.pile.Pile": ("pile", ["BPB"]),
    "tasks.ethnic.crows-pair.tasks.CrowsPairTask": ("crows_pair", ["CP"]),
    "tasks.ethnic.stereoset.tasks.StereoSetTask": ("stereoset", ["SS_ICAT"]),
    # glmkit's short names for the same
    "lambada": ("lambada", ["Accuracy"]),
    "mmlu": ("mmlu", ["Accuracy"]),
    "pile": ("pile", ["BPB"]),
    "crows_pair": ("crows_pair", ["CP"]),
    "stereoset": ("stereoset", ["SS_ICAT"]),
}
DEFAULT_METRICS = {"mul": ["Accuracy"], "gen": ["EM", "F1"], "lm": ["PPL"]}


class TaskError(ValueError):
    """A task file or its data is not what GLM-130B's layout expects."""


@dataclass
class TaskConfig:
    """The fields of GLM-130B's BaseConfig / MultiChoiceTaskConfig / GenerationTaskConfig / LanguageModelTaskConfig
    (evaluation/configs.py, same names and defaults) plus glmkit's chat-model options."""

    name: str
    type: str
    path: str
    module: str | None = None
    metrics: list[str] = field(default_factory=list)
    use_task_mask: bool = False
    use_multitask_encoding: bool = False
    unidirectional: bool = False
    max_seq_length: int = 2048
    file_pattern: str | dict[str, str] = "**/*.json*"
    micro_batch_size: int = 1
    # gen
    sampling_strategy: str = "BaseStrategy"
    num_beams: int = 4
    length_penalty: float = 1.0
    no_repeat_ngram_size: int = 3
    min_gen_length: int = 0
    max_gen_length: int = 128
    stop: list[str] = field(default_factory=list)  # glmkit: cut the generated text at the first of these strings
    # lm
    generation_length: int = 256
    # glmkit: chat models and scoring variants
    prompt: str = "plain"  # plain | chat
    scoring: str = "loglikelihood"  # loglikelihood | letters (mul)
    letters: str | None = None  # default: "ABCD..." as many as choices
    cot: bool = False  # letters: reason first (ChatGLM2's evaluate_ceval.py), then read the letter
    extraction_prompt: str = "综上所述，ABCD中正确的选项是："
    length_normalization: list[str] = field(default_factory=list)  # token / char (extra mul accuracies)
    source: str | None = None  # the YAML file (relative `path`s resolve against its folder without --data-path)

    @property
    def behaviour(self) -> str:
        """mul / gen / lm, or the GLM-130B task class this file names (lambada, mmlu, pile, crows_pair, stereoset)."""
        return BUILTIN_MODULES[self.module][0] if self.module else self.type

    def as_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


def _check(config: TaskConfig, where: str) -> None:
    if config.type not in TASK_TYPES:
        raise TaskError(f"{where}: type must be one of {TASK_TYPES}, got {config.type!r}")
    if config.module and config.module not in BUILTIN_MODULES:
        raise TaskError(f"{where}: module {config.module!r} is not a task class glmkit knows; known: "
                        f"{sorted(k for k in BUILTIN_MODULES if '.' in k)} (or their short names)")
    if config.use_multitask_encoding:
        raise TaskError(f"{where}: use_multitask_encoding is not supported (GLM-130B: 'Not supported now')")
    if not (config.use_task_mask or not config.unidirectional):
        raise TaskError(f"{where}: [MASK] doesn't support unidirectional attention (set use_task_mask: true)")
    if config.sampling_strategy not in ("BaseStrategy", "BeamSearchStrategy"):
        raise TaskError(f"{where}: unknown sampling_strategy {config.sampling_strategy!r}")
    if config.prompt not in ("plain", "chat"):
        raise TaskError(f"{where}: prompt must be plain or chat, got {config.prompt!r}")
    if config.scoring not in ("loglikelihood", "letters"):
        raise TaskError(f"{where}: scoring must be loglikelihood or letters, got {config.scoring!r}")
    if config.scoring == "letters" and config.type != "mul":
        raise TaskError(f"{where}: scoring: letters is for mul tasks")
    bad = [n for n in config.length_normalization if n not in ("token", "char")]
    if bad:
        raise TaskError(f"{where}: length_normalization takes token and/or char, got {bad}")
    for name in ("max_seq_length", "micro_batch_size", "max_gen_length", "generation_length", "num_beams"):
        if int(getattr(config, name)) < 1:
            raise TaskError(f"{where}: {name} must be >= 1")
    if config.type == "lm" and config.generation_length >= config.max_seq_length - 1:
        raise TaskError(f"{where}: generation_length must be below max_seq_length - 1")


def task_config(data: dict[str, Any], where: str = "task") -> TaskConfig:
    """A TaskConfig from a parsed YAML mapping (keys with '-' or '_'); unknown keys and missing name/type/path are
    errors."""
    if not isinstance(data, dict):
        raise TaskError(f"{where}: a task file holds a mapping of fields, got {type(data).__name__}")
    known = {f.name for f in fields(TaskConfig)}
    values: dict[str, Any] = {}
    for key, value in data.items():
        name = str(key).replace("-", "_")
        if name not in known:
            raise TaskError(f"{where}: unknown field {key!r} (known: {sorted(known - {'source'})})")
        values[name] = value
    missing = [k for k in ("name", "type", "path") if k not in values]
    if missing:
        raise TaskError(f"{where}: missing field(s) {missing}")
    if isinstance(values.get("stop"), str):
        values["stop"] = [values["stop"]]
    if isinstance(values.get("length_normalization"), str):
        values["length_normalization"] = [values["length_normalization"]]
    config = TaskConfig(**values)
    if not config.metrics:
        config.metrics = list(BUILTIN_MODULES[config.module][1] if config.module in BUILTIN_MODULES
                              else DEFAULT_METRICS.get(config.type, []))
    _check(config, where)
    return config


def load_task_config(path: str | Path) -> TaskConfig:
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        raise TaskError(f"{path}: not valid YAML: {e}") from None
    config = task_config(data, str(path))
    config.source = str(path)
    return config


def find_task_files(paths: list[str | Path]) -> list[Path]:
    """Task files: each path a YAML file or a folder searched recursively for *.yaml (GLM-130B's find_all_tasks)."""
    out: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            found = sorted(p.rglob("*.yaml"))
            if not found:
                raise TaskError(f"no *.yaml task files under {p}")
            out += found
        elif p.is_file():
            out.append(p)
        else:
            raise TaskError(f"task file or folder {p} does not exist")
    return out


def task_data_dir(config: TaskConfig, data_path: str | Path | None) -> Path:
    """config.path under data_path (GLM-130B's DATA_PATH), else under the YAML file's folder."""
    root = Path(data_path) if data_path is not None else (Path(config.source).parent if config.source else Path("."))
    return root / config.path


def file_groups(config: TaskConfig, data_dir: Path) -> dict[str, list[Path]]:
    """Group name -> sorted data files, as BaseTask.get_file_groups globs them (recursive)."""
    if not data_dir.is_dir():
        raise TaskError(f"task {config.name!r}: data folder {data_dir} does not exist")
    patterns = {"all": config.file_pattern} if isinstance(config.file_pattern, str) else dict(config.file_pattern)
    groups = {name: [Path(p) for p in sorted(glob(str(data_dir / pattern), recursive=True)) if Path(p).is_file()]
              for name, pattern in patterns.items()}
    if not any(groups.values()):
        raise TaskError(f"task {config.name!r}: no data files match {patterns} under {data_dir}")
    return {k: v for k, v in groups.items() if v}


def read_items(path: Path) -> list[dict[str, Any]]:
    """The items of a JSON Lines file (or of a .json file holding one array)."""
    return read_json_records(path, TaskError)


def text_field(item: dict[str, Any], key: str, where: str) -> Any:
    """item[key + '_pretokenized'] (a string or a list of strings). GLM-130B also accepts `key` holding icetk token
    ids; those belong to GLM-130B's tokenizer, so glmkit asks for the text."""
    pre = key + "_pretokenized"
    if pre in item:
        return item[pre]
    if key in item:
        raise TaskError(f"{where}: the item has {key!r} as token ids (GLM-130B's icetk); glmkit needs {pre!r} text")
    raise TaskError(f"{where}: the item has no {pre!r}")


def mul_item(item: dict[str, Any], where: str) -> tuple[str, list[str], int]:
    text, choices = text_field(item, "inputs", where), text_field(item, "choices", where)
    if not isinstance(text, str) or not isinstance(choices, list) or not all(isinstance(c, str) for c in choices):
        raise TaskError(f"{where}: inputs_pretokenized must be a string, choices_pretokenized a list of strings")
    if not choices:
        raise TaskError(f"{where}: no choices")
    label = item.get("label", -1)
    if not isinstance(label, int) or isinstance(label, bool):
        raise TaskError(f"{where}: label must be an integer, got {label!r}")
    return text, choices, label


def gen_item(item: dict[str, Any], where: str) -> tuple[str, list[str]]:
    text = text_field(item, "inputs", where)
    targets = item.get("targets_pretokenized", [])
    if isinstance(targets, str):
        targets = [targets]
    if not isinstance(text, str) or not all(isinstance(t, str) for t in targets):
        raise TaskError(f"{where}: inputs_pretokenized must be a string, targets_pretokenized strings")
    return text, list(targets)


def lm_documents(path: Path) -> list[dict[str, Any]]:
    """Documents of an lm data file: the whole file (GLM-130B's LanguageModelTaskDataset), or one per line of a
    .jsonl file (`text_pretokenized` or `text`; Pile's layout, its `meta` kept)."""
    if path.suffix in (".jsonl", ".json"):
        docs = []
        for n, item in enumerate(read_items(path), 1):
            text = item.get("text_pretokenized", item.get("text"))
            if not isinstance(text, str):
                raise TaskError(f"{path}:{n}: an lm item needs a text_pretokenized (or text) string")
            if text:
                docs.append({"text": text, "meta": item.get("meta", {})})
        return docs
    return [{"text": path.read_text(encoding="utf-8"), "meta": {}}]


def lm_windows(n_tokens: int, max_seq_length: int, generation_length: int,
               unidirectional: bool = False) -> list[tuple[int, int, int]]:
    """GLM-130B's sliding windows over a document of n_tokens (LanguageModelTaskDataset): a list of
    (prompt_start, text_start, text_end) token indices. Window i covers tokens[i*g : i*g + max_seq_length - 1];
    its first max_seq_length - 1 - g tokens are the prompt (seen, not scored) and the rest the text scored. The
    first window, and every window when unidirectional, scores all its tokens."""
    L, g = max_seq_length, generation_length
    count = max(math.ceil(max(n_tokens - (L - 1), 0) / g) + 1, 1)
    out = []
    for i in range(count):
        start = i * g
        end = min(start + L - 1, n_tokens)
        if i == 0 or unidirectional:
            out.append((start, start, end))
        else:
            out.append((start, min(start + L - 1 - g, end), end))
    return out
