"""Quantization-aware training (``quant.qat``): fake-quantized weights and activations, LSQ scales.

Three steps, each usable on its own:

1. :func:`prepare_qat` wraps every selected ``Linear``/``Conv2d`` in a :class:`FakeQuantLayer`:
   weights fake-quantized symmetric per channel (or tensor / group) at ``weight_bits``; the
   layer's *input* fake-quantized per tensor, asymmetric unsigned (uint8 for ``act_bits=8``).
2. Ranges are *observed* first: the weight scale follows the weight's min-max (or MSE-best)
   range and the activation range is a moving average of batch min/max, over
   ``calibration_batches`` batches and then the first ``observer_steps`` training steps. Then
   observers freeze and, with ``learnable_scales=True``, the scales train by LSQ (Esser et al.
   2020) together with the weights (clipped straight-through estimator for rounding).
   ``freeze_bn_after`` steps on, BatchNorm running statistics stop updating (the BN is not
   folded into the conv; the packed conv and the BN stay two layers).
3. :func:`convert_qat` turns every wrapper into a packed :class:`~.modules.QuantLinear` /
   :class:`~.modules.QuantConv2d` holding the integer weights and, if ``act_bits`` is set, the
   frozen input quantizer, so the deployed model computes what was trained (W4A8 etc.).

Training uses the caller's ``TrainConfig`` through :func:`~modelpress.core.training.fit`.
Without one, the method only calibrates the ranges and converts (post-training quantization).

A layer whose parent reads its weight itself (``nn.MultiheadAttention``'s ``out_proj``,
``nn.TransformerEncoderLayer``'s ``linear1``/``linear2`` on its inference fast path, see
:mod:`modelpress.nn.layer_kinds`) would skip the input quantizer there, so it is quantized
weight-only (its input stays float), in training and after conversion alike;
``info["float_activations"]`` lists those layers. GPT-2's ``Conv1D`` is quantized as a Linear.

    >>> import torch
    >>> from modelpress import quantize, TrainConfig
    >>> from modelpress.quantization.qat import QAT
    >>> torch.manual_seed(0)  # doctest: +ELLIPSIS
    <...>
    >>> x = torch.randn(256, 8); y = (x[:, 0] > 0).long()
    >>> batches = [(x[i:i + 32], y[i:i + 32]) for i in range(0, 256, 32)]
    >>> m = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 2))
    >>> q = quantize(m, QAT(weight_bits=4, act_bits=8, observer_steps=4), batches,
    ...              train=TrainConfig(epochs=3, lr=1e-2))
    >>> type(q[0]).__name__, q[0].act_bits
    ('QuantLinear', 8)

Returns a new model (the verbs copy; see :mod:`modelpress.api`).
"""
from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from ..core.config import MethodConfig
from ..core.data import as_data, call_model
from ..core.scope import Scope
from ..engine import MethodInputs, MethodResult, register_method
from ..nn.layer_kinds import parent_reads_weight
from ..nn.modules import set_module
from .modules import QUANTIZABLE, QuantConv2d, QuantLinear, quantize_layer
from .primitives import (
    QuantizedTensor,
    QuantSpec,
    broadcast_params,
    fake_quantize,
    lsq_fake_quantize,
    qparams,
    quantize,
)
from .weight_only import layer_spec, select_layers, weight_ranges

AVERAGING = 0.1  # weight of the newest batch in the moving-average activation range


class QAT(MethodConfig):
    """Quantization-aware training with LSQ scales, then conversion to packed integer layers."""

    weight_bits: int = Field(4, ge=2, le=8, description="bits per weight")
    act_bits: int | None = Field(8, ge=2, le=8, description="bits of each layer's input; None = weight-only")
    granularity: Literal["tensor", "channel", "group"] = Field("channel", description="weight scales per ...")
    group_size: int = Field(128, ge=1, description="inputs per weight scale when granularity='group'")
    learnable_scales: bool = Field(True, description="LSQ: scales train after the observer steps")
    scale_init: Literal["minmax", "mse"] = Field("mse", description="weight range while observing")
    observer_steps: int = Field(50, ge=0, description="training steps with ranges observed, then frozen")
    calibration_batches: int = Field(4, ge=1, description="batches observed before training starts")
    freeze_bn_after: int | None = Field(None, ge=0, description="step from which BN running stats freeze")
    scope: Scope = Scope()
    keep_first_last: bool = Field(False, description="leave the first and last layer in float")


class FakeQuantLayer(nn.Module):
    """A float ``Linear``/``Conv2d`` (``self.layer``) with fake-quantized weights and input."""

    def __init__(self, layer: nn.Module, cfg: QAT):
        super().__init__()
        self.layer = layer
        self.wspec = layer_spec(layer, cfg.weight_bits, cfg.granularity, cfg.group_size, True)
        self.scale_init = cfg.scale_init
        self.learnable = cfg.learnable_scales
        rows = self._rows()
        dev = layer.weight.device
        self.w_scale = nn.Parameter(torch.ones(rows, 1, device=dev), requires_grad=cfg.learnable_scales)
        self.act_bits = cfg.act_bits
        if cfg.act_bits is not None:
            self.register_buffer("act_lo", torch.zeros((), device=dev))
            self.register_buffer("act_hi", torch.zeros((), device=dev))
            self.register_buffer("act_seen", torch.zeros((), dtype=torch.long, device=dev))
            self.act_scale = nn.Parameter(torch.ones((), device=dev), requires_grad=cfg.learnable_scales)
            self.register_buffer("act_zero", torch.zeros((), device=dev))
        self.observing = True
        self._init_weight_scale()

    def _rows(self) -> int:
        w = self.layer.weight
        return {"tensor": 1, "channel": w.shape[0]}.get(self.wspec.granularity, w.numel() // self.wspec.group_size)

    @property
    def act_spec(self) -> QuantSpec:
        return QuantSpec(bits=self.act_bits, symmetric=False, signed=False, granularity="tensor")

    @torch.no_grad()
    def _init_weight_scale(self) -> None:
        lo, hi = weight_ranges(self.layer.weight, self.wspec, self.scale_init)
        self.w_scale.copy_(qparams(lo, hi, self.wspec)[0])
        self._scale_of = self._weight_version()

    def _weight_version(self) -> tuple[int, int]:
        """Changes whenever the weight does (an optimizer step or any in-place write bumps ``_version``)."""
        w = self.layer.weight
        return w.data_ptr(), w._version

    def _follow_weight(self) -> None:
        """Re-derive the scale from the weight only when the weight changed since the last time: an MSE
        range search per forward would dominate calibration, where the weights do not change."""
        if getattr(self, "_scale_of", None) != self._weight_version():
            self._init_weight_scale()

    @property
    def weight(self) -> torch.Tensor:
        """The fake-quantized weight, for a parent that reads ``layer.weight`` instead of calling the layer."""
        return self.quantized_weight()

    @property
    def bias(self) -> torch.Tensor | None:
        return self.layer.bias

    def freeze(self) -> None:
        """Stop observing: ranges stay as observed; with LSQ the scales train from here."""
        self.observing = False

    # -- forward -------------------------------------------------------------------
    def _quantize_input(self, x: torch.Tensor) -> torch.Tensor:
        if self.act_bits is None:
            return x
        spec = self.act_spec
        if self.observing:
            with torch.no_grad():
                lo, hi = x.detach().min().float(), x.detach().max().float()
                if int(self.act_seen) == 0:
                    self.act_lo.copy_(lo), self.act_hi.copy_(hi)
                else:
                    self.act_lo.lerp_(lo, AVERAGING), self.act_hi.lerp_(hi, AVERAGING)
                self.act_seen += 1
                scale, zero = qparams(self.act_lo, self.act_hi, spec)
                self.act_scale.copy_(scale.reshape(())), self.act_zero.copy_(zero.reshape(()))
        if self.learnable and not self.observing:
            return lsq_fake_quantize(x, self.act_scale, self.act_zero, spec.qmin, spec.qmax)
        return fake_quantize(x, self.act_scale.abs(), self.act_zero, spec.qmin, spec.qmax)

    def quantized_weight(self) -> torch.Tensor:
        """The fake-quantized weight (gradients reach the weight, and the LSQ scale once frozen)."""
        w, spec = self.layer.weight, self.wspec
        if self.observing or not self.learnable:
            self._follow_weight()  # the scale follows the weight
            scale = broadcast_params(w, self.w_scale.detach().abs(), spec)
            return fake_quantize(w, scale, torch.zeros_like(scale), spec.qmin, spec.qmax)
        per_row = w.numel() // self.w_scale.numel()
        grad_scale = 1.0 / math.sqrt(per_row * spec.qmax)
        scale = broadcast_params(w, self.w_scale, spec)
        return lsq_fake_quantize(w, scale, torch.zeros_like(scale), spec.qmin, spec.qmax, grad_scale=grad_scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self._quantize_input(x)
        w = self.quantized_weight()
        if isinstance(self.layer, nn.Linear):
            return F.linear(x, w, self.layer.bias)
        c = self.layer
        return F.conv2d(x, w, c.bias, c.stride, c.padding, c.dilation, c.groups)

    # -- conversion ----------------------------------------------------------------
    @torch.no_grad()
    def to_packed(self) -> QuantLinear | QuantConv2d:
        """The packed layer computing what this wrapper computes in eval mode."""
        w, spec = self.layer.weight.detach().float(), self.wspec
        if self.observing or not self.learnable:
            self._follow_weight()
        scale = self.w_scale.detach().abs().float() + (0.0 if self.observing or not self.learnable else 1e-12)
        full = broadcast_params(w, scale, spec)
        q = quantize(w, full, torch.zeros_like(full), spec.qmin, spec.qmax)
        qt = QuantizedTensor(q.to(torch.int8).cpu(), scale.cpu(), torch.zeros_like(scale).cpu(), spec, tuple(w.shape))
        packed = quantize_layer(self.layer, spec, qt=qt, act_bits=self.act_bits)
        if self.act_bits is not None:
            act_scale = self.act_scale.detach().abs() + (1e-12 if self.learnable and not self.observing else 0.0)
            packed.set_act_qparams(act_scale, self.act_zero)
        return packed


def float_activation_layers(model: nn.Module, names: list[str], cfg: QAT) -> dict[str, str]:
    """``{name: reason}`` of the layers among ``names`` quantized weight-only although ``cfg.act_bits``
    is set: their parent reads their weight itself, so an input quantizer would not always run."""
    if cfg.act_bits is None:
        return {}
    reads = {n: parent_reads_weight(model, n) for n in names}
    return {n: r.reason for n, r in reads.items() if r is not None}


def prepare_qat(model: nn.Module, cfg: QAT) -> list[tuple[str, FakeQuantLayer]]:
    """Wrap the selected layers of ``model`` (in place) in :class:`FakeQuantLayer`; returns the wrappers."""
    wrapped = []
    layers = select_layers(model, cfg.scope, cfg.keep_first_last)
    weight_only = float_activation_layers(model, [n for n, _ in layers], cfg)
    for name, layer in layers:
        fq = FakeQuantLayer(layer, cfg.model_copy(update={"act_bits": None}) if name in weight_only else cfg)
        set_module(model, name, fq)
        wrapped.append((name, fq))
    return wrapped


def fake_quant_layers(model: nn.Module) -> list[tuple[str, FakeQuantLayer]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, FakeQuantLayer)]


def freeze_observers(model: nn.Module) -> None:
    for _, m in fake_quant_layers(model):
        m.freeze()


def freeze_batchnorm(model: nn.Module) -> None:
    """BatchNorm layers to eval mode: running statistics stop updating, affine params still train."""
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.eval()


@torch.no_grad()
def calibrate(model: nn.Module, data, batches: int) -> None:
    """Run ``batches`` batches through ``model`` (eval mode) so the observers see real ranges."""
    was_training = model.training
    model.eval()
    for i, inputs in enumerate(as_data(data).inputs()):
        if i >= batches:
            break
        call_model(model, inputs)
    model.train(was_training)


class QATCallback:
    """Freezes the observers after ``observer_steps`` steps and BN statistics from ``freeze_bn_after``."""

    def __init__(self, cfg: QAT):
        self.cfg = cfg
        self.observers_frozen_at: int | None = None
        self.bn_frozen_at: int | None = None

    def on_step_begin(self, step: int, model: nn.Module) -> None:
        if self.observers_frozen_at is None and step >= self.cfg.observer_steps:
            freeze_observers(model)
            self.observers_frozen_at = step
        if self.cfg.freeze_bn_after is not None and step >= self.cfg.freeze_bn_after:
            freeze_batchnorm(model)  # every step: fit put the model in train mode once, keep BN out of it
            if self.bn_frozen_at is None:
                self.bn_frozen_at = step


def convert_qat(model: nn.Module) -> nn.Module:
    """Replace every :class:`FakeQuantLayer` by its packed layer (in place); returns the model."""
    for name, fq in fake_quant_layers(model):
        set_module(model, name, fq.to_packed())
    return model


@register_method("quant.qat", QAT, needs_data=True, needs_training=True, layer_types=QUANTIZABLE)
def qat(model: nn.Module, cfg: QAT, inputs: MethodInputs) -> MethodResult:
    """Quantization-aware training (LSQ scales, observed ranges, BN freezing) into packed layers."""
    wrapped = prepare_qat(model, cfg)
    calibrate(model, inputs.data, cfg.calibration_batches)
    cb = QATCallback(cfg)
    if inputs.can_train:
        inputs.fit(model, "quantization-aware training", callbacks=[cb])
    else:
        inputs.log("quant.qat: no TrainConfig given, so the ranges are calibrated and the weights are not trained")
    freeze_observers(model)
    info = {"layers": {
        name: {"params": fq.layer.weight.numel(), "weight_bits": cfg.weight_bits, "act_bits": fq.act_bits,
               "act_range": ([round(float(fq.act_lo), 4), round(float(fq.act_hi), 4)]
                             if fq.act_bits is not None else None)}
        for name, fq in wrapped}, "observers_frozen_at": cb.observers_frozen_at, "bn_frozen_at": cb.bn_frozen_at}
    float_acts = float_activation_layers(model, [n for n, _ in wrapped], cfg)
    if float_acts:
        info["float_activations"] = float_acts
        inputs.log(f"quant.qat: inputs left float (weights quantized): {', '.join(float_acts)}")
    return MethodResult(convert_qat(model), info, trained=inputs.can_train)
