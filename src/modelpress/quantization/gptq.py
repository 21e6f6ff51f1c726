"""GPTQ weight-only quantization (``quant.gptq``), Frantar et al. 2022.

Round-to-nearest (``quant.weight_only``) rounds every weight on its own. GPTQ rounds the inputs
of a layer one column at a time and spreads each column's rounding error over the columns not
rounded yet, weighted by the inverse of ``H = 2 X^T X / n``, the Hessian of the layer's squared
output error on calibration inputs ``X``: the output ``X W^T`` moves as little as it can
(the optimal brain surgeon update, computed in blocks from the Cholesky factor of ``H^-1``).

* layers are calibrated one group at a time in the order the model calls them, each on the
  outputs of its already-quantized predecessors (:mod:`modelpress.engine.layerwise`; memory: one
  group's Hessians);
* ``bits`` 2..8, one scale per output channel or per ``group_size`` inputs, symmetric or
  asymmetric: the storage of ``quant.weight_only`` (packed :class:`~.modules.QuantLinear` /
  :class:`~.modules.QuantConv2d`), so reload, ONNX export and sizes are the same;
* ``act_order``: columns go in order of decreasing ``diag(H)`` (the inputs that matter most are
  rounded first, while most columns can still absorb their error); group scales are then fixed
  from the original weights before the sweep, so every group stays a contiguous run of inputs
  (what the packed format and deployment kernels expect);
* ``damp``: ``damp * mean(diag H)`` added to the diagonal before the Cholesky factorization;
* ``range_search="mse"``: each group's range is the clipping with the least squared weight error
  (as ``quant.weight_only`` offers), not its min/max.

``Linear`` (GPT-2's ``Conv1D`` included) and ``Conv2d`` (its inputs unfolded into patches) layers;
``info["layers"]`` gives per layer the weight SQNR and ``error_vs_rtn``: GPTQ's output error
``tr((W - Q) H (W - Q)^T)`` over round-to-nearest's on the same calibration inputs (below 1 is
GPTQ doing its job).

    >>> import torch
    >>> from modelpress import quantize
    >>> from modelpress.quantization.gptq import GPTQ
    >>> net = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.ReLU(), torch.nn.Linear(64, 8))
    >>> data = [torch.randn(32, 64) for _ in range(4)]
    >>> q = quantize(net, GPTQ(bits=4, group_size=32), data)
    >>> type(q[0]).__name__, q[0].qspec.bits
    ('QuantLinear', 4)
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
from ..engine.layerwise import (
    Hessian,
    Offload,
    calibrate_layerwise,
    calibration_inputs,
    inverse_hessian_cholesky,
    split_calibratable,
)
from .primitives import QuantizedTensor, QuantSpec, qparams, sqnr
from .weight_only import RangeSearch, install_calibrated, layer_spec, quantize_weight, select_layers, weight_ranges

LAYER_TYPES = ("Linear", "Conv2d")


class GPTQ(MethodConfig):
    """GPTQ: second-order weight-only quantization calibrated layer by layer on data."""

    bits: int = Field(4, ge=2, le=8, description="bits per weight")
    granularity: Literal["channel", "group"] = Field("group", description="one scale per output channel or group")
    group_size: int = Field(128, ge=1, description="inputs per scale when granularity='group'")
    symmetric: bool = Field(True, description="signed integers around zero, no zero point")
    act_order: bool = Field(True, description="quantize inputs in order of decreasing Hessian diagonal")
    damp: float = Field(0.01, gt=0, le=1, description="fraction of mean(diag H) added to the diagonal")
    range_search: RangeSearch = Field("minmax", description="each group's range: 'minmax' or the clipping "
                                                            "with the least squared error ('mse')")
    block_size: int = Field(128, ge=1, description="columns updated together (speed only)")
    calibration_batches: int = Field(16, ge=1, description="batches of data run for calibration")
    offload: Offload = Field("auto", description="keep the calibrated layers' weights on disk except while "
                                                 "they run or are compressed: 'disk', 'none', or 'auto' (when "
                                                 "they and calibration do not fit in the memory available)")
    scope: Scope = Scope()
    keep_first_last: bool = Field(False, description="leave the first and last layer in float")


def _params(cols: torch.Tensor, spec: QuantSpec, search: RangeSearch = "minmax") -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and zero point per row of ``cols`` (out, k) under ``spec``'s bits / symmetry: the row's
    min/max, or the clipped range with the least squared error (``search="mse"``)."""
    row_spec = spec.model_copy(update={"granularity": "channel", "axis": 0})
    lo, hi = weight_ranges(cols, row_spec, search)
    return qparams(lo, hi, spec)


@torch.no_grad()
def gptq_quantize(w: torch.Tensor, h: torch.Tensor, spec: QuantSpec, *, act_order: bool = True,
                  damp: float = 0.01, block_size: int = 128, range_search: RangeSearch = "minmax",
                  name: str = "layer") -> QuantizedTensor:
    """GPTQ of one weight ``w`` (out, inputs...) given the Hessian ``h`` of its flattened inputs."""
    shape = tuple(w.shape)
    wf = w.detach().reshape(shape[0], -1).to(h.device, torch.float32).clone(memory_format=torch.contiguous_format)
    out, cols = wf.shape
    wf[:, h.diagonal() == 0] = 0.0  # inputs that are always zero
    group = spec.group_size if spec.granularity == "group" else cols
    n_groups = cols // group
    scale = torch.zeros(out, n_groups, device=wf.device)
    zero = torch.zeros(out, n_groups, device=wf.device)
    if spec.granularity == "channel" or act_order:  # ranges fixed from the weights before the sweep
        for g in range(n_groups):
            s, z = _params(wf[:, g * group:(g + 1) * group], spec, range_search)
            scale[:, g], zero[:, g] = s[:, 0], z[:, 0]
    perm = torch.argsort(h.diagonal(), descending=True) if act_order else torch.arange(cols, device=wf.device)
    wp = wf[:, perm]
    hinv = inverse_hessian_cholesky(h[perm][:, perm], damp, f"quant.gptq: layer {name!r}").to(torch.float32)
    q = torch.zeros_like(wp)
    if spec.granularity == "group" and not act_order:
        block_size = group  # a group's range is read from the weights as they stand when it starts
    lazy = spec.granularity == "group" and not act_order
    for start in range(0, cols, block_size):
        stop = min(start + block_size, cols)
        block = wp[:, start:stop].clone()
        err = torch.zeros_like(block)
        hb = hinv[start:stop, start:stop]
        for i in range(stop - start):
            col = int(perm[start + i])
            g = col // group
            if lazy and col % group == 0:
                s, z = _params(block[:, i:i + group], spec, range_search)
                scale[:, g], zero[:, g] = s[:, 0], z[:, 0]
            s, z = scale[:, g], zero[:, g]
            w_col = block[:, i]
            q_col = torch.clamp(torch.round(w_col / s) + z, spec.qmin, spec.qmax)
            q[:, start + i] = q_col
            e = (w_col - (q_col - z) * s) / hb[i, i]
            block[:, i:] -= e[:, None] * hb[i, i:][None, :]
            err[:, i] = e
        wp[:, stop:] -= err @ hinv[start:stop, stop:]
    ints = torch.empty_like(q)
    ints[:, perm] = q
    if not torch.isfinite(scale).all():
        raise DataError(f"quant.gptq: layer {name!r}: non-finite scales", hint="check the weights")
    dtype = torch.int8 if spec.signed else torch.uint8
    rows = out * n_groups
    return QuantizedTensor(ints.to(dtype).cpu().reshape(shape), scale.reshape(rows, 1).cpu(),
                           zero.reshape(rows, 1).cpu(), spec, shape)


def output_error(w: torch.Tensor, approx: torch.Tensor, h: torch.Tensor, rows: int = 1024) -> float:
    """``tr((W - Q) H (W - Q)^T)``: the layer's squared output error on the calibration inputs (x2/n),
    in float64, ``rows`` output rows at a time (a whole float64 copy of an LM head is hundreds of MB)."""
    w2, a2 = w.detach().reshape(w.shape[0], -1), approx.reshape(w.shape[0], -1)
    total = 0.0
    for i in range(0, w2.shape[0], rows):
        d = w2[i:i + rows].to(h.device, torch.float64) - a2[i:i + rows].to(h.device, torch.float64)
        total += float(((d @ h) * d).sum())
    return total


@register_method("quant.gptq", GPTQ, layer_types=LAYER_TYPES)
def gptq(model: nn.Module, cfg: GPTQ, inputs: MethodInputs) -> MethodResult:
    """GPTQ: layer-by-layer second-order int2..int8 weight quantization calibrated on data (packed layers)."""
    batches = calibration_inputs(inputs.data, cfg.calibration_batches, "quant.gptq")
    layers, skipped = split_calibratable(select_layers(model, cfg.scope, cfg.keep_first_last, LAYER_TYPES))
    results: dict[str, tuple[nn.Module, QuantSpec, QuantizedTensor]] = {}
    report: dict[str, dict] = {}
    fallback: list[str] = []

    def compress(name: str, layer: nn.Module, stats: Hessian) -> None:
        spec = layer_spec(layer, cfg.bits, cfg.granularity, cfg.group_size, cfg.symmetric)
        if spec.granularity != cfg.granularity:
            fallback.append(name)
        h = stats.matrix
        qt = gptq_quantize(layer.weight, h, spec, act_order=cfg.act_order, damp=cfg.damp,
                           block_size=cfg.block_size, range_search=cfg.range_search, name=name)
        deq = qt.dequantize().to(layer.weight.device, layer.weight.dtype)
        rtn = quantize_weight(layer.weight, spec, cfg.range_search).dequantize()  # RTN, for the report
        ours, theirs = output_error(layer.weight, deq, h), output_error(layer.weight, rtn, h)
        report[name] = {"params": layer.weight.numel(), "bits": cfg.bits, "granularity": spec.granularity,
                        "sqnr_db": round(sqnr(layer.weight.detach().cpu(), deq.cpu()), 2),
                        "error_vs_rtn": round(ours / theirs, 4) if theirs > 0 else (0.0 if ours == 0 else math.inf)}
        layer.weight.data.copy_(deq.reshape(layer.weight.shape))  # later layers see this layer quantized
        results[name] = (layer, spec, qt)

    unreached = calibrate_layerwise(model, layers, batches, Hessian, compress, "quant.gptq",
                                    offload=cfg.offload, replaces_weights=True, log=inputs.log)
    install_calibrated(model, results, unreached, skipped, fallback, cfg.group_size, inputs.log, "quant.gptq")
    info = {"layers": report, "fallback": fallback, "calibration_batches": len(batches)}
    if skipped:
        info["skipped"] = skipped
    return MethodResult(model, info)
