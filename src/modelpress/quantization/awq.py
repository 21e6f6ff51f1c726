"""AWQ weight-only quantization (``quant.awq``), Lin et al. 2023: activation-aware scales.

A few input channels of a layer carry much larger activations than the rest; the weights that
multiply them matter most, and round-to-nearest treats them like any other. AWQ multiplies those
weight columns by ``s_j = mean|x_j| ** alpha`` (normalised) before rounding, so they are rounded
more finely, and divides the input by ``s`` in the op that produces it (the preceding norm or
Linear, :mod:`.smoothing`): the float model is unchanged, only the rounding improves.

* layers are calibrated one group at a time in call order, on the outputs of their
  already-quantized predecessors (:mod:`modelpress.engine.layerwise`); a group is the layers
  reading one input (q/k/v after a norm, gate/up, ``down_proj`` after ``up_proj``), which share
  one ``s``;
* ``alpha`` is searched on a grid of ``grid`` points in ``[0, 1)`` per group, minimising the
  group's output error ``sum tr((Q(W s)/s - W) H (Q(W s)/s - W)^T)`` with ``H = X^T X`` of the
  calibration inputs (``alpha = 0`` is round-to-nearest);
* ``clip``: each group of weights then gets the clipped range (``1 .. 1 - max_shrink`` of its
  min/max) with the least output error on the same inputs;
* a group whose input no op can absorb (see :func:`~.smoothing.find_folds`: e.g. BERT's
  post-norm blocks, whose norm also feeds the residual) keeps ``s = 1`` and gets only the clip
  search; ``info["layers"][name]["scaled_into"]`` says where each layer's scales went.

The storage is ``quant.weight_only``'s (packed :class:`~.modules.QuantLinear`), so reload, ONNX
export (``MatMulNBits``) and sizes are the same as RTN and GPTQ. ``info["layers"]`` gives per
layer the chosen ``alpha`` and ``error_vs_rtn`` (output error over round-to-nearest's, below 1 is
AWQ doing its job).

    >>> import torch
    >>> from modelpress import MethodInputs, run_method
    >>> from modelpress.quantization.awq import AWQ
    >>> net = torch.nn.Sequential(torch.nn.LayerNorm(64), torch.nn.Linear(64, 64), torch.nn.ReLU(),
    ...                           torch.nn.Linear(64, 8))
    >>> data = [torch.randn(32, 64) * torch.linspace(0.1, 10, 64) for _ in range(4)]
    >>> q, report = run_method(net, AWQ(bits=4, group_size=32), MethodInputs(data=data))
    >>> type(q[1]).__name__, report.info["layers"]["1"]["scaled_into"]
    ('QuantLinear', '0')
"""
from __future__ import annotations

import math
from typing import Literal

import torch
from pydantic import Field
from torch import nn

from ..core.config import MethodConfig
from ..core.errors import DataError
from ..core.scope import Scope
from ..engine import MethodInputs, MethodResult, register_method
from ..engine.layerwise import Hessian, Offload, calibrate_layerwise, calibration_inputs, split_calibratable
from .primitives import QuantizedTensor, QuantSpec, fake_quantize_tensor, minmax, quantize_tensor, sqnr
from .smoothing import find_folds, scale_consumer, scale_producer, untie
from .weight_only import install_calibrated, layer_spec, select_layers

LAYER_TYPES = ("Linear",)


class AWQ(MethodConfig):
    """AWQ: activation-aware weight-only quantization (scales searched on data, folded into the producer)."""

    bits: int = Field(4, ge=2, le=8, description="bits per weight")
    granularity: Literal["channel", "group"] = Field("group", description="one scale per output channel or group")
    group_size: int = Field(128, ge=1, description="inputs per scale when granularity='group'")
    symmetric: bool = Field(True, description="signed integers around zero, no zero point")
    grid: int = Field(20, ge=1, le=200, description="values of alpha tried in [0, 1)")
    clip: bool = Field(True, description="search each weight group's clipping on the calibration inputs")
    max_shrink: float = Field(0.5, ge=0, lt=1, description="clip search: ranges down to (1 - max_shrink) x min/max")
    calibration_batches: int = Field(16, ge=1, description="batches of data run for calibration")
    offload: Offload = Field("auto", description="keep the calibrated layers' weights on disk except while "
                                                 "they run or are compressed: 'disk', 'none', or 'auto' (when "
                                                 "they and calibration do not fit in the memory available)")
    scope: Scope = Scope()
    keep_first_last: bool = Field(False, description="leave the first and last layer in float")


class ActivationStats(Hessian):
    """``X^T X`` (as :class:`Hessian`) and the mean absolute value of each input channel."""

    def __init__(self, features: int, device: torch.device | str = "cpu"):
        super().__init__(features, device)
        self.abs_sum = torch.zeros(features, dtype=torch.float64, device=device)

    def observe(self, rows: torch.Tensor) -> None:
        super().observe(rows)
        self.abs_sum += rows.to(self.abs_sum.device, torch.float64).abs().sum(0)

    @property
    def mean_abs(self) -> torch.Tensor:
        return (self.abs_sum / max(self.rows, 1)).float()


def _error(d: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    """``tr(d H d^T)``: output error of a weight error ``d`` (out, in) on inputs with Hessian ``h``."""
    return ((d @ h) * d).sum()


@torch.no_grad()
def search_scales(weights: list[torch.Tensor], specs: list[QuantSpec], h: torch.Tensor, mean_abs: torch.Tensor,
                  grid: int) -> tuple[float, torch.Tensor, float]:
    """AWQ's grid search: ``(alpha, s, error over alpha=0's)`` minimising the group's output error."""
    base = mean_abs.clamp(min=1e-5)
    best = (math.inf, 0.0, torch.ones_like(base))
    first = None
    for i in range(grid):
        alpha = i / grid
        s = base.pow(alpha)
        s = s / (s.max() * s.min()).sqrt()
        err = 0.0
        for w, spec in zip(weights, specs):
            q = fake_quantize_tensor(w * s[None, :], spec) / s[None, :]
            err += float(_error(q - w, h))
        first = err if first is None else first
        if err < best[0]:
            best = (err, alpha, s)
    ratio = best[0] / first if first else 1.0
    return best[1], best[2], ratio


@torch.no_grad()
def clipped_ranges(w: torch.Tensor, spec: QuantSpec, h: torch.Tensor, grid: int,
                   max_shrink: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row ``(lo, hi)`` of ``w``'s quantization groups: the min/max shrunk by the factor in
    ``[1 - max_shrink, 1]`` with the least output error on inputs with Hessian ``h`` (its diagonal
    blocks: groups are scored one at a time)."""
    lo, hi = minmax(w, spec)
    if max_shrink == 0 or grid <= 1:
        return lo, hi
    out, cols = w.shape
    g = spec.group_size if spec.granularity == "group" else cols
    blocks = torch.stack([h[i:i + g, i:i + g] for i in range(0, cols, g)])        # (G, g, g)
    best_err = torch.full_like(lo, math.inf)
    best_lo, best_hi = lo.clone(), hi.clone()
    for shrink in torch.linspace(1.0, 1.0 - max_shrink, grid).tolist():
        d = (fake_quantize_tensor(w, spec, lo * shrink, hi * shrink) - w).reshape(out, cols // g, g).transpose(0, 1)
        err = (torch.bmm(d, blocks) * d).sum(-1).transpose(0, 1).reshape(-1, 1)  # (out * G, 1), row-major
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_lo = torch.where(better, lo * shrink, best_lo)
        best_hi = torch.where(better, hi * shrink, best_hi)
    return best_lo, best_hi


def fold_into_quantized(qt: QuantizedTensor, s: torch.Tensor) -> None:
    """Divide output row ``j`` of an already-quantized weight by ``s_j`` (its scales; exact)."""
    out = qt.shape[0]
    qt.scale = (qt.scale.reshape(out, -1) / s.to(qt.scale)[:, None]).reshape(qt.scale.shape)


@register_method("quant.awq", AWQ, needs_data=True, layer_types=LAYER_TYPES)
def awq(model: nn.Module, cfg: AWQ, inputs: MethodInputs) -> MethodResult:
    """AWQ: activation-aware int2..int8 weight quantization, scales folded into the producing op (packed layers)."""
    batches = calibration_inputs(inputs.data, cfg.calibration_batches, "quant.awq")
    layers, skipped = split_calibratable(select_layers(model, cfg.scope, cfg.keep_first_last, LAYER_TYPES))
    untie(model, [layer for _, layer in layers])  # a tied lm_head: scaling it must not scale the embedding
    folds = {n: f for f in find_folds(model, dict(layers), batches[0]) for n in f.consumers}
    modules = dict(model.named_modules())
    results: dict[str, tuple[nn.Module, QuantSpec, QuantizedTensor]] = {}
    report: dict[str, dict] = {}
    fallback: list[str] = []

    def compress_group(group: dict[str, nn.Module], observers: dict[str, ActivationStats]) -> None:
        names = list(group)
        stats = observers[names[0]]
        h = stats.matrix.float()
        specs = {}
        for n, layer in group.items():
            specs[n] = layer_spec(layer, cfg.bits, cfg.granularity, cfg.group_size, cfg.symmetric)
            if specs[n].granularity != cfg.granularity:
                fallback.append(n)
        originals = {n: layer.weight.detach().float().clone() for n, layer in group.items()}
        fold = folds.get(names[0])
        producer = fold.producer if fold is not None and set(fold.consumers) == set(names) else None
        alpha, gain = 0.0, 1.0
        if producer is not None and cfg.grid > 1:
            alpha, s, gain = search_scales(list(originals.values()), list(specs.values()), h,
                                           stats.mean_abs.to(h.device), cfg.grid)
            if alpha > 0:
                scale_producer(modules[producer], s)
                if producer in results:
                    fold_into_quantized(results[producer][2], s)
                for layer in group.values():
                    scale_consumer(layer, s)
                h = h / (s[:, None] * s[None, :])  # the inputs are now x / s
        for n, layer in group.items():
            w = layer.weight.detach().float()
            spec = specs[n]
            if cfg.clip:
                lo, hi = clipped_ranges(w, spec, h, cfg.grid, cfg.max_shrink)
            else:
                lo, hi = minmax(w, spec)
            qt = quantize_tensor(w.cpu(), spec, lo.cpu(), hi.cpu())
            deq = qt.dequantize().to(layer.weight.device)
            if not torch.isfinite(qt.scale).all():
                raise DataError(f"quant.awq: layer {n!r}: non-finite scales", hint="check the weights")
            ours = float(_error(deq - w, h))
            rtn = float(_error(fake_quantize_tensor(originals[n], spec) - originals[n], stats.matrix.float()))
            report[n] = {"params": w.numel(), "bits": cfg.bits, "granularity": spec.granularity,
                         "alpha": alpha, "scaled_into": producer if alpha > 0 else None,
                         "sqnr_db": round(sqnr(w.cpu(), deq.cpu()), 2),
                         "error_vs_rtn": round(ours / rtn, 4) if rtn > 0 else (0.0 if ours == 0 else math.inf)}
            layer.weight.data.copy_(deq.to(layer.weight.dtype))  # later groups see this layer quantized
            results[n] = (layer, spec, qt)

    def producers(names: list[str]) -> list[nn.Module]:  # scaled with the group (on disk otherwise)
        fold = folds.get(names[0])
        return [modules[fold.producer]] if fold is not None and fold.producer in modules else []

    unreached = calibrate_layerwise(model, layers, batches, ActivationStats, None, "quant.awq",
                                    compress_group=compress_group, offload=cfg.offload, replaces_weights=True,
                                    also_hold=producers, log=inputs.log)
    install_calibrated(model, results, unreached, skipped, fallback, cfg.group_size, inputs.log, "quant.awq")
    scaled = sorted({r["scaled_into"] for r in report.values() if r["scaled_into"]})
    info = {"layers": report, "fallback": fallback, "calibration_batches": len(batches),
            "scaled_into": scaled, "unscaled": [n for n, r in report.items() if not r["scaled_into"]]}
    if skipped:
        info["skipped"] = skipped
    return MethodResult(model, info)
