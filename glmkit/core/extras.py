"""Optional dependencies: the base install runs models; serving, the web UI, training and lm-eval are extras
(`pip install 'glmkit[serve]'` ...). `require_extra` is the one check every entry point makes before it imports
an extra's package, so a missing one is reported as the exact pip command that brings it.
"""

from __future__ import annotations

import importlib

# extra -> the import names of the packages it installs (pyproject.toml's [project.optional-dependencies])
EXTRAS: dict[str, tuple[str, ...]] = {
    "serve": ("fastapi", "uvicorn", "prometheus_client"),
    "web": ("gradio",),
    "train": ("peft", "tensorboard", "rouge_chinese", "jieba", "nltk", "google.protobuf"),
    "eval": ("lm_eval",),
}


class MissingExtraError(ImportError):
    """An optional package is not installed; the message names the extra that installs it."""


def install_hint(extra: str) -> str:
    return f"pip install 'glmkit[{extra}]'"


def require_extra(extra: str, *modules: str, what: str | None = None) -> None:
    """Import `modules` (default: all of `extra`'s) or raise MissingExtraError naming `pip install 'glmkit[extra]'`.

    `what` names the feature in the message (e.g. "glmkit serve"). Importing (rather than looking the module up)
    also catches a package that is present but broken, e.g. one whose own dependency is missing.
    """
    if extra not in EXTRAS:
        raise ValueError(f"unknown extra {extra!r}; known: {', '.join(EXTRAS)}")
    missing = []
    for name in modules or EXTRAS[extra]:
        try:
            importlib.import_module(name)
        except ImportError:
            missing.append(name)
    if missing:
        needs = f"{what} needs" if what else "this needs"
        raise MissingExtraError(f"{needs} {', '.join(missing)} (the '{extra}' extra, not installed); "
                                f"install it with: {install_hint(extra)}")
