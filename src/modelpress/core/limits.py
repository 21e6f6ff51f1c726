"""Bounded readers for the structured input modelpress parses: a shared recipe is untrusted.

A YAML file of a few hundred bytes can expand to gigabytes through anchors and aliases (each
level of an alias chain multiplies the size), and a JSON or YAML document can nest deeper than
Python's recursion limit or hold a string of hundreds of megabytes. Everything here is checked
*before* anything is built: :func:`load_yaml` walks the parser's event stream (linear in the
text, aliases are never expanded) and refuses anchors and aliases, more than :data:`MAX_NODES`
nodes, nesting deeper than :data:`MAX_DEPTH`, longer strings than :data:`MAX_STRING` and larger
files than the caller's byte cap, each as one :class:`~.errors.ConfigError` line naming the key
path. :func:`read_json` does the same for JSON files modelpress reads back (reports, Hugging Face
``config.json``). :func:`short` keeps echoed values short in error messages.

    >>> load_yaml("a: &x [1, 2]\\nb: *x", "r.yaml")
    Traceback (most recent call last):
    ...
    modelpress.core.errors.ConfigError: r.yaml: YAML anchors and aliases are not allowed (anchor &x at a, line 1)
    >>> short("x" * 1000, 20)
    "'xxxxxxxxxxxxxxxx... (1,002 characters)"
"""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import yaml

from .errors import ConfigError

MAX_NODES = 100_000        # scalars + mappings + sequences in one document
MAX_DEPTH = 64             # nested mappings / sequences
MAX_STRING = 1_000_000     # characters in one scalar
MAX_YAML_BYTES = 10 << 20  # a recipe or search space file
MAX_JSON_BYTES = 64 << 20  # a report or config.json read back


def short(value: Any, limit: int = 80) -> str:
    """``repr(value)`` cut to ``limit`` characters (with the full length), for error messages."""
    text = repr(value) if not isinstance(value, str) or len(value) <= 4 * limit else repr(value[:4 * limit])
    full = len(repr(value)) if not isinstance(value, str) else len(value) + 2
    return text if len(text) <= limit else f"{text[:limit - 3]}... ({full:,} characters)"


def _path(stack: list) -> str:
    return ".".join(str(p) for p in stack if p is not None) or "<document>"


def check_yaml_events(text: str, where: str) -> None:
    """Walk ``text``'s YAML events and raise on anchors/aliases and oversized documents."""
    stack: list = []          # the key path to the current node
    kinds: list[str] = []     # "map" / "seq" of each open container
    expecting_key: list[bool] = []
    nodes = 0
    try:
        for event in yaml.parse(text, Loader=yaml.SafeLoader):
            if isinstance(event, yaml.AliasEvent):
                raise ConfigError(f"{where}: YAML anchors and aliases are not allowed (alias *{event.anchor} at "
                                  f"{_path(stack)}, line {event.start_mark.line + 1})",
                                  hint="write the values out instead of referring to them")
            if not isinstance(event, (yaml.ScalarEvent, yaml.MappingStartEvent, yaml.SequenceStartEvent,
                                      yaml.MappingEndEvent, yaml.SequenceEndEvent)):
                continue
            if isinstance(event, (yaml.MappingEndEvent, yaml.SequenceEndEvent)):
                kinds.pop(), expecting_key.pop(), stack.pop()
                _after_value(kinds, expecting_key, stack)
                continue
            nodes += 1
            if nodes > MAX_NODES:
                raise ConfigError(f"{where}: more than {MAX_NODES:,} YAML nodes (at {_path(stack)})",
                                  hint="a recipe is a short list of stages; split or trim the file")
            if getattr(event, "anchor", None):
                raise ConfigError(f"{where}: YAML anchors and aliases are not allowed (anchor &{event.anchor} at "
                                  f"{_path(stack)}, line {event.start_mark.line + 1})",
                                  hint="write the values out instead of referring to them")
            if isinstance(event, yaml.ScalarEvent):
                if len(event.value) > MAX_STRING:
                    raise ConfigError(f"{where}: a value of {len(event.value):,} characters at {_path(stack)} "
                                      f"(at most {MAX_STRING:,})", hint="shorten the value")
                if kinds and kinds[-1] == "map" and expecting_key[-1]:
                    stack[-1] = short(event.value, 40) if not isinstance(event.value, str) else event.value[:40]
                    expecting_key[-1] = False
                    continue
                _after_value(kinds, expecting_key, stack)
                continue
            if len(kinds) >= MAX_DEPTH:
                raise ConfigError(f"{where}: YAML nested deeper than {MAX_DEPTH} levels (at {_path(stack)})",
                                  hint="flatten the structure")
            is_map = isinstance(event, yaml.MappingStartEvent)
            kinds.append("map" if is_map else "seq")
            expecting_key.append(is_map)
            stack.append(None if is_map else 0)
    except yaml.YAMLError:
        return  # a syntax error: the loader reports it with its position


def _after_value(kinds: list[str], expecting_key: list[bool], stack: list) -> None:
    """A value ended: a mapping expects its next key, a sequence moves to its next index."""
    if not kinds:
        return
    if kinds[-1] == "map":
        expecting_key[-1] = True
    elif isinstance(stack[-1], int):
        stack[-1] += 1


class _Loader(yaml.SafeLoader):
    """``yaml.SafeLoader`` without YAML 1.1's base-60 numbers: ``2:4`` (an N:M pattern) stays the
    string it reads as, not the integer 124 (YAML 1.2 dropped them too)."""


_INT = re.compile(r"^(?:[-+]?0b[0-1_]+|[-+]?0[0-7_]+|[-+]?(?:0|[1-9][0-9_]*)|[-+]?0x[0-9a-fA-F_]+)$")
_FLOAT = re.compile(r"^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+][0-9]+)?|\.[0-9][0-9_]*(?:[eE][-+][0-9]+)?"
                    r"|[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))$")
_Loader.yaml_implicit_resolvers = {
    first: [(tag, {"tag:yaml.org,2002:int": _INT, "tag:yaml.org,2002:float": _FLOAT}.get(tag, rx))
            for tag, rx in resolvers]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()}


def load_yaml(text: str, where: str) -> Any:
    """Safe YAML loading (no base-60 numbers) after :func:`check_yaml_events` (see the module docstring)."""
    check_yaml_events(text, where)
    return yaml.load(text, Loader=_Loader)  # a SafeLoader subclass: no arbitrary objects


def read_text_capped(path: str | Path, max_bytes: int, what: str) -> str:
    """The UTF-8 text of ``path``, refusing a file larger than ``max_bytes`` before reading it."""
    path = Path(path)
    size = path.stat().st_size
    if size > max_bytes:
        raise ConfigError(f"{what} {path} is {size:,} bytes (at most {max_bytes:,})",
                          hint="this is not a file modelpress wrote or expects; check the path")
    return path.read_text(encoding="utf-8")


def _depth(obj: Any, limit: int) -> int:
    """Nesting depth of a parsed JSON value, stopping once past ``limit``."""
    todo, deepest = [(obj, 1)], 0
    while todo:
        value, d = todo.pop()
        if d > limit:
            return d
        deepest = max(deepest, d)
        children = value.values() if isinstance(value, dict) else value if isinstance(value, list) else ()
        todo.extend((c, d + 1) for c in children if isinstance(c, (dict, list)))
    return deepest


def read_json(path: str | Path, what: str, max_bytes: int = MAX_JSON_BYTES) -> Any:
    """A JSON file modelpress reads back, size- and depth-capped, errors as one ConfigError line."""
    text = read_text_capped(path, max_bytes, what)
    try:
        value = json.loads(text)
    except (json.JSONDecodeError, RecursionError) as exc:
        raise ConfigError(f"{what} {path} is not valid JSON ({type(exc).__name__}: {short(str(exc), 120)})",
                          hint="the file may be truncated or corrupt") from None
    if _depth(value, MAX_DEPTH) > MAX_DEPTH:
        raise ConfigError(f"{what} {path} nests deeper than {MAX_DEPTH} levels", hint="the file is not valid here")
    return value
