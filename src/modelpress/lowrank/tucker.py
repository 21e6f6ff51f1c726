"""Tucker-2 decomposition of Conv2d layers (``lowrank.tucker``), Kim et al. 2016 style.

A kernel ``W`` (out, in, kh, kw) is decomposed over its two channel modes with tensorly's
``partial_tucker``: ``W ~ G x_0 U_out x_1 U_in`` with a core ``G`` (r_out, r_in, kh, kw). The
conv becomes a :class:`~.layers.FactorizedLayer` of three convs:

1. 1x1 ``in -> r_in`` (``U_in^T``, no bias);
2. kxk ``r_in -> r_out`` (the core, with the original stride, padding and dilation);
3. 1x1 ``r_out -> out`` (``U_out``, with the original bias).

Ranks come from exactly one of

* ``rank_ratio``: ``r = ceil(ratio * channels)`` on each mode;
* ``energy``: per mode, the smallest rank whose singular values of the mode unfolding keep
  this fraction of the sum of squares;
* ``param_ratio``: the largest equal fraction of both channel counts keeping at most this
  fraction of the layer's parameters;
* ``vbmf=True``: per mode, the rank empirical VBMF (Nakajima et al. 2013) finds in the mode
  unfolding -- ``out x (in*kh*kw)`` for ``r_out``, ``in x (out*kh*kw)`` for ``r_in`` -- as in
  Kim et al. 2016: the noise variance is estimated from the spectrum and only the singular
  values above the analytic EVB threshold are kept (see :func:`~.layers.vbmf_rank`); no
  parameter to tune, but no control over the compression either;

and ``energy=0.95`` when none is given. ``min_rank`` bounds every rule from below.
Grouped/depthwise convs and layers that would not shrink are left dense and listed in
``info["skipped"]``; ``info["layers"]`` gives ranks, params before/after and the
relative reconstruction error of each factorized kernel.

    >>> import torch
    >>> from modelpress import factorize
    >>> from modelpress.lowrank.tucker import Tucker
    >>> m = torch.nn.Sequential(torch.nn.Conv2d(32, 64, 3, padding=1))
    >>> f = factorize(m, Tucker(rank_ratio=0.5))
    >>> [tuple(c.weight.shape) for c in f[0]]
    [(16, 32, 1, 1), (32, 16, 3, 3), (64, 32, 1, 1)]

With ``train=TrainConfig(...)`` and data, the factorized model is fine-tuned (``fit``).
Returns a new model (the verbs copy; see :mod:`modelpress.api`).
"""
from __future__ import annotations

import warnings

import torch
from pydantic import Field, model_validator
from torch import nn

from ..engine import MethodInputs, MethodResult, register_method
from .layers import (
    FactorizedLayer,
    RankChoice,
    check_conv,
    conv_weight,
    energy_rank,
    factorize_layers,
    n_params,
    ratio_rank,
    relative_error,
    vbmf_rank,
)

DEFAULT_ENERGY = 0.95
LAYER_TYPES = ("Conv2d",)


class Tucker(RankChoice):
    """Tucker-2 over the output/input channels of Conv2d kernels: 1x1 -> kxk core -> 1x1
    (rank_ratio, energy and vbmf apply to each channel mode)."""

    vbmf: bool = Field(False, description="choose each mode's rank by empirical VBMF of its unfolding "
                                          "(instead of rank_ratio / energy / param_ratio)")
    n_iter_max: int = Field(100, ge=1, description="HOOI iterations of partial_tucker")

    @model_validator(mode="after")
    def _vbmf_alone(self):
        given = [k for k in ("rank_ratio", "energy", "param_ratio") if getattr(self, k) is not None]
        if self.vbmf and given:
            raise ValueError(f"vbmf=True chooses the ranks itself: give one of rank_ratio, energy, param_ratio, "
                             f"vbmf (got {', '.join(given)}, vbmf)")
        return self


def tucker_params(shape: tuple[int, ...], r_out: int, r_in: int, bias: bool) -> int:
    out_ch, in_ch, kh, kw = shape
    return in_ch * r_in + r_in * r_out * kh * kw + r_out * out_ch + (out_ch if bias else 0)


def tucker_ranks(w: torch.Tensor, cfg: Tucker, bias: bool) -> tuple[int, int]:
    """``(r_out, r_in)`` for kernel ``w`` under the config's rank rule."""
    out_ch, in_ch = w.shape[:2]
    lo = lambda full: min(cfg.min_rank, full)  # noqa: E731
    if cfg.rank_ratio is not None:
        return ratio_rank(out_ch, cfg.rank_ratio, cfg.min_rank), ratio_rank(in_ch, cfg.rank_ratio, cfg.min_rank)
    if cfg.param_ratio is not None:
        budget = cfg.param_ratio * (w.numel() + (out_ch if bias else 0))
        best = (lo(out_ch), lo(in_ch))
        for step in range(1, 1001):  # the largest common fraction of both modes within the budget
            t = step / 1000
            ranks = (ratio_rank(out_ch, t, cfg.min_rank), ratio_rank(in_ch, t, cfg.min_rank))
            if tucker_params(tuple(w.shape), *ranks, bias) > budget:
                break
            best = ranks
        return best
    wd = w.detach().double().cpu()
    if cfg.vbmf:  # mode-0 and mode-1 unfoldings, as in Kim et al. 2016
        return (max(lo(out_ch), vbmf_rank(wd.reshape(out_ch, -1))),
                max(lo(in_ch), vbmf_rank(wd.transpose(0, 1).reshape(in_ch, -1))))
    energy = cfg.energy if cfg.energy is not None else DEFAULT_ENERGY
    s_out = torch.linalg.svdvals(wd.reshape(out_ch, -1))
    s_in = torch.linalg.svdvals(wd.transpose(0, 1).reshape(in_ch, -1))
    return (max(lo(out_ch), energy_rank(s_out, energy)), max(lo(in_ch), energy_rank(s_in, energy)))


@torch.no_grad()
def tucker_factors(w: torch.Tensor, r_out: int, r_in: int, n_iter_max: int = 100):
    """``(core, U_out, U_in)`` of the Tucker-2 decomposition of ``w`` (tensorly ``partial_tucker``)."""
    from tensorly.decomposition import partial_tucker

    arr = w.detach().double().cpu().numpy()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        (core, (u_out, u_in)), _ = partial_tucker(arr, rank=[r_out, r_in], modes=[0, 1], init="svd",
                                                  n_iter_max=n_iter_max, random_state=0)
    return torch.from_numpy(core.copy()), torch.from_numpy(u_out.copy()), torch.from_numpy(u_in.copy())


@torch.no_grad()
def tucker_conv(layer: nn.Conv2d, r_out: int, r_in: int, n_iter_max: int = 100) -> tuple[FactorizedLayer, float]:
    """``layer`` as 1x1 -> kxk -> 1x1 convs with channel ranks ``(r_out, r_in)``, and the relative error."""
    w = layer.weight
    out_ch, in_ch, kh, kw = w.shape
    core, u_out, u_in = tucker_factors(w, r_out, r_in, n_iter_max)
    approx = torch.einsum("abhw,oa,ib->oihw", core, u_out, u_in)
    dt = w.dtype
    first = conv_weight(layer, (r_in, in_ch, 1, 1), u_in.t().to(dt))
    middle = conv_weight(layer, (r_out, r_in, kh, kw), core.to(dt), stride=layer.stride, padding=layer.padding,
                         dilation=layer.dilation)
    last = conv_weight(layer, (out_ch, r_out, 1, 1), u_out.to(dt), bias=layer.bias is not None)
    return FactorizedLayer("tucker", first, middle, last), relative_error(w, approx)


@register_method("lowrank.tucker", Tucker, structural=True, layer_types=LAYER_TYPES)
def tucker(model: nn.Module, cfg: Tucker, inputs: MethodInputs) -> MethodResult:
    """Tucker-2 decomposition of Conv2d kernels into 1x1 -> kxk -> 1x1 convs (tensorly partial_tucker)."""

    def plan(layer: nn.Module):
        reason = check_conv(layer)
        if reason is not None:
            return reason
        bias = layer.bias is not None
        r_out, r_in = tucker_ranks(layer.weight, cfg, bias)
        after = tucker_params(tuple(layer.weight.shape), r_out, r_in, bias)
        if after >= n_params(layer):
            return f"ranks ({r_out}, {r_in}) would not reduce parameters ({after} >= {n_params(layer)})"
        return [r_out, r_in], lambda: tucker_conv(layer, r_out, r_in, cfg.n_iter_max)

    return factorize_layers(model, cfg, inputs, "tucker", plan, LAYER_TYPES)
