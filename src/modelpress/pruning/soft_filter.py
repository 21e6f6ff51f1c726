"""Soft filter pruning (``prune.soft_filter``; He et al., IJCAI 2018).

During training, every ``frequency`` steps (default: once per epoch) the ``ratio`` of
filters with the smallest L2 norm in each selected conv is set to zero, but *not*
masked: the zeroed filters keep receiving gradients and may grow back, and the next
round may pick other filters. After training the weakest filters are zeroed once more
and masked (the hard cut), so further fine-tuning keeps them at zero.

The hard cut zeroes only the filter weights (a bias, when present, stays, so the model
computes exactly what it was trained to). The filters stay in the tensor; removing them
physically, with the next layer's input channels, is structured pruning
(``prune.channels``).

Without training (no ``train=`` / ``inputs.train``) only the hard cut happens, i.e. one-shot
L2 filter pruning.

    >>> import torch
    >>> from torch import nn
    >>> from modelpress import prune, TrainConfig
    >>> from modelpress.pruning.soft_filter import SoftFilterPruning
    >>> m = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Conv2d(4, 8, 3), nn.ReLU(),
    ...                   nn.Flatten(), nn.Linear(8 * 4 * 4, 3))
    >>> x = torch.randn(32, 1, 8, 8); batches = [(x, torch.randint(0, 3, (32,)))] * 4
    >>> p = prune(m, SoftFilterPruning(ratio=0.25, frequency=2), batches, train=TrainConfig(epochs=1))
    >>> int((p[2].weight.flatten(1).abs().sum(1) == 0).sum())  # 2 of 8 filters cut
    2
"""
from __future__ import annotations

import torch
from pydantic import Field
from torch import nn

from ..core.config import MethodConfig
from ..core.masks import set_mask
from ..core.scope import Scope, first_and_last
from ..engine import MethodInputs, MethodResult, register_method
from .magnitude import PRUNABLE

Layers = list[tuple[str, nn.Module]]


class SoftFilterPruning(MethodConfig):
    """Zero the weakest conv filters during training without masking them; hard cut at the end."""

    ratio: float = Field(0.3, gt=0, lt=1, description="fraction of filters zeroed in each conv")
    frequency: int | None = Field(None, ge=1, description="steps between soft zeroings; None = once per epoch")
    scope: Scope = Scope()
    keep_first_last: bool = Field(True, description="leave the first conv dense")


def filter_norms(weight: torch.Tensor) -> torch.Tensor:
    """L2 norm of each output filter."""
    return weight.detach().flatten(1).norm(dim=1)


def weakest_filters(weight: torch.Tensor, ratio: float) -> list[int]:
    """Indices of the ``round(ratio * filters)`` filters with the smallest L2 norm, sorted."""
    k = int(round(ratio * weight.shape[0]))
    if k == 0:
        return []
    return sorted(torch.topk(filter_norms(weight), k, largest=False).indices.tolist())


@torch.no_grad()
def zero_weakest_filters(layers: Layers, ratio: float) -> dict[str, list[int]]:
    """The soft step: zero the weakest filters of each layer (no mask). Returns the indices."""
    zeroed = {}
    for name, mod in layers:
        idx = weakest_filters(mod.weight, ratio)
        mod.weight[idx] = 0
        zeroed[name] = idx
    return zeroed


@torch.no_grad()
def cut_weakest_filters(layers: Layers, ratio: float) -> dict[str, list[int]]:
    """The hard cut: zero and mask the weakest filters of each layer. Returns the indices."""
    cut = {}
    for name, mod in layers:
        idx = weakest_filters(mod.weight, ratio)
        mask = torch.ones_like(mod.weight)
        mask[idx] = 0
        set_mask(mod, "weight", mask)
        cut[name] = idx
    return cut


class SoftFilterCallback:
    """Training callback zeroing the weakest filters after every ``frequency``-th step."""

    def __init__(self, layers: Layers, ratio: float, frequency: int):
        self.layers, self.ratio, self.frequency = layers, ratio, frequency
        self.history: list[tuple[int, dict[str, list[int]]]] = []

    def on_step_end(self, step: int, model: nn.Module) -> None:
        if (step + 1) % self.frequency == 0:
            self.history.append((step, zero_weakest_filters(self.layers, self.ratio)))


def select_convs(model: nn.Module, cfg: SoftFilterPruning) -> Layers:
    default_exclude = first_and_last(model, PRUNABLE) if cfg.keep_first_last else []
    return cfg.scope.resolve(model, ("Conv2d",), default_exclude=default_exclude)


@register_method("prune.soft_filter", SoftFilterPruning, needs_training=True, layer_types=("Conv2d",))
def soft_filter_prune(model: nn.Module, cfg: SoftFilterPruning, inputs: MethodInputs) -> MethodResult:
    """Soft filter pruning: zeroed filters keep training and may recover; masked hard cut at the end."""
    layers = select_convs(model, cfg)
    history: list = []
    if inputs.can_train:
        cb = SoftFilterCallback(layers, cfg.ratio, cfg.frequency or max(1, len(inputs.training_data())))
        inputs.fit(model, "soft filter pruning", callbacks=[cb])
        history = cb.history
    else:
        inputs.log("prune.soft_filter: no training given, so only the final hard cut is applied")
    cut = cut_weakest_filters(layers, cfg.ratio)
    # Filters zeroed in some soft round that the final cut spared: they came back.
    revived = {n: sorted({i for _, z in history for i in z[n]} - set(cut[n])) for n in cut}
    return MethodResult(model, {"filters_cut": cut, "revived": revived, "soft_rounds": len(history)},
                        trained=inputs.can_train)
