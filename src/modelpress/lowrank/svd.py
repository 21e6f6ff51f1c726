"""Truncated SVD of Linear and 1x1 Conv2d layers (``lowrank.svd``).

A weight ``W`` (out x in) becomes ``U_r diag(S_r) V_r^T``: one layer ``in -> r`` without bias
holding ``diag(S_r)^(1/2) V_r^T``, then one ``r -> out`` holding ``U_r diag(S_r)^(1/2)`` and
the original bias, in a :class:`~.layers.FactorizedLayer`. That costs ``r * (in + out)``
weights instead of ``in * out``, so a layer is factorized only when its rank is below
``in * out / (in + out)``; the others are left dense and listed in ``info["skipped"]``.

The rank of each layer comes from exactly one of

* ``rank_ratio``: a fraction of ``min(out, in)``;
* ``energy``: the fraction of the sum of squared singular values kept (e.g. 0.95);
* ``param_ratio``: the largest rank keeping at most this fraction of the layer's parameters;

and ``energy=0.95`` when none is given. ``info["layers"]`` gives per layer: rank,
params before/after and the relative reconstruction error ``||W - W_r||_F / ||W||_F``.

    >>> import torch
    >>> from modelpress import factorize
    >>> from modelpress.lowrank.svd import SVD
    >>> m = torch.nn.Sequential(torch.nn.Linear(256, 128), torch.nn.ReLU(), torch.nn.Linear(128, 10))
    >>> f = factorize(m, SVD(param_ratio=0.5, scope={"include": ["0"]}))
    >>> [tuple(l.weight.shape) for l in f[0]]      # 256 -> 42 -> 128: 16,128 of 32,768 weights
    [(42, 256), (128, 42)]

GPT-2's ``Conv1D`` (a Linear storing its weight ``[in, out]``) is factorized as the Linear it is.
With ``train=TrainConfig(...)`` and data, the factorized model is fine-tuned (``fit``).
Returns a new model (the verbs copy; see :mod:`modelpress.api`).
"""
from __future__ import annotations

import math

import torch
from torch import nn

from ..engine import MethodInputs, MethodResult, register_method
from ..nn.layer_kinds import linear_equivalent
from .layers import (
    LAYER_TYPES,
    FactorizedLayer,
    RankChoice,
    check_conv,
    conv_weight,
    energy_rank,
    factorize_layers,
    ratio_rank,
)

DEFAULT_ENERGY = 0.95


class SVD(RankChoice):
    """Truncated SVD of Linear / 1x1 Conv2d weights into two thinner layers (rank_ratio: of min(out, in))."""


def layer_matrix(layer: nn.Module) -> torch.Tensor:
    """The weight of a Linear-kind layer or 1x1 conv as an (out, in) matrix."""
    layer = linear_equivalent(layer)
    return layer.weight.detach().reshape(layer.weight.shape[0], -1)


def svd_rank(s: torch.Tensor, out_f: int, in_f: int, cfg: SVD) -> int:
    """The rank the config asks for, given the singular values ``s`` of an (out, in) weight."""
    full = min(out_f, in_f)
    if cfg.rank_ratio is not None:
        r = ratio_rank(full, cfg.rank_ratio)
    elif cfg.param_ratio is not None:
        before = out_f * in_f + out_f  # with a bias; the factorized layer keeps it
        r = math.floor((cfg.param_ratio * before - out_f) / (in_f + out_f))
    else:
        r = energy_rank(s, cfg.energy if cfg.energy is not None else DEFAULT_ENERGY)
    return max(min(cfg.min_rank, full), min(full, max(r, 1)))


@torch.no_grad()
def factorize_matrix_layer(layer: nn.Module, rank: int) -> tuple[FactorizedLayer, float]:
    """``layer`` (Linear or 1x1 Conv2d) as two layers of inner width ``rank``, and the relative error."""
    w = layer_matrix(layer).double()
    u, s, vh = torch.linalg.svd(w, full_matrices=False)
    root = s[:rank].sqrt()
    first_w = (root[:, None] * vh[:rank]).to(layer.weight.dtype)   # (r, in)
    second_w = (u[:, :rank] * root[None, :]).to(layer.weight.dtype)  # (out, r)
    err = float((w - u[:, :rank] @ torch.diag(s[:rank]) @ vh[:rank]).norm() / w.norm()) if w.norm() > 0 else 0.0
    out_f, in_f = w.shape
    if isinstance(layer, nn.Linear):
        first = nn.Linear(in_f, rank, bias=False)
        second = nn.Linear(rank, out_f, bias=layer.bias is not None)
        first.weight.copy_(first_w)
        second.weight.copy_(second_w)
        if layer.bias is not None:
            second.bias.copy_(layer.bias)
        first, second = (m.to(device=layer.weight.device, dtype=layer.weight.dtype) for m in (first, second))
    else:  # a 1x1 conv: stride and padding on the first factor (padded zeros stay zero through it)
        first = conv_weight(layer, (rank, in_f, 1, 1), first_w, stride=layer.stride, padding=layer.padding)
        second = conv_weight(layer, (out_f, rank, 1, 1), second_w, bias=layer.bias is not None)
    return FactorizedLayer("svd", first, second), err


def unsupported(layer: nn.Module) -> str | None:
    if isinstance(layer, nn.Conv2d):
        if tuple(layer.kernel_size) != (1, 1):
            return f"{layer.kernel_size[0]}x{layer.kernel_size[1]} conv (use lowrank.tucker or lowrank.cp)"
        return check_conv(layer)
    return None


@register_method("lowrank.svd", SVD, structural=True, layer_types=LAYER_TYPES)
def svd(model: nn.Module, cfg: SVD, inputs: MethodInputs) -> MethodResult:
    """Truncated SVD of Linear / 1x1 conv weights into two thinner layers (rank by ratio, energy or budget)."""

    def plan(layer: nn.Module):
        layer = linear_equivalent(layer)  # GPT-2's Conv1D: a copy as nn.Linear (replaced only if factorized)
        reason = unsupported(layer)
        if reason is not None:
            return reason
        w = layer_matrix(layer)
        out_f, in_f = w.shape
        rank = svd_rank(torch.linalg.svdvals(w.double()), out_f, in_f, cfg)
        if rank * (in_f + out_f) >= in_f * out_f:
            return f"rank {rank} would not reduce parameters (needs < {in_f * out_f / (in_f + out_f):.1f})"
        return rank, lambda: factorize_matrix_layer(layer, rank)

    return factorize_layers(model, cfg, inputs, "svd", plan)
