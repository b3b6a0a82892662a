"""Where models come from: a bundled name, a local folder or a Hugging Face id, resolved to one local folder for
both the loader and the tokenizer (torch-free, so `glmkit tokenizer` stays light)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

BUNDLED = {"glm-tiny": Path(__file__).parents[1] / "assets" / "glm-tiny"}
MODEL_FILES = ["*.json", "*.safetensors", "*.bin", "*.model", "*.txt", "*.tiktoken"]


def resolve_model_dir(path_or_id: str | os.PathLike, allow_patterns: list[str] | None = None) -> Path:
    """A local folder, a bundled model name, or a Hugging Face id (downloaded through huggingface_hub's cache,
    only the files matching allow_patterns; HF_HUB_OFFLINE=1 uses the cache alone)."""
    s = str(path_or_id)
    if s in BUNDLED:
        if not (BUNDLED[s] / "config.json").exists():
            raise FileNotFoundError(f"the bundled model {s!r} is not installed at {BUNDLED[s]}")
        return BUNDLED[s]
    p = Path(s).expanduser()
    if p.is_dir():
        return p
    if p.exists():
        raise FileNotFoundError(f"{p} is a file; pass the model folder that holds config.json and the weights")
    if s.count("/") != 1 or s.startswith((".", "/", "~")):
        raise FileNotFoundError(f"no model folder at {p}: {s!r} is neither a folder nor a Hugging Face id like "
                                "'THUDM/chatglm-6b'")
    offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes")
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(repo_id=s, allow_patterns=allow_patterns or MODEL_FILES,
                                      local_files_only=offline))
    except Exception as e:  # offline, unknown repo, gated, no huggingface_hub: all end the same way for the user
        first = str(e).splitlines()[0][:200] if str(e) else ""
        raise FileNotFoundError(
            f"could not fetch {s!r} from the Hugging Face Hub ({type(e).__name__}: {first}). "
            "Without network access, download the model elsewhere and pass its local folder.") from None


def read_json_object(path: Path, error: type[Exception]) -> dict[str, Any]:
    """The JSON object in `path`; `error` (the caller's error type) when the file is not valid JSON or not an
    object."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise error(f"{path} is not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise error(f"{path} does not hold a JSON object")
    return data
