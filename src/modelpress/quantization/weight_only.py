"""Weight-only post-training quantization, round-to-nearest (``quant.weight_only``).

Every selected ``Linear``/``Conv2d`` becomes a packed :class:`~.modules.QuantLinear` /
:class:`~.modules.QuantConv2d`: weights stored as ``bits``-bit integers (2..8) with one fp32
scale per tensor, output channel or group of ``group_size`` inputs; activations stay float.
GPT-2's ``Conv1D`` is a Linear here (quantized per output channel, like any Linear), and every
``nn.LSTM`` / ``nn.GRU`` / ``nn.RNN`` becomes a :class:`~.rnn.QuantRNN` holding each of its weight
matrices the same way (a subclass with a forward of its own is left in float: ``info["skipped"]``).
No data is needed. ``range_search="mse"`` shrinks each row's range to the clipping that
minimises the weight's squared error (a grid search), which matters at 2..4 bits.

    >>> import torch
    >>> from modelpress import quantize
    >>> from modelpress.quantization.weight_only import WeightOnly
    >>> m = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.ReLU(), torch.nn.Linear(64, 10))
    >>> q = quantize(m, WeightOnly(bits=4))
    >>> type(q[0]).__name__, q[0].qweight.numel()          # 64 * 64 weights, 4 bits each
    ('QuantLinear', 2048)

A layer whose inputs per output channel are not a multiple of ``group_size`` (e.g. a 5x5
conv on one channel, 25 inputs) falls back to per-channel scales; ``info["fallback"]`` of the report
lists those layers. ``info["layers"]`` gives per layer: bits, granularity and the weight
SQNR in dB. Returns a new model (the verbs copy; see :mod:`modelpress.api`).
"""
from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field
from torch import nn

from ..core.config import MethodConfig
from ..core.scope import Scope, first_and_last
from ..engine import MethodInputs, MethodResult, register_method
from ..nn.layer_kinds import RECURRENT, plain_linears
from ..nn.modules import set_module
from .modules import QUANTIZABLE, quantize_layer, weight_spec
from .primitives import QuantizedTensor, QuantSpec, _grouped, minmax, qparams, quantize_tensor, sqnr
from .rnn import QuantRNN, rnn_weight_sqnr, unsupported_rnn

LAYER_TYPES = (*QUANTIZABLE, *RECURRENT)

RangeSearch = Literal["minmax", "mse"]


class WeightOnly(MethodConfig):
    """Weight-only quantization with round-to-nearest (int8, int4, ... with per-row scales)."""

    bits: int = Field(8, ge=2, le=8, description="bits per weight")
    granularity: Literal["tensor", "channel", "group"] = Field("channel", description="one scale per ...")
    group_size: int = Field(128, ge=1, description="inputs per scale when granularity='group'")
    symmetric: bool = Field(True, description="signed integers around zero, no zero point")
    range_search: RangeSearch = Field("minmax", description="'minmax' or the clipping with the least MSE")
    scope: Scope = Scope()
    keep_first_last: bool = Field(False, description="leave the first and last layer in float")


def layer_spec(layer: nn.Module, bits: int, granularity: str, group_size: int, symmetric: bool) -> QuantSpec:
    """The weight spec for ``layer``; group granularity falls back to channel when it does not fit."""
    fan_in = layer.weight[0].numel()
    if granularity == "group" and fan_in % group_size:
        granularity = "channel"
    return weight_spec(bits, granularity, group_size, symmetric)


@torch.no_grad()
def weight_ranges(w: torch.Tensor, spec: QuantSpec, search: RangeSearch = "minmax",
                  grid: int = 40, min_shrink: float = 0.3) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row ``(lo, hi)`` for quantizing ``w``: its min/max, or the shrunk range with the least MSE.

    The MSE search tries ``grid`` shrink factors between 1 and ``min_shrink`` and keeps, per
    row, the one with the smallest quantization error of that row.
    """
    lo, hi = minmax(w, spec)
    if search == "minmax":
        return lo, hi
    rows = _grouped(w.detach().float(), spec)
    best_err = torch.full_like(lo, float("inf"))
    best_lo, best_hi = lo.clone(), hi.clone()
    row_spec = _row_spec(spec)
    for shrink in torch.linspace(1.0, min_shrink, grid).tolist():
        # quantize-dequantize in place on one buffer: what quantize_tensor(...).dequantize() gives, without
        # the integer copy and the reshapes (this loop runs 40 times per layer, and per step in QAT)
        scale, zero = qparams(lo * shrink, hi * shrink, row_spec)
        err = torch.div(rows, scale).round_().add_(zero).clamp_(spec.qmin, spec.qmax).sub_(zero).mul_(scale)
        err = err.sub_(rows).square_().sum(dim=1, keepdim=True)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_lo = torch.where(better, lo * shrink, best_lo)
        best_hi = torch.where(better, hi * shrink, best_hi)
    return best_lo, best_hi


def _row_spec(spec: QuantSpec) -> QuantSpec:
    """``spec`` applied to an already grouped ``(rows, n)`` view: one scale per row."""
    return spec.model_copy(update={"granularity": "channel", "axis": 0})


def quantize_weight(w: torch.Tensor, spec: QuantSpec, search: RangeSearch = "minmax") -> QuantizedTensor:
    """Round-to-nearest quantization of a weight with ranges from :func:`weight_ranges`."""
    lo, hi = weight_ranges(w, spec, search)
    return quantize_tensor(w.detach().float().cpu(), spec, lo, hi)


def select_layers(model: nn.Module, scope: Scope, keep_first_last: bool,
                  layer_types: tuple[str, ...] = QUANTIZABLE) -> list[tuple[str, nn.Module]]:
    """The layers of ``layer_types`` in ``scope`` (first and last left out when ``keep_first_last``),
    for methods that replace every one of them: a GPT-2 ``Conv1D`` among them is replaced in
    ``model`` by the equivalent ``nn.Linear`` first (see :mod:`modelpress.nn.layer_kinds`)."""
    default_exclude = first_and_last(model, layer_types) if keep_first_last else []
    return plain_linears(model, scope.resolve(model, layer_types, default_exclude=default_exclude))


def quantize_rnn(layer: nn.RNNBase, cfg: WeightOnly) -> tuple[QuantRNN, dict]:
    """The packed copy of a recurrent layer and its report row (SQNR over all its matrices)."""
    q = QuantRNN.from_rnn(layer, cfg.bits, cfg.granularity, cfg.group_size, cfg.symmetric,
                          quantize=lambda w, spec: quantize_weight(w, spec, cfg.range_search))
    params = sum(getattr(layer, n).numel() for n in q.weight_names)
    return q, {"params": params, "bits": cfg.bits, "granularity": q.qspec.granularity,
               "sqnr_db": round(rnn_weight_sqnr(layer, q), 2)}


@register_method("quant.weight_only", WeightOnly, layer_types=LAYER_TYPES)
def weight_only(model: nn.Module, cfg: WeightOnly, inputs: MethodInputs) -> MethodResult:
    """Weight-only round-to-nearest quantization into packed int2..int8 layers (no data needed)."""
    layers = select_layers(model, cfg.scope, cfg.keep_first_last, LAYER_TYPES)
    report, fallback, skipped = {}, [], {}
    for name, layer in layers:
        if isinstance(layer, nn.RNNBase):
            reason = unsupported_rnn(layer)
            if reason:
                skipped[name] = reason
                continue
            q, report[name] = quantize_rnn(layer, cfg)
            if q.qspec.granularity != cfg.granularity:
                fallback.append(name)
            set_module(model, name, q)
            continue
        spec = layer_spec(layer, cfg.bits, cfg.granularity, cfg.group_size, cfg.symmetric)
        if spec.granularity != cfg.granularity:
            fallback.append(name)
        qt = quantize_weight(layer.weight, spec, cfg.range_search)
        report[name] = {"params": layer.weight.numel(), "bits": cfg.bits, "granularity": spec.granularity,
                        "sqnr_db": round(sqnr(layer.weight.detach().cpu(), qt.dequantize()), 2)}
        set_module(model, name, quantize_layer(layer, spec, qt=qt))
    if fallback:
        inputs.log(f"quant.weight_only: group_size {cfg.group_size} does not divide the inputs of "
                   f"{', '.join(fallback)}; those layers use per-channel scales")
    info = {"layers": report, "fallback": fallback}
    if skipped:
        info["skipped"] = skipped
        inputs.log(f"quant.weight_only: left in float: {', '.join(f'{n} ({r})' for n, r in skipped.items())}")
    return MethodResult(model, info)


def install_calibrated(model: nn.Module, results: dict, unreached: list[str], skipped: dict[str, str],
                       fallback: list[str], group_size: int, log, method: str) -> dict[str, str]:
    """Put the packed layers a layer-wise quantizer (GPTQ, AWQ) made into ``model`` and log what it left:
    ``results`` maps a layer name to ``(layer, spec, quantized tensor)``; returns ``skipped`` with the
    layers the calibration data never reached."""
    for name in unreached:
        skipped[name] = "not reached by the calibration data"
    for name, (layer, spec, qt) in results.items():
        set_module(model, name, quantize_layer(layer, spec, qt=qt))
    if fallback:
        log(f"{method}: group_size {group_size} does not divide the inputs of {', '.join(fallback)}; "
            "those layers use per-channel scales")
    if skipped:
        log(f"{method}: left in float: {', '.join(f'{n} ({r})' for n, r in skipped.items())}")
    return skipped

