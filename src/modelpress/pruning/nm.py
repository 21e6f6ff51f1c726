"""N:M semi-structured sparsity (``prune.nm``): at most N non-zeros in every M consecutive weights.

Groups run along the *input* (reduction) dimension, the layout sparse tensor cores use
(NVIDIA's 2:4 on Ampere and later):

* ``Linear`` ``(out, in)``: groups of M consecutive input features of each output row;
* ``Conv2d`` ``(out, in, kh, kw)``: each filter is flattened channels-last, ``(kh, kw, in)``,
  as NVIDIA's ASP does, so when ``in % M == 0`` a group is M consecutive input channels at
  one kernel position (otherwise groups continue across kernel positions); ``Conv1d`` alike;
* GPT-2's ``Conv1D`` stores its weight ``(in, out)``: groups run along its dim 0, the inputs;
* ``LSTM`` / ``GRU`` / ``RNN``: every weight matrix ``(gates * hidden, in)`` on its own, named
  ``lstm.weight_ih_l0`` ... in the report.

In each group the N largest ``|w|`` stay; the others are zeroed and masked, so fine-tuning
keeps the pattern. A layer whose reduction length ``in*kh*kw`` is not divisible by M
(LeNet-5's conv2: 150; a depthwise 3x3: 9) is handled by ``incompatible``: ``"skip"``
(default: left dense and reported in the run's ``info["skipped"]``, as NVIDIA's ASP does;
naming such a layer explicitly in the scope is an error), ``"error"``, or ``"pad"``: the
row is treated as zero-padded to a multiple of M (what a kernel would do), so the last,
short group keeps at most N weights.

    >>> import torch
    >>> from modelpress import prune
    >>> from modelpress.pruning.nm import NMSparsity, verify_nm
    >>> m = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Linear(16, 8), torch.nn.Linear(8, 2))
    >>> p = prune(m, NMSparsity(n=2, m=4))
    >>> verify_nm(p[1].weight, 2, 4), float((p[1].weight == 0).float().mean())
    (True, 0.5)
"""
from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field, model_validator
from torch import nn

from ..core.config import MethodConfig
from ..core.errors import UnsupportedError
from ..core.scope import Scope, first_and_last
from ..engine import MethodInputs, MethodResult, register_method
from ..nn.layer_kinds import weight_refs
from .magnitude import WEIGHT_PRUNABLE


class NMSparsity(MethodConfig):
    """Keep the N largest weights in every group of M along the input dimension (2:4 by default)."""

    n: int = Field(2, ge=1, description="weights kept per group")
    m: int = Field(4, ge=2, le=128, description="group size")
    scope: Scope = Scope()
    keep_first_last: bool = Field(True, description="leave the first and last layer dense")
    incompatible: Literal["skip", "error", "pad"] = Field(
        "skip", description="layers whose input dimension is not divisible by m: skip, error or zero-pad")

    @model_validator(mode="after")
    def _n_below_m(self):
        if self.n >= self.m:
            raise ValueError(f"n ({self.n}) must be smaller than m ({self.m})")
        return self


def _rows(weight: torch.Tensor) -> torch.Tensor:
    """``(out, K)`` view with the input dimension last: channels-last for convolutions."""
    return weight.movedim(1, -1).reshape(weight.shape[0], -1) if weight.dim() > 2 else weight


def _unrows(rows: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    if len(shape) <= 2:
        return rows.reshape(shape)
    moved = (shape[0], *shape[2:], shape[1])
    return rows.reshape(moved).movedim(-1, 1)


def _groups(rows: torch.Tensor, m: int, fill: float) -> torch.Tensor:
    """``(out, K/m, m)`` groups, the last one padded with ``fill`` when ``K % m``."""
    extra = (-rows.shape[1]) % m
    if extra:
        rows = torch.cat([rows, rows.new_full((rows.shape[0], extra), fill)], dim=1)
    return rows.reshape(rows.shape[0], -1, m)


def reduction_length(weight: torch.Tensor) -> int:
    """Length of the input dimension the groups run along (``in * kh * kw`` for a conv)."""
    return int(weight[0].numel())


def nm_mask(weight: torch.Tensor, n: int, m: int, scores: torch.Tensor | None = None) -> torch.Tensor:
    """0/1 mask keeping the ``n`` highest ``scores`` (default ``|w|``) in each group of ``m``."""
    scores = (weight.detach().abs() if scores is None else scores).float()
    k = reduction_length(weight)
    groups = _groups(_rows(scores), m, float("-inf"))  # padding never wins a slot
    keep = torch.zeros_like(groups)
    keep.scatter_(-1, groups.topk(n, dim=-1).indices, 1.0)
    keep = keep.reshape(groups.shape[0], -1)[:, :k]
    return _unrows(keep, weight.shape)


def verify_nm(weight: torch.Tensor, n: int, m: int) -> bool:
    """True when every group of ``m`` along the input dimension holds at most ``n`` non-zeros.

    A length not divisible by ``m`` is checked as if zero-padded (see the module docstring).
    """
    nonzero = _groups(_rows((weight.detach() != 0).float()), m, 0.0)
    return bool((nonzero.sum(-1) <= n).all())


@register_method("prune.nm", NMSparsity, layer_types=WEIGHT_PRUNABLE)
def nm_prune(model: nn.Module, cfg: NMSparsity, inputs: MethodInputs) -> MethodResult:
    """N:M semi-structured sparsity (2:4, 1:4, 4:8 ...) along the input dimension, masked."""
    default_exclude = first_and_last(model, WEIGHT_PRUNABLE) if cfg.keep_first_last else []
    layers = weight_refs(cfg.scope.resolve(model, WEIGHT_PRUNABLE, default_exclude=default_exclude))
    skipped = {}
    if cfg.incompatible != "pad":  # check every layer before touching any
        for name, ref in layers:
            k = reduction_length(ref.out_in())
            if k % cfg.m == 0:
                continue
            if cfg.incompatible == "skip" and ref.owner not in cfg.scope.include:
                skipped[name] = f"input dimension {k} is not divisible by m={cfg.m}"
                continue
            raise UnsupportedError(
                f"layer {name!r}: input dimension {k} (in_channels*kernel) is not divisible by m={cfg.m}",
                hint=f"exclude it with Scope(exclude=[{ref.owner!r}]) or set incompatible='pad' to zero-pad it")
        layers = [(n, m) for n, m in layers if n not in skipped]
        if not layers:
            raise UnsupportedError(f"no selected layer has an input dimension divisible by m={cfg.m}",
                                   hint="use incompatible='pad' or a smaller m")
    with torch.no_grad():
        for name, ref in layers:
            scores = ref.weight.detach().abs()
            old = ref.mask()
            if old is not None:  # weights pruned earlier stay pruned
                scores = scores.masked_fill(old == 0, -1.0)
            mask = ref.from_out_in(nm_mask(ref.out_in(), cfg.n, cfg.m, ref.out_in(scores)))  # groups along inputs
            ref.set_mask(mask if old is None else mask * old)
    info = {"layer_sparsity": {n: float((ref.weight == 0).float().mean()) for n, ref in layers},
            "pattern": f"{cfg.n}:{cfg.m}"}
    if skipped:
        info["skipped"] = skipped
        inputs.log(f"prune.nm left dense: {', '.join(f'{n} ({why})' for n, why in skipped.items())}")
    return MethodResult(model, info)
