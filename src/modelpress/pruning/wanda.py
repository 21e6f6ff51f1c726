"""Wanda: pruning by weights and activations (``prune.wanda``), Sun et al. 2023.

Each weight is scored ``|W_ij| * ||X_j||``: its magnitude times the L2 norm of the input feature it
multiplies over the calibration inputs. Weights are compared within their output row (each row
keeps the same fraction) or within each N:M group, and the lowest go; the others are left as they
are (no weight update, unlike ``prune.sparsegpt``). One forward pass per group of layers that read
the same input, no retraining, no second-order statistics: fast, and on models whose inputs have
a few large features (transformers) far better than magnitude alone.

    >>> import torch
    >>> from modelpress import prune
    >>> from modelpress.pruning.wanda import Wanda
    >>> net = torch.nn.Sequential(torch.nn.Linear(32, 32), torch.nn.ReLU(), torch.nn.Linear(32, 32),
    ...                           torch.nn.ReLU(), torch.nn.Linear(32, 4))
    >>> sparse = prune(net, Wanda(sparsity=0.5), [torch.randn(16, 32) for _ in range(2)])
    >>> float((sparse[2].weight == 0).float().mean())   # first and last layer stay dense
    0.5

Shared fields, layers and N:M layout: :mod:`.calibrated`.
"""
from __future__ import annotations

import torch
from torch import nn

from ..engine import MethodInputs, MethodResult, register_method
from ..engine.layerwise import InputNorms
from .calibrated import LAYER_TYPES, CalibratedPruning, run_calibrated_pruning
from .nm import nm_mask


class Wanda(CalibratedPruning):
    """Wanda: prune the weights with the smallest |W| x ||X|| per output row (or per N:M group)."""


def wanda_mask(weight: torch.Tensor, norms: torch.Tensor, sparsity: float,
               nm: tuple[int, int] | None = None) -> torch.Tensor:
    """0/1 mask (weight's shape ``[out, in...]``) of Wanda's scores ``|W| * norms`` (one per input)."""
    scores = weight.detach().abs().float() * norms.float().reshape(1, *weight.shape[1:])
    if nm is not None:
        return nm_mask(weight, nm[0], nm[1], scores)
    rows = scores.reshape(weight.shape[0], -1)
    k = int(round(sparsity * rows.shape[1]))
    mask = torch.ones_like(rows)
    if k:
        mask.scatter_(1, rows.topk(k, dim=1, largest=False).indices, 0.0)
    return mask.reshape(weight.shape)


@register_method("prune.wanda", Wanda, layer_types=LAYER_TYPES)
def wanda(model: nn.Module, cfg: Wanda, inputs: MethodInputs) -> MethodResult:
    """Wanda one-shot pruning (|W| x input-norm scores, per row or N:M), calibrated on data."""

    def prune_layer(name: str, layer: nn.Module, weight: torch.Tensor, stats: InputNorms):
        mask = wanda_mask(weight, stats.norms.to(weight.device), cfg.sparsity, cfg.nm)
        return weight * mask, mask

    return run_calibrated_pruning(model, cfg, inputs, "prune.wanda", InputNorms, prune_layer)
