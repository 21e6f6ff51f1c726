"""Unstructured magnitude pruning (``prune.magnitude``), global or per layer, with schedules.

Weights with the smallest ``|w|`` (L1) or ``w**2`` (L2; same order per weight, kept for
symmetry with the structured criteria) are set to zero and masked, so fine-tuning keeps
them at zero. ``ranking="global"`` compares weights across all selected layers (one
threshold, Han et al.'s Deep Compression); ``"layer"`` prunes each layer to the target.
The number of pruned weights is exact: ``round(sparsity * n)`` (ties broken by index).

    >>> import torch
    >>> from modelpress import prune
    >>> from modelpress.pruning.magnitude import MagnitudePruning
    >>> m = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU(), torch.nn.Linear(8, 8),
    ...                         torch.nn.ReLU(), torch.nn.Linear(8, 2))
    >>> pruned = prune(m, MagnitudePruning(sparsity=0.5))  # first and last layer stay dense
    >>> int((pruned[2].weight == 0).sum())
    32

Returns a pruned copy (masks attached); ``strip_masks`` makes the result plain.
"""
from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field, field_validator
from torch import nn

from ..core.config import MethodConfig
from ..core.masks import set_mask
from ..core.registry import MethodContext, register_method
from ..core.scope import Scope, first_and_last
from ..core.training import fit, total_steps
from ..core.data import as_data
from .schedules import OneShot, Schedule

PRUNABLE = ("Linear", "Conv2d", "Conv1d")


class MagnitudePruning(MethodConfig):
    """Zero the smallest-magnitude weights to reach ``sparsity`` (fraction of weights removed)."""

    sparsity: float = Field(0.5, ge=0, lt=1, description="fraction of weights set to zero")
    ranking: Literal["global", "layer"] = "global"
    norm: Literal["l1", "l2"] = "l1"
    scope: Scope = Scope()
    layer_sparsity: dict[str, float] = Field(default_factory=dict,
                                             description="per-layer targets overriding `sparsity`")
    keep_first_last: bool = Field(True, description="leave the first and last layer dense")
    schedule: Schedule = Field(default_factory=OneShot)

    @field_validator("layer_sparsity")
    @classmethod
    def _ratios(cls, v):
        for name, s in v.items():
            if not 0 <= s < 1:
                raise ValueError(f"layer {name!r}: sparsity must be in [0, 1), got {s}")
        return v


def select_layers(model: nn.Module, cfg: MagnitudePruning) -> list[tuple[str, nn.Module]]:
    default_exclude = first_and_last(model, PRUNABLE) if cfg.keep_first_last else []
    layers = cfg.scope.resolve(model, PRUNABLE, default_exclude=default_exclude)
    names = {n for n, _ in layers}
    for name in cfg.layer_sparsity:
        if name not in names:
            from ..core.errors import ScopeError
            raise ScopeError(f"layer_sparsity names {name!r}, which is not a selected prunable layer",
                             hint=f"selected layers: {', '.join(sorted(names))}")
    return layers


def _score(w: torch.Tensor, norm: str) -> torch.Tensor:
    return w.detach().abs() if norm == "l1" else w.detach().pow(2)


def _mask_smallest(scores: torch.Tensor, k: int) -> torch.Tensor:
    """0/1 mask (flat) removing exactly the ``k`` smallest scores."""
    mask = torch.ones_like(scores)
    if k > 0:
        idx = torch.topk(scores, k, largest=False, sorted=False).indices
        mask[idx] = 0
    return mask


@torch.no_grad()
def prune_to(layers: list[tuple[str, nn.Module]], cfg: MagnitudePruning, sparsity: float) -> dict[str, float]:
    """Mask ``layers`` to ``sparsity`` (scaled per-layer overrides); returns per-layer sparsity."""
    scale = sparsity / cfg.sparsity if cfg.sparsity > 0 else 0.0
    overrides = {n: s * scale for n, s in cfg.layer_sparsity.items()}
    glob = [(n, m) for n, m in layers if n not in overrides]
    if cfg.ranking == "global" and glob:
        scores = torch.cat([_score(m.weight, cfg.norm).reshape(-1) for _, m in glob])
        # Previously pruned weights score 0, so they stay pruned as the target grows.
        flat = _mask_smallest(scores, int(round(sparsity * scores.numel())))
        offset = 0
        for _, m in glob:
            n = m.weight.numel()
            set_mask(m, "weight", flat[offset:offset + n].reshape(m.weight.shape))
            offset += n
    else:
        overrides.update({n: sparsity for n, _ in glob})
    for n, m in layers:
        if n in overrides:
            s = _score(m.weight, cfg.norm).reshape(-1)
            set_mask(m, "weight", _mask_smallest(s, int(round(overrides[n] * s.numel()))).reshape(m.weight.shape))
    return {n: float((m.weight == 0).float().mean()) for n, m in layers}


class _ScheduleCallback:
    def __init__(self, layers, cfg, schedule):
        self.layers, self.cfg, self.schedule = layers, cfg, schedule
        self.history: list[tuple[int, float]] = []

    def on_step_begin(self, step: int, model: nn.Module) -> None:
        target = self.schedule.sparsity_at(step, self.cfg.sparsity)
        if target is not None:
            prune_to(self.layers, self.cfg, target)
            self.history.append((step, target))


@register_method("prune.magnitude", MagnitudePruning, needs_training=False,
                 layer_types=PRUNABLE)
def magnitude_prune(model: nn.Module, cfg: MagnitudePruning, ctx: MethodContext) -> nn.Module:
    """Unstructured magnitude pruning (L1/L2, global or per layer), one-shot or scheduled."""
    layers = select_layers(model, cfg)
    if isinstance(cfg.schedule, OneShot) or ctx.train is None or ctx.data is None:
        ctx.info["layer_sparsity"] = prune_to(layers, cfg, cfg.sparsity)
        return model
    data = as_data(ctx.data, batch_size=ctx.train.batch_size, shuffle=True)
    schedule = cfg.schedule.resolve(total_steps(data, ctx.train))
    cb = _ScheduleCallback(layers, cfg, schedule)
    fit(model, data, ctx.train, loss_fn=ctx.loss_fn, callbacks=[cb], description="prune + fine-tune")
    # The schedule may end after the training does (e.g. a short run): make the target exact.
    ctx.info["layer_sparsity"] = prune_to(layers, cfg, cfg.sparsity)
    ctx.info["schedule"] = cb.history
    ctx.trained = True
    return model
