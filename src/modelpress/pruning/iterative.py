"""Iterative prune -> fine-tune loops (``prune.iterative``; Han et al. 2015).

Prune to ``steps[0]``, fine-tune, prune to ``steps[1]``, fine-tune, ... . Each step is a
one-shot unstructured prune with any criterion of :mod:`.criteria` (``l1``, ``l2``,
``random``, ``taylor``, ``snip``); weights pruned in an earlier step stay pruned (their
masks rank them lowest) and masks keep them at zero while fine-tuning.

Every step fine-tunes with ``finetune`` or, when that is None, with the caller's training
config (``train=`` / a recipe stage's ``finetune``), so the whole run trains
``len(steps)`` times that. Without any training config the steps are applied back to back
(the same as one-shot pruning to the last step).

    >>> import torch
    >>> from torch import nn
    >>> from modelpress import prune, TrainConfig
    >>> from modelpress.pruning.iterative import IterativePruning
    >>> m = nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 2))
    >>> x = torch.randn(64, 4); batches = [(x, (x[:, 0] > 0).long())]
    >>> p = prune(m, IterativePruning(steps=[0.5, 0.75]), batches, train=TrainConfig(epochs=2))
    >>> float((p[2].weight == 0).float().mean())
    0.75

:func:`iterative_prune` is the same loop as a plain function (with an optional metric per
step) for recipes and benchmarks.
"""
from __future__ import annotations

from typing import Any, Callable, Literal

from pydantic import Field, field_validator
from torch import nn

from ..core.config import MethodConfig
from ..core.scope import Scope
from ..core.training import TrainConfig, fit
from ..engine import MethodInputs, MethodResult, register_method
from .importance import check_criterion, weight_importance
from .magnitude import WEIGHT_PRUNABLE, UnstructuredPruning, prune_to, select_layers


class IterativePruning(MethodConfig):
    """Prune to each sparsity in ``steps`` in turn, fine-tuning after every step."""

    steps: list[float] = Field(default_factory=lambda: [0.5, 0.75, 0.9],
                               description="increasing target sparsities, one prune + fine-tune each")
    criterion: str = Field("l1", description="importance of each weight (see modelpress.pruning.importance): "
                                             "l1, l2, random, taylor or snip")
    ranking: Literal["global", "layer"] = "global"
    scope: Scope = Scope()
    keep_first_last: bool = Field(True, description="leave the first and last layer dense")
    finetune: TrainConfig | None = Field(None, description="per-step fine-tune; None = the caller's train config")
    batches: int = Field(8, ge=1, description="batches for the taylor/snip scores")
    seed: int = Field(0, ge=0, description="seed of the random criterion")

    @field_validator("criterion")
    @classmethod
    def _criterion(cls, v):
        return check_criterion(v, "weights")

    @field_validator("steps")
    @classmethod
    def _increasing(cls, v):
        if not v:
            raise ValueError("give at least one sparsity step")
        if any(not 0 < s < 1 for s in v):
            raise ValueError(f"every step must be in (0, 1), got {v}")
        if any(b <= a for a, b in zip(v, v[1:])):
            raise ValueError(f"steps must increase strictly, got {v}")
        return v


def _step_config(cfg: IterativePruning, sparsity: float) -> UnstructuredPruning:
    return UnstructuredPruning(sparsity=sparsity, ranking=cfg.ranking, scope=cfg.scope,
                               keep_first_last=cfg.keep_first_last)


def _sparsity(layers) -> float:
    total = sum(m.weight.numel() for _, m in layers)
    return sum(int((m.weight == 0).sum()) for _, m in layers) / total


def iterative_prune(model: nn.Module, cfg: IterativePruning, data: Any = None, train: TrainConfig | None = None,
                    *, loss_fn: Callable | None = None, evaluate: Callable[[nn.Module], float] | None = None,
                    log: Callable[[str], None] = lambda msg: None) -> list[dict]:
    """Run the loop on ``model`` in place; one record per step.

    Each record holds the step's ``target``, the ``sparsity`` reached over the selected
    layers, and ``metric`` (``evaluate(model)`` after the fine-tune) when ``evaluate`` is given.
    """
    train = cfg.finetune or train
    layers = select_layers(model, _step_config(cfg, cfg.steps[-1]))
    records = []
    for i, target in enumerate(cfg.steps):
        scores = weight_importance(cfg.criterion, model, layers, data=data, loss_fn=loss_fn,
                                   batches=cfg.batches, seed=cfg.seed)
        prune_to(layers, _step_config(cfg, target), target, scores)
        if train is not None and data is not None:
            fit(model, data, train, loss_fn=loss_fn, description=f"step {i + 1}/{len(cfg.steps)}: fine-tune")
        record = {"target": target, "sparsity": _sparsity(layers)}
        if evaluate is not None:
            record["metric"] = float(evaluate(model))
        log(f"iterative pruning step {i + 1}/{len(cfg.steps)}: " + ", ".join(f"{k}={v:.4f}" for k, v in record.items()))
        records.append(record)
    return records


@register_method("prune.iterative", IterativePruning, needs_training=True, layer_types=WEIGHT_PRUNABLE)
def iterative_prune_method(model: nn.Module, cfg: IterativePruning, inputs: MethodInputs) -> MethodResult:
    """Iterative pruning: prune to each sparsity step, fine-tune after each (masks enforced)."""
    train = cfg.finetune or inputs.train
    trains = train is not None and inputs.data is not None
    if not trains:
        inputs.log("prune.iterative: no training given, so the steps run back to back without fine-tuning")
    steps = iterative_prune(model, cfg, inputs.data, inputs.train, loss_fn=inputs.loss_fn, log=inputs.log)
    layers = select_layers(model, _step_config(cfg, cfg.steps[-1]))
    info = {"steps": steps, "layer_sparsity": {n: float((m.weight == 0).float().mean()) for n, m in layers}}
    return MethodResult(model, info, trained=trains)
