"""Online distillation: deep mutual learning (Zhang et al. 2018), ``distill.mutual``.

Two students learn together, with no pre-trained teacher: each minimises its own
cross-entropy plus ``weight * T**2 * KL(p_other || p_self)`` on softened outputs, where the
other's probabilities are treated as constants (each network teaches the other). Both are
updated by one optimizer in the same steps. The peer defaults to a copy of the student with
fresh random weights (re-initialised with the seed), or is given as a model reference /
module.

    >>> import torch
    >>> from torch import nn
    >>> from modelpress.core.training import TrainConfig
    >>> a = nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, 3))
    >>> x, y = torch.randn(64, 4), torch.randint(0, 3, (64,))
    >>> s, peer = mutual_learning(a, None, [(x, y)], MutualLearning(), TrainConfig(epochs=3, lr=1e-2))
    >>> s(x).shape == peer(x).shape == (64, 3)
    True

Returns the trained student (a copy unless ``inplace=True``); the peer is in the report's
``info["peer"]`` (:func:`~modelpress.engine.run_method`).
"""
from __future__ import annotations

import copy
from typing import Any

import torch
from pydantic import Field
from torch import nn

from ..core.config import MethodConfig
from ..core.data import as_data, call_model
from ..core.errors import DataError
from ..core.training import TrainConfig, class_cross_entropy, fit
from ..engine import MethodInputs, MethodResult, register_method
from .losses import kd_loss


class MutualLearning(MethodConfig):
    """Two students teach each other (deep mutual learning): CE + KL to the other's predictions."""

    peer: str | None = Field(None, description="model reference of the second student; default: the student "
                                               "architecture with fresh weights")
    T: float = Field(1.0, gt=0, description="softmax temperature of the mutual KL terms")
    weight: float = Field(1.0, ge=0, description="weight of each KL term next to the cross-entropy")
    seed: int = Field(1, description="seed of the peer's fresh initialisation")


class _Pair(nn.Module):
    def __init__(self, a: nn.Module, b: nn.Module):
        super().__init__()
        self.a, self.b = a, b

    def forward(self, *args, **kwargs):  # what evaluation sees: the student's predictions
        return self.a(*args, **kwargs)


def fresh_copy(model: nn.Module, seed: int) -> nn.Module:
    """Same architecture, weights re-initialised by each layer's own ``reset_parameters``.

    The draw uses its own RNG stream (the caller's global RNG is left as it was); if it
    happens to reproduce the student's weights (same seed as the student's own init), the
    next seed is used, since two identical students teach each other nothing."""
    first = next((p for p in model.parameters()), None)
    for attempt in range(4):
        peer = copy.deepcopy(model)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed + 7919 * attempt)
            for m in peer.modules():
                if hasattr(m, "reset_parameters"):
                    m.reset_parameters()
        if first is None or not torch.equal(next(peer.parameters()), first):
            return peer
    return peer


def mutual_loss(pair: _Pair, inputs: Any, target: torch.Tensor | None, T: float, weight: float) -> torch.Tensor:
    if target is None:
        raise DataError("distill.mutual needs labelled batches (inputs, target)",
                        hint="both students learn from the labels and from each other")
    a, b = call_model(pair.a, inputs), call_model(pair.b, inputs)
    if a.shape != b.shape:
        raise DataError(f"distill.mutual: the students' outputs differ in shape ({tuple(a.shape)} vs {tuple(b.shape)})",
                        hint="both must predict the same classes")
    ce = class_cross_entropy(a, target, "distill.mutual") + class_cross_entropy(b, target, "distill.mutual")
    return ce + weight * (kd_loss(a, b.detach(), T) + kd_loss(b, a.detach(), T))


def mutual_learning(student: nn.Module, peer: nn.Module | None, data: Any, cfg: MutualLearning,
                    train: TrainConfig, evaluation=None) -> tuple[nn.Module, nn.Module]:
    """Train ``student`` and ``peer`` (fresh copy if None) together, in place; returns both."""
    peer = peer if peer is not None else fresh_copy(student, cfg.seed)
    pair = _Pair(student, peer)
    fit(pair, as_data(data), train, loss_fn=lambda m, x, y: mutual_loss(m, x, y, cfg.T, cfg.weight),
        description="mutual learning", evaluation=evaluation)
    return student.eval(), peer.eval()


@register_method("distill.mutual", MutualLearning, needs_data=True, needs_training=True,
                 layer_types=())
def deep_mutual_learning(student: nn.Module, cfg: MutualLearning, inputs: MethodInputs) -> MethodResult:
    """Online distillation: the student and a peer train together, each matching the other's predictions."""
    peer = inputs.resolve_model(cfg.peer, "MutualLearning.peer") if cfg.peer else None
    student, peer = mutual_learning(student, peer, inputs.data, cfg, inputs.train or TrainConfig(),
                                    inputs.evaluation)
    return MethodResult(student, {"peer": peer}, trained=True)
