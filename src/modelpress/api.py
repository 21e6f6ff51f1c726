"""The verbs: each takes a model, one config object and optional data.

**Every verb returns a new model and leaves the input untouched**, unless ``inplace=True``
is passed, in which case the input model itself is modified and returned. Methods that
replace modules (structured pruning, low-rank, quantization) may return a different
object even in place; always use the return value.

    >>> import torch
    >>> from modelpress import prune, MagnitudePruning
    >>> m = torch.nn.Sequential(torch.nn.Linear(16, 16), torch.nn.Linear(16, 16), torch.nn.Linear(16, 4))
    >>> p = prune(m, MagnitudePruning(sparsity=0.75))
    >>> float((p[1].weight == 0).float().mean()), float((m[1].weight == 0).float().mean())
    (0.75, 0.0)
"""
from __future__ import annotations

import copy
from typing import Any

from torch import nn

from .core.config import MethodConfig
from .core.data import as_data
from .core.errors import ConfigError
from .core.registry import MethodContext, get_method
from .core.training import TrainConfig


def _check_family(config: MethodConfig, verb: str, families: tuple[str, ...]) -> None:
    info = get_method(config)
    if info.family not in families:
        raise ConfigError(f"{type(config).__name__} is a '{info.name}' method; {verb}() takes "
                          f"{'/'.join(families)} methods", hint="use the matching verb, or apply(model, config)")


def apply(model: nn.Module, config: MethodConfig, data: Any = None, *, train: TrainConfig | None = None,
          inplace: bool = False, task: str = "classification", loss_fn=None,
          context: MethodContext | None = None, evaluation=None) -> nn.Module:
    """Apply any registered method; returns the compressed model (a copy unless ``inplace``).

    ``train`` asks for training inside the method when it supports it (e.g. a pruning
    schedule during fine-tuning); ``context`` (optional) receives what the method reports;
    ``evaluation`` (a :class:`~modelpress.core.training.Evaluation`) makes that training
    evaluate on held-out data after every epoch and keep the best weights.
    """
    from .core.errors import DataError

    info = get_method(config)
    data = as_data(data)
    if info.needs_data and data is None:
        raise DataError(f"method {info.name} needs data (calibration or training batches)",
                        hint="pass data=DataLoader/list of batches")
    from .core.data import check_finite_params, check_model_accepts, first_inputs_if_reusable

    check_finite_params(model, info.name)  # NaN weights would compress to garbage silently
    sample = first_inputs_if_reusable(data)
    if sample is not None:  # a wrong input shape fails here in one line, not deep in the method
        check_model_accepts(model, sample, f"{info.name} data")
    ctx = context or MethodContext()
    ctx.data, ctx.train, ctx.task, ctx.loss_fn = data, train, task, loss_fn
    if evaluation is not None:
        ctx.evaluation = evaluation
    target = model if inplace else copy.deepcopy(model)
    return info.fn(target, config, ctx)


def prune(model: nn.Module, config: MethodConfig, data: Any = None, **kwargs) -> nn.Module:
    """Prune ``model`` with a pruning config (e.g. ``MagnitudePruning``). Returns a new model
    unless ``inplace=True``. See :func:`apply` for the keyword arguments."""
    _check_family(config, "prune", ("prune",))
    return apply(model, config, data, **kwargs)


def quantize(model: nn.Module, config: MethodConfig, data: Any = None, **kwargs) -> nn.Module:
    """Quantize ``model``. Returns a new model unless ``inplace=True``."""
    _check_family(config, "quantize", ("quant",))
    return apply(model, config, data, **kwargs)


def distill(student: nn.Module, config: MethodConfig, data: Any = None, **kwargs) -> nn.Module:
    """Distill into ``student`` (the teacher is named in the config). Returns a new model unless ``inplace=True``."""
    _check_family(config, "distill", ("distill",))
    return apply(student, config, data, **kwargs)


def factorize(model: nn.Module, config: MethodConfig, data: Any = None, **kwargs) -> nn.Module:
    """Low-rank factorize ``model``. Returns a new model unless ``inplace=True``."""
    _check_family(config, "factorize", ("lowrank",))
    return apply(model, config, data, **kwargs)


def compress(model: nn.Module, recipe, data=None, *, out: str | None = None, **kwargs):
    """Run a recipe (a :class:`~modelpress.recipes.schema.Recipe` or a YAML path) on ``model``.

    Returns a :class:`~modelpress.recipes.pipeline.RunResult` whose ``model`` is the
    compressed model; the input model is not modified. With ``out``, stage checkpoints,
    the final artifact and reports are written there and a rerun resumes.
    """
    from .recipes.pipeline import run_recipe
    from .recipes.schema import Recipe

    if not isinstance(recipe, Recipe):
        recipe = Recipe.load(recipe)
    return run_recipe(recipe, model=copy.deepcopy(model), data=data, out=out, **kwargs)
