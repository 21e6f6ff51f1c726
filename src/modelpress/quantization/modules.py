"""Deployable weight-quantized layers: ``QuantLinear`` and ``QuantConv2d`` (packed 2..8-bit weights).

A quantized layer stores what a deployment needs and nothing else:

* ``qweight``: the integer weights packed ``bits`` per value into a flat uint8 buffer
  (:func:`~modelpress.quantization.primitives.pack_bits`), so int4 takes 1/8 of fp32;
* ``scale`` (and ``zero`` when asymmetric): one float per row, i.e. per tensor, output channel
  or group of ``group_size`` inputs (see :class:`~.primitives.QuantSpec`);
* ``bias`` in float (a parameter, so a later fine-tune may still adjust it);
* optionally ``act_scale`` / ``act_zero``: a per-tensor fake quantizer of the layer's *input*
  (``act_bits``, unsigned asymmetric), which QAT keeps so accuracy is what W4A8 gets.

The forward pass dequantizes the weight once and caches the float copy in a non-persistent
attribute (rebuilt whenever a buffer changes, e.g. after ``load_state_dict``), so repeated
calls cost what a float layer costs. Both classes are ``@buildable``: an artifact written by
:func:`~modelpress.artifact.checkpoint.save_artifact` reloads bit-exactly.

A packed layer still looks like the layer it replaced to the code around it: ``weight`` is that
cached float weight (``nn.MultiheadAttention`` passes ``out_proj.weight`` to its functional form,
``nn.TransformerEncoderLayer``'s fast path hands ``linear1.weight`` to a fused kernel, Hugging
Face models read ``weight.dtype``), next to ``bias``, ``in_features`` / ``out_features`` or the
conv geometry. Nothing of it is saved: the state_dict holds the packed buffers only.

    >>> import torch
    >>> from torch import nn
    >>> from modelpress.quantization.modules import quantize_layer
    >>> from modelpress.quantization.primitives import QuantSpec
    >>> fc = nn.Linear(64, 32)
    >>> q = quantize_layer(fc, QuantSpec(bits=4, granularity="channel"))
    >>> q.qweight.dtype, q.qweight.numel()   # 64 * 32 weights at 4 bits = 1024 bytes
    (torch.uint8, 1024)
    >>> x = torch.randn(8, 64)
    >>> bool((q(x) - fc(x)).abs().max() < 0.5)
    True
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..core.errors import ConfigError, UnsupportedError
from ..nn.records import buildable
from .primitives import (
    QuantizedTensor,
    QuantSpec,
    broadcast_params,
    dequantize,
    fake_quantize,
    packed_nbytes,
    quantize_tensor,
    unpack_bits,
)


def weight_spec(bits: int, granularity: str = "channel", group_size: int = 128,
                symmetric: bool = True) -> QuantSpec:
    """The :class:`QuantSpec` of a weight: symmetric -> signed ints, asymmetric -> unsigned."""
    return QuantSpec(bits=bits, granularity=granularity, group_size=group_size, symmetric=symmetric,
                     signed=symmetric)


def n_rows(shape: tuple[int, ...], spec: QuantSpec) -> int:
    """How many scales a weight of ``shape`` has under ``spec``."""
    numel = 1
    for s in shape:
        numel *= s
    if spec.granularity == "tensor":
        return 1
    if spec.granularity == "channel":
        return shape[0]
    return numel // spec.group_size


def quantized_weight_bytes(shape: tuple[int, ...], spec: QuantSpec) -> int:
    """Bytes a quantized weight takes in the artifact: packed integers + fp32 scales (+ zero points if
    asymmetric: whole numbers, stored ``bits`` each by the artifact's ``integral`` encoding)."""
    numel = 1
    for s in shape:
        numel *= s
    rows = n_rows(shape, spec)
    return packed_nbytes(numel, spec.bits) + rows * 4 + (0 if spec.symmetric else packed_nbytes(rows, spec.bits))


class _PackedWeight(nn.Module):
    """Storage and dequantization shared by :class:`QuantLinear` and :class:`QuantConv2d`."""

    weight_shape: tuple[int, ...]

    def _init_storage(self, bits: int, granularity: str, group_size: int, symmetric: bool, bias: bool,
                      act_bits: int | None) -> None:
        self.qspec = weight_spec(bits, granularity, group_size, symmetric)
        numel = 1
        for s in self.weight_shape:
            numel *= s
        if granularity == "group" and (numel // self.weight_shape[0]) % group_size:
            raise ConfigError(f"group_size {group_size} does not divide the {numel // self.weight_shape[0]} "
                              f"inputs per output channel of a weight of shape {self.weight_shape}",
                              hint="pick a group_size that divides it, or granularity='channel'")
        rows = n_rows(self.weight_shape, self.qspec)
        self.register_buffer("qweight", torch.zeros(packed_nbytes(numel, bits), dtype=torch.uint8))
        self.register_buffer("scale", torch.ones(rows, 1))
        if not symmetric:
            self.register_buffer("zero", torch.zeros(rows, 1))
        self.bias = nn.Parameter(torch.zeros(self.weight_shape[0])) if bias else None
        self.act_bits = act_bits
        if act_bits is not None:
            if not 2 <= act_bits <= 8:
                raise ConfigError(f"act_bits must be in 2..8 (got {act_bits})", hint="use 8 for uint8 activations")
            self.register_buffer("act_scale", torch.ones(()))
            self.register_buffer("act_zero", torch.zeros(()))
        self._cache_key: tuple | None = None
        self._cache: torch.Tensor | None = None

    # -- storage -------------------------------------------------------------------
    def set_weight(self, qt: QuantizedTensor) -> None:
        """Store the integers and scales of ``qt`` (a quantized weight of this layer's shape)."""
        mine = (tuple(self.weight_shape), self.qspec.bits, self.qspec.signed, self.qspec.granularity)
        theirs = (tuple(qt.shape), qt.spec.bits, qt.spec.signed, qt.spec.granularity)
        if mine != theirs:
            raise ConfigError(f"quantized weight (shape, bits, signed, granularity) = {theirs} does not fit "
                              f"a layer storing {mine}", hint="build the layer with quantize_layer()")
        with torch.no_grad():
            self.qweight.copy_(qt.packed())
            self.scale.copy_(qt.scale.reshape_as(self.scale))
            if not self.qspec.symmetric:
                self.zero.copy_(qt.zero.reshape_as(self.zero))
        self._cache_key = None

    def set_act_qparams(self, scale: torch.Tensor, zero: torch.Tensor) -> None:
        with torch.no_grad():
            self.act_scale.copy_(scale.reshape(()))
            self.act_zero.copy_(zero.reshape(()))

    def int_weight(self) -> torch.Tensor:
        """The integer weights (int16, the layer's weight shape)."""
        numel = 1
        for s in self.weight_shape:
            numel *= s
        q = unpack_bits(self.qweight.detach().cpu(), self.qspec.bits, numel, self.qspec.signed)
        return q.reshape(self.weight_shape)

    def dequantized_weight(self) -> torch.Tensor:
        """The float weight the layer computes with (cached until a buffer changes)."""
        key = (self.qweight._version, self.scale._version, self.qweight.data_ptr(), self.scale.data_ptr(),
               self.scale.device, getattr(self, "zero", self.scale)._version)
        if self._cache is None or self._cache_key != key:
            ref = torch.empty(self.weight_shape, device="meta")
            scale = broadcast_params(ref, self.scale, self.qspec)
            zero = broadcast_params(ref, self.zero, self.qspec) if not self.qspec.symmetric else torch.zeros(())
            q = self.int_weight().to(self.scale.device)
            self._cache = dequantize(q, scale, zero.to(self.scale.device)).to(self.scale.dtype)
            self._cache_key = key
        return self._cache

    @property
    def weight(self) -> torch.Tensor:
        """The float weight the layer computes with (:meth:`dequantized_weight`, cached, not saved)."""
        return self.dequantized_weight()

    def quantize_input(self, x: torch.Tensor) -> torch.Tensor:
        if self.act_bits is None:
            return x
        return fake_quantize(x, self.act_scale, self.act_zero, 0, 2 ** self.act_bits - 1)

    def _storage_spec(self) -> dict:
        return {"bits": self.qspec.bits, "granularity": self.qspec.granularity, "group_size": self.qspec.group_size,
                "symmetric": self.qspec.symmetric, "bias": self.bias is not None, "act_bits": self.act_bits}

    def extra_repr(self) -> str:
        act = f", act_bits={self.act_bits}" if self.act_bits is not None else ""
        return (f"weight={tuple(self.weight_shape)}, bits={self.qspec.bits}, granularity={self.qspec.granularity}"
                f"{f', group_size={self.qspec.group_size}' if self.qspec.granularity == 'group' else ''}{act}")


@buildable
class QuantLinear(_PackedWeight):
    """``nn.Linear`` with packed ``bits``-bit weights (see the module docstring)."""

    def __init__(self, in_features: int, out_features: int, bits: int = 8, granularity: str = "channel",
                 group_size: int = 128, symmetric: bool = True, bias: bool = True, act_bits: int | None = None):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.weight_shape = (out_features, in_features)
        self._init_storage(bits, granularity, group_size, symmetric, bias, act_bits)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(self.quantize_input(x), self.dequantized_weight(), self.bias)

    def spec(self) -> dict:  # recorded in artifacts (see modelpress.nn.records)
        return {"in_features": self.in_features, "out_features": self.out_features, **self._storage_spec()}

    @classmethod
    def from_spec(cls, args: dict) -> "QuantLinear":
        return cls(**args)


@buildable
class QuantConv2d(_PackedWeight):
    """``nn.Conv2d`` (zero padding) with packed ``bits``-bit weights (see the module docstring)."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size, stride=1, padding=0, dilation=1,
                 groups: int = 1, bits: int = 8, granularity: str = "channel", group_size: int = 128,
                 symmetric: bool = True, bias: bool = True, act_bits: int | None = None):
        super().__init__()
        pair = lambda v: tuple(v) if isinstance(v, (list, tuple)) else (v, v)  # noqa: E731
        self.in_channels, self.out_channels, self.groups = in_channels, out_channels, groups
        self.kernel_size, self.stride, self.dilation = pair(kernel_size), pair(stride), pair(dilation)
        self.padding = padding if isinstance(padding, str) else pair(padding)
        self.padding_mode = "zeros"  # what an nn.Conv2d has; only zero padding is packed
        self.weight_shape = (out_channels, in_channels // groups, *self.kernel_size)
        self._init_storage(bits, granularity, group_size, symmetric, bias, act_bits)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(self.quantize_input(x), self.dequantized_weight(), self.bias, self.stride,
                        self.padding, self.dilation, self.groups)

    def spec(self) -> dict:
        return {"in_channels": self.in_channels, "out_channels": self.out_channels,
                "kernel_size": list(self.kernel_size), "stride": list(self.stride),
                "padding": self.padding if isinstance(self.padding, str) else list(self.padding),
                "dilation": list(self.dilation), "groups": self.groups, **self._storage_spec()}

    @classmethod
    def from_spec(cls, args: dict) -> "QuantConv2d":
        return cls(**args)


QUANTIZABLE = ("Linear", "Conv2d")


def empty_like_layer(layer: nn.Module, spec: QuantSpec, act_bits: int | None = None,
                     bias: bool | None = None) -> QuantLinear | QuantConv2d:
    """A packed layer with ``layer``'s geometry and ``spec``'s storage (weights not set yet)."""
    has_bias = layer.bias is not None if bias is None else bias
    common = dict(bits=spec.bits, granularity=spec.granularity, group_size=spec.group_size,
                  symmetric=spec.symmetric, bias=has_bias, act_bits=act_bits)
    if isinstance(layer, nn.Linear):
        return QuantLinear(layer.in_features, layer.out_features, **common)
    if isinstance(layer, nn.Conv2d):
        if layer.padding_mode != "zeros":
            raise UnsupportedError(f"Conv2d with padding_mode={layer.padding_mode!r} cannot be packed",
                                   hint="exclude the layer with Scope(exclude=[...])")
        return QuantConv2d(layer.in_channels, layer.out_channels, layer.kernel_size, layer.stride,
                           layer.padding, layer.dilation, layer.groups, **common)
    raise UnsupportedError(f"cannot quantize a {type(layer).__name__} (only Linear and Conv2d)",
                           hint="exclude it with Scope(exclude=[...])")


@torch.no_grad()
def quantize_layer(layer: nn.Module, spec: QuantSpec, *, qt: QuantizedTensor | None = None,
                   bias: torch.Tensor | None = None, act_bits: int | None = None) -> QuantLinear | QuantConv2d:
    """Packed copy of a float ``Linear``/``Conv2d``: round-to-nearest unless ``qt`` gives the integers.

    ``bias`` replaces the layer's bias (bias correction may add one to a bias-free layer).
    """
    spec = weight_spec(spec.bits, spec.granularity, spec.group_size, spec.symmetric)
    qt = qt if qt is not None else quantize_tensor(layer.weight.detach().float().cpu(), spec)
    q = empty_like_layer(layer, spec, act_bits, bias=(layer.bias is not None) or (bias is not None))
    q.set_weight(qt)
    if q.bias is not None:
        src = bias if bias is not None else layer.bias
        q.bias.copy_(src.detach().float().cpu())
    device = layer.weight.device  # meta: a calibration kept the weight on disk and only its packed copy
    if device.type == "meta":
        device = layer.bias.device if layer.bias is not None else torch.device("cpu")
    return q.to(device)


def quantized_layers(model: nn.Module) -> list[tuple[str, QuantLinear | QuantConv2d]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, (QuantLinear, QuantConv2d))]


def packed_weight_bytes(model: nn.Module) -> int:
    """Bytes of every packed layer's weight storage in the artifact (integers + fp32 scales + zero points
    packed ``bits`` each)."""
    total = 0
    for m in model.modules():
        if not isinstance(m, _PackedWeight):  # packed layers and the matrices of packed recurrent layers
            continue
        zeros = 0 if m.qspec.symmetric else packed_nbytes(m.zero.numel(), m.qspec.bits)
        total += m.qweight.numel() + m.scale.numel() * 4 + zeros
    return total
