"""The verbs: each takes a model, one config object and optional data.

**Every verb returns a new model and leaves the input untouched**, unless ``inplace=True``
is passed, in which case the input model itself is modified and returned. Methods that
replace modules (structured pruning, low-rank, quantization) may return a different
object even in place; always use the return value. The model comes back in eval mode.

Every verb runs through :func:`~modelpress.engine.run_method`, exactly as a recipe stage
does: ``train=TrainConfig(...)`` trains inside the method when it has a schedule, or
fine-tunes after it otherwise, batching the data with ``train.batch_size`` and shuffling it;
``seed=s`` gives the same weights as a one-stage recipe with ``seed: s``.

    >>> import torch
    >>> from modelpress import prune, MagnitudePruning
    >>> m = torch.nn.Sequential(torch.nn.Linear(16, 16), torch.nn.Linear(16, 16), torch.nn.Linear(16, 4))
    >>> p = prune(m, MagnitudePruning(sparsity=0.75))
    >>> float((p[1].weight == 0).float().mean()), float((m[1].weight == 0).float().mean())
    (0.75, 0.0)
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import nn

from .artifact.loading import load_model
from .core.config import MethodConfig
from .core.errors import ConfigError
from .core.progress import log
from .core.training import Evaluation, LossFn, TrainConfig
from .engine import MethodInputs, get_method, run_method
from .recipes.pipeline import RunResult, run_recipe
from .recipes.resolve import resolve_run
from .recipes.schema import Recipe
from .tasks.base import Task
from .tasks.classification import Classification


def _check_family(config: MethodConfig, verb: str, families: tuple[str, ...]) -> None:
    info = get_method(config)
    if info.family not in families:
        raise ConfigError(f"{type(config).__name__} is a '{info.name}' method; {verb}() takes "
                          f"{'/'.join(families)} methods", hint="use the matching verb, or apply(model, config)")


def apply(model: nn.Module, config: MethodConfig, data: Any = None, *, train: TrainConfig | None = None,
          inplace: bool = False, task: Task | None = None, loss_fn: LossFn | None = None,
          teachers: nn.Module | tuple[nn.Module, ...] = (), evaluation: Evaluation | None = None,
          seed: int | None = None) -> nn.Module:
    """Apply any registered method; returns the compressed model (a copy unless ``inplace``).

    ``train`` asks for training inside the method (e.g. a pruning schedule) or a fine-tune
    after it; ``task`` (default :class:`~modelpress.tasks.Classification`) gives the training
    loss and metric, ``loss_fn`` overrides the loss; ``teachers`` are modules distillation
    methods learn from (model references in a config are loaded); ``evaluation`` (an
    :class:`~modelpress.core.training.Evaluation`) evaluates on held-out data after every
    epoch and keeps the best weights. For the method's report use
    :func:`~modelpress.engine.run_method`.
    """
    inputs = MethodInputs(data=data, train=train, task=task or Classification(), loss_fn=loss_fn,
                          teachers=teachers, evaluation=evaluation, log=log, load_model=load_model)
    return run_method(model, config, inputs, seed=seed, inplace=inplace)[0]


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
    """Distill into ``student`` (the teacher is named in the config or passed as ``teachers=``).
    Returns a new model unless ``inplace=True``."""
    _check_family(config, "distill", ("distill",))
    return apply(student, config, data, **kwargs)


def factorize(model: nn.Module, config: MethodConfig, data: Any = None, **kwargs) -> nn.Module:
    """Low-rank factorize ``model``. Returns a new model unless ``inplace=True``."""
    _check_family(config, "factorize", ("lowrank",))
    return apply(model, config, data, **kwargs)


def compress(model: nn.Module | str | None, recipe: Recipe | str | Path, data: Any = None, *,
             out: str | Path | None = None, overrides: list[str] | tuple[str, ...] = (), resume: bool = True,
             trust_remote_code: bool = False) -> RunResult:
    """Run a recipe exactly as ``modelpress compress`` does; returns a
    :class:`~modelpress.recipes.pipeline.RunResult` (``.model``, ``.rows``, ``.out``).

    ``recipe``: a :class:`~modelpress.recipes.schema.Recipe`, a YAML path or a built-in name;
    ``model``: a module (not modified), a model reference (zoo name, file.py:fn, HF folder,
    artifact) or None for the recipe's own ``model:``; ``data``: a
    :class:`~modelpress.tasks.DatasetBundle`, a dataset spec (``"mnist5k"``,
    ``"imagefolder:photos"``) or None for the recipe's ``data:``. A zoo model on labelled data
    starts from its trained baseline (the recipe's ``baseline:`` training, cached). With
    ``out``, stage checkpoints, the final artifact and reports are written there and a rerun
    resumes.

        >>> from modelpress import compress
        >>> result = compress(None, "lenet5-prune", out=None, overrides=["eval.latency=false",
        ...                   "stage.1.finetune.epochs=0.1", "baseline.train.epochs=0.2"])  # doctest: +SKIP
    """
    if not isinstance(recipe, Recipe):
        recipe = Recipe.load(recipe, overrides)
    elif overrides:
        raise ConfigError("compress(): overrides apply to a recipe file or name, not to a Recipe object",
                          hint="edit the Recipe, or pass its path")
    run = resolve_run(recipe, model, data, trust_remote_code=trust_remote_code)
    return run_recipe(recipe, run.model, run.data, out=out, resume=resume)
