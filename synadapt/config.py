"""Typed stage configs: dataclasses loaded from YAML, overridden by ``--dotted.key value`` flags.

Every stage has one config class whose defaults run the embedded task. A field's documentation is the string
literal under it (TRL style); :func:`describe` turns those into ``--help`` text.
"""
from __future__ import annotations

import ast
import dataclasses
import inspect
import textwrap
import typing
from pathlib import Path

import yaml


def _field_types(cls) -> dict[str, type]:
    return typing.get_type_hints(cls)


def _coerce(value, typ, key: str):
    origin = typing.get_origin(typ)
    if dataclasses.is_dataclass(typ):
        if not isinstance(value, dict):
            raise ValueError(f"config key {key!r} must be a mapping, got {value!r}")
        return build(typ, value, prefix=key + ".")
    if typ is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if typ is float and isinstance(value, str):
        # YAML 1.1 reads "4e-4" (no dot) as a string; in a float field it can only mean the number.
        try:
            return float(value)
        except ValueError:
            pass
    if typ in (int, float, str, bool) and not isinstance(value, typ):
        raise ValueError(f"config key {key!r} must be {typ.__name__}, got {value!r}")
    if origin is list and not isinstance(value, list):
        raise ValueError(f"config key {key!r} must be a list, got {value!r}")
    return value


def build(cls, values: dict, prefix: str = ""):
    """Instantiate ``cls`` from a nested dict, rejecting unknown keys with their full dotted name."""
    types = _field_types(cls)
    unknown = sorted(set(values) - set(types))
    if unknown:
        raise ValueError(f"unknown config key {prefix + unknown[0]!r} for {cls.__name__}; "
                         f"known keys: {', '.join(sorted(types))}")
    defaults = cls()
    kwargs = {}
    for name, value in values.items():
        typ = types[name]
        if dataclasses.is_dataclass(typ) and isinstance(value, dict):
            merged = {**dataclasses.asdict(getattr(defaults, name)), **value}
            kwargs[name] = build(typ, merged, prefix=prefix + name + ".")
        else:
            kwargs[name] = _coerce(value, typ, prefix + name)
    return dataclasses.replace(defaults, **kwargs)


def parse_overrides(args: list[str]) -> dict:
    """``["--a.b", "3", "--c=x"]`` → ``{"a": {"b": 3}, "c": "x"}``; values are parsed as YAML scalars."""
    nested: dict = {}
    i = 0
    while i < len(args):
        arg = args[i]
        if not arg.startswith("--"):
            raise ValueError(f"unexpected argument {arg!r}; overrides look like --key value or --key=value")
        key, eq, raw = arg[2:].partition("=")
        if not eq:
            if i + 1 >= len(args):
                raise ValueError(f"override --{key} needs a value")
            raw, i = args[i + 1], i + 1
        node = nested
        parts = key.replace("-", "_").split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = yaml.safe_load(raw)
        i += 1
    return nested


def deep_merge(base: dict, extra: dict) -> dict:
    """``extra`` laid over ``base``, recursing into nested mappings."""
    out = dict(base)
    for k, v in extra.items():
        out[k] = deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def load_config(cls, path: str | Path | None = None, overrides: list[str] | dict | None = None):
    """Defaults of ``cls``, then the YAML file at ``path``, then ``overrides`` (CLI flags or a dict)."""
    values = (yaml.safe_load(Path(path).read_text()) or {}) if path else {}
    if isinstance(overrides, list):
        overrides = parse_overrides(overrides)
    return build(cls, deep_merge(values, overrides or {}))


def field_docs(cls) -> dict[str, str]:
    """The string literal under each field of a dataclass, by field name."""
    try:
        tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    except (OSError, TypeError):
        return {}
    docs, body = {}, tree.body[0].body
    for node, nxt in zip(body, body[1:]):
        if isinstance(node, ast.AnnAssign) and isinstance(nxt, ast.Expr) and isinstance(nxt.value, ast.Constant):
            docs[node.target.id] = " ".join(str(nxt.value.value).split())
    return docs


def describe(cls, prefix: str = "", defaults=None) -> list[str]:
    """One help line per (nested) field: ``--dotted.name (default) doc``. Nested sections show the values their
    parent gives them (a stage's own defaults), not their class defaults."""
    lines, docs = [], field_docs(cls)
    defaults = cls() if defaults is None else defaults
    for f in dataclasses.fields(cls):
        value = getattr(defaults, f.name)
        if dataclasses.is_dataclass(value):
            lines += describe(type(value), prefix + f.name + ".", value)
        else:
            lines.append(f"  --{prefix}{f.name} (default {value!r}) {docs.get(f.name, '')}".rstrip())
    return lines


@dataclasses.dataclass
class RetryConfig:
    """How a Ray Data stage survives failures without looping forever on one that repeats."""

    max_actor_restarts: int = 2
    """Times Ray restarts an actor whose process died (host OOM, segfault, a killed node) before the job fails."""
    max_task_retries: int = 2
    """Times a batch whose actor died is retried (on a restarted or another actor) before the job fails."""
    retry_errors: bool = True
    """On resume, redo rows that a previous run recorded with an error (a transient CUDA OOM, a lost file) instead of
    keeping the error record; False keeps them as done."""
