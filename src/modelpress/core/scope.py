"""Layer targeting: ``Scope(include=[...], exclude=[...])``.

Each entry is one of

* an exact module name: ``"features.0"``, ``"fc3"``;
* a regular expression on module names: ``"re:layer\\.\\d+\\.conv2"`` (full match);
* a layer type: ``"type:Conv2d"`` (matches subclasses too) or, in Python, the class itself.

A layer type also matches the classes of other libraries registered as that type under another
name (:func:`register_type_alias`): GPT-2's ``Conv1D`` is a ``Linear`` to every method and scope.

``include`` empty means "every layer the method supports". An entry that matches no
layer is an error (a typo must never silently compress nothing)::

    >>> from torch import nn
    >>> from modelpress.core.scope import Scope
    >>> m = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
    >>> [n for n, _ in Scope(exclude=["2"]).resolve(m, ("Linear",))]
    ['0']
"""
from __future__ import annotations

import re
from typing import Any, Iterable, NamedTuple

from pydantic import field_validator
from torch import nn

from .config import StrictModel
from .errors import ScopeError
from .registry import Registry


class TypeAlias(NamedTuple):
    """What a class of another library counts as: ``type_name`` (e.g. ``"Linear"``); ``transposed``:
    a Linear whose weight is stored ``[in, out]`` (see :mod:`modelpress.nn.layer_kinds`)."""

    type_name: str
    transposed: bool = False


# Qualified class name -> the layer type it is: one place for every method, scope and report.
TYPE_ALIASES: Registry[TypeAlias] = Registry("layer type alias")


def register_type_alias(qualified_name: str, type_name: str, *, transposed: bool = False) -> None:
    """Let the class ``qualified_name`` (``module.Class``) match the layer type ``type_name``."""
    TYPE_ALIASES.register(qualified_name, TypeAlias(type_name, transposed))


# Hugging Face GPT-2 / GPT / DecisionTransformer ...: a Linear with its weight stored [in, out].
register_type_alias("transformers.pytorch_utils.Conv1D", "Linear", transposed=True)


def type_alias(module: nn.Module) -> TypeAlias | None:
    """The alias ``module``'s class (or a base class) is registered under, if any."""
    for c in type(module).__mro__:
        alias = TYPE_ALIASES.find(f"{c.__module__}.{c.__qualname__}")
        if alias is not None:
            return alias
    return None


def _normalise(entry: Any) -> str:
    if isinstance(entry, type):
        return f"type:{entry.__name__}"
    if not isinstance(entry, str) or not entry:
        raise ValueError(f"scope entries are module names, 're:' patterns or 'type:' names, got {entry!r}")
    if entry.startswith("re:"):
        try:
            re.compile(entry[3:])
        except re.error as exc:
            raise ValueError(f"invalid regular expression {entry[3:]!r}: {exc}") from None
    return entry


def type_matches(module: nn.Module, type_names: Iterable[str]) -> bool:
    """True when ``module``'s class, a base class or its alias is named in ``type_names``."""
    names = {c.__name__ for c in type(module).__mro__}
    alias = type_alias(module)
    if alias is not None:
        names.add(alias.type_name)
    return any(t in names for t in type_names)


class Scope(StrictModel):
    """Which layers a method touches. See the module docstring."""

    include: list[str] = []
    exclude: list[str] = []

    @field_validator("include", "exclude", mode="before")
    @classmethod
    def _entries(cls, v):
        if v is None:
            return []
        if isinstance(v, (str, type)):
            v = [v]
        return [_normalise(e) for e in v]

    @staticmethod
    def _match(entry: str, name: str, module: nn.Module) -> bool:
        if entry.startswith("re:"):
            return re.fullmatch(entry[3:], name) is not None
        if entry.startswith("type:"):
            return type_matches(module, [entry[5:]])
        return entry == name

    def resolve(self, model: nn.Module, layer_types: Iterable[str] = ("Linear", "Conv2d"),
                *, default_exclude: Iterable[str] = ()) -> list[tuple[str, nn.Module]]:
        """The ``(name, module)`` pairs selected, in model order.

        ``layer_types`` are the types the method supports. A layer explicitly included by
        name but of an unsupported type raises :class:`ScopeError`; ``default_exclude`` are
        names the method leaves out unless the user includes them explicitly.
        """
        layer_types = tuple(layer_types)
        named = [(n, m) for n, m in model.named_modules() if n]
        for entry in self.include + self.exclude:
            if not any(self._match(entry, n, m) for n, m in named):
                sample = ", ".join(n for n, _ in named[:8])
                raise ScopeError(f"scope entry {entry!r} matches no layer of {type(model).__name__}",
                                 hint=f"layer names look like: {sample} ... (see `modelpress analyze`)")
        selected = []
        for n, m in named:
            if self.include:
                hit = [e for e in self.include if self._match(e, n, m)]
                if not hit:
                    continue
                if not type_matches(m, layer_types):
                    if any(not e.startswith(("re:", "type:")) for e in hit):
                        raise ScopeError(
                            f"layer {n!r} is a {type(m).__name__}, which this method cannot handle",
                            hint=f"supported layer types: {', '.join(layer_types)}")
                    continue
                explicit = any(e == n for e in hit)
            else:
                if not type_matches(m, layer_types):
                    continue
                explicit = False
            if any(self._match(e, n, m) for e in self.exclude):
                continue
            if n in default_exclude and not explicit:
                continue
            selected.append((n, m))
        if not selected:
            left_out = sorted(set(default_exclude) & {n for n, m in named if type_matches(m, layer_types)})
            raise ScopeError(f"the scope selects no {'/'.join(layer_types)} layer of {type(model).__name__}"
                             + (f" (left out by default: {', '.join(left_out)})" if left_out else ""),
                             hint="set keep_first_last: false, or include those layers by name" if left_out
                             else "widen Scope(include=...) or remove exclusions")
        return selected


def first_and_last(model: nn.Module, layer_types: Iterable[str] = ("Linear", "Conv2d")) -> list[str]:
    """Names of the first and last layers of the given types (kept dense/fp32 by default). A
    recurrent stack (nn.LSTM / nn.GRU) first is the model's body, not a stem reading raw input:
    it is not left out."""
    named = [(n, m) for n, m in model.named_modules() if n and type_matches(m, layer_types)]
    if not named:
        return []
    first = [] if isinstance(named[0][1], nn.RNNBase) else [named[0][0]]
    return sorted({*first, named[-1][0]})
