"""Follow channels through a traced graph: which positions of which layers are the same channel.

Every Conv/Linear output is a fresh *space* of channels; each channel is one integer
*slot*. Walking the fx graph in order, every tensor value gets a :class:`Value`: the dim
that holds channels and, for each position along it, the slot it carries. Ops move slots
around without knowing about layers:

* activations, pooling, dropout, BatchNorm, depthwise convs: slots pass through unchanged;
* a grouped conv (``1 < groups``, not depthwise) is read and produces like a plain conv;
  that its conv groups must stay equally wide is a count constraint checked by
  :mod:`.groups`, not a union of slots;
* residual ``add``/``mul`` of two tracked values: slot ``i`` of one operand and slot ``i``
  of the other are *unioned* (they must be pruned together);
* ``cat`` along the channel dim: the slot lists are concatenated (offsets come for free);
* ``flatten``/``view``/``reshape``: worked out from the recorded shapes; a flatten repeats
  each slot ``H*W`` times, so a following Linear loses ``H*W`` inputs per pruned channel;
* a channel shuffle (ShuffleNet: ``view(b, g, c // g, h, w)``, ``transpose(1, 2)``, ``view(b, c, h, w)``):
  the view into ``g`` rows ties channel ``j`` of every row together (the rows must lose the same
  channels for the shuffle to stay a shuffle), the transpose permutes the slots, the view back
  merges them; any other op on the two-dim channel block marks it;
* ``chunk`` along the channel dim: the pieces stay equally wide, so position ``j`` of every piece
  is one channel;
* a LayerNorm (or RMSNorm) over the channel dim alone: its scale and shift lose the same
  channels (the statistics are then taken over the channels that remain, as in width
  pruning of transformers);
* a parameter of the model combined with the channels (ConvNeXt's layer scale ``gamma * x``,
  a class token concatenated along the tokens, a position embedding added): the parameter
  is sliced along its channel dim (axis kind ``param:NAME:DIM`` of the module owning it);
* stochastic depth / drop path (identity at inference, a per-sample mask in training): pass;
* ``torch.roll`` along other dims (Swin's cyclic window shift): pass;
* a mean over the channel dim alone, kept as a size-1 dim (an RMSNorm's statistic): untracked,
  taken over the channels that remain (ConvNeXt V2's global response norm: an L2 norm over the
  spatial dims, per channel, divided by its mean over the channels);
* reductions (mean, sum, max, min, vector norms) over other dims: the channels go through;
* anything else that touches a tracked value (an unknown function, a view mixing channels,
  a roll along the channels ...) *marks* the value's slots as unprunable,
  with a reason naming the op and its source line. Values that reach the model output are
  marked too, so output features are never removed.

Each layer axis (a Conv's output channels, a Linear's input features, a BatchNorm) records
the slot of every position it holds. :mod:`.groups` turns the result into pruning groups.
The rules are conservative: an op not listed here never gets its channels removed.
"""
from __future__ import annotations

import math
import operator
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import fx, nn

from ..nn.attention import Attention
from .tracing import node_location


class UnionFind:
    """Disjoint sets over 0..n-1, grown on demand (path halving)."""

    def __init__(self):
        self.parent: list[int] = []

    def add(self) -> int:
        self.parent.append(len(self.parent))
        return len(self.parent) - 1

    def find(self, x: int) -> int:
        while self.parent[x] != x:
            self.parent[x] = self.parent[self.parent[x]]
            x = self.parent[x]
        return x

    def union(self, a: int, b: int) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            self.parent[max(ra, rb)] = min(ra, rb)  # the smaller id stays root: stable ordering


@dataclass
class Value:
    """Channel description of one tensor: ``cdim`` holds channels, ``slots[i]`` is position i's slot."""

    cdim: int
    slots: list[int]
    # the channel block viewed as two dims (cdim, cdim + 1) of these sizes (a channel shuffle's
    # view(b, groups, c // groups, h, w)); ``slots`` are in that layout, row-major
    split: tuple[int, int] | None = None


def _transposed(slots: list[int], rows: int, cols: int) -> list[int]:
    """Slots of a ``rows x cols`` block (row-major) after swapping its two dims."""
    return [slots[r * cols + j] for j in range(cols) for r in range(rows)]


@dataclass
class Space:
    """Channels created by one layer (``producer``), or anonymous data concatenated in (None)."""

    producer: str | None
    slots: list[int]


@dataclass
class ChannelAnalysis:
    """Result of :func:`analyze_channels` (consumed by :class:`~.groups.ChannelGraph`)."""

    uf: UnionFind = field(default_factory=UnionFind)
    spaces: list[Space] = field(default_factory=list)
    slot_space: list[int] = field(default_factory=list)
    axes: dict[tuple[str, str], list[int]] = field(default_factory=dict)  # (module, kind) -> slot per position
    marks: dict[int, str] = field(default_factory=dict)                  # slot -> why it cannot be pruned
    producer_space: dict[str, int] = field(default_factory=dict)
    # Conv/Linear layer -> output positions per sample (H*W for a conv, tokens for a Linear): its
    # MACs are that times its weight's size, whatever width pruning leaves
    sites: dict[str, int] = field(default_factory=dict)
    # modules fx kept whole that the rules do not know (nn.TransformerEncoder ...): another
    # capture (torch.export) may see inside them
    opaque: list[str] = field(default_factory=list)

    def new_space(self, producer: str | None, size: int) -> list[int]:
        slots = [self.uf.add() for _ in range(size)]
        self.slot_space.extend([len(self.spaces)] * size)
        self.spaces.append(Space(producer, slots))
        return slots

    def mark(self, values, reason: str) -> None:
        for v in values:
            if v is not None:
                for s in v.slots:
                    self.marks.setdefault(s, reason)

    def record_axis(self, module: str, kind: str, slots: list[int]) -> None:
        key = (module, kind)
        if key in self.axes:  # a module called twice: both inputs share its positions
            for a, b in zip(self.axes[key], slots):
                self.uf.union(a, b)
        else:
            self.axes[key] = list(slots)


# -- op tables -----------------------------------------------------------------------------
_PASS_MODULES = (nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.ELU, nn.SELU, nn.CELU, nn.GELU, nn.SiLU, nn.Mish,
                 nn.Sigmoid, nn.Tanh, nn.Hardtanh, nn.Hardswish, nn.Hardsigmoid, nn.Softplus, nn.Softsign,
                 nn.Identity, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout,
                 nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d,
                 nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d, nn.AdaptiveMaxPool1d,
                 nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d, nn.Upsample, nn.ZeroPad2d, nn.ConstantPad1d,
                 nn.ConstantPad2d, nn.ReflectionPad1d, nn.ReflectionPad2d, nn.ReplicationPad1d,
                 nn.ReplicationPad2d)
_PASS_FUNCTIONS = {torch.relu, torch.relu_, F.relu, F.relu_, F.relu6, F.leaky_relu, F.elu, F.selu, F.gelu,
                   F.silu, F.mish, F.hardswish, F.hardsigmoid, F.hardtanh, torch.sigmoid, F.sigmoid, torch.tanh,
                   F.tanh, F.softplus, F.dropout, F.dropout1d, F.dropout2d, F.max_pool1d, F.max_pool2d,
                   F.max_pool3d, F.avg_pool1d, F.avg_pool2d, F.avg_pool3d, F.adaptive_avg_pool1d,
                   F.adaptive_avg_pool2d, F.adaptive_avg_pool3d, F.adaptive_max_pool1d, F.adaptive_max_pool2d,
                   F.interpolate, F.pad, torch.clamp, torch.clip, torch.abs, torch.neg, operator.neg, torch.exp,
                   torch.sqrt}
# functions of other libraries, by module prefix and name (imported by no one here)
_PASS_NAMED = {("torchvision.ops", "stochastic_depth"), ("timm.layers", "drop_path"), ("timm.models", "drop_path")}
# methods that keep a parameter a parameter (same values, maybe broadcast to a bigger shape)
_PARAM_METHODS = {"expand", "expand_as", "to", "type_as", "contiguous", "float", "half", "double", "clone"}
_PASS_METHODS = {"relu", "relu_", "sigmoid", "tanh", "contiguous", "clone", "detach", "float", "half",
                 "double", "to", "type_as", "abs", "neg", "clamp", "clamp_", "clip", "exp", "sqrt"}
_ELEMENTWISE_FUNCTIONS = {operator.add, operator.sub, operator.mul, operator.truediv, operator.iadd,
                          operator.isub, operator.imul, operator.itruediv, operator.pow, torch.add, torch.sub,
                          torch.mul, torch.div, torch.maximum, torch.minimum, torch.pow, torch.addcmul}
_ELEMENTWISE_METHODS = {"add", "add_", "sub", "sub_", "mul", "mul_", "div", "div_", "pow", "maximum", "minimum",
                        "addcmul"}
_RESHAPE_METHODS = {"view", "reshape", "flatten", "squeeze", "unsqueeze"}
_RESHAPE_FUNCTIONS = {torch.flatten, torch.reshape, torch.squeeze, torch.unsqueeze}
_REDUCE_METHODS = {"mean", "sum", "amax", "amin", "norm"}
_REDUCE_FUNCTIONS = {torch.mean, torch.sum, torch.amax, torch.amin, torch.norm, torch.linalg.vector_norm}
_METADATA_METHODS = {"size", "dim", "numel", "stride", "is_contiguous", "element_size", "get_device"}
_SPLIT_METHODS = {"view", "reshape", "flatten", "transpose", "permute", "swapaxes", "swapdims", "contiguous", "clone"}


def _reduce_name(node: fx.Node) -> str:  # "mean" for Tensor.mean, torch.mean, aten.mean.dim
    t = node.target
    return t if isinstance(t, str) else getattr(t, "__name__", "").split(".")[0]


def _named_pass(fn) -> bool:
    mod, name = getattr(fn, "__module__", None) or "", getattr(fn, "__name__", "")
    return any(mod.startswith(prefix) and name == n for prefix, n in _PASS_NAMED)


@dataclass
class ParamRef:
    """A graph value that is a parameter (or buffer) of the model, maybe broadcast: ``owner.attr``."""

    owner: str
    attr: str
    shape: tuple  # the parameter's own shape (the value's may have more leading dims)
    view: tuple | None = None  # a view of it with size-1 dims added or dropped (layer scale as [1, C, 1, 1])
    dims: tuple | None = None  # for each dim of ``view``, the parameter's dim it is (None: an added 1)

    def reshaped(self, shape) -> ParamRef | None:
        """This parameter viewed as ``shape`` when that only adds or drops size-1 dims, else None."""
        own = [(d, n) for d, n in enumerate(self.shape) if n != 1]
        new = [(d, n) for d, n in enumerate(shape) if n != 1]
        if self.view is not None or [n for _, n in own] != [n for _, n in new]:
            return None
        dims = [None] * len(shape)
        for (pd, _), (vd, _) in zip(own, new):
            dims[vd] = pd
        return ParamRef(self.owner, self.attr, self.shape, tuple(shape), tuple(dims))


def _prod(xs) -> int:
    return int(math.prod(xs))


def _arg(node: fx.Node, i: int, name: str, default=None):
    if len(node.args) > i:
        return node.args[i]
    return node.kwargs.get(name, default)


def _first_input(node: fx.Node):
    return node.args[0] if node.args else node.kwargs.get("input")


def _op_name(node: fx.Node, module: nn.Module | None = None) -> str:
    if node.op == "call_module":
        return f"{type(module).__name__} '{node.target}'"
    if node.op == "call_method":
        return f"Tensor.{node.target}"
    fn = node.target
    if hasattr(fn, "overloadpacket"):  # an ATen op of an exported graph
        return f"aten.{fn.overloadpacket.__name__}"
    mod = getattr(fn, "__module__", None) or ""
    mod = "torch" if mod.startswith("torch") and mod != "torch.nn.functional" else mod
    return f"{mod + '.' if mod and mod not in ('_operator', 'builtins') else ''}{getattr(fn, '__name__', str(fn))}"


class _Walker:
    """One pass over the graph in topological order (fx nodes are already ordered)."""

    def __init__(self, gm: fx.GraphModule):
        self.gm = gm
        self.root: nn.Module = gm.meta.get("root", gm)  # the traced model (gm holds copies of get_attr owners)
        self.res = ChannelAnalysis()
        # (width read off a tensor, the value it sizes a view of, why): marked at the end unless the
        # two are the same channels by then
        self.size_ties: list[tuple[Value, Value, str]] = []
        self.values: dict[fx.Node, Value | None] = {}
        self.params: dict[fx.Node, ParamRef] = {}  # values that are model parameters
        self.tuples: dict[fx.Node, list[Value | None]] = {}  # outputs of layers returning tuples

    # -- helpers -----------------------------------------------------------------------
    def value(self, a) -> Value | None:
        return self.values.get(a) if isinstance(a, fx.Node) else None

    def tracked_inputs(self, node: fx.Node) -> list[Value]:
        found: list[Value] = []

        def add(a):
            found.append(self.values.get(a))
            found.extend(self.tuples.get(a, ()))

        fx.node.map_arg((node.args, node.kwargs), add)
        return [v for v in found if v is not None]

    def reason(self, what: str, node: fx.Node) -> str:
        where = node_location(node)
        return f"{what} at {where}" if where else f"{what} (graph node '{node.name}')"

    def unknown(self, node: fx.Node, module: nn.Module | None = None, why: str = "") -> None:
        what = why or f"{_op_name(node, module)} is not supported by structured pruning"
        self.res.mark(self.tracked_inputs(node), self.reason(what, node))
        return None

    def producer(self, name: str, size: int, kind: str = "out") -> list[int]:
        if name not in self.res.producer_space:
            slots = self.res.new_space(name, size)
            self.res.producer_space[name] = self.res.slot_space[slots[0]]
            self.res.record_axis(name, kind, slots)
        return self.res.spaces[self.res.producer_space[name]].slots

    def param_axis(self, a, r: int, slots: list[int]) -> bool:
        """If ``a`` is a parameter whose size at channel position ``r`` (counted from the right)
        equals ``len(slots)``, record it as an axis carrying ``slots``; True when recorded."""
        ref = self.params.get(a) if isinstance(a, fx.Node) else None
        if ref is not None and ref.view is not None:  # a reshaped parameter: back to its own dim
            vd = len(ref.view) - r
            if vd < 0 or ref.view[vd] != len(slots) or ref.dims[vd] is None:
                return False
            self.res.record_axis(ref.owner, f"param:{ref.attr}:{ref.dims[vd]}", slots)
            return True
        if ref is None or len(ref.shape) < r or ref.shape[len(ref.shape) - r] != len(slots):
            return False
        self.res.record_axis(ref.owner, f"param:{ref.attr}:{len(ref.shape) - r}", slots)
        return True

    def passthrough(self, node: fx.Node, x: Value | None, module=None) -> Value | None:
        out = node.meta.get("shape")
        first = _first_input(node)
        src = first.meta.get("shape") if isinstance(first, fx.Node) else None
        if x is None:
            return None
        width = tuple(out[x.cdim:x.cdim + 2]) if x.split and out else (out[x.cdim],) if out else None
        if out is None or src is None or len(out) != len(src) or width != (x.split or (len(x.slots),)):
            return self.unknown(node, module, f"{_op_name(node, module)} changes the channel dim")
        return Value(x.cdim, list(x.slots), x.split)

    # -- dispatch ------------------------------------------------------------------------
    def run(self) -> ChannelAnalysis:
        for node in self.gm.graph.nodes:
            if node.op == "placeholder":
                self.values[node] = None
            elif node.op == "get_attr":
                self.values[node] = None
                self.get_attr(node)
            elif node.op == "output":
                self.res.mark(self.tracked_inputs(node), "feeds the model output")
            elif node.op == "call_module":
                self.values[node] = self.call_module(node, self.gm.get_submodule(node.target))
            elif any(v.split for v in self.tracked_inputs(node)) and not self.keeps_split(node):
                self.values[node] = self.unknown(node, why=f"{_op_name(node)} reads channels viewed as "
                                                           "(groups, channels per group)")
            elif node.op == "call_method":
                self.values[node] = self.call_method(node)
            else:
                self.values[node] = self.call_function(node)
        for v, x, reason in self.size_ties:  # timm Swin: ``B, H, W, C = x.shape`` ... ``attn.view(..., C)``
            if any(self.res.uf.find(a) != self.res.uf.find(b) for a, b in zip(v.slots, x.slots)):
                self.res.mark([v], reason)
        return self.res

    def keeps_split(self, node: fx.Node) -> bool:
        """Ops that may read a channel block viewed as two dims (see :attr:`Value.split`)."""
        if node.op == "call_method":
            return node.target in _SPLIT_METHODS
        return node.target in (torch.transpose, torch.permute, torch.swapaxes, torch.swapdims, torch.reshape,
                               torch.flatten)

    def get_attr(self, node: fx.Node) -> None:
        owner, _, attr = node.target.rpartition(".")
        try:
            module = self.root.get_submodule(owner)
        except AttributeError:
            return
        t = getattr(module, attr, None)
        if isinstance(t, torch.Tensor) and (attr in module._parameters or attr in module._buffers):
            self.params[node] = ParamRef(owner, attr, tuple(t.shape))

    def call_module(self, node: fx.Node, m: nn.Module) -> Value | None:
        x = self.value(_first_input(node))
        name = node.target
        if isinstance(m, nn.modules.conv._ConvNd) and not m.transposed:
            return self.conv(node, m, x, name)
        if isinstance(m, nn.Linear):
            return self.linear(node, m, x, name)
        if isinstance(m, Attention):
            return self.attention(node, m, name)
        if isinstance(m, nn.Embedding):  # the embedding dim is a new space of channels
            out = node.meta.get("shape") or (m.embedding_dim,)
            return Value(len(out) - 1, self.producer(name, m.embedding_dim, kind="emb"))
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            if x is None:
                return None
            if x.cdim != 1 or len(x.slots) != m.num_features:
                return self.unknown(node, m, f"BatchNorm '{name}' does not normalise the channel dim")
            self.res.record_axis(name, "norm", x.slots)
            return Value(1, list(x.slots))
        if isinstance(m, (nn.LayerNorm, nn.RMSNorm)):
            shape = node.meta.get("shape") or ()
            if x is None:
                return None
            if len(m.normalized_shape) == 1 and x.cdim == len(shape) - 1:  # over the channels alone
                self.res.record_axis(name, "ln", x.slots)
            elif x.cdim >= len(shape) - len(m.normalized_shape):
                self.res.mark([x], self.reason(f"{type(m).__name__} '{name}' normalises over the channels "
                                               "and other dims together", node))
            return Value(x.cdim, list(x.slots))
        if isinstance(m, (nn.Flatten, nn.Unflatten)):
            return self.reshape(node, x)
        if isinstance(m, (nn.Softmax, nn.LogSoftmax)):
            return self.softmax(node, x, m.dim)
        if isinstance(m, nn.PReLU) and m.num_parameters == 1:
            return self.passthrough(node, x, m)
        if isinstance(m, (nn.InstanceNorm1d, nn.InstanceNorm2d)) and not m.affine and not m.track_running_stats:
            return self.passthrough(node, x, m)
        if isinstance(m, _PASS_MODULES):
            return self.passthrough(node, x, m)
        if x is not None and next(m.parameters(), None) is not None:
            self.res.opaque.append(name)
        return self.unknown(node, m)

    def conv(self, node: fx.Node, m: nn.modules.conv._ConvNd, x: Value | None, name: str) -> Value | None:
        out = node.meta.get("shape")
        if out:
            self.res.sites[name] = self.res.sites.get(name, 0) + _prod(out[2:])
        if 1 < m.groups == m.in_channels == m.out_channels:  # depthwise: channel i only feeds channel i
            if x is None:
                return None
            if x.cdim != 1 or len(x.slots) != m.in_channels:
                return self.unknown(node, m, f"depthwise Conv '{name}' reads channels from another dim")
            self.res.record_axis(name, "dw", x.slots)
            return Value(1, list(x.slots))
        # A plain or grouped conv reads its input channels and creates new ones. A grouped
        # conv's two axes are recorded like a plain conv's; that every conv group keeps the
        # same width is a constraint on how many channels go, enforced per group by
        # graph.groups (selection) and graph.surgery (slicing), not a coupling of slots.
        if x is not None:
            if x.cdim != 1 or len(x.slots) != m.in_channels:
                self.unknown(node, m, f"Conv '{name}' reads a tensor whose channels are not in dim 1")
            elif m.groups == m.in_channels:  # one input per group (depthwise with a multiplier)
                self.unknown(node, m, f"grouped Conv '{name}' reads one channel per group "
                                      f"(groups={m.groups}): its inputs could only go all at once")
            else:
                self.res.record_axis(name, "in", x.slots)
        return Value(1, self.producer(name, m.out_channels))

    def linear(self, node: fx.Node, m: nn.Linear, x: Value | None, name: str) -> Value | None:
        src = _first_input(node).meta.get("shape") or ()
        if x is not None:
            if x.cdim == len(src) - 1 and len(x.slots) == m.in_features:
                self.res.record_axis(name, "in", x.slots)
            else:
                self.unknown(node, m, f"Linear '{name}' reads features that are not the channel dim")
        out = node.meta.get("shape") or (m.out_features,)
        self.res.sites[name] = self.res.sites.get(name, 0) + _prod(out[1:-1])
        return Value(len(out) - 1, self.producer(name, m.out_features))

    def attention(self, node: fx.Node, m: Attention, name: str) -> None:
        """modelpress' :class:`~modelpress.nn.attention.Attention` as one layer: its query, key and
        value projections read the channels of their inputs; its output projection makes new ones.
        (Its heads are ``prune.heads``' to cut.)"""
        sources = [_arg(node, i, k) for i, k in enumerate(("query", "key", "value"))]
        for proj, src in zip(("q_proj", "k_proj", "v_proj"), sources):
            v, shape = self.value(src), src.meta.get("shape") if isinstance(src, fx.Node) else None
            layer = getattr(m, proj)
            if shape:
                batch = shape[0] if m.batch_first or len(shape) == 2 else shape[1]
                tokens = _prod(shape[:-1]) // (batch if len(shape) == 3 else 1)
                self.res.sites[f"{name}.{proj}"] = self.res.sites.get(f"{name}.{proj}", 0) + tokens
                if proj == "q_proj":
                    self.res.sites[f"{name}.out_proj"] = self.res.sites.get(f"{name}.out_proj", 0) + tokens
            if v is None:
                continue
            if shape and v.cdim == len(shape) - 1 and len(v.slots) == layer.in_features:
                self.res.record_axis(f"{name}.{proj}", "in", v.slots)
            else:
                self.res.mark([v], self.reason(f"Attention '{name}' reads features that are not the channel dim",
                                               node))
        masks = [v for k, v in node.kwargs.items() if k not in ("query", "key", "value")]
        self.res.mark([self.value(a) for a in list(node.args[3:]) + masks], self.reason(
            f"Attention '{name}' reads a mask made from the channels", node))
        q_shape = sources[0].meta.get("shape") if isinstance(sources[0], fx.Node) else None
        out = Value(len(q_shape or (0,)) - 1, self.producer(f"{name}.out_proj", m.out_proj.out_features))
        self.tuples[node] = [out, None]
        return None

    def call_method(self, node: fx.Node) -> Value | None:
        name = node.target
        first = _first_input(node)
        x = self.value(first)
        if name in _METADATA_METHODS:
            return None
        if name in _PARAM_METHODS and first in self.params:
            self.params[node] = self.params[first]
            return None
        if name in ("reshape", "view") and first in self.params:  # gamma.reshape(1, -1, 1, 1)
            view = self.params[first].reshaped(node.meta.get("shape") or ())
            if view is not None:
                self.params[node] = view
            return None
        if name in _PASS_METHODS:
            return self.passthrough(node, x)
        if name in _ELEMENTWISE_METHODS:
            return self.elementwise(node)
        if name in _RESHAPE_METHODS:
            shape_args = None
            if name in ("view", "reshape"):
                rest = node.args[1:]
                shape_args = list(rest[0]) if len(rest) == 1 and isinstance(rest[0], (list, tuple)) else list(rest)
            return self.reshape(node, x, shape_args)
        if name in ("permute", "transpose", "swapaxes", "swapdims"):
            return self.permute(node, x, name)
        if name in ("chunk", "split"):
            return self.pieces(node, x, name)
        if name in _REDUCE_METHODS:
            return self.reduce(node, x)
        if name in ("softmax", "log_softmax"):
            return self.softmax(node, x, _arg(node, 1, "dim"))
        return self.unknown(node)

    def call_function(self, node: fx.Node) -> Value | None:
        fn = node.target
        x = self.value(_first_input(node))
        if fn is getattr:  # x.shape, x.dtype ...: metadata, not data
            return None
        if fn is operator.getitem:
            first = _first_input(node)
            if first in self.tuples and isinstance(node.args[1], int):  # one output of a layer returning a tuple
                items = self.tuples[first]
                return items[node.args[1]] if -len(items) <= node.args[1] < len(items) else None
            return self.index(node, x, node.args[1]) if x is not None else None
        if fn in _PASS_FUNCTIONS or _named_pass(fn):
            return self.passthrough(node, x)
        if fn in (F.layer_norm, F.rms_norm):
            return self.functional_norm(node, x, has_bias=fn is F.layer_norm)
        if fn in _ELEMENTWISE_FUNCTIONS:
            return self.elementwise(node)
        if fn in (torch.cat, torch.concat):
            return self.cat(node)
        if fn in _RESHAPE_FUNCTIONS:
            shape_args = list(_arg(node, 1, "shape")) if fn is torch.reshape else None
            return self.reshape(node, x, shape_args)
        if fn in (torch.permute, torch.transpose, torch.swapaxes, torch.swapdims):
            return self.permute(node, x, fn.__name__)
        if fn in (torch.chunk, torch.split):
            return self.pieces(node, x, "chunk" if fn is torch.chunk else "split")
        if fn in _REDUCE_FUNCTIONS:
            return self.reduce(node, x)
        if fn in (torch.softmax, F.softmax, F.log_softmax, torch.log_softmax):
            return self.softmax(node, x, _arg(node, 1, "dim"))
        if fn is torch.roll and x is not None:  # Swin's cyclic shift: along the spatial dims only
            dims = _arg(node, 2, "dims")
            rank = len(_first_input(node).meta.get("shape") or ())
            dims = [dims] if isinstance(dims, int) else list(dims or [])
            if dims and rank and x.cdim not in [d % rank for d in dims]:
                return self.passthrough(node, x)
        if not self.tracked_inputs(node):
            return None  # arithmetic on sizes, tensor factories ...: nothing to follow
        return self.unknown(node)

    # -- rules ---------------------------------------------------------------------------
    def elementwise(self, node: fx.Node) -> Value | None:
        out = node.meta.get("shape")
        operands = [a for a in list(node.args) + list(node.kwargs.values()) if isinstance(a, fx.Node)]
        tracked = [(a, self.values[a]) for a in operands if self.values.get(a) is not None]
        if not tracked:
            return None
        all_vals = [v for _, v in tracked]
        if out is None:
            return self.unknown(node)
        right = {len(a.meta["shape"]) - v.cdim for a, v in tracked}  # channel dim counted from the right
        if len(right) != 1:
            return self.unknown(node, why=f"{_op_name(node)} combines tensors whose channels are in different dims")
        r = right.pop()
        cdim, size = len(out) - r, out[len(out) - r]
        full = [v for v in all_vals if len(v.slots) == size]
        if len(full) != len(all_vals):  # a one-channel operand broadcast over many channels
            return self.unknown(node, why=f"{_op_name(node)} broadcasts one channel over {size}")
        for a in operands:
            shape = a.meta.get("shape")
            if self.values.get(a) is None and shape is not None and len(shape) >= r and shape[len(shape) - r] > 1 \
                    and not self.param_axis(a, r, full[0].slots):
                self.res.mark(all_vals, self.reason(f"{_op_name(node)} combines the channels with a tensor "
                                                    "structured pruning cannot follow", node))
        for v in full[1:]:
            for a, b in zip(full[0].slots, v.slots):
                self.res.uf.union(a, b)
        return Value(cdim, list(full[0].slots))

    def cat(self, node: fx.Node) -> Value | None:
        tensors = list(_arg(node, 0, "tensors"))
        out = node.meta.get("shape")
        vals = [self.value(t) for t in tensors]
        tracked = [v for v in vals if v is not None]
        if not tracked or out is None:
            return None
        if not all(isinstance(t, fx.Node) and t.meta.get("shape") for t in tensors):
            return self.unknown(node, why="torch.cat of values structured pruning cannot follow")
        dim = _arg(node, 1, "dim", 0) % len(out)
        if len({v.cdim for v in tracked}) != 1:
            return self.unknown(node, why="torch.cat of tensors whose channels are in different dims")
        cdim = tracked[0].cdim
        if dim != cdim:  # concatenating along batch/space: channel i of every input is one channel
            for v in tracked[1:]:
                for a, b in zip(tracked[0].slots, v.slots):
                    self.res.uf.union(a, b)
            r = len(out) - cdim
            followed = all(v is not None or self.param_axis(t, r, tracked[0].slots) for t, v in zip(tensors, vals))
            if not followed:
                self.res.mark(tracked, self.reason("torch.cat with a tensor structured pruning cannot follow", node))
            return Value(cdim, list(tracked[0].slots))
        slots: list[int] = []
        for t, v in zip(tensors, vals):
            if v is None:  # untracked data: its channels get anonymous, unprunable slots
                anon = self.res.new_space(None, t.meta["shape"][dim])
                self.res.mark([Value(dim, anon)], self.reason("concatenated with a tensor structured pruning "
                                                              "cannot follow", node))
                slots += anon
            else:
                slots += v.slots
        return Value(cdim, slots)

    def _size_of(self, a) -> tuple[fx.Node, int] | None:
        """``(tensor, dim)`` when the graph value ``a`` is a size read off a tensor (``x.shape[i]``, ``x.size(i)``)."""
        if not isinstance(a, fx.Node):
            return None
        if a.op == "call_method" and a.target == "size" and len(a.args) == 2 and isinstance(a.args[1], int):
            return a.args[0], a.args[1]
        if a.op == "call_function" and a.target is operator.getitem and isinstance(a.args[1], int):
            holder = a.args[0]
            if isinstance(holder, fx.Node) and (holder.op == "call_function" and holder.target is getattr
                                                and holder.args[1] == "shape" or holder.op == "call_method"
                                                and holder.target == "size" and len(holder.args) == 1):
                return holder.args[0], a.args[1]
        return None

    def sized_by_channels(self, node: fx.Node, x: Value | None, shape_args: list) -> None:
        """A view whose size is read off another tensor's channel dim (MaxViT: ``B, G, P, D =
        x.shape`` ... ``out.reshape(B, G, P, D)``) ties that tensor's width to a width the graph does
        not follow: those channels stay."""
        for a in shape_args:
            src = self._size_of(a)
            v = self.values.get(src[0]) if src else None
            rank = len(src[0].meta.get("shape") or ()) if src else 0
            if v is None or not rank or src[1] % rank != v.cdim or (x is not None and set(v.slots) == set(x.slots)):
                continue
            reason = self.reason(f"its width sizes a view of another tensor ({_op_name(node)})", node)
            if x is not None and len(x.slots) == len(v.slots):  # fine if a later op (a residual add) joins them
                self.size_ties.append((v, x, reason))
            else:
                self.res.mark([v], reason)

    def reshape(self, node: fx.Node, x: Value | None, shape_args: list | None = None) -> Value | None:
        """Channel mapping of any view-like op, from the shapes before and after."""
        if shape_args:
            self.sized_by_channels(node, x, shape_args)
        if x is None:
            return None
        src, out = _first_input(node).meta.get("shape"), node.meta.get("shape")
        if src is None or out is None:
            return self.unknown(node)
        if x.split:
            return self.merge_split(node, x, src, out, shape_args)
        channels, inner = src[x.cdim], _prod(src[x.cdim + 1:])
        for k in range(len(out)):
            stride = _prod(out[k + 1:])
            # output dim k must span exactly the channel block, each position inside one channel
            if stride <= inner and inner % stride == 0 and out[k] * stride == channels * inner:
                if shape_args is not None and len(shape_args) == len(out):
                    arg = shape_args[k]
                    if isinstance(arg, int) and arg != -1 and not (out[k] == channels and
                                                                   self.width_attr(node, arg, x.slots)):
                        return self.unknown(node, why=f"{_op_name(node)} hard-codes {arg} as the size of "
                                                      "the channel dim (use -1 or x.size(...))")
                return Value(k, [x.slots[(p * stride) // inner] for p in range(out[k])])
        for k in range(len(out)):  # leading dims folded into the channels (timm Swin's patch merging:
            # (B, H/2, W/2, 2, 2, C) -> (B, H/2, W/2, 4C)): position p of the new dim is channel p % C
            if out[k] > channels and out[k] % channels == 0 and _prod(out[k + 1:]) == inner \
                    and _prod(out[:k + 1]) == _prod(src[:x.cdim + 1]) and inner == 1:
                if shape_args is not None and len(shape_args) == len(out) and isinstance(shape_args[k], int) \
                        and shape_args[k] != -1:
                    break
                return Value(k, [x.slots[p % channels] for p in range(out[k])])
        for k in range(len(out) - 1):  # the channels as (rows, columns): a channel shuffle's first view
            rows, cols = out[k], out[k + 1]
            if rows > 1 and cols > 1 and rows * cols == channels and _prod(out[k + 2:]) == inner \
                    and _prod(out[:k]) == _prod(src[:x.cdim]):
                if shape_args is not None and len(shape_args) == len(out) and isinstance(shape_args[k + 1], int) \
                        and shape_args[k + 1] != -1:
                    break
                for r in range(1, rows):  # every row must lose the same columns
                    for j in range(cols):
                        self.res.uf.union(x.slots[j], x.slots[r * cols + j])
                return Value(k, list(x.slots), (rows, cols))
        return self.unknown(node, why=f"{_op_name(node)} from {tuple(src)} to {tuple(out)} mixes the channel dim")

    def merge_split(self, node: fx.Node, x: Value, src, out, shape_args: list | None) -> Value | None:
        """A view of a (rows, columns) channel block back into one channel dim."""
        before, after = _prod(src[:x.cdim]), _prod(src[x.cdim + 2:])
        width = x.split[0] * x.split[1]
        for k in range(len(out)):
            if out[k] == width and _prod(out[:k]) == before and _prod(out[k + 1:]) == after:
                if shape_args is not None and len(shape_args) == len(out) and isinstance(shape_args[k], int) \
                        and shape_args[k] != -1:
                    break
                return Value(k, list(x.slots))
        if tuple(out) == tuple(src):
            return Value(x.cdim, list(x.slots), x.split)
        return self.unknown(node, why=f"{_op_name(node)} from {tuple(src)} to {tuple(out)} mixes the channel dim")

    def width_attr(self, node: fx.Node, size: int, slots: list[int]) -> bool:
        """A view whose channel size comes from an int attribute of the module running it
        (torchvision's ViT: ``x.reshape(n, self.hidden_dim, -1)``): when exactly one attribute of
        that module holds ``size``, record it as an axis (kind ``attr:NAME``) set to the new width."""
        stack = node.meta.get("nn_module_stack") or {}
        owner = next(reversed(stack.values()))[0] if stack else ""
        try:
            module = self.root.get_submodule(owner)
        except AttributeError:
            return False
        names = [a for a, v in vars(module).items()
                 if not a.startswith("_") and type(v) is int and v == size]
        if len(names) != 1:
            return False
        self.res.record_axis(owner, f"attr:{names[0]}", slots)
        return True

    def index(self, node: fx.Node, x: Value, idx) -> Value | None:
        """``x[...]`` with ints, slices, None and Ellipsis: the channel dim moves, or must be ``:``."""
        src = _first_input(node).meta.get("shape")
        items = list(idx) if isinstance(idx, tuple) else [idx]
        if src is None or any(not (i is None or i is Ellipsis or isinstance(i, (int, slice))) for i in items):
            return self.unknown(node, why="indexing a tensor with tensors is not supported by structured pruning")
        given = sum(1 for i in items if i is not None and i is not Ellipsis)
        full: list = []
        for i in items:
            full += [slice(None)] * (len(src) - given) if i is Ellipsis else [i]
        full += [slice(None)] * (len(src) - sum(1 for i in full if i is not None))
        d_in = d_out = 0
        cdim = None
        for i in full:
            if i is None:
                d_out += 1
                continue
            if d_in == x.cdim:
                if i != slice(None):
                    return self.unknown(node, why="indexing or slicing the channel dim is not supported "
                                                  "by structured pruning")
                cdim = d_out
            d_in += 1
            d_out += not isinstance(i, int)
        return Value(cdim, list(x.slots)) if cdim is not None else self.unknown(node)

    def permute(self, node: fx.Node, x: Value | None, name: str) -> Value | None:
        if x is None:
            return None
        ndim = len(node.meta.get("shape") or ())
        rest = node.args[1:]
        if name == "permute":
            dims = list(rest[0]) if len(rest) == 1 and isinstance(rest[0], (list, tuple)) else list(rest)
            dims = [d % ndim for d in dims]
        else:
            first, second = ("axis0", "axis1") if name == "swapaxes" else ("dim0", "dim1")
            a, b = (d % ndim for d in (_arg(node, 1, first), _arg(node, 2, second)))
            dims = list(range(ndim))
            dims[a], dims[b] = b, a
        if x.split:
            at, rows, cols = dims.index(x.cdim), *x.split
            if dims.index(x.cdim + 1) == at + 1:
                return Value(at, list(x.slots), x.split)
            if at > 0 and dims.index(x.cdim + 1) == at - 1:  # the shuffle: rows and columns swap
                return Value(at - 1, _transposed(x.slots, rows, cols), (cols, rows))
            return self.unknown(node, why=f"{_op_name(node)} separates channels viewed as (groups, channels "
                                          "per group), as attention heads are")
        return Value(dims.index(x.cdim), list(x.slots))

    def pieces(self, node: fx.Node, x: Value | None, how: str) -> None:
        """``chunk`` / ``split``: a tuple of pieces (read by ``getitem``). Cut along the channel
        dim, the pieces must stay equally wide: position ``j`` of every piece is one channel, and
        only ``chunk`` (whose sizes follow the width) is followed there."""
        src = _first_input(node).meta.get("shape")
        if x is None or not src:
            return None
        dim = _arg(node, 2, "dim", 0) % len(src)
        size = _arg(node, 1, "chunks" if how == "chunk" else "split_size_or_sections")
        if how == "chunk" and isinstance(size, int) and size > 0:
            step = -(-src[dim] // size)
        elif how == "split" and isinstance(size, int) and size > 0:
            step = size
        else:
            return self.unknown(node, why=f"{_op_name(node)} into sizes structured pruning cannot follow")
        count = -(-src[dim] // step)
        if dim != x.cdim:
            self.tuples[node] = [Value(x.cdim, list(x.slots)) for _ in range(count)]
            return None
        if how != "chunk" or src[dim] % size:
            return self.unknown(node, why=f"{_op_name(node)} cuts the channel dim into pieces of fixed size "
                                          "(chunk keeps them equal)")
        for k in range(1, count):
            for j in range(step):
                self.res.uf.union(x.slots[j], x.slots[k * step + j])
        self.tuples[node] = [Value(x.cdim, x.slots[k * step:(k + 1) * step]) for k in range(count)]
        return None

    def reduce(self, node: fx.Node, x: Value | None) -> Value | None:
        if x is None:
            return None
        src = _first_input(node).meta.get("shape") or ()
        at = 2 if _reduce_name(node) in ("norm", "linalg_vector_norm") else 1  # norm(x, p, dim, keepdim)
        dims = _arg(node, at, "dim")
        keepdim = _arg(node, at + 1, "keepdim", False)
        if dims is None:
            return self.unknown(node, why=f"{_op_name(node)} reduces over the channel dim")
        dims = [d % len(src) for d in (dims if isinstance(dims, (list, tuple)) else [dims])]
        if dims == [x.cdim] and keepdim and _reduce_name(node) == "mean":
            return None  # a statistic over the channels (an RMSNorm's): taken over those that remain
        if x.cdim in dims:
            return self.unknown(node, why=f"{_op_name(node)} reduces over the channel dim")
        cdim = x.cdim if keepdim else x.cdim - sum(d < x.cdim for d in dims)
        return Value(cdim, list(x.slots))

    def functional_norm(self, node: fx.Node, x: Value | None, has_bias: bool) -> Value | None:
        """``F.layer_norm`` / ``F.rms_norm`` (e.g. inside a LayerNorm2d): over the channels alone,
        with its weight and bias parameters of the model, the parameters lose the channels."""
        if x is None:
            return None
        ndim = len(node.meta.get("shape") or ())
        shape = _arg(node, 1, "normalized_shape")
        norm_dims = len(shape) if isinstance(shape, (list, tuple)) else 1
        if x.cdim < ndim - norm_dims:
            return Value(x.cdim, list(x.slots))  # normalises other dims: channels pass
        params = [_arg(node, 2, "weight"), _arg(node, 3, "bias") if has_bias else None]
        params = [p for p in params if p is not None]
        owners = {self.params[p].owner for p in params if p in self.params}
        if norm_dims != 1 or x.cdim != ndim - 1 or not params or len(owners) != 1 or \
                not isinstance(self.root.get_submodule(owners.pop()), (nn.LayerNorm, nn.RMSNorm)) or \
                not all(self.param_axis(p, 1, x.slots) for p in params):
            return self.unknown(node, why=f"{_op_name(node)} normalises over the channels with sizes "
                                          "structured pruning cannot change")
        return Value(x.cdim, list(x.slots))

    def softmax(self, node: fx.Node, x: Value | None, dim) -> Value | None:
        if x is None:
            return None
        ndim = len(node.meta.get("shape") or ())
        if dim is None or dim % ndim == x.cdim:
            return self.unknown(node, why=f"{_op_name(node)} normalises over the channel dim")
        return Value(x.cdim, list(x.slots))


def analyze_channels(gm: fx.GraphModule) -> ChannelAnalysis:
    """Run the channel rules over a graph traced by :func:`~.tracing.trace_with_shapes`."""
    return _Walker(gm).run()
