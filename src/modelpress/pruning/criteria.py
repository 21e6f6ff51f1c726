"""Unstructured pruning criteria besides magnitude: random, first-order Taylor and SNIP.

Each is a registered config whose scores come from :mod:`.importance` (low score = pruned
first), plugged into the shared ranking, overrides, scope and schedule code of :mod:`.magnitude`:

=================  ================  ===================================================
``prune.random``   ``RandomPruning``  uniform random scores (seeded): the baseline every
                                      criterion must beat
``prune.taylor``   ``TaylorPruning``  ``sum_b |w * dL_b/dw|`` over ``batches`` batches
                                      (first-order Taylor estimate of the loss change when
                                      ``w`` is removed; Molchanov et al. 2017/2019)
``prune.snip``     ``SNIPPruning``    ``|w * dL/dw|`` with the gradient of the loss over
                                      ``batches`` batches, meant for a fresh init
                                      (Lee et al. 2019, "connection sensitivity")
=================  ================  ===================================================

Taylor sums per-batch *absolute* saliencies, so a weight that matters a lot on some
batches is kept even when its gradient averages out; SNIP takes the absolute value of
the *summed* gradient, as the paper does. Taylor and SNIP need labelled data (or
``loss_fn``); gradients are taken in eval mode (no dropout noise, BatchNorm running
statistics untouched) and never touch ``.grad``, so they can run inside a training loop.

    >>> import torch
    >>> from torch import nn
    >>> from modelpress import prune
    >>> from modelpress.pruning.criteria import TaylorPruning
    >>> m = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
    >>> x = torch.randn(64, 4); batches = [(x, (x[:, 0] > 0).long())]
    >>> p = prune(m, TaylorPruning(sparsity=0.5, keep_first_last=False), batches)
    >>> int((p[0].weight == 0).sum()) + int((p[2].weight == 0).sum())
    28
"""
from __future__ import annotations

from pydantic import Field
from torch import nn

from ..engine import MethodInputs, MethodResult, register_method
from .importance import random_scores, snip_scores, taylor_scores
from .magnitude import WEIGHT_PRUNABLE, UnstructuredPruning, run_unstructured

__all__ = ["RandomPruning", "SNIPPruning", "TaylorPruning", "random_scores", "snip_scores", "taylor_scores"]


class RandomPruning(UnstructuredPruning):
    """Prune weights chosen uniformly at random (seeded): the baseline for every criterion."""

    seed: int = Field(0, ge=0, description="the same seed always prunes the same weights")


class TaylorPruning(UnstructuredPruning):
    """Prune the weights whose removal changes the loss least, ``sum_b |w * dL_b/dw|``."""

    batches: int = Field(8, ge=1, description="batches the saliency is accumulated over")


class SNIPPruning(UnstructuredPruning):
    """SNIP connection sensitivity ``|w * dL/dw|``, meant to prune a fresh init before training."""

    batches: int = Field(1, ge=1, description="batches the gradient is summed over (the paper uses one)")


# -- registered methods ----------------------------------------------------------------
@register_method("prune.random", RandomPruning, layer_types=WEIGHT_PRUNABLE)
def random_prune(model: nn.Module, cfg: RandomPruning, inputs: MethodInputs) -> MethodResult:
    """Unstructured random pruning (seeded baseline), global or per layer, one-shot or scheduled."""
    return run_unstructured(model, cfg, inputs, lambda layers: random_scores(layers, cfg.seed))


@register_method("prune.taylor", TaylorPruning, needs_data=True, layer_types=WEIGHT_PRUNABLE)
def taylor_prune(model: nn.Module, cfg: TaylorPruning, inputs: MethodInputs) -> MethodResult:
    """Unstructured first-order Taylor pruning |w * dL/dw| accumulated over batches."""
    return run_unstructured(model, cfg, inputs, lambda layers: taylor_scores(
        model, layers, inputs.data, loss_fn=inputs.loss_fn, batches=cfg.batches))


@register_method("prune.snip", SNIPPruning, needs_data=True, layer_types=WEIGHT_PRUNABLE)
def snip_prune(model: nn.Module, cfg: SNIPPruning, inputs: MethodInputs) -> MethodResult:
    """SNIP: prune by connection sensitivity |w * dL/dw|, typically at initialisation."""
    return run_unstructured(model, cfg, inputs, lambda layers: snip_scores(
        model, layers, inputs.data, loss_fn=inputs.loss_fn, batches=cfg.batches))
