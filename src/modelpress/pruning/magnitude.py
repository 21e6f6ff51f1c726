"""Unstructured pruning by weight score, global or per layer, with schedules (``prune.magnitude``).

This module holds what every unstructured criterion shares: the config fields
(:class:`UnstructuredPruning`), layer selection, the global / per-layer ranking with
per-layer overrides, and the schedule callback. A criterion only supplies a *scorer*
(``layers -> {name: score tensor}``, low score = pruned first); magnitude lives here,
random / Taylor / SNIP in :mod:`.criteria`.

Magnitude pruning zeroes the weights with the smallest ``|w|`` (``norm="l1"``) or ``w**2``
(``"l2"``; any ``|w|**p`` gives the same order per weight, so L1, L2 and Ln agree here and
the choice only matters for the structured criteria). ``ranking="global"`` compares weights
across all selected layers (one threshold, Han et al.'s Deep Compression); ``"layer"``
prunes each layer to the target. The number of pruned weights is exact:
``round(sparsity * n)``.

Layers are ``Linear`` (GPT-2's ``Conv1D`` included), ``Conv1d``/``Conv2d`` and the recurrent
``LSTM``/``GRU``/``RNN``: each weight matrix of a recurrent layer is ranked like a layer of its
own, named ``lstm.weight_ih_l0``, ``lstm.weight_hh_l0_reverse`` ... (in reports and in
``layer_sparsity``); biases are never pruned.

    >>> import torch
    >>> from modelpress import prune
    >>> from modelpress.pruning.magnitude import MagnitudePruning
    >>> m = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU(), torch.nn.Linear(8, 8),
    ...                         torch.nn.ReLU(), torch.nn.Linear(8, 2))
    >>> pruned = prune(m, MagnitudePruning(sparsity=0.5))  # first and last layer stay dense
    >>> int((pruned[2].weight == 0).sum())
    32

Returns a pruned copy with masks attached (fine-tuning keeps the zeros, see
:mod:`modelpress.core.masks`); ``strip_masks`` makes the result a plain model.
"""
from __future__ import annotations

from typing import Callable, Literal

import torch
from pydantic import Field, field_validator
from torch import nn

from ..core.config import MethodConfig
from ..core.errors import ScopeError
from ..core.scope import Scope, first_and_last
from ..core.training import total_steps
from ..engine import MethodInputs, MethodResult, register_method
from ..nn.layer_kinds import RECURRENT, WeightRef, weight_refs
from .importance import magnitude_scores
from .schedules import OneShot, Schedule

PRUNABLE = ("Linear", "Conv2d", "Conv1d")
WEIGHT_PRUNABLE = (*PRUNABLE, *RECURRENT)  # what unstructured and N:M pruning mask, weight by weight

# (name, weight matrix): one per Linear/conv, one per weight matrix of a recurrent layer. A
# WeightRef reads like a layer (``ref.weight``), so a scorer written for layers scores it as is.
Layers = list[tuple[str, WeightRef]]
Scorer = Callable[[Layers], dict[str, torch.Tensor]]


class UnstructuredPruning(MethodConfig):
    """Fields shared by every unstructured criterion (not registered itself)."""

    sparsity: float = Field(0.5, ge=0, lt=1, description="fraction of weights set to zero")
    ranking: Literal["global", "layer"] = "global"
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


class MagnitudePruning(UnstructuredPruning):
    """Zero the smallest-magnitude weights to reach ``sparsity`` (fraction of weights removed)."""

    norm: Literal["l1", "l2"] = "l1"


def select_layers(model: nn.Module, cfg: UnstructuredPruning) -> Layers:
    """The weight matrices of the prunable layers in the config's scope (first/last left out unless
    included by name)."""
    default_exclude = first_and_last(model, WEIGHT_PRUNABLE) if cfg.keep_first_last else []
    layers = weight_refs(cfg.scope.resolve(model, WEIGHT_PRUNABLE, default_exclude=default_exclude))
    names = {n for n, _ in layers}
    for name in cfg.layer_sparsity:
        if name not in names:
            raise ScopeError(f"layer_sparsity names {name!r}, which is not a selected prunable layer",
                             hint=f"selected layers: {', '.join(sorted(names))}")
    return layers


def _mask_smallest(scores: torch.Tensor, k: int) -> torch.Tensor:
    """0/1 mask (flat) removing exactly the ``k`` smallest scores."""
    mask = torch.ones_like(scores)
    if k > 0:
        idx = torch.topk(scores, k, largest=False, sorted=False).indices
        mask[idx] = 0
    return mask


def _with_pruned_lowest(ref: WeightRef, score: torch.Tensor) -> torch.Tensor:
    # Weights already masked rank below everything, so a growing target (schedules,
    # iterative steps) never revives them, even when a criterion scores other weights 0 too.
    mask = ref.mask()
    score = score.detach().float()
    return score if mask is None else score.masked_fill(mask == 0, float("-inf"))


@torch.no_grad()
def prune_to(layers: Layers, cfg: UnstructuredPruning, sparsity: float,
             scores: dict[str, torch.Tensor] | None = None) -> dict[str, float]:
    """Mask ``layers`` to ``sparsity`` by ``scores`` (default: magnitude); returns per-layer sparsity.

    Per-layer overrides are scaled by ``sparsity / cfg.sparsity`` so a schedule ramps them too.
    """
    if scores is None:
        scores = magnitude_scores(layers, getattr(cfg, "norm", "l1"))
    scores = {n: _with_pruned_lowest(m, scores[n]) for n, m in layers}
    scale = sparsity / cfg.sparsity if cfg.sparsity > 0 else 0.0
    overrides = {n: s * scale for n, s in cfg.layer_sparsity.items()}
    glob = [(n, m) for n, m in layers if n not in overrides]
    if cfg.ranking == "global" and glob:
        flat_scores = torch.cat([scores[n].reshape(-1) for n, _ in glob])
        flat = _mask_smallest(flat_scores, int(round(sparsity * flat_scores.numel())))
        offset = 0
        for _, m in glob:
            n = m.weight.numel()
            m.set_mask(flat[offset:offset + n].reshape(m.weight.shape))
            offset += n
    else:
        overrides.update({n: sparsity for n, _ in glob})
    for n, m in layers:
        if n in overrides:
            s = scores[n].reshape(-1)
            m.set_mask(_mask_smallest(s, int(round(overrides[n] * s.numel()))).reshape(m.weight.shape))
    return {n: float((m.weight == 0).float().mean()) for n, m in layers}


class _ScheduleCallback:
    """Re-prunes to the schedule's sparsity at the steps the schedule names (before the step)."""

    def __init__(self, layers: Layers, cfg: UnstructuredPruning, schedule, scorer: Scorer | None = None):
        self.layers, self.cfg, self.schedule = layers, cfg, schedule
        self.scorer = scorer or (lambda ls: magnitude_scores(ls, getattr(cfg, "norm", "l1")))
        self.history: list[tuple[int, float]] = []

    def on_step_begin(self, step: int, model: nn.Module) -> None:
        target = self.schedule.sparsity_at(step, self.cfg.sparsity)
        if target is not None:
            prune_to(self.layers, self.cfg, target, self.scorer(self.layers))
            self.history.append((step, target))


def run_unstructured(model: nn.Module, cfg: UnstructuredPruning, inputs: MethodInputs, scorer: Scorer) -> MethodResult:
    """Prune ``model`` in place by ``scorer``: one-shot, or along the schedule while fine-tuning.

    The schedule runs only when the caller gave training (``inputs.train`` and ``inputs.data``);
    otherwise the target is applied at once and the engine fine-tunes afterwards.
    """
    layers = select_layers(model, cfg)
    if isinstance(cfg.schedule, OneShot) or not inputs.can_train:
        return MethodResult(model, {"layer_sparsity": prune_to(layers, cfg, cfg.sparsity, scorer(layers))})
    schedule = cfg.schedule.resolve(total_steps(inputs.training_data(), inputs.train))
    cb = _ScheduleCallback(layers, cfg, schedule, scorer)
    inputs.fit(model, "prune + fine-tune", callbacks=[cb])
    # The schedule may end after the training does (e.g. a short run): make the target exact.
    info = {"layer_sparsity": prune_to(layers, cfg, cfg.sparsity, scorer(layers)), "schedule": cb.history}
    return MethodResult(model, info, trained=True)


@register_method("prune.magnitude", MagnitudePruning, layer_types=WEIGHT_PRUNABLE)
def magnitude_prune(model: nn.Module, cfg: MagnitudePruning, inputs: MethodInputs) -> MethodResult:
    """Unstructured magnitude pruning (L1/L2, global or per layer), one-shot or scheduled."""
    return run_unstructured(model, cfg, inputs, lambda layers: magnitude_scores(layers, cfg.norm))
