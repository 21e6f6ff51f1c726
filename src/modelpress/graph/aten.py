"""Graph capture for models torch.fx cannot trace: ``torch.export`` (non-strict) and ATen rules.

Hugging Face transformers take keyword inputs (``input_ids=``, ``attention_mask=``), return
``ModelOutput`` objects and branch in Python on configuration and input values, which symbolic
tracing cannot follow. ``torch.export.export(..., strict=False)`` runs the real forward once on
the example inputs and records the ATen operations it performed, with every shape. Parameters
appear as graph inputs named by their place in the model (``model.layers.0.mlp.up_proj.weight``),
so each ``aten.linear`` / ``aten.conv2d`` / ``aten.embedding`` / ``aten.layer_norm`` is tied back
to the module owning its weight, and the channel rules of :mod:`.channels` apply unchanged:

* ``aten.linear`` and ``aten.conv*`` with the weight of an ``nn.Linear`` / ``nn.Conv*``: that layer;
* ``aten.embedding``: the embedding dim is a new space of channels (axis kind ``emb``), so the
  hidden width of a transformer (embeddings, every norm, every projection reading or writing the
  residual stream) forms one group;
* views, transposes, slices, selects, elementwise ops, norms, means, softmax, concatenation:
  as in :mod:`.channels`; everything else (``scaled_dot_product_attention``, ``matmul`` ...)
  marks the channels it touches as unprunable, so attention internals stay whole (their heads
  are ``prune.heads``' job).

A recorded graph has every size as a number, so it cannot say whether the model's code computes
a width (``x.size(-1)``, ``-1``) or hard-codes one; the pruned model is therefore run once on the
example input by the caller (:func:`modelpress.pruning.structured.channel_prune`), and a width
hard-coded in the model's code fails there, loudly, before anything is returned.

    >>> import torch
    >>> from torch import nn
    >>> class Net(nn.Module):
    ...     def __init__(self):
    ...         super().__init__()
    ...         self.emb, self.fc, self.out = nn.Embedding(10, 8), nn.Linear(8, 8), nn.Linear(8, 3)
    ...     def forward(self, input_ids):
    ...         h = self.emb(input_ids)
    ...         return self.out(h + self.fc(h)).mean(dim=1)
    >>> gm = export_with_shapes(Net(), {"input_ids": torch.zeros(2, 5, dtype=torch.long)})
    >>> analysis = analyze_exported(gm)
    >>> sorted(k for k in analysis.axes if k[0] in ("emb", "fc"))
    [('emb', 'emb'), ('fc', 'in'), ('fc', 'out')]
"""
from __future__ import annotations

import operator
import warnings
from typing import Any

import torch
from torch import fx, nn

from ..core.data import args_and_kwargs
from ..core.errors import UnsupportedError
from .channels import ChannelAnalysis, ParamRef, Value, _arg, _first_input, _op_name, _Walker
from .tracing import _user_frame

aten = torch.ops.aten

_PASS = {aten.relu, aten.relu_, aten.gelu, aten.silu, aten.tanh, aten.sigmoid, aten.dropout, aten.alias,
         aten.clone, aten.contiguous, aten._to_copy, aten.to, aten.detach, aten.neg, aten.abs, aten.hardtanh,
         aten.hardswish, aten.hardsigmoid, aten.elu, aten.leaky_relu, aten.mish, aten.softplus, aten.exp,
         aten.sqrt, aten.rsqrt, aten.clamp, aten.lift_fresh_copy, aten.type_as, aten.max_pool1d,
         aten.max_pool2d, aten.avg_pool1d, aten.avg_pool2d, aten.adaptive_avg_pool1d,
         aten.adaptive_avg_pool2d, aten.relu6, aten.gelu_, aten.silu_, aten.hardswish_, aten.dropout_,
         aten.feature_dropout}
_SCALAR_PASS = {aten.pow}  # x ** 2 and friends: elementwise on one tensor
_ELEMENTWISE = {aten.add, aten.sub, aten.mul, aten.div, aten.maximum, aten.minimum, aten.add_, aten.mul_,
                aten.sub_, aten.div_, aten.rsub, aten.addcmul}
_RESHAPE = {aten.view, aten.reshape, aten._unsafe_view, aten.flatten, aten.unsqueeze, aten.squeeze}
_KEEPS_SPLIT = {*_RESHAPE, aten.permute, aten.transpose, aten.clone, aten.contiguous}
_REDUCE = {aten.mean, aten.sum, aten.amax, aten.amin, aten.linalg_vector_norm}
_METADATA = {aten.sym_size, aten.sym_numel, aten.sym_stride, aten._assert_tensor_metadata, aten.dim,
             aten.size, aten.stride}
# a new tensor that takes only its dtype/device (and for *_like its shape) from the input
_FRESH = {aten.new_zeros, aten.new_ones, aten.new_empty, aten.new_full, aten.zeros_like, aten.ones_like,
          aten.empty_like, aten.full_like}
_PARAM_KEEP = {aten.expand, aten.to, aten._to_copy, aten.alias, aten.clone, aten.contiguous, aten.detach,
               aten.lift_fresh_copy, aten.type_as}


def _packet(node: fx.Node):
    return getattr(node.target, "overloadpacket", None)


def export_with_shapes(model: nn.Module, example_inputs: Any) -> fx.GraphModule:
    """Record one forward of ``model`` on ``example_inputs`` with ``torch.export`` (non-strict);
    every node gets ``meta["shape"]``, and ``meta["params"]`` maps parameter inputs to their names.

    Raises :class:`UnsupportedError` naming the failing source line when the model cannot be exported.
    """
    args, kwargs = args_and_kwargs(example_inputs)
    was_training = model.training
    model.eval()
    try:  # with grad enabled: under no_grad nn.TransformerEncoderLayer takes its fused fast path
        with warnings.catch_warnings():  # export's advice to model authors (e.g. on nn.LSTM) is noise here
            warnings.simplefilter("ignore")
            ep = torch.export.export(model, args, kwargs, strict=False)
    except Exception as exc:  # export raises many types (UserError, GuardOnDataDependent, TypeError ...)
        raise UnsupportedError(
            f"cannot capture {type(model).__name__} with torch.export at {_user_frame(exc)}: "
            f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}",
            hint="structural pruning needs a forward that torch.fx or torch.export can record") from None
    finally:
        model.train(was_training)
    sig = ep.graph_signature
    names = {**sig.inputs_to_parameters, **sig.inputs_to_buffers,
             **getattr(sig, "inputs_to_lifted_tensor_constants", {})}
    gm = ep.graph_module
    for node in gm.graph.nodes:
        val = node.meta.get("val")
        node.meta["shape"] = tuple(int(n) for n in val.shape) if isinstance(val, torch.Tensor) else None
    gm.meta["root"] = model
    gm.meta["params"] = names
    return gm


class _AtenWalker(_Walker):
    """The channel rules of :mod:`.channels` over an exported ATen graph."""

    def __init__(self, gm: fx.GraphModule):
        super().__init__(gm)
        self._owners: dict[int, list[tuple[str, nn.Module]]] | None = None
        names: dict[str, str] = gm.meta.get("params", {})
        for node in gm.graph.nodes:
            if node.op == "placeholder" and node.name in names:
                owner, _, attr = names[node.name].rpartition(".")
                t = self._tensor(owner, attr)
                if t is not None:
                    self.params[node] = ParamRef(owner, attr, tuple(t.shape))

    def _tensor(self, owner: str, attr: str) -> torch.Tensor | None:
        try:
            module = self.root.get_submodule(owner)
        except AttributeError:
            return None
        t = getattr(module, attr, None)
        return t if isinstance(t, torch.Tensor) else None

    def _layer(self, weight, types) -> tuple[str, nn.Module] | None:
        """The module of ``types`` whose ``weight`` parameter the graph value ``weight`` is (a
        weight tied between layers is named once in the graph, after any one of them)."""
        ref = self.params.get(weight) if isinstance(weight, fx.Node) else None
        if ref is None or ref.attr != "weight":
            return None
        param = self._tensor(ref.owner, ref.attr)
        if self._owners is None:
            self._owners = {}
            for name, m in self.root.named_modules():
                w = m._parameters.get("weight")
                if w is not None:
                    self._owners.setdefault(id(w), []).append((name, m))
        return next(((n, m) for n, m in self._owners.get(id(param), []) if isinstance(m, types)), None)

    def call_function(self, node: fx.Node) -> Value | None:
        op = _packet(node)
        if op is None:  # operator.getitem on a tuple, higher-order ops ...
            return super().call_function(node) if node.target is operator.getitem else \
                (self.unknown(node) if self.tracked_inputs(node) else None)
        first = _first_input(node)
        x = self.value(first)
        if op in _METADATA or op in _FRESH:
            return None
        if op in _PARAM_KEEP and first in self.params:
            self.params[node] = self.params[first]
            return None
        if op in _PASS or op in _SCALAR_PASS and not isinstance(_arg(node, 1, "exponent"), fx.Node):
            return self.passthrough(node, x)
        if op in _ELEMENTWISE:
            return self.elementwise(node)
        if op in _RESHAPE:
            return self.reshape(node, x)
        if op in (aten.permute, aten.transpose):
            return self.permute(node, x, op.__name__)
        if op in (aten.chunk, aten.split):
            return self.pieces(node, x, op.__name__)
        if op is aten.t:
            return x and Value(1 - x.cdim, list(x.slots))
        if op is aten.expand:
            return self.expand(node, x)
        if op is aten.slice:
            return self.slice(node, x)
        if op is aten.select:
            return self.select(node, x)
        if op in (aten.cat, aten.concat):
            return self.cat(node)
        if op in (aten.pad, aten.constant_pad_nd):
            return self.pad(node, x)
        if op is aten.roll:
            return self.roll(node, x)
        if op in _REDUCE:
            return self.reduce(node, x)
        if op in (aten.softmax, aten._softmax, aten.log_softmax, aten._log_softmax):
            return self.softmax(node, x, _arg(node, 1, "dim"))
        if op is aten.linear:
            layer = self._layer(_arg(node, 1, "weight"), nn.Linear)
            return self.linear(node, layer[1], x, layer[0]) if layer else self.foreign_weight(node)
        if op in (aten.conv1d, aten.conv2d, aten.convolution):
            layer = self._layer(_arg(node, 1, "weight"), (nn.Conv1d, nn.Conv2d))
            if layer and (op is not aten.convolution or not _arg(node, 6, "transposed")):
                return self.conv(node, layer[1], x, layer[0])
            return self.foreign_weight(node)
        if op is aten.embedding:
            return self.embedding(node)
        if op is aten.layer_norm:
            return self.functional_norm(node, x, has_bias=True)
        if op is aten.rms_norm:
            return self.functional_norm(node, x, has_bias=False)
        if op is aten.batch_norm or op is aten._native_batch_norm_legit_no_training:
            return self.unknown(node)  # eval-mode BatchNorm through an exported graph: not followed
        if not self.tracked_inputs(node):
            return None
        return self.unknown(node)

    def keeps_split(self, node: fx.Node) -> bool:
        return _packet(node) in _KEEPS_SPLIT

    # -- rules of their own --------------------------------------------------------------
    def foreign_weight(self, node: fx.Node) -> None:
        """A linear/conv op whose weight is not an nn.Linear's / nn.Conv's (nn.MultiheadAttention's
        ``in_proj_weight``, a weight computed in forward): its channels stay."""
        ref = self.params.get(_arg(node, 1, "weight"))
        what = f"the weight {'.'.join(filter(None, (ref.owner, ref.attr)))}" if ref else "a computed weight"
        return self.unknown(node, why=f"{_op_name(node)} with {what} (not a Linear/Conv layer's own) "
                                      "is not supported by structured pruning")
    def embedding(self, node: fx.Node) -> Value | None:
        layer = self._layer(_arg(node, 0, "weight"), nn.Embedding)
        if layer is None:
            return self.unknown(node)
        name, m = layer
        out = node.meta.get("shape") or (m.embedding_dim,)
        return Value(len(out) - 1, self.producer(name, m.embedding_dim, kind="emb"))

    def expand(self, node: fx.Node, x: Value | None) -> Value | None:
        if x is None:
            return None
        src, out = _first_input(node).meta.get("shape"), node.meta.get("shape")
        if src is None or out is None:
            return self.unknown(node)
        cdim = x.cdim + len(out) - len(src)  # new dims are added in front
        if out[cdim] != len(x.slots):
            return self.unknown(node, why=f"aten.expand broadcasts one channel over {out[cdim]}")
        return Value(cdim, list(x.slots))

    def slice(self, node: fx.Node, x: Value | None) -> Value | None:
        if x is None:
            return None
        src = _first_input(node).meta.get("shape") or ()
        dim = _arg(node, 1, "dim", 0) % max(len(src), 1)
        out = node.meta.get("shape")
        if dim == x.cdim and (out is None or out[dim] != src[dim]):
            return self.unknown(node, why="slicing the channel dim is not supported by structured pruning")
        return Value(x.cdim, list(x.slots))

    def pad(self, node: fx.Node, x: Value | None) -> Value | None:
        """Padding of other dims (Swin pads the map to whole windows) keeps the channels."""
        if x is None:
            return None
        rank = len(_first_input(node).meta.get("shape") or ())
        widths = list(_arg(node, 1, "pad") or ())
        at = 2 * (rank - 1 - x.cdim)  # pairs from the last dim backwards
        if rank == 0 or any(widths[at:at + 2]):
            return self.unknown(node, why="padding the channel dim is not supported by structured pruning")
        return Value(x.cdim, list(x.slots))

    def roll(self, node: fx.Node, x: Value | None) -> Value | None:
        """A cyclic shift of other dims (Swin's shifted windows) keeps the channels."""
        if x is None:
            return None
        rank = len(_first_input(node).meta.get("shape") or ())
        dims = _arg(node, 2, "dims") or ()
        dims = [dims] if isinstance(dims, int) else list(dims)
        if rank == 0 or not dims or x.cdim in [d % rank for d in dims]:  # no dims: rolls the flattened tensor
            return self.unknown(node, why="rolling the channel dim is not supported by structured pruning")
        return Value(x.cdim, list(x.slots))

    def select(self, node: fx.Node, x: Value | None) -> Value | None:
        if x is None:
            return None
        src = _first_input(node).meta.get("shape") or ()
        dim = _arg(node, 1, "dim") % max(len(src), 1)
        if dim == x.cdim:
            return self.unknown(node, why="selecting one channel is not supported by structured pruning")
        return Value(x.cdim - (dim < x.cdim), list(x.slots))


def analyze_exported(gm: fx.GraphModule) -> ChannelAnalysis:
    """Run the channel rules over a graph recorded by :func:`export_with_shapes`."""
    return _AtenWalker(gm).run()
