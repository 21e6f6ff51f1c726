"""The method registry: one dotted name per method, with capability flags.

The registry serves the Python verbs (look up by config type), recipes and the CLI
(look up by name) and the tests (parametrise over :func:`list_methods`)::

    >>> from modelpress import list_methods
    >>> "prune.magnitude" in [m.name for m in list_methods("prune.*")]
    True

A method is a function ``fn(model, config, inputs) -> MethodResult`` registered with
:func:`register_method` (see :mod:`modelpress.engine.inputs`); :func:`~modelpress.engine.run.run_method`
is the one way to run it.
"""
from __future__ import annotations

import fnmatch
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

from torch import nn

from ..core.config import MethodConfig
from ..core.errors import ConfigError, MissingDependencyError
from ..core.registry import Registry
from ..core.scope import type_matches

if TYPE_CHECKING:  # pragma: no cover - typing only
    from .inputs import MethodInputs, MethodResult

# Packages whose modules register the built-in methods (one method = one module), imported on the
# first lookup so ``import modelpress`` stays fast.
METHOD_PACKAGES = ("modelpress.pruning", "modelpress.quantization", "modelpress.distillation",
                   "modelpress.lowrank")


@dataclass(frozen=True)
class MethodInfo:
    """A registered method. ``layer_types`` are the layer classes it edits; empty means it
    trains the whole model (distillation) rather than rewriting layers."""

    name: str
    config_cls: type[MethodConfig]
    fn: Callable[[nn.Module, MethodConfig, "MethodInputs"], "MethodResult"]
    family: str
    summary: str
    needs_data: bool = False
    needs_training: bool = False
    structural: bool = False
    layer_types: tuple[str, ...] = ()
    requires: Callable[[nn.Module], str | None] | None = None  # why the method cannot apply, or None

    def applicable(self, model: nn.Module) -> str | None:
        """Why the method cannot apply to ``model`` (no layer of its types, or the structure it
        needs is missing), or None."""
        if self.layer_types and not any(type_matches(m, self.layer_types) for m in model.modules()):
            return f"no layer of the types {', '.join(self.layer_types)}"
        return self.requires(model) if self.requires is not None else None

    def flags(self) -> dict:
        return {"needs_data": self.needs_data, "needs_training": self.needs_training,
                "structural": self.structural, "layer_types": list(self.layer_types)}


def _import_method_modules() -> None:
    import importlib
    import pkgutil


    for pkg_name in METHOD_PACKAGES:
        pkg = importlib.import_module(pkg_name)
        for mod in pkgutil.iter_modules(pkg.__path__):
            try:
                importlib.import_module(f"{pkg_name}.{mod.name}")
            except MissingDependencyError:
                continue  # an optional extra is missing: the method reports it when used directly
            except ImportError as exc:
                if (exc.name or "").startswith("modelpress"):
                    raise  # our own bug, not a missing optional package
                continue


METHODS: Registry[MethodInfo] = Registry("method", loader=_import_method_modules, hint="see `modelpress list`")
_BY_CONFIG: dict[type, MethodInfo] = {}


def register_method(name: str, config: type[MethodConfig], *, needs_data: bool = False,
                    needs_training: bool = False, structural: bool = False,
                    layer_types: tuple[str, ...] = ("Linear", "Conv2d"),
                    requires: Callable[[nn.Module], str | None] | None = None):
    """Decorator registering ``fn(model, config, inputs) -> MethodResult`` under ``name``.
    ``requires(model)`` (optional) says why the method cannot apply to a model beyond its layer
    types (e.g. it needs transformer attention), or None."""

    def deco(fn):
        doc = fn.__doc__ or config.__doc__ or ""
        summary = doc.strip().splitlines()[0] if doc.strip() else ""
        info = MethodInfo(name=name, config_cls=config, fn=fn, family=name.split(".")[0], summary=summary,
                          needs_data=needs_data, needs_training=needs_training, structural=structural,
                          layer_types=tuple(layer_types), requires=requires)
        METHODS.register(name, info)  # the same method imported twice registers an equal info: a no-op
        config.method = name
        _BY_CONFIG[config] = info
        return fn

    return deco


def load_method_modules() -> None:
    """Import every built-in method module: they also register the module classes, encodings
    and replays an artifact may name."""
    METHODS.load_plugins()


def list_methods(pattern: str = "*") -> list[MethodInfo]:
    """Registered methods whose dotted name matches the glob ``pattern`` (e.g. ``"quant.*"``)."""
    return [METHODS.get(n) for n in METHODS.names() if fnmatch.fnmatchcase(n, pattern)]


def get_method(name_or_config: str | MethodConfig | type) -> MethodInfo:
    """Look a method up by dotted name, config instance or config class."""
    METHODS.load_plugins()
    if isinstance(name_or_config, str):
        if name_or_config not in METHODS:
            close = [n for n in METHODS.names() if n.split(".")[-1] in name_or_config or name_or_config in n]
            raise ConfigError(f"unknown method {name_or_config!r}",
                              hint=f"available: {', '.join(close or METHODS.names())} (see `modelpress list`)")
        return METHODS.get(name_or_config)
    cls = name_or_config if isinstance(name_or_config, type) else type(name_or_config)
    if cls not in _BY_CONFIG:
        raise ConfigError(f"{cls.__name__} is not the config of a registered method",
                          hint="use a config class from modelpress (see `modelpress list`)")
    return _BY_CONFIG[cls]


def build_config(name: str, values: dict | None, where: str | None = None) -> MethodConfig:
    """Build and validate the config of method ``name`` from a plain dict."""
    return get_method(name).config_cls.from_dict(values, where=where or name)
