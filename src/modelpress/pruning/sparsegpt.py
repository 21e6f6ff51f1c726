"""SparseGPT: one-shot pruning with a second-order weight update (``prune.sparsegpt``),
Frantar & Alistarh 2023.

Like GPTQ, but the "rounding" is to zero: the inputs of a layer are visited in blocks of
``block_size``; in each block the weights with the lowest ``w^2 / [H^-1]_jj^2`` are chosen for
removal (the optimal brain surgeon saliency, ``H = 2 X^T X / n`` from the calibration inputs), and
each removed weight's error is spread over the inputs not visited yet through the Cholesky factor
of ``H^-1``, so the layer's output on the calibration data moves as little as it can. The weights
that stay change too: that is what lets 50% and 2:4 sparsity go without retraining.

Unstructured masks are chosen per block over all rows (the paper's adaptive mask selection, the
layer's sparsity exact); an N:M ``pattern`` picks the weights to remove in every group of M
consecutive inputs (channels-last for a conv, as ``prune.nm`` lays them out).

    >>> import torch
    >>> from modelpress import prune
    >>> from modelpress.pruning.sparsegpt import SparseGPT
    >>> net = torch.nn.Sequential(torch.nn.Linear(32, 32), torch.nn.ReLU(), torch.nn.Linear(32, 32),
    ...                           torch.nn.ReLU(), torch.nn.Linear(32, 4))
    >>> sparse = prune(net, SparseGPT(pattern="2:4"), [torch.randn(16, 32) for _ in range(2)])
    >>> int((sparse[2].weight.reshape(32, 8, 4) != 0).sum(-1).max())   # at most 2 of every 4
    2

Shared fields and layers: :mod:`.calibrated`; the Hessian and the layer-by-layer driver:
:mod:`modelpress.engine.layerwise`.
"""
from __future__ import annotations

import torch
from pydantic import Field
from torch import nn

from ..engine import MethodInputs, MethodResult, register_method
from ..engine.layerwise import Hessian, inverse_hessian_cholesky
from .calibrated import LAYER_TYPES, CalibratedPruning, channels_last_order, run_calibrated_pruning


class SparseGPT(CalibratedPruning):
    """SparseGPT: prune by OBS saliency and update the remaining weights (unstructured or N:M)."""

    damp: float = Field(0.01, gt=0, le=1, description="fraction of mean(diag H) added to the diagonal")
    block_size: int = Field(128, ge=1, description="inputs whose mask is chosen together")


@torch.no_grad()
def sparsegpt_prune(w: torch.Tensor, h: torch.Tensor, sparsity: float,
                    nm: tuple[int, int] | None = None, *, damp: float = 0.01, block_size: int = 128,
                    name: str = "layer") -> tuple[torch.Tensor, torch.Tensor]:
    """SparseGPT of one weight ``w`` ``[out, cols]`` given the Hessian ``h`` of its inputs:
    ``(new weight, 0/1 mask)``."""
    wf = w.detach().to(h.device, torch.float32).clone(memory_format=torch.contiguous_format)
    out, cols = wf.shape
    wf[:, h.diagonal() == 0] = 0.0  # inputs that are always zero
    hinv = inverse_hessian_cholesky(h, damp, f"prune.sparsegpt: layer {name!r}").to(torch.float32)
    pruned = torch.zeros_like(wf, dtype=torch.bool)
    if nm is not None:
        block_size = max(nm[1], block_size - block_size % nm[1])  # N:M groups never straddle blocks
    for start in range(0, cols, block_size):
        stop = min(start + block_size, cols)
        block = wf[:, start:stop].clone()
        err = torch.zeros_like(block)
        hb = hinv[start:stop, start:stop]
        d = hb.diagonal()
        if nm is None:
            saliency = block.pow(2) / d.pow(2)[None, :]
            k = int(round(sparsity * saliency.numel()))
            block_mask = torch.zeros_like(block, dtype=torch.bool)
            if k:
                block_mask.view(-1)[saliency.view(-1).topk(k, largest=False).indices] = True
        else:
            block_mask = torch.zeros_like(block, dtype=torch.bool)
        for i in range(stop - start):
            if nm is not None and i % nm[1] == 0:
                group = block[:, i:i + nm[1]].pow(2) / d[i:i + nm[1]].pow(2)[None, :]
                drop = nm[1] - nm[0]
                block_mask[:, i:i + nm[1]].scatter_(1, group.topk(drop, dim=1, largest=False).indices, True)
            col = block[:, i]
            new = col.masked_fill(block_mask[:, i], 0.0)
            e = (col - new) / hb[i, i]
            block[:, i:] -= e[:, None] * hb[i, i:][None, :]
            block[:, i] = new
            err[:, i] = e
        wf[:, start:stop] = block
        pruned[:, start:stop] = block_mask
        wf[:, stop:] -= err @ hinv[start:stop, stop:]
    wf[pruned] = 0.0
    return wf, (~pruned).to(wf.dtype)


@register_method("prune.sparsegpt", SparseGPT, layer_types=LAYER_TYPES)
def sparsegpt(model: nn.Module, cfg: SparseGPT, inputs: MethodInputs) -> MethodResult:
    """SparseGPT one-shot pruning (OBS saliency + weight update, unstructured or N:M), calibrated on data."""

    def prune_layer(name: str, layer: nn.Module, weight: torch.Tensor, stats: Hessian):
        rows = weight.reshape(weight.shape[0], -1)
        h = stats.matrix
        order = channels_last_order(layer) if cfg.nm is not None else None
        if order is not None:  # N:M groups run along (kh, kw, in): visit the inputs in that order
            rows, h = rows[:, order], h[order][:, order]
        new, mask = sparsegpt_prune(rows, h, cfg.sparsity, cfg.nm, damp=cfg.damp, block_size=cfg.block_size,
                                    name=name)
        if order is not None:
            back = torch.empty_like(order)
            back[order] = torch.arange(order.numel())
            new, mask = new[:, back], mask[:, back]
        return new.reshape(weight.shape).to(weight.device), mask.reshape(weight.shape).to(weight.device)

    return run_calibrated_pruning(model, cfg, inputs, "prune.sparsegpt", Hessian, prune_layer)
