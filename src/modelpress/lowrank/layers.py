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

import torch
from pydantic import Field, model_validator
from torch import nn

from ..core.config import MethodConfig
from ..core.errors import ConfigError
from ..core.scope import Scope
from ..export.modules import buildable

METHODS = ("svd", "tucker", "cp")


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

    def spec(self) -> dict:  # recorded in artifacts; the factors are recorded as children
        return {"method": self.method}

    @classmethod
    def from_spec(cls, args: dict) -> "FactorizedLayer":
        return cls(args["method"])

    def extra_repr(self) -> str:
        return f"method={self.method!r}"


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
