"""Unstructured pruning criteria besides magnitude: random, first-order Taylor and SNIP.

Each criterion is a *scorer* (low score = pruned first) plugged into the shared ranking,
overrides, scope and schedule code of :mod:`.magnitude`, and a small registered config:

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
``ctx.loss_fn``); gradients are taken in eval mode (no dropout noise, BatchNorm running
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

from typing import Any, Callable

import torch
from pydantic import Field
from torch import nn

from ..core.data import as_data, check_finite, split_batch
from ..core.errors import DataError
from ..core.registry import MethodContext, register_method
from ..core.training import classification_loss
from .magnitude import PRUNABLE, Layers, UnstructuredPruning, magnitude_scores, run_unstructured

CRITERIA = ("l1", "l2", "random", "taylor", "snip")


class RandomPruning(UnstructuredPruning):
    """Prune weights chosen uniformly at random (seeded): the baseline for every criterion."""

    seed: int = Field(0, ge=0, description="the same seed always prunes the same weights")


class TaylorPruning(UnstructuredPruning):
    """Prune the weights whose removal changes the loss least, ``sum_b |w * dL_b/dw|``."""

    batches: int = Field(8, ge=1, description="batches the saliency is accumulated over")


class SNIPPruning(UnstructuredPruning):
    """SNIP connection sensitivity ``|w * dL/dw|``, meant to prune a fresh init before training."""

    batches: int = Field(1, ge=1, description="batches the gradient is summed over (the paper uses one)")


# -- scorers -------------------------------------------------------------------------
def random_scores(layers: Layers, seed: int = 0) -> dict[str, torch.Tensor]:
    """Uniform random scores; the same seed gives the same scores (so schedules prune nested sets)."""
    g = torch.Generator().manual_seed(seed)
    return {n: torch.rand(m.weight.shape, generator=g).to(m.weight.device) for n, m in layers}


def _batch_gradients(model: nn.Module, layers: Layers, data: Any, loss_fn: Callable | None, batches: int):
    """Yield, per batch, the gradients of the loss w.r.t. each layer's weight (eval mode)."""
    if data is None:
        raise DataError("gradient-based pruning criteria (taylor, snip) need data",
                        hint="pass labelled batches: prune(model, config, data)")
    loss_fn = loss_fn or classification_loss
    weights = [m.weight for _, m in layers]
    was_training = model.training
    flags = [w.requires_grad for w in weights]
    model.eval()
    try:
        for w in weights:
            w.requires_grad_(True)
        seen = 0
        for batch in as_data(data):
            if seen >= batches:
                break
            inputs, target = split_batch(batch)
            check_finite(inputs, "pruning-criterion data")
            with torch.enable_grad():
                loss = loss_fn(model, inputs, target)
                grads = torch.autograd.grad(loss, weights, allow_unused=True)
            seen += 1
            yield [torch.zeros_like(w) if g is None else g for w, g in zip(weights, grads)]
    finally:
        for w, f in zip(weights, flags):
            w.requires_grad_(f)
        model.train(was_training)


def taylor_scores(model: nn.Module, layers: Layers, data: Any, *, loss_fn: Callable | None = None,
                  batches: int = 8) -> dict[str, torch.Tensor]:
    """``sum_b |w * dL_b/dw|`` over up to ``batches`` batches of ``data``."""
    acc = [torch.zeros_like(m.weight, dtype=torch.float32) for _, m in layers]
    for grads in _batch_gradients(model, layers, data, loss_fn, batches):
        for a, (_, m), g in zip(acc, layers, grads):
            a += (m.weight.detach() * g).abs().float()
    return {n: a for (n, _), a in zip(layers, acc)}


def snip_scores(model: nn.Module, layers: Layers, data: Any, *, loss_fn: Callable | None = None,
                batches: int = 1) -> dict[str, torch.Tensor]:
    """``|w * sum_b dL_b/dw|`` over up to ``batches`` batches (normalised to sum 1, as in SNIP)."""
    total = [torch.zeros_like(m.weight, dtype=torch.float32) for _, m in layers]
    for grads in _batch_gradients(model, layers, data, loss_fn, batches):
        for t, g in zip(total, grads):
            t += g.float()
    scores = [(m.weight.detach().float() * t).abs() for (_, m), t in zip(layers, total)]
    norm = sum(float(s.sum()) for s in scores) or 1.0  # one normaliser: ranking unchanged, values comparable
    return {n: s / norm for (n, _), s in zip(layers, scores)}


def score_layers(criterion: str, model: nn.Module, layers: Layers, *, data: Any = None,
                 loss_fn: Callable | None = None, batches: int = 8, seed: int = 0) -> dict[str, torch.Tensor]:
    """Scores of ``criterion`` (one of :data:`CRITERIA`) for ``layers``; used by iterative pruning."""
    if criterion in ("l1", "l2"):
        return magnitude_scores(layers, criterion)
    if criterion == "random":
        return random_scores(layers, seed)
    if criterion == "taylor":
        return taylor_scores(model, layers, data, loss_fn=loss_fn, batches=batches)
    if criterion == "snip":
        return snip_scores(model, layers, data, loss_fn=loss_fn, batches=batches)
    raise ValueError(f"unknown pruning criterion {criterion!r}; expected one of {', '.join(CRITERIA)}")


# -- registered methods ----------------------------------------------------------------
@register_method("prune.random", RandomPruning, layer_types=PRUNABLE)
def random_prune(model: nn.Module, cfg: RandomPruning, ctx: MethodContext) -> nn.Module:
    """Unstructured random pruning (seeded baseline), global or per layer, one-shot or scheduled."""
    return run_unstructured(model, cfg, ctx, lambda layers: random_scores(layers, cfg.seed))


@register_method("prune.taylor", TaylorPruning, needs_data=True, layer_types=PRUNABLE)
def taylor_prune(model: nn.Module, cfg: TaylorPruning, ctx: MethodContext) -> nn.Module:
    """Unstructured first-order Taylor pruning |w * dL/dw| accumulated over batches."""
    return run_unstructured(model, cfg, ctx, lambda layers: taylor_scores(
        model, layers, ctx.data, loss_fn=ctx.loss_fn, batches=cfg.batches))


@register_method("prune.snip", SNIPPruning, needs_data=True, layer_types=PRUNABLE)
def snip_prune(model: nn.Module, cfg: SNIPPruning, ctx: MethodContext) -> nn.Module:
    """SNIP: prune by connection sensitivity |w * dL/dw|, typically at initialisation."""
    return run_unstructured(model, cfg, ctx, lambda layers: snip_scores(
        model, layers, ctx.data, loss_fn=ctx.loss_fn, batches=cfg.batches))
