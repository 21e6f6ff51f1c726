"""What the low-rank methods share: the factorized module, rank helpers and the shared config fields.

Every factorization replaces one layer by a short chain of ordinary layers (two Linears, or
1x1 / kxk / depthwise Conv2ds). The chain is a :class:`FactorizedLayer`, an ``nn.Sequential``
that remembers which method built it. It is ``@buildable``: an artifact records it as an empty
container and its children as plain ``Linear``/``Conv2d`` records, so
:func:`~modelpress.load_artifact` rebuilds it on the original architecture::

    >>> import torch
    >>> from torch import nn
    >>> f = FactorizedLayer("svd", nn.Linear(8, 2, bias=False), nn.Linear(2, 4))
    >>> f(torch.randn(3, 8)).shape, f.method
    (torch.Size([3, 4]), 'svd')
"""
from __future__ import annotations

import math
from typing import Any, Callable

import numpy as np
import torch
from pydantic import Field, model_validator
from torch import nn

from ..core.config import MethodConfig
from ..core.errors import ConfigError
from ..core.progress import progress_bar
from ..core.scope import Scope, first_and_last
from ..engine import MethodInputs, MethodResult
from ..nn.layer_kinds import parent_reads_weight
from ..nn.modules import set_module
from ..nn.records import buildable

METHODS = ("svd", "tucker", "cp")
LAYER_TYPES = ("Linear", "Conv2d")

# What a method's planner returns for one layer: a reason to leave it dense, or
# (rank, factorize() -> (new layer, relative error)).
Plan = Callable[[nn.Module], "str | tuple[Any, Callable[[], tuple[nn.Module, float]]]"]


class RankChoice(MethodConfig):
    """Fields SVD and Tucker share: how the rank is chosen (one of three rules) and which layers."""

    rank_ratio: float | None = Field(None, gt=0, le=1, description="rank as a fraction of the full rank")
    energy: float | None = Field(None, gt=0, le=1, description="fraction of squared singular values kept")
    param_ratio: float | None = Field(None, gt=0, lt=1, description="keep at most this fraction of params")
    scope: Scope = Scope()
    keep_first_last: bool = Field(False, description="leave the first and last layer dense")
    min_rank: int = Field(1, ge=1, description="never factorize below this rank")

    @model_validator(mode="after")
    def _one_rank_rule(self):
        given = [k for k in ("rank_ratio", "energy", "param_ratio") if getattr(self, k) is not None]
        if len(given) > 1:
            raise ValueError(f"give one of rank_ratio, energy, param_ratio (got {', '.join(given)})")
        return self


@buildable
class FactorizedLayer(nn.Sequential):
    """A layer replaced by its factors, applied in order (see the module docstring)."""

    def __init__(self, method: str, *factors: nn.Module):
        if method not in METHODS:
            raise ConfigError(f"FactorizedLayer.method must be one of {', '.join(METHODS)} (got {method!r})")
        super().__init__(*factors)
        self.method = method

    # Model code sometimes reads a layer's weight instead of calling it (Hugging Face ViT reads
    # the patch projection's ``weight.dtype``): the factorized layer answers with the dense weight
    # its factors multiply out to, computed on each read and stored nowhere.
    @property
    def weight(self) -> torch.Tensor:
        """The dense weight of the layer the factors replace (``[out, in]`` or ``[out, in, kh, kw]``)."""
        factors = list(self)
        if all(isinstance(f, nn.Linear) for f in factors):
            w = factors[0].weight
            for f in factors[1:]:
                w = f.weight @ w
            return w
        w = _full_kernel(factors[0])
        for f in factors[1:]:
            nxt = _full_kernel(f)
            o, m, kh, kw = nxt.shape
            _, i, ph, pw = w.shape
            if min(kh, ph) > 1 or min(kw, pw) > 1:  # not built by modelpress' factorizations
                raise ConfigError("FactorizedLayer.weight: two factors span the same spatial axis")
            w = torch.einsum("omyx,mipq->oiypxq", nxt, w).reshape(o, i, kh * ph, kw * pw)
        return w

    @property
    def bias(self) -> torch.Tensor | None:
        return self[-1].bias

    def spec(self) -> dict:  # recorded in artifacts; the factors are recorded as children
        return {"method": self.method}

    @classmethod
    def from_spec(cls, args: dict) -> "FactorizedLayer":
        return cls(args["method"])

    def extra_repr(self) -> str:
        return f"method={self.method!r}"


def _full_kernel(conv: nn.Module) -> torch.Tensor:
    """A conv factor's weight as a dense ``[out, in, kh, kw]`` kernel (a grouped one block-diagonal)."""
    w = conv.weight
    groups = getattr(conv, "groups", 1)
    if groups == 1:
        return w
    out, cin_g = w.shape[0], w.shape[1]
    cout_g = out // groups
    full = w.new_zeros(out, cin_g * groups, *w.shape[2:])
    for g in range(groups):
        full[g * cout_g:(g + 1) * cout_g, g * cin_g:(g + 1) * cin_g] = w[g * cout_g:(g + 1) * cout_g]
    return full


def n_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def relative_error(ref: torch.Tensor, approx: torch.Tensor) -> float:
    """``||ref - approx||_F / ||ref||_F`` (0 for an all-zero ``ref`` reproduced exactly)."""
    ref, approx = ref.detach().double().cpu(), approx.detach().double().cpu()
    norm = ref.norm()
    diff = (ref - approx).norm()
    return float(diff / norm) if norm > 0 else float(diff)


def energy_rank(singular_values: torch.Tensor, energy: float) -> int:
    """Smallest rank whose singular values keep ``energy`` of the sum of squares."""
    sq = singular_values.double().pow(2)
    total = float(sq.sum())
    if total == 0:
        return 1
    kept = torch.cumsum(sq, 0) / total
    return int(torch.searchsorted(kept, torch.tensor(energy - 1e-12, dtype=kept.dtype)).item()) + 1


def _evb_tau(x: np.ndarray, alpha: float) -> np.ndarray:
    """``tau(x)``: the root ``>= sqrt(alpha)`` of ``tau**2 - (x - 1 - alpha) * tau + alpha = 0``
    (the inverse of ``x = (1 + tau) * (1 + alpha / tau)``), for ``x >= (1 + sqrt(alpha))**2``."""
    b = x - 1.0 - alpha
    return 0.5 * (b + np.sqrt(np.maximum(b * b - 4.0 * alpha, 0.0)))


def _evb_gain(tau: np.ndarray, alpha: float) -> np.ndarray:
    """Change of ``2 F / M`` (F: the EVB free energy) when one component with ``tau`` is kept
    rather than pruned; negative when keeping it pays off."""
    return np.log1p(tau) + alpha * np.log1p(tau / alpha) - tau


def vbmf_rank(matrix: torch.Tensor) -> int:
    """Rank of ``matrix`` chosen by empirical variational Bayesian matrix factorization (EVBMF).

    Nakajima, Sugiyama, Babacan and Tomioka (JMLR 2013), "Global analytic solution of
    fully-observed variational Bayesian matrix factorization": for ``V`` (L x M, transposed so
    that ``L <= M``) observed with isotropic Gaussian noise of unknown variance ``sigma2``, with
    Gaussian priors on both factors whose variances are themselves estimated (empirical Bayes),
    the VB solution is a shrunk SVD that keeps exactly the singular values ``gamma_h`` above

        gamma_evb = sqrt(M * sigma2 * (1 + t) * (1 + alpha / t)),   alpha = L / M,

    where ``t`` (about ``2.5129 * sqrt(alpha)``) is the positive root of
    ``log(1 + t) + alpha * log(1 + t / alpha) - t = 0``. With ``x_h = gamma_h**2 / (M * sigma2)``
    and ``tau(x)`` the inverse of ``x = (1 + tau) * (1 + alpha / tau)``, the free energy as a
    function of the noise variance is, up to constants and a factor ``2 / M``,

        L * log(sigma2) + ||V||_F**2 / (M * sigma2)
            + sum over x_h > x_evb of [log(1 + tau_h) + alpha * log(1 + tau_h / alpha) - tau_h],

    with ``x_evb = (1 + t) * (1 + alpha / t)`` (each kept component lowers it). ``sigma2``
    minimises it (``scipy.optimize.minimize_scalar``, bounded, over ``log(sigma2)`` around the
    best point of a 65-point grid since the objective need not be unimodal) within the paper's bounds
    ``max(gamma_{H+1}**2 / (M * x_evb), sum_{h > H} gamma_h**2 / (M * (L - H))) <= sigma2 <=
    ||V||_F**2 / (L * M)``, with ``H = ceil(L / (1 + alpha)) - 1`` the largest rank EVB can
    return. The rank is the number of singular values above ``gamma_evb`` for that ``sigma2``,
    at least 1 (an all-noise or all-zero matrix gives 1).

        >>> g = torch.Generator().manual_seed(0)
        >>> signal = torch.randn(40, 3, generator=g) @ torch.randn(3, 60, generator=g)
        >>> vbmf_rank(signal + 0.05 * torch.randn(40, 60, generator=g))
        3
    """
    return evbmf(matrix)[0]


def evbmf(matrix: torch.Tensor) -> tuple[int, float]:
    """``(rank, noise variance)`` estimated by EVBMF (see :func:`vbmf_rank`)."""
    from scipy.optimize import brentq, minimize_scalar

    v = matrix.detach().double().cpu().reshape(matrix.shape[0], -1)
    if v.shape[0] > v.shape[1]:
        v = v.t()
    n_rows, n_cols = v.shape
    s = torch.linalg.svdvals(v).numpy()
    total = float((s ** 2).sum())
    if n_rows < 2 or total <= 0 or not np.isfinite(total):
        return 1, 0.0
    alpha = n_rows / n_cols
    t = brentq(lambda u: float(_evb_gain(np.array(u), alpha)), 1e-8 * math.sqrt(alpha), 1e3)
    x_thr = (1.0 + t) * (1.0 + alpha / t)
    h_max = min(math.ceil(n_rows / (1.0 + alpha)) - 1, n_rows - 1)
    upper = total / (n_rows * n_cols)
    lower = max(s[h_max] ** 2 / (n_cols * x_thr), float((s[h_max:] ** 2).sum()) / (n_cols * (n_rows - h_max)))
    s2 = s ** 2 / n_cols

    def objective(log_sigma2: float) -> float:
        sigma2 = math.exp(log_sigma2)
        x = s2 / sigma2
        kept = x[x > x_thr]
        return n_rows * log_sigma2 + total / (n_cols * sigma2) + float(_evb_gain(_evb_tau(kept, alpha), alpha).sum())

    if not lower < upper:
        sigma2 = upper
    else:
        lo, hi = math.log(lower), math.log(upper)
        grid = np.linspace(lo, hi, 65)
        i = int(np.argmin([objective(g) for g in grid]))
        a, b = grid[max(i - 1, 0)], grid[min(i + 1, len(grid) - 1)]
        res = minimize_scalar(objective, bounds=(a, b), method="bounded", options={"xatol": 1e-10})
        sigma2 = math.exp(res.x if res.fun <= objective(grid[i]) else grid[i])
    return max(1, int((s2 > sigma2 * x_thr).sum())), sigma2


def ratio_rank(full: int, ratio: float, min_rank: int = 1) -> int:
    """``ceil(ratio * full)`` clipped to ``[min_rank, full]``."""
    return max(min(min_rank, full), min(full, math.ceil(ratio * full - 1e-9)))


def check_conv(layer: nn.Conv2d) -> str | None:
    """Why a Conv2d cannot be factorized into dense factors, or None if it can."""
    if layer.groups != 1:
        return f"grouped conv (groups={layer.groups})"
    if layer.padding_mode != "zeros":
        return f"padding_mode={layer.padding_mode!r}"
    return None


def conv_weight(layer: nn.Conv2d, shape: tuple[int, ...], weight: torch.Tensor, bias: bool = False,
                **geometry) -> nn.Conv2d:
    """A Conv2d on ``layer``'s device/dtype holding ``weight`` (reshaped to ``shape``)."""
    out_ch, in_per_group, kh, kw = shape
    groups = geometry.pop("groups", 1)
    conv = nn.Conv2d(in_per_group * groups, out_ch, (kh, kw), bias=bias, groups=groups, **geometry)
    with torch.no_grad():
        conv.weight.copy_(weight.reshape(shape))
        if bias and layer.bias is not None:
            conv.bias.copy_(layer.bias)
        elif bias:
            conv.bias.zero_()
    return conv.to(device=layer.weight.device, dtype=layer.weight.dtype)


def factorize_layers(model: nn.Module, cfg: Any, inputs: MethodInputs, method: str, plan: Plan,
                     layer_types: tuple[str, ...] = LAYER_TYPES) -> MethodResult:
    """The one driver of the low-rank methods: every layer of ``layer_types`` in ``cfg.scope``
    (first and last left out with ``cfg.keep_first_last``) is planned by ``plan``; a layer is replaced by
    its factors unless the plan gives a reason not to (or the relative error exceeds
    ``cfg.max_error``, when the config has one). A layer whose parent reads its weight itself
    (``nn.MultiheadAttention``'s ``out_proj``, ``nn.TransformerEncoderLayer``'s ``linear1``/``linear2``)
    is left dense: a chain of factors has no single weight to read. Reports per layer the rank,
    the parameters before and after and the relative error; the layers left dense and why."""
    default_exclude = first_and_last(model, layer_types) if cfg.keep_first_last else []
    layers = cfg.scope.resolve(model, layer_types, default_exclude=default_exclude)
    max_error = getattr(cfg, "max_error", None)
    report, skipped = {}, {}

    def factorize_one(name: str, layer: nn.Module) -> None:
        read = parent_reads_weight(model, name)
        if read is not None:
            skipped[name] = read.reason
            return
        step = plan(layer)
        if isinstance(step, str):
            skipped[name] = step
            return
        rank, factorize = step
        new, err = factorize()
        if max_error is not None and err > max_error:
            skipped[name] = f"relative error {err:.3f} at rank {rank} exceeds max_error={max_error}"
            return
        report[name] = {"rank": rank, "params_before": n_params(layer), "params_after": n_params(new),
                        "rel_error": err}
        set_module(model, name, new)

    with progress_bar(f"lowrank.{method}", total=len(layers)) as advance:
        for name, layer in layers:
            advance(0, note=name)
            factorize_one(name, layer)
            advance()
    if skipped:
        inputs.log(f"lowrank.{method}: left dense: {', '.join(f'{n} ({r})' for n, r in skipped.items())}")
    return MethodResult(model, {"layers": report, "skipped": skipped})
