"""The one way to run a registered method: :func:`run_method`.

The Python verbs (:mod:`modelpress.api`), recipe stages, search trials, the distillation
helpers and the student builders all call it, so a config means the same everywhere. In order:

1. look the method up by its config and check what it needs (data) and the model (no NaN/Inf
   weights; the data's first batch fits the model);
2. list the layers holding weights of a type the method does not handle: they are left as
   they are and reported (``unsupported_layers``);
3. seed torch (``stage_seed(seed, stage)``, the same numbers a recipe uses for its stages);
4. run the method on a copy (or the model itself with ``inplace=True``);
5. fine-tune when training was asked for and the method did not train the model itself, on the
   task's loss (labels; the uncompressed model's outputs for tasks without labels) unless a
   ``loss_fn`` overrides it;
6. check the result for NaN/Inf and return it in eval mode with a :class:`MethodReport`.

    >>> import torch
    >>> from modelpress import MagnitudePruning
    >>> from modelpress.engine import MethodInputs, run_method
    >>> net = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Linear(8, 8), torch.nn.Linear(8, 2))
    >>> sparse, report = run_method(net, MagnitudePruning(sparsity=0.5), MethodInputs())
    >>> report.method, report.info["layer_sparsity"]
    ('prune.magnitude', {'1': 0.5})
"""
from __future__ import annotations

import copy
import dataclasses

import torch
from torch import nn

from ..core.config import MethodConfig
from ..core.data import check_finite_params, check_model_accepts, first_inputs_if_reusable
from ..core.errors import DataError
from ..core.scope import type_matches
from ..nn.attention import convert_attention
from .inputs import MethodInputs, MethodReport, MethodResult
from .registry import get_method


def stage_seed(seed: int, stage: int = 0) -> int:
    """The torch seed of the ``stage``-th method run (counting from 0) under ``seed``."""
    return seed * 1000 + stage + 1


def unsupported_layers(model: nn.Module, layer_types: tuple[str, ...]) -> dict[str, str]:
    """``{name: type}`` of the layers holding weights (a parameter of their own with 2+ dims longer
    than 1, e.g. Embedding, LSTM, MultiheadAttention; a layer scale ``[C, 1, 1]`` or a class token
    ``[1, 1, C]`` is a vector) of a type not in ``layer_types`` and not inside
    a layer of those types: a method for ``layer_types`` leaves them as they are. A method
    without layer types (it trains the whole model) leaves nothing out."""
    if not layer_types:
        return {}
    supported = [n for n, m in model.named_modules() if n and type_matches(m, layer_types)]
    out = {}
    for name, m in model.named_modules():
        if not name or type_matches(m, layer_types) or any(name.startswith(f"{s}.") for s in supported):
            continue
        if any(sum(n > 1 for n in p.shape) >= 2 for p in m.parameters(recurse=False)):
            out[name] = type(m).__name__
    return out


def _own_shapes(module: nn.Module | None) -> dict[str, tuple[int, ...]]:
    if module is None:
        return {}
    return {n: tuple(p.shape) for n, p in module.named_parameters(recurse=False)}


def _submodule(model: nn.Module, name: str) -> nn.Module | None:
    try:
        return model.get_submodule(name)
    except AttributeError:
        return None


def run_method(model: nn.Module, config: MethodConfig, inputs: MethodInputs | None = None, *,
               seed: int | None = None, stage: int = 0, inplace: bool = False) -> tuple[nn.Module, MethodReport]:
    """Run the method ``config`` belongs to on ``model``: ``(compressed model, report)``.

    The input model is left untouched unless ``inplace=True`` (methods that replace modules
    may still return another object: use the return value). ``seed=None`` (the default)
    leaves torch's random state alone; otherwise torch is seeded with ``stage_seed(seed, stage)``
    first, so ``seed=s`` reproduces stage 1 of a recipe with ``seed: s``.
    """
    inputs = inputs or MethodInputs()
    info = get_method(config)
    if info.needs_data and inputs.data is None:
        raise DataError(f"method {info.name} needs data (calibration or training batches)",
                        hint="pass data=DataLoader/list of batches")
    check_finite_params(model, info.name)  # NaN weights would compress to garbage silently
    sample = first_inputs_if_reusable(inputs.data)
    if sample is not None:  # a wrong input shape fails here in one line, not deep in the method
        check_model_accepts(model, sample, f"{info.name} data")
    if seed is not None:
        torch.manual_seed(stage_seed(seed, stage))
    original = model
    target = model if inplace else copy.deepcopy(model)
    if "Linear" in info.layer_types:
        # nn.MultiheadAttention computes its projections from packed parameters, no Linear a method
        # could prune or quantize (and nn.TransformerEncoderLayer's fused inference path reads the
        # weights of replaced Linears directly, skipping their forward): its exact equivalent with
        # four Linear projections takes its place; torchvision's Swin attention (F.linear on its
        # layers' weights) likewise becomes WindowAttention, which calls them
        convert_attention(target)
    skipped = unsupported_layers(target, info.layer_types)
    shapes = {n: _own_shapes(target.get_submodule(n)) for n in skipped} if info.structural else {}
    if inputs.loss_fn is None and inputs.train is not None and not inputs.task.labelled:
        # no labels: the compressed model learns the original's outputs
        reference = copy.deepcopy(original) if inplace else original
        inputs = dataclasses.replace(inputs, loss_fn=inputs.task.training_loss(reference=reference))
    result = info.fn(target, config, inputs)
    if not isinstance(result, MethodResult):  # a method written for the old contract
        result = MethodResult(result)
    fine_tuned = False
    if inputs.can_train and not result.trained:
        inputs.fit(result.model, f"{info.name.split('.')[-1]}: fine-tune")
        fine_tuned = True
    out = result.model.eval()
    # a structural method may still have cut such a layer through its parameters (a position
    # embedding, an attention it swapped for an equivalent): those were not left as they are
    skipped = {n: t for n, t in skipped.items() if n not in shapes or _own_shapes(_submodule(out, n)) == shapes[n]}
    if skipped:
        inputs.log(f"  {info.name} handles {', '.join(info.layer_types)}; left as they are: "
                   + ", ".join(f"{n} ({t})" for n, t in skipped.items()))
    try:
        check_finite_params(out, f"{info.name} result")
    except DataError as err:  # say what to do about a run that diverged
        raise DataError(f"{err} after compression/fine-tuning",
                        hint="lower the fine-tune learning rate, or check the data") from None
    return out, MethodReport(method=info.name, info=result.info, trained=result.trained, fine_tuned=fine_tuned,
                             unsupported_layers=skipped)
