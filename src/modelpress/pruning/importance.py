"""Channel importance criteria for structured pruning: scoring only, never removal.

Every criterion maps a :class:`~modelpress.graph.Group` to one score per channel (higher
= more important); :mod:`.structured` decides what to cut from the scores.

* ``l1`` / ``l2``: the L1 norm / L2 norm of everything a channel owns in each member of the
  group (its filter, its BatchNorm scale, its input columns in the next layers). Each
  member's scores are divided by their mean, so a wide Linear after a flatten does not
  outvote the conv, and the group score is the mean over the members that hold the channel.
* ``bn_scale``: ``|gamma|`` of the group's BatchNorm layers (network slimming, Liu et al.
  2017), not normalised, so it compares across layers as the paper does; a group without
  BatchNorm falls back to ``l1``.
* ``taylor``: first-order Taylor estimate of the loss change when a channel is removed,
  ``|sum(w * dL/dw)|`` over the channel's parameters (Molchanov et al. 2019), averaged over a
  few batches, normalised per member like ``l1``. Needs data with a loss.
* ``random``: a seeded baseline.

    >>> import torch
    >>> from torch import nn
    >>> from modelpress.graph import build_channel_graph
    >>> model = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))
    >>> with torch.no_grad():
    ...     model[0].weight[1] = 0  # neuron 1 has no incoming weights
    >>> group = build_channel_graph(model, torch.zeros(2, 4)).groups[0]
    >>> int(channel_importance([group], "l1")[0].argmin())
    1
"""
from __future__ import annotations

from typing import Any, Callable, Iterator, Sequence

import torch
from torch import nn

from ..core.data import as_data, split_batch
from ..core.errors import DataError
from ..core.training import classification_loss
from ..graph.groups import Group, Member
from ..graph.surgery import axis_grad_rows, axis_rows

CRITERIA = ("l1", "l2", "bn_scale", "taylor", "random")


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


def magnitude_scores(group: Group, p: int = 1) -> torch.Tensor:
    """``l1`` (p=1) or ``l2`` (p=2) group importance (see the module docstring)."""
    n = len(group)
    parts = []
    for m in group.members:
        rows = axis_rows(m.module, m.kind)
        per_pos = rows.abs().sum(1) if p == 1 else rows.pow(2).sum(1)
        scores, covered = _per_channel(m, per_pos, n)
        parts.append((scores if p == 1 else scores.sqrt(), covered))
    return normalised_mean(parts, n)


def bn_scale_scores(group: Group) -> torch.Tensor | None:
    """Mean ``|gamma|`` over the group's BatchNorms; None when the group has none."""
    n = len(group)
    parts = [_per_channel(m, axis_rows(m.module, m.kind).abs().reshape(-1), n)
             for m in group.members if m.kind == "norm"]
    if not parts:
        return None
    total = sum(s for s, _ in parts)
    count = sum(c.double() for _, c in parts)
    return (total / count.clamp(min=1)).float()


def backward_batches(model: nn.Module, data: Any, loss_fn: Callable | None, batches: int) -> Iterator[None]:
    """Yield after each of ``batches`` backward passes (gradients are in ``param.grad``).

    ``loss_fn(model, inputs, target)`` defaults to cross-entropy on labelled batches. The
    model runs in eval mode (BatchNorm statistics stay put); gradients are cleared and the
    training flag restored afterwards.
    """
    data = as_data(data)
    if data is None:
        raise DataError("taylor importance needs data (a few batches with a loss)",
                        hint="pass data=..., or use importance='l1'")
    loss_fn = loss_fn or classification_loss
    was_training = model.training
    model.eval()
    try:
        for i, batch in enumerate(data):
            if i >= batches:
                break
            inputs, target = split_batch(batch)
            if target is None and loss_fn is classification_loss:
                raise DataError("taylor importance needs a loss: labelled (inputs, target) batches or a loss_fn",
                                hint="pass loss_fn=..., labelled data, or use importance='l1'")
            model.zero_grad(set_to_none=True)
            with torch.enable_grad():
                loss_fn(model, inputs, target).backward()
            yield
    finally:
        model.zero_grad(set_to_none=True)
        model.train(was_training)


def taylor_scores(groups: Sequence[Group], model: nn.Module, data: Any, *, loss_fn: Callable | None = None,
                  batches: int = 4) -> list[torch.Tensor]:
    """First-order Taylor importance of every group from ``batches`` batches of ``data``
    (see :func:`backward_batches` for the loss)."""
    members = [g.members for g in groups]
    acc = [[torch.zeros(len(g), dtype=torch.float64) for _ in ms] for g, ms in zip(groups, members)]
    covered = [[_per_channel(m, torch.zeros(len(m.axis.positions)), len(g))[1] for m in ms]
               for g, ms in zip(groups, members)]
    for _ in backward_batches(model, data, loss_fn, batches):
        for gi, (g, ms) in enumerate(zip(groups, members)):
            for mi, m in enumerate(ms):
                wg = axis_grad_rows(m.module, m.kind)
                if wg is not None:
                    acc[gi][mi] += _per_channel(m, wg.sum(1), len(g))[0].abs()
    return [normalised_mean(list(zip(a, c)), len(g)) for g, a, c in zip(groups, acc, covered)]


def channel_importance(groups: Sequence[Group], criterion: str, *, model: nn.Module | None = None,
                       data: Any = None, loss_fn: Callable | None = None, batches: int = 4,
                       seed: int = 0) -> list[torch.Tensor]:
    """Scores (one float per channel, higher = keep) of each group under ``criterion``."""
    if criterion not in CRITERIA:
        raise ValueError(f"unknown importance {criterion!r}; expected one of {CRITERIA}")
    if criterion == "taylor":
        if model is None:
            raise ValueError("taylor importance needs the model")
        return taylor_scores(groups, model, data, loss_fn=loss_fn, batches=batches)
    out = []
    for i, g in enumerate(groups):
        if criterion == "random":
            out.append(torch.rand(len(g), generator=torch.Generator().manual_seed(seed + i)))
        elif criterion == "bn_scale":
            s = bn_scale_scores(g)
            out.append(s if s is not None else magnitude_scores(g, 1))
        else:
            out.append(magnitude_scores(g, 1 if criterion == "l1" else 2))
    return out
