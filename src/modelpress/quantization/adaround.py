"""AdaRound (Nagel et al. 2020): learned rounding of weights, plus bias correction (``quant.adaround``).

Round-to-nearest is not the best rounding for a layer's *output*: rounding some weights the
other way lets their errors cancel. AdaRound learns, per weight, whether to round down or
up, layer by layer, on calibration data:

* each weight becomes ``s * (floor(w / s) + h(V))`` with the rectified sigmoid
  ``h(V) = clip(sigmoid(V) * 1.2 - 0.1, 0, 1)``, ``V`` initialised so ``h(V)`` is the
  fractional part (the start is the float weight);
* Adam on ``V`` minimises the reconstruction error of the layer's output (summed over output
  channels, averaged over positions) plus ``reg_weight * sum(1 - |2h - 1|^beta)``, which pushes
  ``h`` to 0 or 1 as ``beta`` anneals from 20 to 2 (no regulariser for the first 20%);
* then rounding is hard (``h >= 0.5`` rounds up) and the layer is packed
  (:class:`~.modules.QuantLinear` / :class:`~.modules.QuantConv2d`).

Layers are processed in model order. A layer's inputs come from the model with the earlier
layers already quantized and its targets from the float model, so each layer also
compensates the error it receives. ``bias_correction=True`` then adds
``E[W x] - E[Q(W) x_q]`` (per output channel, over the calibration data) to the bias, which
removes the mean shift quantization leaves; ``iterations=0`` gives round-to-nearest with bias
correction only. A layer that never runs as a module because its parent reads its weight
(``nn.MultiheadAttention``'s ``out_proj``) has no inputs to learn from: it is rounded to nearest
and listed in ``info["round_to_nearest"]``. GPT-2's ``Conv1D`` is quantized as a Linear.

    >>> import torch
    >>> from modelpress.engine import MethodInputs, run_method
    >>> from modelpress.quantization.adaround import AdaRound
    >>> torch.manual_seed(0)  # doctest: +ELLIPSIS
    <...>
    >>> m = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.ReLU(), torch.nn.Linear(64, 8))
    >>> q, report = run_method(m, AdaRound(bits=4, iterations=200), MethodInputs(data=[torch.randn(64, 32)]))
    >>> rep = report.info["layers"]["0"]
    >>> rep["mse_adaround"] < rep["mse_rtn"]
    True

Returns a new model (the verbs copy; see :mod:`modelpress.api`).
"""
from __future__ import annotations

import copy
import itertools
import math
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from ..core.config import MethodConfig, StrictModel
from ..core.data import as_data, call_model, check_finite
from ..core.errors import DataError
from ..core.scope import Scope
from ..engine import MethodInputs, MethodResult, register_method
from ..nn.layer_kinds import parent_reads_weight
from ..nn.modules import set_module
from .modules import QUANTIZABLE, quantize_layer
from .primitives import QuantizedTensor, QuantSpec, broadcast_params, qparams
from .weight_only import layer_spec, quantize_weight, select_layers, weight_ranges

ZETA, GAMMA = 1.1, -0.1  # stretch of the rectified sigmoid (AdaRound paper, eq. 23)


class AdaRoundAdvanced(StrictModel):
    """Rarely changed knobs of the rounding optimisation."""

    lr: float = Field(3e-2, gt=0, description="Adam learning rate on V")
    reg_weight: float = Field(0.01, ge=0, description="weight of the rounding regulariser")
    beta_start: float = Field(20.0, gt=0)
    beta_end: float = Field(2.0, gt=0)
    warmup: float = Field(0.2, ge=0, lt=1, description="fraction of iterations without the regulariser")
    batch_size: int = Field(32, ge=1, description="calibration samples per iteration")
    seed: int = 0


class AdaRound(MethodConfig):
    """Weight-only quantization with learned rounding (AdaRound) and optional bias correction."""

    bits: int = Field(4, ge=2, le=8, description="bits per weight")
    granularity: Literal["tensor", "channel", "group"] = Field("channel", description="one scale per ...")
    group_size: int = Field(128, ge=1, description="inputs per scale when granularity='group'")
    symmetric: bool = True
    range_search: Literal["minmax", "mse"] = Field("mse", description="how each row's range is chosen")
    iterations: int = Field(300, ge=0, description="Adam steps per layer (0 = round-to-nearest)")
    calibration_batches: int = Field(8, ge=1, description="batches of the data used for calibration")
    bias_correction: bool = Field(True, description="add E[Wx] - E[Q(W)x] to the bias")
    scope: Scope = Scope()
    keep_first_last: bool = Field(False, description="leave the first and last layer in float")
    advanced: AdaRoundAdvanced = Field(default_factory=AdaRoundAdvanced)


# -- capturing a layer's inputs / outputs -----------------------------------------------
class _Stop(Exception):
    """Raised by a hook to end the forward pass once the layer of interest has run."""


@torch.no_grad()
def capture(model: nn.Module, layer: nn.Module, batches: list, what: Literal["input", "output"]) -> torch.Tensor:
    """The inputs (or outputs) of ``layer`` when ``model`` runs on ``batches``, concatenated."""
    got: list[torch.Tensor] = []

    def hook(_, args, out):
        got.append((args[0] if what == "input" else out).detach())
        raise _Stop

    handle = layer.register_forward_hook(hook)
    try:
        for inputs in batches:
            try:
                call_model(model, inputs)
            except _Stop:
                pass
    finally:
        handle.remove()
    if not got:
        raise DataError(f"the layer {type(layer).__name__} never ran on the calibration data",
                        hint="exclude layers the forward pass does not use with Scope(exclude=[...])")
    return torch.cat(got)


def run_layer(layer: nn.Module, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    if isinstance(layer, nn.Linear):
        return F.linear(x, weight, bias)
    return F.conv2d(x, weight, bias, layer.stride, layer.padding, layer.dilation, layer.groups)


def _channel_dim(layer: nn.Module) -> int:
    return -1 if isinstance(layer, nn.Linear) else 1


def output_mse(layer: nn.Module, x: torch.Tensor, y: torch.Tensor, weight: torch.Tensor,
               bias: torch.Tensor | None, chunk: int = 256) -> float:
    """Mean squared error of ``layer`` with ``weight`` against targets ``y`` (summed over channels)."""
    total, n = 0.0, 0
    with torch.no_grad():
        for i in range(0, x.shape[0], chunk):
            out = run_layer(layer, x[i:i + chunk], weight, bias)
            err = (out - y[i:i + chunk]).pow(2).sum(dim=_channel_dim(layer))
            total += float(err.sum())
            n += err.numel()
    return total / max(n, 1)


# -- the rounding optimisation ---------------------------------------------------------
def rectified_sigmoid(v: torch.Tensor) -> torch.Tensor:
    return torch.clamp(torch.sigmoid(v) * (ZETA - GAMMA) + GAMMA, 0, 1)


def rounding_regularizer(h: torch.Tensor, beta: float) -> torch.Tensor:
    """``sum(1 - |2h - 1|^beta)``: zero when every ``h`` is 0 or 1, largest at 0.5."""
    return (1 - (2 * h - 1).abs().pow(beta)).sum()


def adaround_weight(layer: nn.Module, x: torch.Tensor, y: torch.Tensor, spec: QuantSpec,
                    scale: torch.Tensor, zero: torch.Tensor, iterations: int,
                    adv: AdaRoundAdvanced | None = None) -> QuantizedTensor:
    """Learn the rounding of ``layer.weight`` so the layer maps inputs ``x`` to targets ``y``.

    ``scale``/``zero`` are per row (shape ``(rows, 1)``, see :mod:`.primitives`); returns the
    hard-rounded integers. ``iterations=0`` is round-to-nearest.
    """
    adv = adv or AdaRoundAdvanced()
    w = layer.weight.detach().float()
    s, z = broadcast_params(w, scale, spec), broadcast_params(w, zero, spec)
    w_floor = torch.floor(w / s)
    rest = (w / s - w_floor).clamp(0, 1)
    bias = None if layer.bias is None else layer.bias.detach().float()
    if iterations > 0:
        p = ((rest - GAMMA) / (ZETA - GAMMA)).clamp(1e-4, 1 - 1e-4)
        v = torch.log(p / (1 - p)).requires_grad_(True)
        opt = torch.optim.Adam([v], lr=adv.lr)
        gen = torch.Generator().manual_seed(adv.seed)
        warm = int(adv.warmup * iterations)
        dim = _channel_dim(layer)
        for it in range(iterations):
            idx = torch.randint(0, x.shape[0], (min(adv.batch_size, x.shape[0]),), generator=gen)
            h = rectified_sigmoid(v)
            w_soft = (torch.clamp(w_floor + h + z, spec.qmin, spec.qmax) - z) * s
            rec = (run_layer(layer, x[idx], w_soft, bias) - y[idx]).pow(2).sum(dim=dim).mean()
            loss = rec
            if it >= warm:
                t = (it - warm) / max(iterations - warm, 1)
                beta = adv.beta_end + 0.5 * (adv.beta_start - adv.beta_end) * (1 + math.cos(math.pi * t))
                loss = rec + adv.reg_weight * rounding_regularizer(h, beta)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        up = (v.detach() >= 0).float()
    else:
        up = (rest >= 0.5).float()
    q = torch.clamp(w_floor + up + z, spec.qmin, spec.qmax)
    dtype = torch.int8 if spec.signed else torch.uint8
    return QuantizedTensor(q.to(dtype).cpu(), scale.cpu(), zero.cpu(), spec, tuple(w.shape))


def bias_correction(layer: nn.Module, x_q: torch.Tensor, y: torch.Tensor, weight_q: torch.Tensor,
                    bias: torch.Tensor | None, chunk: int = 256) -> torch.Tensor:
    """The bias that makes the quantized layer's mean output per channel match the float one."""
    dim = _channel_dim(layer)
    out_ch = weight_q.shape[0]
    diff = torch.zeros(out_ch)
    count = 0
    with torch.no_grad():
        for i in range(0, x_q.shape[0], chunk):
            d = y[i:i + chunk] - run_layer(layer, x_q[i:i + chunk], weight_q, bias)
            d = d.movedim(dim, -1).reshape(-1, out_ch)
            diff += d.sum(0).cpu()
            count += d.shape[0]
    base = torch.zeros(out_ch) if bias is None else bias.detach().float().cpu()
    return base + diff / max(count, 1)


def calibration_inputs(data, batches: int, where: str) -> list:
    """The first ``batches`` input batches of ``data`` (DataError when there is none)."""
    if data is None:
        raise DataError(f"{where} needs calibration data", hint="pass data=[batch, ...] or a DataLoader")
    out = list(itertools.islice(as_data(data).inputs(), batches))
    if not out:
        raise DataError(f"{where}: the calibration data is empty", hint="pass at least one batch of inputs")
    for i, inputs in enumerate(out):
        check_finite(inputs, f"{where} calibration batch {i}")
    return out


@register_method("quant.adaround", AdaRound, needs_data=True, layer_types=QUANTIZABLE)
def adaround(model: nn.Module, cfg: AdaRound, inputs: MethodInputs) -> MethodResult:
    """AdaRound learned rounding, layer by layer on calibration data, with bias correction."""
    batches = calibration_inputs(inputs.data, cfg.calibration_batches, "quant.adaround")
    model.eval()
    reference = copy.deepcopy(model)  # float model: the targets
    ref_modules = dict(reference.named_modules())
    report, nearest = {}, {}
    for name, layer in select_layers(model, cfg.scope, cfg.keep_first_last):
        spec = layer_spec(layer, cfg.bits, cfg.granularity, cfg.group_size, cfg.symmetric)
        read = parent_reads_weight(model, name)
        if read is not None and not read.calls_layer:  # no inputs to capture: round to nearest
            nearest[name] = read.reason
            set_module(model, name, quantize_layer(layer, spec, qt=quantize_weight(layer.weight, spec,
                                                                                  cfg.range_search)))
            continue
        x_q = capture(model, layer, batches, "input")
        y = capture(reference, ref_modules[name], batches, "output")
        lo, hi = weight_ranges(layer.weight, spec, cfg.range_search)
        scale, zero = qparams(lo, hi, spec)
        scale, zero = scale.to(layer.weight.device), zero.to(layer.weight.device)
        rtn = adaround_weight(layer, x_q, y, spec, scale, zero, 0)
        qt = adaround_weight(layer, x_q, y, spec, scale, zero, cfg.iterations, cfg.advanced) \
            if cfg.iterations else rtn
        dev = layer.weight.device
        w_rtn, w_q = rtn.dequantize().to(dev), qt.dequantize().to(dev)
        bias = layer.bias
        rep = {"params": layer.weight.numel(), "bits": cfg.bits,
               "mse_rtn": output_mse(layer, x_q, y, w_rtn, bias),
               "mse_adaround": output_mse(layer, x_q, y, w_q, bias),
               "flipped": float((qt.q != rtn.q).float().mean())}
        if cfg.bias_correction:
            bias = bias_correction(layer, x_q, y, w_q, bias).to(dev)
            rep["mse_corrected"] = output_mse(layer, x_q, y, w_q, bias)
        report[name] = rep
        set_module(model, name, quantize_layer(layer, spec, qt=qt, bias=bias))
    info = {"layers": report}
    if nearest:
        info["round_to_nearest"] = nearest
        inputs.log(f"quant.adaround: rounded to nearest (their inputs cannot be captured): {', '.join(nearest)}")
    return MethodResult(model, info)
