"""Importance: the one scoring interface of every pruning method (scoring only, never removal).

A criterion is an :class:`Importance` registered under its name. It scores what a pruning
method removes, with low scores removed first:

* :meth:`Importance.weights`: one score per weight of each layer (unstructured and N:M
  pruning, iterative pruning);
* :meth:`Importance.channels`: one score per channel of each
  :class:`~modelpress.graph.Group` of coupled parameters (structured pruning).

============  =======  ========  =====================================================================
criterion     weights  channels  score
============  =======  ========  =====================================================================
``l1``        yes      yes       ``|w|``; per channel the L1 norm of everything the channel owns in each
                                 member of the group (filter, BatchNorm scale, input columns of the next
                                 layers), each member's scores divided by their mean, averaged over members
``l2``        yes      yes       ``w**2``; per channel the L2 norm, normalised like ``l1``
``random``    yes      yes       seeded uniform noise: the baseline every criterion must beat
``taylor``    yes      yes       first-order Taylor estimate of the loss change when removed
                                 (Molchanov et al. 2017/2019): ``sum_b |w * dL_b/dw|`` per weight,
                                 ``|sum(w * dL/dw)|`` per channel summed over batches, normalised per
                                 member like ``l1``. Needs data with a loss
``snip``      yes      no        SNIP connection sensitivity ``|w * sum_b dL_b/dw|`` (Lee et al. 2019),
                                 meant for a fresh init. Needs data with a loss
``bn_scale``  no       yes       ``|gamma|`` of the group's BatchNorms (network slimming, Liu et al. 2017),
                                 not normalised; a group without BatchNorm falls back to ``l1``
============  =======  ========  =====================================================================

Gradients come from :func:`gradient_batches` (eval mode: no dropout noise, BatchNorm statistics
untouched; ``.grad`` is never touched, so scoring can run inside a training loop).

    >>> import torch
    >>> from torch import nn
    >>> from modelpress.graph import build_channel_graph
    >>> model = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))
    >>> with torch.no_grad():
    ...     model[0].weight[1] = 0  # neuron 1 has no incoming weights
    >>> group = build_channel_graph(model, torch.zeros(2, 4)).groups[0]
    >>> int(get_importance("l1").channels([group], ScoringInputs())[0].argmin())
    1
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, ClassVar, Iterator, Sequence

import torch
from torch import nn

from ..core.data import as_data, check_finite, split_batch
from ..core.errors import ConfigError, DataError, UnsupportedError
from ..core.registry import Registry
from ..core.training import classification_loss
from ..graph.groups import Group, Member
from ..graph.surgery import axis_grad_rows, axis_rows, has_rows

Layers = list[tuple[str, nn.Module]]


@dataclass(frozen=True)
class ScoringInputs:
    """What a criterion may use: the model and data with a loss (gradient criteria), the number
    of batches to accumulate over, and the seed of the random criterion."""

    model: nn.Module | None = None
    data: Any = None
    loss_fn: Callable | None = None
    batches: int = 8
    seed: int = 0


class Importance:
    """A pruning criterion (see the module docstring). Subclasses override what they support."""

    name: ClassVar[str] = ""
    needs_data: ClassVar[bool] = False

    def weights(self, layers: Layers, inputs: ScoringInputs) -> dict[str, torch.Tensor]:
        """``{layer name: score per weight}`` (the weight's shape)."""
        raise UnsupportedError(f"importance {self.name!r} has no per-weight scores",
                               hint=f"use one of {', '.join(weight_criteria())}")

    def channels(self, groups: Sequence[Group], inputs: ScoringInputs) -> list[torch.Tensor]:
        """One float score per channel of each group (higher = keep)."""
        raise UnsupportedError(f"importance {self.name!r} has no per-channel scores",
                               hint=f"use one of {', '.join(channel_criteria())}")

    @classmethod
    def scores_weights(cls) -> bool:
        return cls.weights is not Importance.weights

    @classmethod
    def scores_channels(cls) -> bool:
        return cls.channels is not Importance.channels


IMPORTANCE: Registry[Importance] = Registry("importance criterion")


def register_importance(cls: type[Importance]) -> type[Importance]:
    IMPORTANCE.register(cls.name, cls())
    return cls


def get_importance(name: str) -> Importance:
    return IMPORTANCE.get(name)


def weight_criteria() -> list[str]:
    """Criteria that score single weights (unstructured pruning)."""
    return [n for n, c in IMPORTANCE.items() if c.scores_weights()]


def channel_criteria() -> list[str]:
    """Criteria that score channels of groups (structured pruning)."""
    return [n for n, c in IMPORTANCE.items() if c.scores_channels()]


def check_criterion(name: str, kind: str) -> str:
    """A config validator: ``name`` must be a criterion of ``kind`` ("weights" or "channels")."""
    allowed = weight_criteria() if kind == "weights" else channel_criteria()
    if name not in allowed:
        raise ValueError(f"unknown importance {name!r}; expected one of {', '.join(allowed)}")
    return name


# -- gradients --------------------------------------------------------------------------------
def gradient_batches(model: nn.Module, params: Sequence[torch.Tensor], data: Any, loss_fn: Callable | None,
                     batches: int, what: str = "gradient-based importance") -> Iterator[list[torch.Tensor]]:
    """Yield, per batch (up to ``batches``), the gradient of the loss w.r.t. each of ``params``
    (zeros where a parameter is unused). ``loss_fn(model, inputs, target)`` defaults to
    cross-entropy on labelled batches. Eval mode; the training flag and ``requires_grad`` are
    restored after, ``.grad`` is never touched."""
    data = as_data(data)
    if data is None:
        raise DataError(f"{what} needs data (a few batches with a loss)",
                        hint="pass data=..., or use importance='l1'")
    default_loss = loss_fn is None
    loss_fn = loss_fn or classification_loss
    was_training = model.training
    flags = [p.requires_grad for p in params]
    model.eval()
    try:
        for p in params:
            p.requires_grad_(True)
        for i, batch in enumerate(data):
            if i >= batches:
                break
            inputs, target = split_batch(batch)
            if target is None and default_loss:
                raise DataError(f"{what} needs a loss: labelled (inputs, target) batches or a loss_fn",
                                hint="pass loss_fn=..., labelled data, or use importance='l1'")
            check_finite(inputs, "pruning-criterion data")
            with torch.enable_grad():
                grads = torch.autograd.grad(loss_fn(model, inputs, target), list(params), allow_unused=True)
            yield [torch.zeros_like(p) if g is None else g for p, g in zip(params, grads)]
    finally:
        for p, f in zip(params, flags):
            p.requires_grad_(f)
        model.train(was_training)


def _need_model(inputs: ScoringInputs, name: str) -> nn.Module:
    if inputs.model is None:
        raise ConfigError(f"importance {name!r} needs the model", hint="pass ScoringInputs(model=...)")
    return inputs.model


# -- per-channel helpers ------------------------------------------------------------------------
def _per_channel(member: Member, per_position: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Sum per-position values into the group's channels: ``(scores[n], covered[n] bool)``."""
    pos, chan = [], []
    for c, positions in enumerate(member.positions):
        pos += positions
        chan += [c] * len(positions)
    scores = torch.zeros(n, dtype=torch.float64)
    covered = torch.zeros(n, dtype=torch.bool)
    if pos:
        scores.index_add_(0, torch.tensor(chan), per_position.double()[torch.tensor(pos)])
        covered[torch.tensor(chan)] = True
    return scores, covered


def normalised_mean(parts: list[tuple[torch.Tensor, torch.Tensor]], n: int) -> torch.Tensor:
    """Mean over members of each member's scores divided by its mean over covered channels."""
    total = torch.zeros(n, dtype=torch.float64)
    count = torch.zeros(n, dtype=torch.float64)
    for scores, covered in parts:
        mean = scores[covered].mean() if covered.any() else scores.new_tensor(0.0)
        total += torch.where(covered, scores / mean if mean > 0 else scores, torch.zeros_like(scores))
        count += covered.double()
    return (total / count.clamp(min=1)).float()


def _group_magnitude(group: Group, p: int) -> torch.Tensor:
    n = len(group)
    parts = []
    for m in group.members:
        if not has_rows(m.kind):
            continue
        rows = axis_rows(m.module, m.kind)
        per_pos = rows.abs().sum(1) if p == 1 else rows.pow(2).sum(1)
        scores, covered = _per_channel(m, per_pos, n)
        parts.append((scores if p == 1 else scores.sqrt(), covered))
    return normalised_mean(parts, n)


# -- the criteria -------------------------------------------------------------------------------
@register_importance
class L1(Importance):
    name = "l1"
    power: ClassVar[int] = 1

    def weights(self, layers, inputs):
        return magnitude_scores(layers, self.name)

    def channels(self, groups, inputs):
        return [_group_magnitude(g, self.power) for g in groups]


@register_importance
class L2(L1):
    name = "l2"
    power = 2


@register_importance
class Random(Importance):
    name = "random"

    def weights(self, layers, inputs):
        return random_scores(layers, inputs.seed)

    def channels(self, groups, inputs):
        return [torch.rand(len(g), generator=torch.Generator().manual_seed(inputs.seed + i))
                for i, g in enumerate(groups)]


@register_importance
class Taylor(Importance):
    name = "taylor"
    needs_data = True

    def weights(self, layers, inputs):
        return taylor_scores(_need_model(inputs, self.name), layers, inputs.data, loss_fn=inputs.loss_fn,
                             batches=inputs.batches)

    def channels(self, groups, inputs):
        model = _need_model(inputs, self.name)
        members = [g.members for g in groups]
        modules = list(dict.fromkeys(m.module for ms in members for m in ms if getattr(m.module, "weight", None)
                                     is not None))
        where = {id(mod): i for i, mod in enumerate(modules)}
        acc = [[torch.zeros(len(g), dtype=torch.float64) for _ in ms] for g, ms in zip(groups, members)]
        covered = [[_per_channel(m, torch.zeros(len(m.axis.positions)), len(g))[1] for m in ms]
                   for g, ms in zip(groups, members)]
        for grads in gradient_batches(model, [mod.weight for mod in modules], inputs.data, inputs.loss_fn,
                                      inputs.batches, "taylor importance"):
            for gi, (g, ms) in enumerate(zip(groups, members)):
                for mi, m in enumerate(ms):
                    if id(m.module) not in where or m.kind.startswith("param:") or not has_rows(m.kind):
                        continue  # gradients are of module.weight, not of a parameter axis
                    wg = axis_grad_rows(m.module, m.kind, grads[where[id(m.module)]])
                    acc[gi][mi] += _per_channel(m, wg.sum(1), len(g))[0].abs()
        return [normalised_mean(list(zip(a, c)), len(g)) for g, a, c in zip(groups, acc, covered)]


@register_importance
class SNIP(Importance):
    name = "snip"
    needs_data = True

    def weights(self, layers, inputs):
        return snip_scores(_need_model(inputs, self.name), layers, inputs.data, loss_fn=inputs.loss_fn,
                           batches=inputs.batches)


@register_importance
class BNScale(Importance):
    name = "bn_scale"

    def channels(self, groups, inputs):
        out = []
        for g in groups:
            n = len(g)
            parts = [_per_channel(m, axis_rows(m.module, m.kind).abs().reshape(-1), n)
                     for m in g.members if m.kind == "norm"]
            if not parts:
                out.append(_group_magnitude(g, 1))
                continue
            total = sum(s for s, _ in parts)
            count = sum(c.double() for _, c in parts)
            out.append((total / count.clamp(min=1)).float())
        return out


# -- per-weight scores (what the criteria above compute) ---------------------------------------
def magnitude_scores(layers: Layers, norm: str = "l1") -> dict[str, torch.Tensor]:
    """``|w|`` (``l1``) or ``w**2`` (``l2``) per weight of each layer."""
    return {n: (m.weight.detach().abs() if norm == "l1" else m.weight.detach().pow(2)) for n, m in layers}


def random_scores(layers: Layers, seed: int = 0) -> dict[str, torch.Tensor]:
    """Uniform random scores; the same seed gives the same scores (so schedules prune nested sets)."""
    g = torch.Generator().manual_seed(seed)
    return {n: torch.rand(m.weight.shape, generator=g).to(m.weight.device) for n, m in layers}


def taylor_scores(model: nn.Module, layers: Layers, data: Any, *, loss_fn: Callable | None = None,
                  batches: int = 8) -> dict[str, torch.Tensor]:
    """``sum_b |w * dL_b/dw|`` over up to ``batches`` batches of ``data``."""
    weights = [m.weight for _, m in layers]
    acc = [torch.zeros_like(w, dtype=torch.float32) for w in weights]
    for grads in gradient_batches(model, weights, data, loss_fn, batches, "taylor importance"):
        for a, w, g in zip(acc, weights, grads):
            a += (w.detach() * g).abs().float()
    return {n: a for (n, _), a in zip(layers, acc)}


def snip_scores(model: nn.Module, layers: Layers, data: Any, *, loss_fn: Callable | None = None,
                batches: int = 1) -> dict[str, torch.Tensor]:
    """``|w * sum_b dL_b/dw|`` over up to ``batches`` batches (normalised to sum 1, as in SNIP)."""
    weights = [m.weight for _, m in layers]
    total = [torch.zeros_like(w, dtype=torch.float32) for w in weights]
    for grads in gradient_batches(model, weights, data, loss_fn, batches, "snip importance"):
        for t, g in zip(total, grads):
            t += g.float()
    scores = [(w.detach().float() * t).abs() for w, t in zip(weights, total)]
    norm = sum(float(s.sum()) for s in scores) or 1.0  # one normaliser: ranking unchanged, values comparable
    return {n: s / norm for (n, _), s in zip(layers, scores)}


def channel_importance(groups: Sequence[Group], criterion: str, *, model: nn.Module | None = None,
                       data: Any = None, loss_fn: Callable | None = None, batches: int = 4,
                       seed: int = 0) -> list[torch.Tensor]:
    """Scores (one float per channel, higher = keep) of each group under ``criterion``."""
    check_criterion(criterion, "channels")
    return get_importance(criterion).channels(groups, ScoringInputs(model, data, loss_fn, batches, seed))


def weight_importance(criterion: str, model: nn.Module, layers: Layers, *, data: Any = None,
                      loss_fn: Callable | None = None, batches: int = 8, seed: int = 0) -> dict[str, torch.Tensor]:
    """Scores (one per weight, low = pruned first) of ``layers`` under ``criterion``."""
    try:
        check_criterion(criterion, "weights")
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    return get_importance(criterion).weights(layers, ScoringInputs(model, data, loss_fn, batches, seed))
