"""Datasets by name: ``load_dataset("mnist5k")``, ``load_dataset("imagefolder:photos?size=32")``.

A spec is ``NAME``, ``NAME:PATH`` or either with ``?key=value`` options. Names are registered
with :func:`register_dataset` (the zoo registers the built-in ones and the readers of the
user's files: ``modelpress list --models`` shows them all). Nothing is downloaded.

    >>> from modelpress.tasks.datasets import load_dataset
    >>> bundle = load_dataset("digits")
    >>> bundle.task, bundle.input_shape
    (Classification(), (1, 28, 28))
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, NamedTuple
from urllib.parse import parse_qsl

from ..core.errors import DataError
from ..core.registry import Registry
from .base import DatasetBundle


def flag(value: str | bool) -> bool:
    """A ``?key=true|false`` option (also 1/0, yes/no)."""
    if isinstance(value, bool):
        return value
    low = str(value).strip().lower()
    if low in ("true", "1", "yes"):
        return True
    if low in ("false", "0", "no"):
        return False
    raise ValueError(f"{value!r} is not true or false")


class DatasetSpec(NamedTuple):
    build: Callable[..., DatasetBundle]  # build(path_or_None, seed, **options)
    needs_path: bool
    options: dict[str, type]  # option name -> type the ?key=value string is converted to
    summary: str


DATASETS: Registry[DatasetSpec] = Registry("dataset", error=DataError, plugins=("modelpress.zoo.datasets",))


def register_dataset(name: str, *, needs_path: bool = False, options: dict[str, type] | None = None,
                     summary: str = "") -> Callable:
    """Decorator registering ``build(path, seed, **options) -> DatasetBundle`` under ``name``."""

    def deco(fn: Callable[..., DatasetBundle]) -> Callable[..., DatasetBundle]:
        DATASETS.register(name, DatasetSpec(fn, needs_path, dict(options or {}), summary))
        return fn

    return deco


def list_datasets() -> list[str]:
    """Dataset names accepted by :func:`load_dataset` (``name`` or ``name:PATH``)."""
    return DATASETS.names()


def parse_spec(spec: str) -> tuple[str, str | None, dict[str, str]]:
    """``"imagefolder:/data/x?size=32"`` -> ``("imagefolder", "/data/x", {"size": "32"})``."""
    query: dict[str, str] = {}
    if "?" in spec:
        spec, qs = spec.rsplit("?", 1)
        query = dict(parse_qsl(qs, keep_blank_values=True))
    name, _, path = spec.partition(":")
    return name.strip().lower(), (path or None), query


def load_dataset(spec: str, root: str | None = None, seed: int = 0, **options: Any) -> DatasetBundle:
    """Load a dataset bundle from ``spec``.

    ``root`` stands in for the ``:PATH`` part of a spec; ``options`` are the same as the
    spec's ``?key=value`` query (keyword arguments win). Splits are seeded: the same ``seed``
    always gives the same split.
    """
    name, path, query = parse_spec(spec)
    if name not in DATASETS:
        raise DataError(f"unknown dataset '{name}'", hint=f"available datasets: {', '.join(list_datasets())}")
    entry = DATASETS.get(name)
    merged = {**query, **options}
    unknown = sorted(set(merged) - set(entry.options))
    if unknown:
        raise DataError(f"dataset '{name}' has no option(s) {unknown}",
                        hint=f"options for '{name}': {sorted(entry.options) or 'none'}")
    try:
        kwargs = {k: entry.options[k](v) for k, v in merged.items()}
    except (TypeError, ValueError) as exc:
        raise DataError(f"dataset '{name}': bad option value in {merged}: {exc}") from exc
    where = path or root
    if entry.needs_path and where is None:
        raise DataError(f"dataset '{name}' needs a path",
                        hint=f"use '{name}:/path/to/data' or load_dataset('{name}', root=...)")
    return entry.build(Path(where).expanduser() if where is not None else None, seed, **kwargs)
