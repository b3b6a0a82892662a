"""Command options from dataclasses: the dataclass is the single source of names, types, defaults and help, and
this module derives the rest from it: a typed build from a mapping (YAML file or code), dotted `key=value`
overrides, and an argparse parser with one flag per field.

    cfg = load(PretrainConfig, "configs/glm-tiny.yaml", ["train.max_steps=10"])
    parser = build_parser(FinetuneArgs, prog="glmkit finetune", description="...")
    args = parse(FinetuneArgs, parser, ["--model_name_or_path", "glm-tiny", "--pre_seq_len", "16", ...])

Field types drive the conversion: int, float, str, bool, Literal[...] (choices), X | None, tuple/list/dict (YAML
values), and nested dataclasses (sections: flags `--train.lr`, keys `train.lr`). A field's help is its
`metadata["help"]`, else the string literal written under it (an attribute docstring). Precedence, lowest first:
the defaults, the --config file, `key=value` overrides, explicit flags.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import inspect
import sys
import textwrap
import types
import typing
from collections.abc import Mapping, Sequence
from functools import cache
from pathlib import Path
from typing import Any, Literal, TypeVar, Union

T = TypeVar("T")
_TRUE, _FALSE = ("1", "true", "yes", "y", "on"), ("0", "false", "no", "n", "off")


# ------------------------------------------------------------------------------------------------ field facts
@cache
def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


@cache
def field_docs(cls: type) -> dict[str, str]:
    """name -> help: metadata["help"], else the attribute docstring under the field in the class source."""
    docs: dict[str, str] = {}
    try:
        tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
        body = tree.body[0].body
        for node, nxt in zip(body, body[1:]):
            if (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) and isinstance(nxt, ast.Expr)
                    and isinstance(nxt.value, ast.Constant) and isinstance(nxt.value.value, str)):
                docs[node.target.id] = " ".join(nxt.value.value.split())
    except (OSError, TypeError, IndexError, AttributeError):  # no source (a frozen build): metadata only
        pass
    for f in dataclasses.fields(cls):
        if f.metadata.get("help"):
            docs[f.name] = f.metadata["help"]
    return docs


def _optional(tp: Any) -> tuple[Any, bool]:
    """(the type without None, whether None is allowed)."""
    if typing.get_origin(tp) in (Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        inner = args[0] if len(args) == 1 else Union[tuple(args)]
        return inner, len(args) < len(typing.get_args(tp))
    return tp, False


def _default(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return dataclasses.MISSING


# ------------------------------------------------------------------------------------------------ conversion
def convert(value: Any, tp: Any, where: str) -> Any:
    """`value` (from YAML, a flag or code) as type `tp`; ValueError naming `where` when it cannot be."""
    inner, nullable = _optional(tp)
    if value is None:
        if nullable or tp is Any:
            return None
        raise ValueError(f"{where} must not be empty (null)")
    tp = inner
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, Mapping):
            raise ValueError(f"{where} must be a section (a mapping of options), got {value!r}")
        return from_dict(tp, value, where)
    if origin is Literal:
        choices = typing.get_args(tp)
        for c in choices:
            if value == c or (isinstance(value, str) and not isinstance(c, str) and value == str(c)):
                return c
        raise ValueError(f"{where} must be one of {', '.join(map(str, choices))}, got {value!r}")
    if origin is Union:
        for arg in typing.get_args(tp):
            try:
                return convert(value, arg, where)
            except ValueError:
                pass
        raise ValueError(f"{where}: {value!r} is none of {tp}")
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in _TRUE + _FALSE:
            return value.lower() in _TRUE
        raise ValueError(f"{where} must be true or false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                return int(value)
            except ValueError:
                pass
        raise ValueError(f"{where} must be an integer, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads "3e-4" (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        raise ValueError(f"{where} must be a number, got {value!r}")
    if tp is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise ValueError(f"{where} must be a string, got {value!r}")
    if origin in (tuple, list):
        if not isinstance(value, (list, tuple)):
            raise ValueError(f"{where} must be a list, got {value!r}")
        args = typing.get_args(tp)
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(args) != len(value):
                raise ValueError(f"{where} must have {len(args)} items, got {len(value)}")
            return tuple(convert(v, a, f"{where}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
        item = args[0] if args else Any
        out = [convert(v, item, f"{where}[{i}]") for i, v in enumerate(value)]
        return tuple(out) if origin is tuple else out
    if origin is dict:
        if not isinstance(value, Mapping):
            raise ValueError(f"{where} must be a mapping, got {value!r}")
        return dict(value)
    if isinstance(tp, type) and isinstance(value, tp):
        return value
    raise ValueError(f"{where}: cannot read {value!r} as {tp}")


def from_dict(cls: type[T], raw: Mapping[str, Any], where: str = "") -> T:
    """A `cls` from a mapping of its fields (nested mappings for dataclass fields), every value converted to the
    field's type. Unknown or missing required keys are a ValueError naming them."""
    if not isinstance(raw, Mapping):
        raise ValueError(f"{where or 'the config'} must be a mapping of options, got {type(raw).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    bad = set(raw) - set(fields)
    if bad:
        raise ValueError(f"unknown {where + ' ' if where else ''}options {sorted(bad)}; known: {sorted(fields)}")
    missing = [n for n, f in fields.items() if n not in raw and _default(f) is dataclasses.MISSING]
    if missing:
        names = ", ".join((where + "." if where else "") + m for m in missing)
        raise ValueError(f"missing required option(s): {names}")
    hints = _hints(cls)
    values = {k: convert(v, hints[k], f"{where}.{k}" if where else k) for k, v in raw.items()}
    return cls(**values)


def to_dict(obj: Any) -> dict[str, Any]:
    """The plain mapping of a config (nested dataclasses as mappings), as --print-config shows it."""
    return dataclasses.asdict(obj)


# ------------------------------------------------------------------------------------------------ files and overrides
def read_yaml(path: str | Path) -> dict[str, Any]:
    import yaml

    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no config file at {path}")
    raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    if not isinstance(raw, dict):
        raise ValueError(f"{path} must hold a mapping of options")
    return raw


def set_dotted(raw: dict[str, Any], key: str, value: Any) -> None:
    """raw[a][b][c] = value for key "a.b.c", creating the sections on the way."""
    node = raw
    parts = key.split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ValueError(f"{key}: {part!r} is not a section")
    node[parts[-1]] = value


def apply_overrides(raw: dict[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    """Applies `key=value` / `section.key=value` items (values parsed as YAML) to `raw` in place; returns it."""
    import yaml

    for item in overrides:
        key, eq, value = item.partition("=")
        if not eq or not key:
            raise ValueError(f"override {item!r} must look like key=value or section.key=value "
                             "(e.g. train.max_steps=100)")
        set_dotted(raw, key.strip(), yaml.safe_load(value))
    return raw


def load(cls: type[T], path: str | Path | None = None, overrides: Sequence[str] = ()) -> T:
    """A `cls` from a YAML file (or nothing) plus `key=value` overrides."""
    raw = read_yaml(path) if path is not None else {}
    return from_dict(cls, apply_overrides(raw, overrides))


# ------------------------------------------------------------------------------------------------ command line
def _flag_kwargs(tp: Any, default: Any) -> dict[str, Any]:
    inner, _ = _optional(tp)
    origin = typing.get_origin(inner)
    if inner is bool:
        if default is False:
            return {"action": "store_true"}  # `--do_train` as main.py's scripts pass it
        return {"type": _parse_bool, "metavar": "true|false"}
    if origin is Literal:
        choices = typing.get_args(inner)
        return {"type": type(choices[0]), "choices": list(choices)}
    if inner in (int, float, str):
        return {"type": inner, "metavar": {int: "N", float: "X", str: "STR"}[inner]}
    return {"type": _parse_yaml, "metavar": "YAML"}


def _parse_bool(s: str) -> bool:
    if s.lower() in _TRUE:
        return True
    if s.lower() in _FALSE:
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {s!r}")


def _parse_yaml(s: str) -> Any:
    import yaml

    return yaml.safe_load(s)


def add_arguments(parser: argparse.ArgumentParser, cls: type, prefix: str = "",
                  sections: Mapping[str, str] | None = None) -> None:
    """One `--name` flag per field of `cls` (`--section.name` for nested dataclasses, in a group per section), with
    the field's help and default. `sections` maps a field name to the title of a group that starts at it. Flags
    leave the namespace untouched unless given (see `parse`)."""
    docs, hints = field_docs(cls), _hints(cls)
    group: Any = parser
    for f in dataclasses.fields(cls):
        if not f.init:
            continue
        if sections and f.name in sections:
            group = parser.add_argument_group(sections[f.name])
        name, tp, default = prefix + f.name, hints[f.name], _default(f)
        if dataclasses.is_dataclass(_optional(tp)[0]):
            sub = parser.add_argument_group(f"{name} (section)", docs.get(f.name))
            add_arguments(sub, _optional(tp)[0], prefix=name + ".")
            continue
        text = docs.get(f.name, "")
        if default is dataclasses.MISSING:
            text = (text + " " if text else "") + "(required)"
        elif not (tp is bool and default is False):
            text = (text + " " if text else "") + f"(default: {default!r})"
        group.add_argument(f"--{name}", dest=name, default=argparse.SUPPRESS, help=text.replace("%", "%%"),
                           **_flag_kwargs(tp, default))


def build_parser(cls: type, prog: str, description: str, *, sections: Mapping[str, str] | None = None,
                 epilog: str | None = None) -> argparse.ArgumentParser:
    """A parser with --config FILE, positional key=value overrides and one flag per field of `cls`."""
    p = argparse.ArgumentParser(prog=prog, description=description, epilog=epilog,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", metavar="FILE", help="YAML file of options (keys as the flags, sections nested)")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                   help="overrides after the config file (YAML values), e.g. learning_rate=1e-3 or train.lr=3e-4")
    add_arguments(p, cls, sections=sections)
    return p


def parse(cls: type[T], parser: argparse.ArgumentParser, argv: Sequence[str],
          namespace: argparse.Namespace | None = None) -> T:
    """`cls` from the command line of a `build_parser` parser: defaults < --config file < overrides < flags.
    argparse exits (status 2) on a malformed flag; bad values or a missing file raise ValueError /
    FileNotFoundError for the command to report. Pass `namespace` to keep the parsed namespace (extra flags)."""
    ns = parser.parse_intermixed_args(list(argv), namespace=namespace)
    raw = read_yaml(ns.config) if getattr(ns, "config", None) else {}
    apply_overrides(raw, getattr(ns, "overrides", None) or [])
    names = _flag_names(cls)
    for name in names:
        if hasattr(ns, name):
            set_dotted(raw, name, getattr(ns, name))
    return from_dict(cls, raw)


def _flag_names(cls: type, prefix: str = "") -> list[str]:
    out = []
    for f in dataclasses.fields(cls):
        tp = _optional(_hints(cls)[f.name])[0]
        if dataclasses.is_dataclass(tp):
            out += _flag_names(tp, prefix + f.name + ".")
        elif f.init:
            out.append(prefix + f.name)
    return out


def fail(prog: str, err: Exception) -> int:
    """Reports a config error the way every command does; returns exit status 2."""
    print(f"{prog}: error: {err}", file=sys.stderr)
    return 2
