"""Keras layers as PyTorch modules, one converter per Keras layer class (:data:`CONVERTERS`).

Layout: Keras images are channels-last (NHWC, and NLC for 1-D). A converter asks the
:class:`GraphBuilder` for its input in the layout it computes in: convolutions, pooling,
padding and BatchNormalization in channels-first (NCHW, as ``torch.nn`` does), Dense,
Embedding, LayerNormalization and Reshape in Keras's own layout. The builder inserts a
:class:`~.keras_modules.Permute` only where the layout changes (at the model's inputs and
outputs for a plain CNN) and remembers it, so a tensor is permuted once. Elementwise layers
and merges keep the layout they are given. A ``Flatten`` of a channels-first tensor flattens in
NCHW order (``nn.Flatten``, as a PyTorch CNN does) and the ``Dense`` reading it gets its
weight columns reordered from Keras's HWC order, so structured pruning sees the ordinary
conv -> flatten -> linear chain; any other reader gets the tensor in Keras's order.
"""
from __future__ import annotations

import copy
import keyword
import math
import re
from collections import OrderedDict
from typing import Callable, NamedTuple

import numpy as np
import torch
from torch import fx, nn

from ..core.errors import UnsupportedError
from .keras_modules import Affine, Concat, Crop, Merge, PadPool, Permute, Reduce, Reshape

KERAS = "keras"  # Keras's layout (channels-last for rank >= 3)
CF = "cf"  # channels-first (Keras's last axis moved to dim 1)
FLAT = "flat"  # a channels-first tensor flattened in NCHW order (``Value.unflat``: its Keras shape)


class Value(NamedTuple):
    """A tensor of the model being built: its fx node, layout and Keras shape (batch first, None)."""

    node: fx.Node
    layout: str
    shape: tuple
    unflat: tuple | None = None  # FLAT: the Keras shape (H, W, C) before the flatten

    @property
    def rank(self) -> int:
        return len(self.shape)


def cf_dim(axis: int, rank: int) -> int:
    """The channels-first dim of Keras ``axis`` of a rank-``rank`` tensor."""
    axis = axis % rank
    if rank < 3 or axis == 0:
        return axis
    return 1 if axis == rank - 1 else axis + 1


class GraphBuilder:
    """Collects modules and an fx graph; converts layouts on demand (once per tensor)."""

    def __init__(self):
        self.root = nn.Module()
        self.graph = fx.Graph()
        self._converted: dict[tuple[fx.Node, str], fx.Node] = {}
        self.added: list[tuple[str, str]] = []  # (name asked for, module name given), in order

    def name(self, name: str) -> str:
        base = re.sub(r"\W", "_", name) or "layer"
        base = "_" + base if base[0].isdigit() or keyword.iskeyword(base) else base
        out, i = base, 1
        while hasattr(self.root, out):
            out, i = f"{base}_{i}", i + 1
        return out

    def add(self, name: str, module: nn.Module, *args: fx.Node) -> fx.Node:
        given = self.name(name)
        self.root.add_module(given, module)
        self.added.append((name, given))
        return self.graph.call_module(given, tuple(args))

    def placeholder(self, name: str) -> fx.Node:
        return self.graph.placeholder(self.name(name))

    def _once(self, v: Value, target: str, make: Callable[[], fx.Node]) -> fx.Node:
        key = (v.node, target)
        if key not in self._converted:
            self._converted[key] = make()
        return self._converted[key]

    def as_cf(self, v: Value) -> Value:
        if v.layout == CF or v.rank < 3:
            return v
        v = self.as_keras(v)
        r = v.rank
        node = self._once(v, CF, lambda: self.add(f"{v.node.name}_to_nchw", Permute((0, r - 1, *range(1, r - 1))),
                                                  v.node))
        return Value(node, CF, v.shape)

    def as_keras(self, v: Value) -> Value:
        if v.layout == KERAS:
            return v
        if v.layout == CF:
            r = v.rank
            node = self._once(v, KERAS, lambda: self.add(f"{v.node.name}_to_nhwc",
                                                         Permute((0, *range(2, r), 1)), v.node))
            return Value(node, KERAS, v.shape)
        hwc = v.unflat  # FLAT: unflatten to CHW, move C last, flatten again
        chw = (hwc[-1], *hwc[:-1])

        def make():
            x = self.add(f"{v.node.name}_unflatten", Reshape((-1, *chw[1:])), v.node)
            x = self.add(f"{v.node.name}_to_nhwc", Permute((0, *range(2, len(chw) + 1), 1)), x)
            return self.add(f"{v.node.name}_flatten", nn.Flatten(), x)
        return Value(self._once(v, KERAS, make), KERAS, v.shape)

    def common(self, values: list[Value]) -> list[Value]:
        """The inputs of a merge in one layout: channels-first when they all have the rank of an
        image and one already is, the same flattening when all are, else Keras's."""
        ranks = {v.rank for v in values}
        if len(ranks) == 1 and min(ranks) >= 3 and any(v.layout == CF for v in values):
            return [self.as_cf(v) for v in values]
        if all(v.layout == FLAT and v.unflat == values[0].unflat for v in values):
            return values
        return [self.as_keras(v) for v in values]

    def module(self, outputs: list[fx.Node]) -> nn.Module:
        """An ``nn.Sequential`` when the graph is one chain of modules, else an ``fx.GraphModule``."""
        self.graph.output(outputs[0] if len(outputs) == 1 else tuple(outputs))
        self.graph.lint()
        nodes = list(self.graph.nodes)
        body = nodes[1:-1]
        chain = (len(outputs) == 1 and nodes[0].op == "placeholder" and nodes[-1].args[0] is (body[-1] if body else
                                                                                                nodes[0])
                 and all(n.op == "call_module" and n.args == ((nodes[i],)) and not n.kwargs
                         for i, n in enumerate(body)))
        if chain:
            return nn.Sequential(OrderedDict((n.target, self.root.get_submodule(n.target)) for n in body))
        return KerasGraphModule(self.root, self.graph, class_name="KerasModel")


class KerasGraphModule(fx.GraphModule):
    """An ``fx.GraphModule`` that keeps its ``zoo_spec`` (source record) through ``copy.deepcopy``,
    which a plain GraphModule drops with every attribute it does not know (methods run on a copy)."""

    def __deepcopy__(self, memo):
        res = super().__deepcopy__(memo)
        if "zoo_spec" in self.__dict__:
            res.zoo_spec = copy.deepcopy(self.__dict__["zoo_spec"], memo)
        return res


# -- weights ----------------------------------------------------------------------------------------
def _np(variable) -> np.ndarray:
    return np.asarray(variable.numpy() if hasattr(variable, "numpy") else variable, dtype=np.float32)


def _tensor(array: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32))


def _set(module: nn.Module, **params: np.ndarray | None) -> nn.Module:
    with torch.no_grad():
        for name, value in params.items():
            if value is not None:
                getattr(module, name).copy_(_tensor(value).reshape(getattr(module, name).shape))
    return module


def _conv_weight(kernel: np.ndarray) -> np.ndarray:
    """Keras ``(*k, in, out)`` -> torch ``(out, in, *k)``."""
    r = kernel.ndim
    return kernel.transpose(r - 1, r - 2, *range(r - 2))


# -- activations ------------------------------------------------------------------------------------
_ACTIVATIONS: dict[str, Callable[[int], nn.Module | None]] = {
    "linear": lambda dim: None, "relu": lambda dim: nn.ReLU(), "relu6": lambda dim: nn.ReLU6(),
    "sigmoid": lambda dim: nn.Sigmoid(), "tanh": lambda dim: nn.Tanh(), "softmax": lambda dim: nn.Softmax(dim),
    "log_softmax": lambda dim: nn.LogSoftmax(dim), "silu": lambda dim: nn.SiLU(), "swish": lambda dim: nn.SiLU(),
    "gelu": lambda dim: nn.GELU(), "hard_sigmoid": lambda dim: nn.Hardsigmoid(),
    "hard_silu": lambda dim: nn.Hardswish(), "hard_swish": lambda dim: nn.Hardswish(), "elu": lambda dim: nn.ELU(),
    "selu": lambda dim: nn.SELU(), "leaky_relu": lambda dim: nn.LeakyReLU(0.2), "softplus": lambda dim: nn.Softplus(),
    "softsign": lambda dim: nn.Softsign(), "mish": lambda dim: nn.Mish(),
}


def _activation_name(activation) -> str:
    return activation if isinstance(activation, str) else getattr(activation, "__name__", repr(activation))


def activate(b: GraphBuilder, layer, v: Value, activation, suffix: str = "") -> Value:
    """``v`` through a Keras activation (a name or the function a layer holds)."""
    name = _activation_name(activation)
    if name not in _ACTIVATIONS:
        raise UnsupportedError(f"Keras layer {layer.name!r} ({type(layer).__name__}) uses activation {name!r}, "
                               "which has no PyTorch conversion",
                               hint=f"use one of {', '.join(sorted(_ACTIVATIONS))}")
    dim = -1 if v.layout != CF else cf_dim(-1, v.rank)
    module = _ACTIVATIONS[name](dim)
    if module is None:
        return v
    if isinstance(module, (nn.Softmax, nn.LogSoftmax)) and v.layout == FLAT:
        v = b.as_keras(v)
    return v._replace(node=b.add(layer.name + (suffix or f"_{name}"), module, v.node))


# -- converters: (layer, inputs, builder, output shapes) -> outputs ---------------------------------
def _channels_last(layer) -> None:
    if getattr(layer, "data_format", "channels_last") != "channels_last":
        raise UnsupportedError(f"Keras layer {layer.name!r} ({type(layer).__name__}) is channels_first",
                               hint="only channels_last Keras models convert; rebuild the layer channels_last")


def _same_pads(layer, size: int | None, k: int, s: int, d: int = 1) -> tuple[int, int]:
    """TensorFlow's ``"same"`` padding of one dim: (before, after), the odd one after."""
    k_eff = (k - 1) * d + 1
    if s == 1:
        total = k_eff - 1
    elif size is None:
        raise UnsupportedError(f"Keras layer {layer.name!r} ({type(layer).__name__}) pads 'same' with stride {s} "
                               "on an input of unknown size",
                               hint="build the Keras model with a fixed input shape (keras.Input(shape=...))")
    else:
        total = max((math.ceil(size / s) - 1) * s + k_eff - size, 0)
    return total // 2, total - total // 2


def _padding(layer, spatial: tuple, kernel, strides, dilation=None) -> list[tuple[int, int]]:
    dilation = dilation or (1,) * len(kernel)
    if layer.padding == "valid":
        return [(0, 0)] * len(kernel)
    if layer.padding == "causal":
        return [((kernel[0] - 1) * dilation[0], 0)]
    return [_same_pads(layer, n, k, s, d) for n, k, s, d in zip(spatial, kernel, strides, dilation)]


def _flat_pads(pads: list[tuple[int, int]]) -> tuple[int, ...]:
    """F.pad's order: last dim first."""
    return tuple(p for pair in reversed(pads) for p in pair)


def _pad_module(pads: list[tuple[int, int]]) -> nn.Module:
    cls = {1: nn.ConstantPad1d, 2: nn.ConstantPad2d, 3: nn.ConstantPad3d}[len(pads)]
    return nn.ZeroPad2d(_flat_pads(pads)) if len(pads) == 2 else cls(_flat_pads(pads), 0.0)


def _padded_conv(b: GraphBuilder, layer, x: Value, conv_cls, pads, **kw) -> tuple[fx.Node, nn.Module]:
    """A conv with Keras's padding: torch's own when even, an explicit pad before it when not."""
    node = x.node
    if any(p0 != p1 for p0, p1 in pads):
        node = b.add(layer.name + "_pad", _pad_module(pads), node)
        padding = 0
    else:
        padding = tuple(p0 for p0, _ in pads)
    conv = conv_cls(padding=padding, **kw)
    return b.add(layer.name, conv, node), conv


_CONV = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}


def conv(layer, ins, b, out_shapes):
    _channels_last(layer)
    x = b.as_cf(ins[0])
    kernel = _np(layer.kernel)
    nd = kernel.ndim - 2
    pads = _padding(layer, x.shape[1:-1], layer.kernel_size, layer.strides, layer.dilation_rate)
    node, module = _padded_conv(b, layer, x, _CONV[nd], pads, in_channels=x.shape[-1], out_channels=layer.filters,
                                kernel_size=tuple(layer.kernel_size), stride=tuple(layer.strides),
                                dilation=tuple(layer.dilation_rate), groups=getattr(layer, "groups", 1),
                                bias=layer.use_bias)
    _set(module, weight=_conv_weight(kernel), bias=_np(layer.bias) if layer.use_bias else None)
    return activate(b, layer, Value(node, CF, out_shapes[0]), layer.activation)


def depthwise_conv(layer, ins, b, out_shapes):
    _channels_last(layer)
    x = b.as_cf(ins[0])
    kernel = _np(layer.kernel)  # (*k, in, multiplier)
    nd, cin, mult = kernel.ndim - 2, kernel.shape[-2], kernel.shape[-1]
    pads = _padding(layer, x.shape[1:-1], layer.kernel_size, layer.strides, layer.dilation_rate)
    node, module = _padded_conv(b, layer, x, _CONV[nd], pads, in_channels=cin, out_channels=cin * mult,
                                kernel_size=tuple(layer.kernel_size), stride=tuple(layer.strides),
                                dilation=tuple(layer.dilation_rate), groups=cin, bias=layer.use_bias)
    weight = kernel.transpose(nd, nd + 1, *range(nd)).reshape(cin * mult, 1, *kernel.shape[:nd])
    _set(module, weight=weight, bias=_np(layer.bias) if layer.use_bias else None)
    return activate(b, layer, Value(node, CF, out_shapes[0]), layer.activation)


def separable_conv(layer, ins, b, out_shapes):
    _channels_last(layer)
    x = b.as_cf(ins[0])
    dw, pw = _np(layer.depthwise_kernel), _np(layer.pointwise_kernel)  # (*k, in, mult), (*1, in*mult, out)
    nd, cin, mult = dw.ndim - 2, dw.shape[-2], dw.shape[-1]
    pads = _padding(layer, x.shape[1:-1], layer.kernel_size, layer.strides, layer.dilation_rate)
    node, depthwise = _padded_conv(b, layer, x, _CONV[nd], pads, in_channels=cin, out_channels=cin * mult,
                                   kernel_size=tuple(layer.kernel_size), stride=tuple(layer.strides),
                                   dilation=tuple(layer.dilation_rate), groups=cin, bias=False)
    _set(depthwise, weight=dw.transpose(nd, nd + 1, *range(nd)).reshape(cin * mult, 1, *dw.shape[:nd]))
    pointwise = _CONV[nd](cin * mult, layer.filters, 1, bias=layer.use_bias)
    _set(pointwise, weight=_conv_weight(pw), bias=_np(layer.bias) if layer.use_bias else None)
    node = b.add(layer.name + "_pointwise", pointwise, node)
    return activate(b, layer, Value(node, CF, out_shapes[0]), layer.activation)


def conv_transpose(layer, ins, b, out_shapes):
    _channels_last(layer)
    if getattr(layer, "output_padding", None) is not None:
        raise UnsupportedError(f"Keras layer {layer.name!r} (Conv{len(layer.kernel_size)}DTranspose) sets "
                               "output_padding", hint="rebuild it without output_padding")
    x = b.as_cf(ins[0])
    kernel = _np(layer.kernel)  # (*k, out, in)
    nd = kernel.ndim - 2
    crops = []
    for k, s, d in zip(layer.kernel_size, layer.strides, layer.dilation_rate):
        k_eff = (k - 1) * d + 1
        if k_eff < s:
            raise UnsupportedError(f"Keras layer {layer.name!r} has a kernel smaller than its stride",
                                   hint="rebuild it with kernel_size >= strides")
        total = k_eff - s if layer.padding == "same" else 0
        crops.append((total // 2, total - total // 2))
    even = all(c0 == c1 for c0, c1 in crops)
    module = {1: nn.ConvTranspose1d, 2: nn.ConvTranspose2d, 3: nn.ConvTranspose3d}[nd](
        kernel.shape[-1], layer.filters, tuple(layer.kernel_size), stride=tuple(layer.strides),
        padding=tuple(c0 for c0, _ in crops) if even else 0, dilation=tuple(layer.dilation_rate),
        bias=layer.use_bias)
    _set(module, weight=kernel.transpose(nd + 1, nd, *range(nd)), bias=_np(layer.bias) if layer.use_bias else None)
    node = b.add(layer.name, module, x.node)
    if not even:
        node = b.add(layer.name + "_crop", Crop(crops), node)
    return activate(b, layer, Value(node, CF, out_shapes[0]), layer.activation)


def dense(layer, ins, b, out_shapes):
    x = ins[0]
    kernel = _np(layer.kernel)  # (in, out)
    if x.layout == FLAT:  # columns from Keras's HWC order to the CHW order nn.Flatten gives
        hwc = x.unflat
        kernel = kernel.reshape(*hwc, -1).transpose(len(hwc) - 1, *range(len(hwc) - 1), len(hwc)).reshape(
            kernel.shape)
    else:
        x = b.as_keras(x)
    module = _set(nn.Linear(kernel.shape[0], kernel.shape[1], bias=layer.use_bias), weight=kernel.T,
                  bias=_np(layer.bias) if layer.use_bias else None)
    return activate(b, layer, Value(b.add(layer.name, module, x.node), KERAS, out_shapes[0]), layer.activation)


def batch_norm(layer, ins, b, out_shapes):
    x = ins[0]
    axis = layer.axis if isinstance(layer.axis, int) else (layer.axis[0] if len(layer.axis) == 1 else None)
    if axis is None or axis % x.rank != x.rank - 1:
        raise UnsupportedError(f"Keras layer {layer.name!r} (BatchNormalization) normalises axis {layer.axis}",
                               hint="only BatchNormalization over the last (channels) axis converts")
    x = b.as_cf(x) if x.rank >= 3 else b.as_keras(x)
    cls = {2: nn.BatchNorm1d, 3: nn.BatchNorm1d, 4: nn.BatchNorm2d, 5: nn.BatchNorm3d}[x.rank]
    c = x.shape[-1]
    module = cls(c, eps=layer.epsilon, momentum=1 - layer.momentum)
    _set(module, weight=_np(layer.gamma) if layer.scale else np.ones(c), bias=_np(layer.beta) if layer.center else
         np.zeros(c), running_mean=_np(layer.moving_mean), running_var=_np(layer.moving_variance))
    return x._replace(node=b.add(layer.name, module, x.node), shape=out_shapes[0])


def layer_norm(layer, ins, b, out_shapes):
    x = b.as_keras(ins[0])
    axes = [layer.axis] if isinstance(layer.axis, int) else list(layer.axis)
    if [a % x.rank for a in axes] != [x.rank - 1] or getattr(layer, "rms_scaling", False):
        raise UnsupportedError(f"Keras layer {layer.name!r} (LayerNormalization) normalises axes {layer.axis}",
                               hint="only LayerNormalization over the last axis (no rms_scaling) converts")
    c = x.shape[-1]
    module = _set(nn.LayerNorm(c, eps=layer.epsilon), weight=_np(layer.gamma) if layer.scale else None,
                  bias=_np(layer.beta) if layer.center else None)
    return Value(b.add(layer.name, module, x.node), KERAS, out_shapes[0])


_POOL = {("max", 1): nn.MaxPool1d, ("max", 2): nn.MaxPool2d, ("avg", 1): nn.AvgPool1d, ("avg", 2): nn.AvgPool2d}


def _pool(kind):
    def convert(layer, ins, b, out_shapes):
        _channels_last(layer)
        x = b.as_cf(ins[0])
        k, s = tuple(layer.pool_size), tuple(layer.strides or layer.pool_size)
        pads = _padding(layer, x.shape[1:-1], k, s)
        if all(p0 == p1 for p0, p1 in pads):
            kw = {"count_include_pad": False} if kind == "avg" else {}
            module = _POOL[(kind, len(k))](k, s, padding=tuple(p0 for p0, _ in pads), **kw)
        else:
            divisor = None
            if kind == "avg":  # window size / real positions of each window, from the built input size
                ones = torch.nn.functional.pad(torch.ones(1, 1, *x.shape[1:-1]), _flat_pads(pads))
                counts = _POOL[("avg", len(k))](k, s)(ones)
                divisor = 1.0 / counts
            module = PadPool(kind, k, s, _flat_pads(pads), divisor)
        return Value(b.add(layer.name, module, x.node), CF, out_shapes[0])
    return convert


def _global_pool(kind):
    def convert(layer, ins, b, out_shapes):
        _channels_last(layer)
        x = b.as_cf(ins[0])
        keep = bool(getattr(layer, "keepdims", False))
        module = Reduce(kind, tuple(range(2, x.rank)), keep)
        return Value(b.add(layer.name, module, x.node), CF if keep else KERAS, out_shapes[0])
    return convert


def flatten(layer, ins, b, out_shapes):
    x = ins[0]
    if x.rank == 2:
        return x._replace(shape=out_shapes[0])
    node = b.add(layer.name, nn.Flatten(), x.node)
    if x.layout == CF:
        return Value(node, FLAT, out_shapes[0], unflat=tuple(x.shape[1:]))
    return Value(node, KERAS, out_shapes[0])


def reshape(layer, ins, b, out_shapes):
    x, target = ins[0], tuple(out_shapes[0][1:])
    if x.rank == 2 and len(target) >= 2 and all(n == 1 for n in target[:-1]) and target[-1] == x.shape[-1]:
        # (N, C) -> (N, 1, 1, C), a squeeze-and-excitation gate: (N, C, 1, 1) channels-first
        node = b.add(layer.name, Reshape((-1, *target[:-1])), b.as_keras(x).node)  # -1: pruning may narrow C
        return Value(node, CF, out_shapes[0])
    x = b.as_keras(x)
    return Value(b.add(layer.name, Reshape(tuple(layer.target_shape)), x.node), KERAS, out_shapes[0])


def _identity(layer, ins, b, out_shapes):
    return ins[0]._replace(shape=out_shapes[0])


def dropout(layer, ins, b, out_shapes):
    return ins[0]._replace(node=b.add(layer.name, nn.Dropout(float(layer.rate)), ins[0].node), shape=out_shapes[0])


def zero_padding(layer, ins, b, out_shapes):
    _channels_last(layer)
    x = b.as_cf(ins[0])
    pads = [tuple(layer.padding)] if isinstance(layer.padding[0], int) else [tuple(p) for p in layer.padding]
    return Value(b.add(layer.name, _pad_module(pads), x.node), CF, out_shapes[0])


def upsampling(layer, ins, b, out_shapes):
    _channels_last(layer)
    if getattr(layer, "interpolation", "nearest") != "nearest":
        raise UnsupportedError(f"Keras layer {layer.name!r} (UpSampling2D) interpolates {layer.interpolation!r}",
                               hint="only nearest UpSampling2D converts")
    x = b.as_cf(ins[0])
    module = nn.Upsample(scale_factor=tuple(float(s) for s in layer.size), mode="nearest")
    return Value(b.add(layer.name, module, x.node), CF, out_shapes[0])


def _merge(kind):
    def convert(layer, ins, b, out_shapes):
        xs = b.common(ins)
        return Value(b.add(layer.name, Merge(kind), *(x.node for x in xs)), xs[0].layout, out_shapes[0],
                     xs[0].unflat)
    return convert


def concatenate(layer, ins, b, out_shapes):
    xs = b.common(ins)
    if xs[0].layout == FLAT:
        xs = [b.as_keras(x) for x in xs]
    dim = cf_dim(layer.axis, xs[0].rank) if xs[0].layout == CF else layer.axis % xs[0].rank
    return Value(b.add(layer.name, Concat(dim), *(x.node for x in xs)), xs[0].layout, out_shapes[0])


def embedding(layer, ins, b, out_shapes):
    x = b.as_keras(ins[0])
    table = _np(layer.embeddings)
    module = _set(nn.Embedding(*table.shape), weight=table)
    return Value(b.add(layer.name, module, x.node), KERAS, out_shapes[0])


def activation_layer(layer, ins, b, out_shapes):
    return activate(b, layer, ins[0], layer.activation, suffix="")._replace(shape=out_shapes[0])


def relu_layer(layer, ins, b, out_shapes):
    max_value = None if layer.max_value is None else float(layer.max_value)
    slope, threshold = float(layer.negative_slope), float(layer.threshold)
    if threshold != 0 or (slope != 0 and max_value is not None):
        raise UnsupportedError(f"Keras layer {layer.name!r} (ReLU) has threshold={threshold}, "
                               f"negative_slope={slope}, max_value={max_value}",
                               hint="ReLU converts with a max_value or a negative_slope, not both, and threshold 0")
    if max_value is None:
        module = nn.LeakyReLU(slope) if slope else nn.ReLU()
    else:
        module = nn.ReLU6() if max_value == 6 else nn.Hardtanh(0.0, max_value)
    return ins[0]._replace(node=b.add(layer.name, module, ins[0].node), shape=out_shapes[0])


def _simple(make: Callable) -> Callable:
    def convert(layer, ins, b, out_shapes):
        return ins[0]._replace(node=b.add(layer.name, make(layer), ins[0].node), shape=out_shapes[0])
    return convert


def softmax_layer(layer, ins, b, out_shapes):
    x = ins[0] if ins[0].layout != FLAT else b.as_keras(ins[0])
    axis = layer.axis if isinstance(layer.axis, int) else (layer.axis[0] if len(layer.axis) == 1 else None)
    if axis is None:
        raise UnsupportedError(f"Keras layer {layer.name!r} (Softmax) is over several axes {layer.axis}",
                               hint="only a Softmax over one axis converts")
    dim = cf_dim(axis, x.rank) if x.layout == CF else axis % x.rank
    return x._replace(node=b.add(layer.name, nn.Softmax(dim), x.node), shape=out_shapes[0])


def _broadcast(b: GraphBuilder, x: Value, values: np.ndarray) -> tuple[Value, torch.Tensor | float]:
    """A per-channel (or broadcast-shaped) Keras constant against ``x``: Keras layout for the tensor."""
    if values.size == 1:
        return x, float(values.reshape(()))
    x = b.as_keras(x)
    values = values.reshape(values.shape[1:]) if values.ndim == x.rank else values
    return x, _tensor(values)


def rescaling(layer, ins, b, out_shapes):
    x, scale = _broadcast(b, ins[0], np.asarray(layer.scale, dtype=np.float32))
    x, offset = _broadcast(b, x, np.asarray(layer.offset, dtype=np.float32))
    return Value(b.add(layer.name, Affine(scale, offset), x.node), x.layout, out_shapes[0], x.unflat)


def normalization(layer, ins, b, out_shapes):
    if getattr(layer, "invert", False):
        raise UnsupportedError(f"Keras layer {layer.name!r} (Normalization) has invert=True",
                               hint="only forward Normalization converts")
    mean, var = _np(layer.mean), _np(layer.variance)
    std = np.maximum(np.sqrt(var), 1e-7)  # keras.backend.epsilon(), as Normalization divides
    x, scale = _broadcast(b, b.as_keras(ins[0]), 1.0 / std)
    x, offset = _broadcast(b, x, -mean / std)
    return Value(b.add(layer.name, Affine(scale, offset), x.node), KERAS, out_shapes[0])


CONVERTERS: dict[str, Callable] = {
    "Conv1D": conv, "Conv2D": conv, "Conv3D": conv, "DepthwiseConv1D": depthwise_conv,
    "DepthwiseConv2D": depthwise_conv, "SeparableConv1D": separable_conv, "SeparableConv2D": separable_conv,
    "Conv1DTranspose": conv_transpose, "Conv2DTranspose": conv_transpose, "Dense": dense,
    "BatchNormalization": batch_norm, "LayerNormalization": layer_norm,
    "MaxPooling1D": _pool("max"), "MaxPooling2D": _pool("max"), "AveragePooling1D": _pool("avg"),
    "AveragePooling2D": _pool("avg"), "GlobalAveragePooling1D": _global_pool("mean"),
    "GlobalAveragePooling2D": _global_pool("mean"), "GlobalMaxPooling1D": _global_pool("max"),
    "GlobalMaxPooling2D": _global_pool("max"), "Flatten": flatten, "Reshape": reshape, "Dropout": dropout,
    "SpatialDropout1D": _identity, "SpatialDropout2D": _identity, "GaussianNoise": _identity,
    "GaussianDropout": _identity, "AlphaDropout": _identity, "ActivityRegularization": _identity,
    "Identity": _identity, "ZeroPadding1D": zero_padding, "ZeroPadding2D": zero_padding,
    "UpSampling2D": upsampling, "Add": _merge("add"), "Subtract": _merge("subtract"),
    "Multiply": _merge("multiply"), "Average": _merge("average"), "Maximum": _merge("maximum"),
    "Minimum": _merge("minimum"), "Concatenate": concatenate, "Embedding": embedding,
    "Activation": activation_layer, "ReLU": relu_layer, "Softmax": softmax_layer,
    "LeakyReLU": _simple(lambda layer: nn.LeakyReLU(float(layer.negative_slope))),
    "ELU": _simple(lambda layer: nn.ELU(float(layer.alpha))), "Rescaling": rescaling,
    "Normalization": normalization,
}
