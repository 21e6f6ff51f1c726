"""CP decomposition of Conv2d layers (``lowrank.cp``), Lebedev et al. 2015 style.

A kernel ``W`` (out, in, kh, kw) is fitted by a rank-``R`` CP decomposition (ALS, SVD
init, fixed seed): ``W ~ sum_r a_r (x) b_r (x) c_r (x) d_r``. The conv
becomes a :class:`~.layers.FactorizedLayer` of four convs:

1. 1x1 ``in -> R`` (the ``b_r``);
2. depthwise ``kh x 1`` on R channels (the ``c_r``) with the original vertical stride,
   padding and dilation;
3. depthwise ``1 x kw`` (the ``d_r``) with the horizontal ones;
4. 1x1 ``R -> out`` (the ``a_r``, with the original bias).

The kernel is separable along height and width, so splitting stride, padding and dilation
per axis is exact. The rank is ``rank`` when given, else the largest one keeping at most
``param_ratio`` (default 0.5) of the layer's parameters. CP is an iterative fit and can be
poor on kernels without low-rank structure: ``max_error`` leaves layers whose relative
reconstruction error exceeds it dense (they are listed in ``info["skipped"]``, as are
grouped convs, 1x1 kernels, for which ``lowrank.svd`` is the right tool, and layers that
would not shrink). ``info["layers"]`` gives rank, params before/after and the relative
error ``||W - W_R||_F / ||W||_F``.

    >>> import torch
    >>> from modelpress import factorize
    >>> from modelpress.lowrank.cp import CP
    >>> m = torch.nn.Sequential(torch.nn.Conv2d(32, 64, 3, padding=1))
    >>> f = factorize(m, CP(rank=16))
    >>> [tuple(c.weight.shape) for c in f[0]]
    [(16, 32, 1, 1), (16, 1, 3, 1), (16, 1, 1, 3), (64, 16, 1, 1)]

With ``train=TrainConfig(...)`` and data, the factorized model is fine-tuned (``fit``).
Returns a new model (the verbs copy; see :mod:`modelpress.api`).
"""
from __future__ import annotations

import math

import torch
from pydantic import Field, model_validator
from torch import nn

from ..core.config import MethodConfig
from ..core.scope import Scope
from ..engine import MethodInputs, MethodResult, register_method
from .layers import FactorizedLayer, check_conv, conv_weight, factorize_layers, n_params, relative_error

DEFAULT_PARAM_RATIO = 0.5
LAYER_TYPES = ("Conv2d",)


class CP(MethodConfig):
    """CP decomposition of Conv2d kernels: 1x1 -> depthwise kx1 -> depthwise 1xk -> 1x1."""

    rank: int | None = Field(None, ge=1, description="CP rank R of every selected conv")
    param_ratio: float | None = Field(None, gt=0, lt=1, description="keep at most this fraction of params "
                                                                     "(0.5 when rank is not given)")
    max_error: float | None = Field(None, gt=0, description="leave a layer dense when its relative "
                                                           "reconstruction error exceeds this (None: never)")
    scope: Scope = Scope()
    keep_first_last: bool = Field(False, description="leave the first and last conv dense")
    n_iter_max: int = Field(100, ge=1, description="ALS iterations of parafac")
    seed: int = Field(0, ge=0, description="random state of parafac")

    @model_validator(mode="after")
    def _one_rank_rule(self):
        if self.rank is not None and self.param_ratio is not None:
            raise ValueError("give one of rank, param_ratio (got both)")
        return self


def cp_params(shape: tuple[int, ...], rank: int, bias: bool) -> int:
    out_ch, in_ch, kh, kw = shape
    return rank * (in_ch + kh + kw + out_ch) + (out_ch if bias else 0)


def cp_rank(shape: tuple[int, ...], cfg: CP, bias: bool) -> int:
    if cfg.rank is not None:
        return cfg.rank
    ratio = cfg.param_ratio if cfg.param_ratio is not None else DEFAULT_PARAM_RATIO
    out_ch, in_ch, kh, kw = shape
    budget = ratio * (out_ch * in_ch * kh * kw + (out_ch if bias else 0)) - (out_ch if bias else 0)
    return max(1, math.floor(budget / (in_ch + kh + kw + out_ch)))


@torch.no_grad()
def cp_factors(w: torch.Tensor, rank: int, n_iter_max: int = 100, seed: int = 0,
               tol: float = 1e-8) -> list[torch.Tensor]:
    """``[A (out, R), B (in, R), C (kh, R), D (kw, R)]`` with ``W ~ sum_r A_r (x) B_r (x) C_r (x) D_r``.

    Alternating least squares (CP-ALS), initialised from each unfolding's leading singular vectors
    (columns past the unfolding's rank drawn from ``seed``), stopped after ``n_iter_max`` sweeps or
    when the relative error moves by less than ``tol``. Written for conv kernels rather than taken
    from tensorly's ``parafac``: that materializes the Khatri-Rao product of the other factors, a
    ``(out * in * kw) x R`` matrix for the ``kh`` mode (7 GB for one 512x512x3x3 conv at the rank
    keeping half its parameters, and ~30 s per sweep). Here the two channel modes meet the small
    spatial ones first: one sweep is two ``R x out x in x kh x kw`` contractions and a few ``R x R``
    solves, and memory is ``R x in x kh x kw``.

    The CP weights are spread evenly over the four factors (each column scaled to the fourth root
    of their norms' product), so no factor is much larger than the others.
    """
    x = w.detach().to(torch.float32).cpu()
    o, i, kh, kw = x.shape
    hw = kh * kw
    x_by_out = x.reshape(o, i * hw)                       # rows: out channel
    x_by_in = x.permute(1, 0, 2, 3).reshape(i, o * hw)    # rows: in channel
    norm2 = float(x.pow(2).sum())
    gen = torch.Generator().manual_seed(seed)

    def start(unfolding: torch.Tensor) -> torch.Tensor:
        flat = unfolding.double()
        _, vectors = torch.linalg.eigh(flat @ flat.t())   # left singular vectors, ascending
        u = vectors.flip(1)[:, :rank]
        if u.shape[1] < rank:
            extra = torch.randn(u.shape[0], rank - u.shape[1], generator=gen, dtype=torch.float64)
            u = torch.cat([u, extra / math.sqrt(u.shape[0])], 1)
        return u.float()

    a, b = start(x_by_out), start(x_by_in)
    c = start(x.permute(2, 0, 1, 3).reshape(kh, -1))
    d = start(x.permute(3, 0, 1, 2).reshape(kw, -1))

    eye = torch.eye(rank, dtype=torch.float64)

    def gram(f: torch.Tensor) -> torch.Tensor:
        return (f.t() @ f).double()

    grams = [gram(f) for f in (a, b, c, d)]

    def solve(mode: int, mttkrp: torch.Tensor) -> torch.Tensor:
        """The least-squares factor of ``mode`` given the others: ``mttkrp @ (Hadamard of their Grams)^-1``."""
        v = torch.ones(rank, rank, dtype=torch.float64)
        for k, g in enumerate(grams):
            if k != mode:
                v = v * g
        v = v + (1e-10 * float(v.diagonal().mean()) + 1e-30) * eye   # ridge: ranks past a mode's size
        factor = torch.cholesky_solve(mttkrp.double().t(), torch.linalg.cholesky(v)).t().float()
        grams[mode] = gram(factor)
        return factor

    previous = math.inf
    for _ in range(n_iter_max):
        spatial = (c[:, None, :] * d[None, :, :]).reshape(hw, rank)            # (kh kw, R)
        z = (b.t() @ x_by_in).view(rank, o, hw)                                 # in contracted
        a = solve(0, torch.einsum("rok,kr->or", z, spatial))
        y = (a.t() @ x_by_out).view(rank, i, hw)                                # out contracted
        b = solve(1, torch.einsum("rik,kr->ir", y, spatial))
        g = torch.einsum("rik,ir->rk", y, b).view(rank, kh, kw)                 # out and in contracted
        c = solve(2, torch.einsum("rhw,wr->hr", g, d))
        m_d = torch.einsum("rhw,hr->wr", g, c)
        d = solve(3, m_d)
        inner = float((m_d.double() * d.double()).sum())
        approx2 = float((grams[0] * grams[1] * grams[2] * grams[3]).sum())
        error = math.sqrt(max(norm2 - 2 * inner + approx2, 0.0) / max(norm2, 1e-30))
        if abs(previous - error) < tol:
            break
        previous = error
    factors = [f.double() for f in (a, b, c, d)]
    norms = [f.norm(dim=0) for f in factors]
    weight = torch.stack(norms).prod(0).pow(0.25)
    return [f / n.clamp_min(1e-30)[None, :] * weight[None, :] for f, n in zip(factors, norms)]


def _axis(value, axis: int, other):
    """Per-axis geometry: ``value[axis]`` on the conv's own axis, ``other`` on the one it does not touch."""
    if isinstance(value, str):
        return value
    return (value[0], other) if axis == 0 else (other, value[1])


@torch.no_grad()
def cp_conv(layer: nn.Conv2d, rank: int, n_iter_max: int = 100, seed: int = 0) -> tuple[FactorizedLayer, float]:
    """``layer`` as 1x1 -> depthwise kx1 -> depthwise 1xk -> 1x1 convs of CP rank ``rank``, and the error."""
    w = layer.weight
    out_ch, in_ch, kh, kw = w.shape
    a, b, c, d = cp_factors(w, rank, n_iter_max, seed)
    rest = (b[:, None, None, :] * c[None, :, None, :] * d[None, None, :, :]).reshape(-1, rank)  # (in kh kw, R)
    approx = (a @ rest.t()).view(out_ch, in_ch, kh, kw)
    dt = w.dtype
    first = conv_weight(layer, (rank, in_ch, 1, 1), b.t().to(dt))
    vertical = conv_weight(layer, (rank, 1, kh, 1), c.t().to(dt), groups=rank, stride=_axis(layer.stride, 0, 1),
                           padding=_axis(layer.padding, 0, 0), dilation=_axis(layer.dilation, 0, 1))
    horizontal = conv_weight(layer, (rank, 1, 1, kw), d.t().to(dt), groups=rank, stride=_axis(layer.stride, 1, 1),
                             padding=_axis(layer.padding, 1, 0), dilation=_axis(layer.dilation, 1, 1))
    last = conv_weight(layer, (out_ch, rank, 1, 1), a.to(dt), bias=layer.bias is not None)
    return FactorizedLayer("cp", first, vertical, horizontal, last), relative_error(w, approx)


@register_method("lowrank.cp", CP, structural=True, layer_types=LAYER_TYPES)
def cp(model: nn.Module, cfg: CP, inputs: MethodInputs) -> MethodResult:
    """CP decomposition of Conv2d kernels into 1x1 -> depthwise kx1 -> 1xk -> 1x1 convs (CP-ALS)."""

    def plan(layer: nn.Module):
        reason = check_conv(layer)
        if reason is None and tuple(layer.kernel_size) == (1, 1):
            reason = "1x1 conv (use lowrank.svd)"
        if reason is not None:
            return reason
        bias = layer.bias is not None
        rank = cp_rank(tuple(layer.weight.shape), cfg, bias)
        after = cp_params(tuple(layer.weight.shape), rank, bias)
        if after >= n_params(layer):
            return f"rank {rank} would not reduce parameters ({after} >= {n_params(layer)})"
        return rank, lambda: cp_conv(layer, rank, cfg.n_iter_max, cfg.seed)

    return factorize_layers(model, cfg, inputs, "cp", plan, LAYER_TYPES)
