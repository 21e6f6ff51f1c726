"""The method registry: one dotted name per method, with capability flags.

The registry serves the Python verbs (look up by config type), recipes and the CLI
(look up by name) and the tests (parametrise over :func:`list_methods`)::

    >>> from modelpress import list_methods
    >>> "prune.magnitude" in [m.name for m in list_methods("prune.*")]
    True

A method is a function ``apply(model, config, ctx) -> nn.Module`` registered with
:func:`register_method`. It receives a model it may modify (the verbs copy the user's
model first unless ``inplace=True``) and returns the compressed model.
"""
from __future__ import annotations

import fnmatch
import importlib
from dataclasses import dataclass, field
from typing import Any, Callable

from torch import nn

from .config import MethodConfig
from .errors import ConfigError


@dataclass
class MethodContext:
    """What a method may use besides model and config.

    * ``data``: calibration / training data (a :class:`~modelpress.core.data.Data`) or None.
    * ``train``: a fine-tune config when the caller asked for training (methods with a
      schedule run it themselves and set ``trained=True``; otherwise the caller fine-tunes
      afterwards).
    * ``task``: ``"classification"`` or ``"embedding"``; ``loss_fn`` overrides the default loss.
    * ``log``: a callable taking a string, for progress notes.
    * ``evaluation``: a :class:`~modelpress.core.training.Evaluation` that training inside the
      method uses (evaluate each epoch, keep the best weights), or None.
    """

    data: Any = None
    train: Any = None
    task: str = "classification"
    loss_fn: Callable | None = None
    log: Callable[[str], None] = lambda msg: None
    trained: bool = False
    evaluation: Any = None
    info: dict = field(default_factory=dict)  # what the method reports (per-layer ratios, skipped layers)

    def finetune(self, model: nn.Module, description: str = "fine-tune") -> None:
        """Fine-tune ``model`` in place when the caller gave both ``train`` and data (sets ``trained``)."""
        if self.train is None or self.data is None:
            return
        from .data import as_data
        from .training import fit

        data = as_data(self.data, batch_size=self.train.batch_size, shuffle=True)
        fit(model, data, self.train, loss_fn=self.loss_fn, description=description, evaluation=self.evaluation)
        self.trained = True


@dataclass(frozen=True)
class MethodInfo:
    name: str
    config_cls: type[MethodConfig]
    fn: Callable[[nn.Module, MethodConfig, MethodContext], nn.Module]
    family: str
    summary: str
    needs_data: bool = False
    needs_training: bool = False
    structural: bool = False
    layer_types: tuple[str, ...] = ()

    def flags(self) -> dict:
        return {"needs_data": self.needs_data, "needs_training": self.needs_training,
                "structural": self.structural, "layer_types": list(self.layer_types)}


_REGISTRY: dict[str, MethodInfo] = {}
_BY_CONFIG: dict[type, MethodInfo] = {}

# Packages whose modules register the built-in methods (one method = one module). They are
# imported on first lookup, so ``import modelpress`` stays fast; a module whose optional
# dependency is missing is skipped here and reports the missing extra when used directly.
_METHOD_PACKAGES = ("modelpress.pruning", "modelpress.quantization", "modelpress.distillation",
                    "modelpress.lowrank")
_loaded = False


def register_method(name: str, config: type[MethodConfig], *, needs_data: bool = False,
                    needs_training: bool = False, structural: bool = False,
                    layer_types: tuple[str, ...] = ("Linear", "Conv2d")):
    """Decorator registering ``fn(model, config, ctx) -> model`` under ``name``."""

    def deco(fn):
        if name in _REGISTRY and _REGISTRY[name].fn is not fn:
            raise ValueError(f"method {name!r} is registered twice")
        summary = (fn.__doc__ or config.__doc__ or "").strip().splitlines()[0] if (fn.__doc__ or config.__doc__) else ""
        info = MethodInfo(name=name, config_cls=config, fn=fn, family=name.split(".")[0], summary=summary,
                          needs_data=needs_data, needs_training=needs_training, structural=structural,
                          layer_types=tuple(layer_types))
        config.method = name
        _REGISTRY[name] = info
        _BY_CONFIG[config] = info
        return fn

    return deco


def _load_builtins() -> None:
    global _loaded
    if _loaded:
        return
    import pkgutil

    from .errors import MissingDependencyError

    for pkg_name in _METHOD_PACKAGES:
        pkg = importlib.import_module(pkg_name)
        for mod in pkgutil.iter_modules(pkg.__path__):
            try:
                importlib.import_module(f"{pkg_name}.{mod.name}")
            except MissingDependencyError:
                continue
            except ImportError as exc:
                if (exc.name or "").startswith("modelpress"):
                    raise  # our own bug, not a missing optional package
                continue
    _loaded = True


def list_methods(pattern: str = "*") -> list[MethodInfo]:
    """Registered methods whose dotted name matches the glob ``pattern`` (e.g. ``"quant.*"``)."""
    _load_builtins()
    return [_REGISTRY[n] for n in sorted(_REGISTRY) if fnmatch.fnmatchcase(n, pattern)]


def get_method(name_or_config: str | MethodConfig | type) -> MethodInfo:
    """Look a method up by dotted name, config instance or config class."""
    _load_builtins()
    if isinstance(name_or_config, str):
        if name_or_config not in _REGISTRY:
            close = [n for n in _REGISTRY if n.split(".")[-1] in name_or_config or name_or_config in n]
            raise ConfigError(f"unknown method {name_or_config!r}",
                              hint=f"available: {', '.join(close or sorted(_REGISTRY))} (see `modelpress list`)")
        return _REGISTRY[name_or_config]
    cls = name_or_config if isinstance(name_or_config, type) else type(name_or_config)
    if cls not in _BY_CONFIG:
        raise ConfigError(f"{cls.__name__} is not the config of a registered method",
                          hint="use a config class from modelpress (see `modelpress list`)")
    return _BY_CONFIG[cls]


def build_config(name: str, values: dict | None, where: str | None = None) -> MethodConfig:
    """Build and validate the config of method ``name`` from a plain dict."""
    info = get_method(name)
    return info.config_cls.from_dict(values, where=where or name)
