"""Regenerates tests/data/glm130b_eval/golden.json: what GLM-130B's ORIGINAL evaluation code builds for small worked
examples. Not collected by pytest (tests/core/test_blank_eval_layout.py and tests/evaluation/test_tasks.py read the
JSON).

Original: THUDM/GLM-130B `evaluation/dataset.py` at commit 212215c (the last commit of the repository), run
verbatim: `MultiChoiceTaskDataset.build_multiple_choice_sample`, `GenerationTaskDataset.build_generation_sample` and
`LanguageModelTaskDataset.__getitem__`. Its imports that need a GPU cluster or GLM-130B's icetk tokenizer are
replaced by stand-ins in a temporary package: `SwissArmyTransformer.get_tokenizer()` returns an object whose
`get_command` gives GLM-130B's command ids ([MASK] 150000, [gMASK] 150001, sop 150004; glm-family.md §2.2) and whose
`tokenize` splits on spaces into integers; `.configs` holds plain dataclasses with the fields and defaults of
evaluation/configs.py; `.utils.get_tokenized_input` is the original's (it only needs the tokenizer).

    git clone https://github.com/THUDM/GLM-130B /tmp/GLM-130B   # or any copy of evaluation/dataset.py @212215c
    .venv/bin/python tests/data/glm130b_eval/make_golden.py /tmp/GLM-130B/evaluation/dataset.py

Library versions used for the committed golden.json: Python 3.11.7, numpy 2.x and scipy 1.17.1 (block_diag), as
installed in glmkit's .venv.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import sys
import tempfile
import textwrap
from pathlib import Path

import numpy as np
import scipy

OUT = Path(__file__).resolve().parent / "golden.json"
COMMANDS = {"[MASK]": 150000, "[gMASK]": 150001, "[sMASK]": 150002, "eod": 150003, "sop": 150004, "eop": 150005}

STUBS = {
    "SwissArmyTransformer/__init__.py": f"""
        COMMANDS = {COMMANDS!r}
        class _Tok:
            def get_command(self, name):
                return COMMANDS[name]
            def tokenize(self, text):
                return [int(t) for t in text.split()]
        def get_tokenizer():
            return _Tok()
        """,
    "evaluation/__init__.py": "",
    "evaluation/configs.py": """
        from dataclasses import dataclass, field
        from typing import Dict, List, Optional

        @dataclass
        class BaseConfig:
            name: str = "t"
            type: str = "mul"
            path: str = ""
            module: Optional[str] = None
            metrics: List[str] = field(default_factory=list)
            use_task_mask: bool = False
            use_multitask_encoding: bool = False
            unidirectional: bool = False
            max_seq_length: int = 2048
            file_pattern: object = "**/*.json*"
            micro_batch_size: int = 1

        @dataclass
        class MultiChoiceTaskConfig(BaseConfig):
            pass

        @dataclass
        class GenerationTaskConfig(BaseConfig):
            sampling_strategy: str = "BaseStrategy"
            num_beams: int = 4
            length_penalty: float = 1.0
            no_repeat_ngram_size: int = 3
            min_gen_length: int = 0
            max_gen_length: int = 128

        @dataclass
        class LanguageModelTaskConfig(BaseConfig):
            generation_length: int = 256
        """,
    "evaluation/utils.py": """
        from SwissArmyTransformer import get_tokenizer

        def get_tokenized_input(item, key):
            if key in item:
                return item[key]
            tokenizer = get_tokenizer()
            pretokenized_key = key + "_pretokenized"
            assert pretokenized_key in item
            if isinstance(item[pretokenized_key], list):
                return [tokenizer.tokenize(raw) for raw in item[pretokenized_key]]
            return tokenizer.tokenize(item[pretokenized_key])
        """,
}

MASK, GMASK = COMMANDS["[MASK]"], COMMANDS["[gMASK]"]
MUL_CASES = [
    dict(name="mask_appended", text=[11, 12, 13, 14], choices=[[21, 22], [31], [41, 42, 43]]),
    dict(name="blank_in_text", text=[11, MASK, 13, 14], choices=[[21, 22], [31], [41, 42, 43]]),
    dict(name="task_mask", text=[11, 12, 13], choices=[[21, 22], [31, 32, 33]], use_task_mask=True),
    dict(name="single_token", text=[11, 12, 13], choices=[[21], [31], [41], [51]], is_single_token=True),
    dict(name="single_token_task_mask", text=[11, 12], choices=[[21], [31]], is_single_token=True,
         use_task_mask=True),
    dict(name="unified_multitask", text=[11, 12, 13], choices=[[21, 22], [31, 32, 33]],
         unified_multitask_encoding=True),
]
GEN_CASES = [
    dict(name="mask", text=[11, 12, 13], use_task_mask=False, unidirectional=False),
    dict(name="gmask", text=[11, 12, 13], use_task_mask=True, unidirectional=False),
    dict(name="gmask_unidirectional", text=[11, 12, 13], use_task_mask=True, unidirectional=True),
    dict(name="blank_in_text", text=[11, MASK, 13], use_task_mask=False, unidirectional=False),
]
LM_CASES = [dict(name="windows", n_tokens=23, max_seq_length=9, generation_length=3, use_task_mask=True,
                 unidirectional=False),
            dict(name="short", n_tokens=5, max_seq_length=9, generation_length=3, use_task_mask=True,
                 unidirectional=False),
            dict(name="unidirectional", n_tokens=15, max_seq_length=9, generation_length=4, use_task_mask=True,
                 unidirectional=True)]


def _plain(x):
    if isinstance(x, np.ndarray):
        return x.tolist()
    if isinstance(x, (list, tuple)):
        return [_plain(v) for v in x]
    if isinstance(x, np.integer):
        return int(x)
    return x


def main(dataset_py: str) -> None:
    source = Path(dataset_py).read_text(encoding="utf-8")
    tmp = Path(tempfile.mkdtemp())
    for rel, text in STUBS.items():
        (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp / rel).write_text(textwrap.dedent(text), encoding="utf-8")
    (tmp / "evaluation" / "dataset.py").write_text(source, encoding="utf-8")
    sys.path.insert(0, str(tmp))
    ds = importlib.import_module("evaluation.dataset")
    cfgs = importlib.import_module("evaluation.configs")

    out = {"source": "THUDM/GLM-130B evaluation/dataset.py @212215c", "sha256": hashlib.sha256(source.encode()).hexdigest(),
           "numpy": np.__version__, "scipy": scipy.__version__, "commands": COMMANDS, "mul": [], "gen": [], "lm": []}
    for case in MUL_CASES:
        kw = {k: case[k] for k in ("is_single_token", "unified_multitask_encoding", "use_task_mask") if k in case}
        kw.setdefault("is_single_token", False)
        s = ds.MultiChoiceTaskDataset.build_multiple_choice_sample(case["text"], case["choices"], **kw)
        out["mul"].append({**case, "sample": {k: _plain(v) for k, v in s.items()}})
    for case in GEN_CASES:
        s = ds.GenerationTaskDataset.build_generation_sample(case["text"], max_gen_length=4,
                                                             use_task_mask=case["use_task_mask"],
                                                             unidirectional=case["unidirectional"])
        out["gen"].append({**case, "max_gen_length": 4, "sample": {k: _plain(v) for k, v in s.items()}})
    for case in LM_CASES:
        config = cfgs.LanguageModelTaskConfig(max_seq_length=case["max_seq_length"],
                                              generation_length=case["generation_length"],
                                              use_task_mask=case["use_task_mask"], unidirectional=case["unidirectional"])
        raw = " ".join(str(100 + i) for i in range(case["n_tokens"]))
        path = tmp / f"{case['name']}.txt"
        path.write_text(raw, encoding="utf-8")
        dset = ds.LanguageModelTaskDataset(str(path), config)
        windows = [{k: _plain(v) for k, v in dset[i].items()} for i in range(len(dset))]
        out["lm"].append({**case, "tokens": list(range(100, 100 + case["n_tokens"])), "windows": windows})
    OUT.write_text(json.dumps(out, indent=1) + "\n", encoding="utf-8")
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main(sys.argv[1])
