"""Writing outputs so that a crash (kill -9, power loss, a full disk) leaves either the previous complete output or
the new complete one, never a half-written file or folder that half-loads.

- `atomic_file(path)`: a file is written to a temporary sibling, fsync'ed and renamed over `path` (os.replace is
  atomic on POSIX); `write_text`, `write_bytes`, `write_json`, `torch_save` are the one-liners on top of it.
- `atomic_dir(path)`: a folder (a model, an adapter, a checkpoint) is written into a temporary sibling
  `.NAME.tmp-PID-RAND`; once every file is in it and fsync'ed, it takes `path`'s place in one atomic exchange
  (renameat2 RENAME_EXCHANGE), and the previous folder is deleted afterwards. Files of the previous folder that the
  new output does not write (a README, notes) are carried over as hard links, except weight files and indexes,
  which would otherwise be stale (an old shard index would win over a new single file).

A writer inside an `atomic_dir` (save_model called by a checkpoint writer) writes straight into the enclosing
temporary folder: one output, one commit. Leftovers of a killed writer (`.NAME.tmp-*`, `.NAME.old-*` whose process
is gone) are removed by the next write of the same output.
"""

from __future__ import annotations

import contextlib
import contextvars
import ctypes
import ctypes.util
import errno
import json
import os
import secrets
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

# temporary folders of the atomic_dir calls open in this context: writers below them write in place
_OPEN_DIRS: contextvars.ContextVar[tuple[Path, ...]] = contextvars.ContextVar("glmkit_atomic_dirs", default=())

# files of a previous output that are never carried into the new one: its weights and their indexes
_NOT_CARRIED = (".safetensors", ".bin", ".pt", ".pth", ".index.json", ".msgpack", ".h5", ".ckpt", ".gguf")


class OutputError(OSError):
    """Writing an output failed (disk full, permissions); the previous output, if any, is unchanged."""


def _tmp_name(path: Path, kind: str) -> Path:
    return path.with_name(f".{path.name}.{kind}-{os.getpid()}-{secrets.token_hex(4)}")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_leftovers(path: Path) -> list[Path]:
    """Deletes the temporary siblings of `path` left by writers that were killed (their process is gone)."""
    removed = []
    if not path.parent.is_dir():
        return removed
    for p in path.parent.glob(f".{path.name}.*-*-*"):
        kind, _, rest = p.name[len(path.name) + 2:].partition("-")
        pid = rest.split("-", 1)[0]
        if kind not in ("tmp", "old") or not pid.isdigit():
            continue
        if int(pid) != os.getpid() and _pid_alive(int(pid)):
            continue
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p, ignore_errors=True)
        else:
            with contextlib.suppress(OSError):
                p.unlink()
        removed.append(p)
    return removed


def fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):  # some filesystems refuse fsync on a folder; the rename is still atomic
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _fail(path: Path, e: BaseException) -> OutputError:
    code = getattr(e, "errno", None)
    if code is None and "No space left on device" in str(e):  # safetensors' writer reports it as its own error
        code = errno.ENOSPC
    reason = "the disk is full" if code in (errno.ENOSPC, errno.EDQUOT) else (getattr(e, "strerror", None) or str(e))
    err = OutputError(code, f"cannot write {path}: {reason}; the previous output (if any) is unchanged")
    err.filename = str(path)
    return err


def _is_write_error(e: BaseException) -> bool:
    return (isinstance(e, OSError) and not isinstance(e, OutputError)) or "No space left on device" in str(e)


def _inside_open_dir(path: Path) -> bool:
    p = path.absolute()
    return any(p == d or d in p.parents for d in _OPEN_DIRS.get())


# ------------------------------------------------------------------------------------------------------ files
@contextlib.contextmanager
def atomic_file(path: str | os.PathLike, mode: str = "wb", **open_kwargs) -> Iterator[Any]:
    """`with atomic_file(p, "w", encoding="utf-8") as f: f.write(...)`: `p` is replaced only when the block ends
    without an exception, by a complete, fsync'ed file. Inside an atomic_dir the file is written in place (the
    folder is committed as a whole)."""
    with atomic_path(path) as target, open(target, mode, **open_kwargs) as f:
        yield f  # inside an atomic_dir, target is path itself; otherwise a temporary sibling, fsync'ed and renamed


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """A temporary path for a library that writes a file by name (safetensors.save_file, torch.save): `path` is
    replaced by it, fsync'ed, when the block ends without an exception."""
    path = Path(path)
    if _inside_open_dir(path):
        yield path
        return
    remove_leftovers(path)
    tmp = _tmp_name(path, "tmp")
    try:
        yield tmp
        _fsync_file(tmp)
        os.replace(tmp, path)
    except BaseException as e:
        with contextlib.suppress(OSError):
            tmp.unlink()
        if _is_write_error(e):
            raise _fail(path, e) from e
        raise
    fsync_dir(path.parent)


def write_text(path: str | os.PathLike, text: str) -> Path:
    with atomic_file(path, "w", encoding="utf-8") as f:
        f.write(text)
    return Path(path)


def write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    with atomic_file(path, "wb") as f:
        f.write(data)
    return Path(path)


def write_json(path: str | os.PathLike, obj: Any, indent: int | None = 2, **kwargs) -> Path:
    return write_text(path, json.dumps(obj, indent=indent, ensure_ascii=False, **kwargs) + "\n")


def torch_save(obj: Any, path: str | os.PathLike) -> Path:
    import torch

    with atomic_path(path) as tmp:
        torch.save(obj, tmp)
    return Path(path)


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# ------------------------------------------------------------------------------------------------------ folders
_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


def _exchange(a: Path, b: Path) -> bool:
    """Swaps two paths atomically (Linux renameat2); False where the system or filesystem cannot."""
    libc_name = ctypes.util.find_library("c")
    if not libc_name:
        return False
    try:
        libc = ctypes.CDLL(libc_name, use_errno=True)
        fn = libc.renameat2
    except (OSError, AttributeError):
        return False
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    if fn(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), str(b))


def _carry_over(old: Path, new: Path) -> None:
    """Hard-links the previous output's own files that the new one lacks (never weights or indexes)."""
    for p in old.iterdir():
        target = new / p.name
        if target.exists() or p.name.startswith("."):
            continue
        if p.is_dir() and not p.is_symlink():
            shutil.copytree(p, target, copy_function=_link_or_copy, symlinks=True)
        elif not p.name.endswith(_NOT_CARRIED):
            _link_or_copy(p, target)


def _link_or_copy(src, dst) -> None:
    try:
        os.link(src, dst, follow_symlinks=False)
    except OSError:
        shutil.copy2(src, dst, follow_symlinks=False)


def _fsync_tree(root: Path) -> None:
    for dirpath, _, files in os.walk(root):
        for name in files:
            p = Path(dirpath) / name
            if not p.is_symlink():
                _fsync_file(p)
        fsync_dir(Path(dirpath))


def commit_dir(tmp: Path, path: Path) -> None:
    """Puts the finished folder `tmp` in `path`'s place (see the module doc)."""
    if path.is_symlink() or (path.exists() and not path.is_dir()):
        raise FileExistsError(f"{path} exists and is not a folder")
    if path.is_dir():
        _carry_over(path, tmp)
    _fsync_tree(tmp)
    if path.is_dir():
        if _exchange(tmp, path):  # tmp now holds the previous output
            fsync_dir(path.parent)
            shutil.rmtree(tmp, ignore_errors=True)
            return
        # no atomic exchange here: move the old one aside first (a crash in between leaves it as .NAME.old-*)
        old = _tmp_name(path, "old")
        os.rename(path, old)
        os.rename(tmp, path)
        fsync_dir(path.parent)
        shutil.rmtree(old, ignore_errors=True)
        return
    os.rename(tmp, path)
    fsync_dir(path.parent)


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike) -> Iterator[Path]:
    """`with atomic_dir(out) as tmp: <write the files into tmp>`: `out` becomes the new folder only when the block
    ends without an exception; until then (and after a failure or a kill) `out` is what it was before. Nested in
    another atomic_dir, writes in place."""
    path = Path(path)
    if _inside_open_dir(path):
        path.mkdir(parents=True, exist_ok=True)
        yield path
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_leftovers(path)
    tmp = _tmp_name(path, "tmp")
    token = _OPEN_DIRS.set(_OPEN_DIRS.get() + (tmp.absolute(),))
    try:
        tmp.mkdir()
        yield tmp
        _OPEN_DIRS.reset(token)
        token = None
        commit_dir(tmp, path)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if _is_write_error(e):
            raise _fail(path, e) from e
        raise
    finally:
        if token is not None:
            _OPEN_DIRS.reset(token)
