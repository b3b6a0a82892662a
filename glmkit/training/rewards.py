"""Reward functions for `glmkit finetune --stage grpo --reward_function FILE.py:NAME` (or these, as
`--reward_function poem_form`): a reward function takes the prompts (text) and the generated answers (text) and
returns one float per answer.

poem_form: the classical forms of the poem-gen prompts (`作者#…*體裁#五言律詩*題目#…`) are machine-checkable. A poem's
half-lines are the pieces between ，and 。; 五言 / 七言 = 5 / 7 characters in every half-line, 絕句 = 4 half-lines,
律詩 = 8, and the poem ends with 。. An answer of the asked form scores 1.0; any other scores
0.5 × (share of its half-lines with the asked length) × (min(n, wanted) / max(n, wanted)) for n half-lines, which
is below 0.5, so that GRPO's group-normalised advantages see progress before the first exact poem.
"""

from __future__ import annotations

import importlib.util
import re
from collections.abc import Callable, Sequence
from pathlib import Path

FORMS = {"五言絕句": (5, 4), "七言絕句": (7, 4), "五言律詩": (5, 8), "七言律詩": (7, 8)}
_FORM_RE = re.compile(r"體裁#([^*#]+)")
_SPLIT_RE = re.compile(r"[，。]")

RewardFunction = Callable[[Sequence[str], Sequence[str]], Sequence[float]]


def asked_form(prompt: str) -> tuple[int, int] | None:
    """(characters per half-line, half-lines) the prompt's 體裁 asks for, or None if it names no known form."""
    m = _FORM_RE.search(prompt)
    return FORMS.get(m.group(1).strip()) if m else None


def half_lines(poem: str) -> list[str]:
    """The pieces of `poem` between ，and 。 (a trailing piece after the last mark counts too)."""
    pieces = _SPLIT_RE.split(poem.strip())
    if pieces and pieces[-1] == "":
        pieces = pieces[:-1]
    return pieces


def has_form(poem: str, chars: int, lines: int) -> bool:
    """True when `poem` is exactly `lines` half-lines of `chars` characters, ending with 。."""
    poem = poem.strip()
    pieces = half_lines(poem)
    return poem.endswith("。") and len(pieces) == lines and all(len(p) == chars for p in pieces)


def form_score(prompt: str, poem: str) -> float:
    """1.0 for a poem of the asked form, a partial score below 0.5 otherwise (see the module docstring); 0.0 when
    the prompt asks for no known form or the answer is empty."""
    form = asked_form(prompt)
    pieces = half_lines(poem)
    if form is None or not pieces:
        return 0.0
    chars, lines = form
    if has_form(poem, chars, lines):
        return 1.0
    right = sum(len(p) == chars for p in pieces) / len(pieces)
    return 0.5 * right * min(len(pieces), lines) / max(len(pieces), lines)


def prompt_text(prompt) -> str:
    """A text prompt, or a message list's last user message."""
    if isinstance(prompt, list):
        users = [m.get("content", "") for m in prompt if isinstance(m, dict) and m.get("role") == "user"]
        return str(users[-1]) if users else ""
    return str(prompt)


def poem_form(prompts: Sequence, completions: Sequence[str]) -> list[float]:
    """The poem-form reward for each (prompt, completion); prompts as text or message lists."""
    if len(prompts) != len(completions):
        raise ValueError(f"{len(prompts)} prompts but {len(completions)} completions")
    return [form_score(prompt_text(p), c) for p, c in zip(prompts, completions)]


def form_share(prompts: Sequence[str], poems: Sequence[str]) -> float:
    """Share of poems that have the form their prompt asks for."""
    if not poems:
        return 0.0
    return sum(form_score(p, c) == 1.0 for p, c in zip(prompts, poems)) / len(poems)


BUILTIN = {"poem_form": poem_form}


def load_reward_function(spec: str) -> RewardFunction:
    """`poem_form` (built in) or `path/to/file.py:function_name` -> the callable."""
    if spec in BUILTIN:
        return BUILTIN[spec]
    path, sep, name = spec.rpartition(":")
    if not sep or not path or not name:
        raise ValueError(f"--reward_function must be FILE.py:NAME or one of {', '.join(BUILTIN)}, got {spec!r}")
    file = Path(path)
    if not file.is_file():
        raise FileNotFoundError(f"--reward_function: no file {file}")
    module_spec = importlib.util.spec_from_file_location(f"glmkit_reward_{file.stem}", file)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    fn = getattr(module, name, None)
    if not callable(fn):
        raise ValueError(f"--reward_function: {file} defines no function {name!r}")
    return fn
