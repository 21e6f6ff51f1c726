"""Mixed-precision weight quantization under a size budget (``quant.mixed_precision``).

Layers do not suffer equally from low bit-widths. This method measures, for every selected
``Linear``/``Conv2d`` and every candidate width, how much the model's loss grows when only
that layer is quantized, then picks one width per layer so that the quantized weights fit
the budget with the smallest total estimated loss increase, and applies it with packed
weight-only layers (:mod:`.modules`, round-to-nearest).

Sensitivity (per layer ``l`` and width ``b``, on ``calibration_batches`` batches):

* ``"loss"``: ``L(model with only layer l at b bits) - L(float model)``, measured;
* ``"hessian"``: ``1/2 * tr(H_l) / n_l * ||Q_b(W_l) - W_l||^2`` (HAWQ-v2), with the trace of
  the layer's loss Hessian estimated by Hutchinson's method (``E[v^T H v]``, Rademacher ``v``).

The loss is the caller's ``loss_fn`` when given; otherwise, by default (``loss_against="float_model"``),
the divergence from the float model's own outputs on the calibration batches: KL divergence of
the outputs as the task measures it (:meth:`~modelpress.tasks.Task.output_divergence`: KL divergence of
the predicted class distributions for classifiers, mean squared error by default). It
needs no labels, is zero at the float model and grows with every perturbation, so it ranks
layers reliably; the cross-entropy on labels (``loss_against="labels"``) does not always: at
4..8 bits quantization noise lowers it about as often as it raises it. Sensitivities are made
monotone (fewer bits never look better than more bits).

Budget: ``budget_bytes``, or ``budget_ratio`` times the fp32 bytes of every Linear/Conv2d
weight of the model (default 0.25). A quantized weight costs its packed integers plus its fp32
scales (and zero points when asymmetric), exactly what the artifact stores; layers outside
the scope count at fp32. The allocation is a multiple-choice knapsack solved by dynamic
programming on byte costs rounded up, so the budget always holds.

    >>> import torch
    >>> from modelpress.engine import MethodInputs, run_method
    >>> from modelpress.quantization.mixed import MixedPrecision
    >>> from modelpress.quantization.modules import packed_weight_bytes
    >>> torch.manual_seed(0)  # doctest: +ELLIPSIS
    <...>
    >>> m = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.ReLU(), torch.nn.Linear(64, 10))
    >>> q, report = run_method(m, MixedPrecision(budget_bytes=3000), MethodInputs(data=[torch.randn(32, 64)]))
    >>> packed_weight_bytes(q) <= 3000, [row["bits"] for row in report.info["layers"]]
    (True, [4, 8])

Returns a new model (the verbs copy; see :mod:`modelpress.api`).
"""
from __future__ import annotations

import itertools
import math
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import Field, field_validator, model_validator
from torch import nn

from ..core.config import MethodConfig
from ..core.data import call_model, check_finite, split_batch
from ..core.errors import ConfigError, DataError
from ..core.scope import Scope, type_matches
from ..engine import MethodInputs, MethodResult, register_method
from ..nn.modules import set_module
from .modules import QUANTIZABLE, quantize_layer, quantized_weight_bytes
from .weight_only import layer_spec, quantize_weight, select_layers

DEFAULT_RATIO = 0.25
DP_RESOLUTION = 4096  # byte-cost buckets of the knapsack


class MixedPrecision(MethodConfig):
    """Per-layer bit-widths chosen by sensitivity to meet a size budget (weight-only, packed)."""

    candidate_bits: list[int] = Field(default_factory=lambda: [2, 4, 8], description="widths to choose from")
    budget_bytes: int | None = Field(None, ge=1, description="bytes of all Linear/Conv2d weights")
    budget_ratio: float | None = Field(None, gt=0, le=1, description=f"fraction of fp32 weight bytes "
                                                                     f"(default {DEFAULT_RATIO})")
    sensitivity: Literal["loss", "hessian"] = "loss"
    loss_against: Literal["float_model", "labels"] = Field(
        "float_model", description="KL divergence from the float model's predictions, or cross-entropy on labels")
    granularity: Literal["tensor", "channel", "group"] = "channel"
    group_size: int = Field(128, ge=1)
    symmetric: bool = True
    range_search: Literal["minmax", "mse"] = Field("mse", description="how each row's range is chosen")
    calibration_batches: int = Field(4, ge=1, description="batches used to measure sensitivity")
    hutchinson_samples: int = Field(16, ge=1, description="random vectors per batch for sensitivity='hessian'")
    scope: Scope = Scope()
    keep_first_last: bool = Field(False, description="leave the first and last layer in float")

    @field_validator("candidate_bits")
    @classmethod
    def _bits(cls, v):
        if not v:
            raise ValueError("give at least one bit-width")
        bad = [b for b in v if not 2 <= b <= 8]
        if bad:
            raise ValueError(f"bit-widths must be in 2..8, got {bad}")
        return sorted(set(v))

    @model_validator(mode="after")
    def _one_budget(self):
        if self.budget_bytes is not None and self.budget_ratio is not None:
            raise ValueError("give budget_bytes or budget_ratio, not both")
        return self


# -- losses and sensitivities ------------------------------------------------------------
def _loss_fn(model: nn.Module, batches: list, inputs: MethodInputs, against: str):
    """``loss(batch_index) -> scalar`` following the module docstring's rule."""
    if inputs.loss_fn is not None:
        return lambda i: inputs.loss_fn(model, *split_batch(batches[i]))
    if against == "labels":
        if any(split_batch(b)[1] is None for b in batches):
            raise DataError("MixedPrecision.loss_against='labels' needs labelled batches (inputs, target)",
                            hint="use loss_against='float_model', which needs no labels")
        return lambda i: F.cross_entropy(call_model(model, split_batch(batches[i])[0]), split_batch(batches[i])[1])
    with torch.no_grad():
        refs = [call_model(model, split_batch(b)[0]).detach() for b in batches]
    return lambda i: inputs.task.output_divergence(call_model(model, split_batch(batches[i])[0]), refs[i])


def _mean_loss(loss, n: int) -> float:
    with torch.no_grad():
        return sum(float(loss(i)) for i in range(n)) / n


def loss_sensitivity(layers, quantized, loss, n_batches: int) -> dict[str, dict[int, float]]:
    """Measured loss increase with only one layer quantized at each width."""
    base = _mean_loss(loss, n_batches)
    out = {}
    for name, layer in layers:
        original = layer.weight.detach().clone()
        out[name] = {}
        for b, w_q in quantized[name].items():
            with torch.no_grad():
                layer.weight.copy_(w_q)
            try:
                out[name][b] = _mean_loss(loss, n_batches) - base
            finally:
                with torch.no_grad():
                    layer.weight.copy_(original)
    return out


def hessian_traces(layers, loss, n_batches: int, samples: int, seed: int = 0) -> dict[str, float]:
    """Hutchinson estimates of ``tr(H_l)`` of the loss w.r.t. each layer's weight."""
    weights = [layer.weight for _, layer in layers]
    gen = torch.Generator().manual_seed(seed)
    traces = [0.0] * len(weights)
    for i in range(n_batches):
        grads = torch.autograd.grad(loss(i), weights, create_graph=True)
        for _ in range(samples):
            vs = [(torch.randint(0, 2, w.shape, generator=gen) * 2 - 1).to(w) for w in weights]
            hvs = torch.autograd.grad(grads, weights, grad_outputs=vs, retain_graph=True)
            for k, (v, hv) in enumerate(zip(vs, hvs)):
                traces[k] += float((v * hv).sum()) / (samples * n_batches)
    return {name: max(t, 0.0) for (name, _), t in zip(layers, traces)}


def _monotone(sens: dict[int, float]) -> dict[int, float]:
    """Fewer bits never cost less than more bits; never negative."""
    out, floor = {}, 0.0
    for b in sorted(sens, reverse=True):
        floor = max(floor, sens[b])
        out[b] = floor
    return out


# -- allocation ------------------------------------------------------------------------
def allocate(costs: list[dict[int, int]], sens: list[dict[int, float]], budget: int) -> list[int] | None:
    """Widths minimising the summed sensitivity with summed bytes <= ``budget`` (None: impossible).

    Multiple-choice knapsack by dynamic programming over byte costs rounded *up* to buckets of
    ``ceil(budget / DP_RESOLUTION)`` bytes, so every answer truly fits. Ties go to more bits.
    """
    if budget < 0:
        return None
    unit = max(1, math.ceil(budget / DP_RESOLUTION))
    cap = budget // unit
    inf = float("inf")
    best = np.full(cap + 1, inf)
    best[0] = 0.0
    choices = []
    for c, s in zip(costs, sens):
        new = np.full(cap + 1, inf)
        pick = np.zeros(cap + 1, dtype=np.int64)
        for b in sorted(c, reverse=True):  # more bits first: strict '<' keeps them on ties
            k = math.ceil(c[b] / unit)
            if k > cap:
                continue
            cand = np.full(cap + 1, inf)
            cand[k:] = best[:cap + 1 - k] + s[b]
            better = cand < new
            new = np.where(better, cand, new)
            pick = np.where(better, b, pick)
        choices.append(pick)
        best = new
    if not np.isfinite(best).any():
        return None
    finite = np.where(np.isfinite(best))[0]
    lowest = best[finite].min()
    end = int(finite[best[finite] <= lowest + 1e-12 * max(abs(lowest), 1)].max())  # ties: most bytes
    bits: list[int] = []
    for c, pick in zip(reversed(costs), reversed(choices)):
        b = int(pick[end])
        bits.append(b)
        end -= math.ceil(c[b] / unit)
    return bits[::-1]


def fp32_weight_bytes(model: nn.Module) -> int:
    return sum(4 * m.weight.numel() for _, m in model.named_modules() if type_matches(m, QUANTIZABLE))


@register_method("quant.mixed_precision", MixedPrecision, needs_data=True, layer_types=QUANTIZABLE)
def mixed_precision(model: nn.Module, cfg: MixedPrecision, inputs: MethodInputs) -> MethodResult:
    """Per-layer bit-widths from loss or Hessian sensitivity, meeting a byte budget (packed weights)."""
    if inputs.data is None:
        raise DataError("quant.mixed_precision needs calibration data", hint="pass data=[batch, ...]")
    batches = list(itertools.islice(iter(inputs.data), cfg.calibration_batches))
    for i, batch in enumerate(batches):
        check_finite(split_batch(batch)[0], f"quant.mixed_precision calibration batch {i}")
    model.eval()
    layers = select_layers(model, cfg.scope, cfg.keep_first_last)
    total_fp32 = fp32_weight_bytes(model)
    fixed = total_fp32 - sum(4 * m.weight.numel() for _, m in layers)
    budget = cfg.budget_bytes if cfg.budget_bytes is not None else int(
        (cfg.budget_ratio or DEFAULT_RATIO) * total_fp32)
    field = "budget_bytes" if cfg.budget_bytes is not None else "budget_ratio"

    specs = {n: {b: layer_spec(m, b, cfg.granularity, cfg.group_size, cfg.symmetric) for b in cfg.candidate_bits}
             for n, m in layers}
    costs = [{b: quantized_weight_bytes(tuple(m.weight.shape), specs[n][b]) for b in cfg.candidate_bits}
             for n, m in layers]
    smallest = fixed + sum(min(c.values()) for c in costs)
    if budget < smallest:
        raise ConfigError(f"MixedPrecision.{field}: a budget of {budget:,} bytes is below the smallest reachable "
                          f"size, {smallest:,} bytes (every selected layer at {min(cfg.candidate_bits)} bits"
                          f"{', layers outside the scope in fp32' if fixed else ''})",
                          hint=f"raise the budget to >= {smallest:,} bytes (budget_ratio >= "
                               f"{math.ceil(smallest / total_fp32 * 1000) / 1000}) or widen the scope")

    qts = {n: {b: quantize_weight(m.weight, specs[n][b], cfg.range_search) for b in cfg.candidate_bits}
           for n, m in layers}
    deq = {n: {b: qt.dequantize().to(m.weight) for b, qt in qts[n].items()} for n, m in layers}
    loss = _loss_fn(model, batches, inputs, cfg.loss_against)
    if cfg.sensitivity == "loss":
        raw = loss_sensitivity(layers, deq, loss, len(batches))
    else:
        traces = hessian_traces(layers, loss, len(batches), cfg.hutchinson_samples)
        raw = {n: {b: 0.5 * traces[n] / m.weight.numel() * float((deq[n][b] - m.weight.detach()).pow(2).sum())
                   for b in cfg.candidate_bits} for n, m in layers}
    sens = {n: _monotone(raw[n]) for n, _ in layers}

    bits = allocate(costs, [sens[n] for n, _ in layers], budget - fixed)
    if bits is None:  # bucket rounding can only fail right at the limit, where the minimum fits
        bits = [min(cfg.candidate_bits)] * len(layers)
    table, used = [], fixed
    for (name, layer), b, c in zip(layers, bits, costs):
        set_module(model, name, quantize_layer(layer, specs[name][b], qt=qts[name][b]))
        used += c[b]
        table.append({"layer": name, "params": layer.weight.numel(), "bits": b, "bytes": c[b],
                      "sensitivity": {k: float(f"{v:.4g}") for k, v in raw[name].items()}})
    info = {"layers": table, "budget_bytes": budget, "weight_bytes": used, "fp32_weight_bytes": total_fp32,
            "estimated_loss_increase": sum(sens[n][b] for (n, _), b in zip(layers, bits))}
    return MethodResult(model, info)
