"""Deploy a static int8 model (``quant.static_int8``) as an ONNX QDQ model for ONNX Runtime.

The fake-quant model is exported with :func:`~modelpress.export.onnx.export_onnx` (its quantizers
switch to torch's fake-quant ops, which the exporter writes as ``QuantizeLinear`` /
``DequantizeLinear`` pairs), then the graph is rewritten the way int8 kernels want it:

* every weight ``QuantizeLinear`` is computed once: the weight is stored as an int8 initializer
  (``<name>_quantized``) read by a ``DequantizeLinear`` with ``axis=0`` (one scale per output
  channel), so the file holds 1 byte per weight;
* every Conv / Gemm bias is stored as int32 with scale ``input scale * weight scale`` and zero
  point 0, the form ONNX Runtime needs to fuse ``DQ -> Conv -> Q`` into ``QLinearConv``
  (a float bias keeps the layer in float);
* per-tensor scales and zero points become scalars (the exporter writes 1-element vectors, and
  ONNX Runtime then leaves residual adds in float instead of fusing ``QLinearAdd``).

ONNX Runtime then fuses the QDQ groups into int8 kernels at session creation. The rounding is the
fake-quant model's, so outputs agree with it up to rare one-step rounding differences.

    >>> import torch, tempfile, os
    >>> from torch import nn
    >>> from modelpress import quantize
    >>> from modelpress.quantization.static import StaticInt8
    >>> from modelpress.export.onnx import ort_session
    >>> torch.manual_seed(0)  # doctest: +ELLIPSIS
    <...>
    >>> net = nn.Sequential(nn.Conv2d(1, 8, 3), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 6 * 6, 4)).eval()
    >>> q = quantize(net, StaticInt8(observer="minmax"), [torch.randn(16, 1, 8, 8)])
    >>> path = export_int8_onnx(q, torch.randn(2, 1, 8, 8), os.path.join(tempfile.mkdtemp(), "q.onnx"))
    >>> x = torch.randn(5, 1, 8, 8)
    >>> out = ort_session(path).run(None, {"input": x.numpy()})[0]
    >>> float(abs(out - q(x).detach().numpy()).max()) < 0.05
    True
"""
from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
from torch import nn

from ..core.errors import UnsupportedError
from ..quantization.static import FakeQuant
from .onnx import OnnxExportError, export_onnx


def _check_quantized(qmodel: nn.Module) -> None:
    quants = [m for m in qmodel.modules() if isinstance(m, FakeQuant)]
    if not quants:
        raise UnsupportedError(f"export_int8_onnx: {type(qmodel).__name__} has no int8 quantizers",
                               hint="quantize it first: quantize(model, StaticInt8(), data=calibration)")
    if any(m.calibrating for m in quants):
        raise UnsupportedError("export_int8_onnx: the model is still calibrating (no scales yet)",
                               hint="use the model returned by quantize(model, StaticInt8(), data)")


class _Graph:
    """Name lookups over an ONNX graph: constants (initializers and Constant nodes), producers."""

    def __init__(self, model):
        from onnx import numpy_helper

        self.model, self.graph = model, model.graph
        self.inits = {t.name: t for t in self.graph.initializer}
        self.consts = {t.name: numpy_helper.to_array(t) for t in self.graph.initializer}
        for node in self.graph.node:
            if node.op_type == "Constant" and node.attribute and node.attribute[0].name == "value":
                self.consts[node.output[0]] = numpy_helper.to_array(node.attribute[0].t)
        self.producer = {o: n for n in self.graph.node for o in n.output}

    def consumers(self, name: str) -> list:
        return [n for n in self.graph.node if name in n.input]

    def add_init(self, array: np.ndarray, name: str) -> str:
        from onnx import numpy_helper

        t = numpy_helper.from_array(array, name)
        self.graph.initializer.append(t)
        self.inits[name], self.consts[name] = t, array
        return name


def _axis_view(v: np.ndarray, ndim: int, axis: int) -> np.ndarray:
    """A per-channel vector shaped to broadcast along ``axis`` of an ``ndim``-d tensor."""
    if v.size == 1:
        return v.reshape(())
    shape = [1] * ndim
    shape[axis] = v.size
    return v.reshape(shape)


def _attr(node, name: str, default):
    from onnx import helper

    for a in node.attribute:
        if a.name == name:
            return helper.get_attribute_value(a)
    return default


def _store_int8_weights(g: _Graph) -> int:
    """Replace ``QuantizeLinear(float weight)`` by its int8 result (an initializer)."""
    done = 0
    for node in list(g.graph.node):
        if node.op_type != "QuantizeLinear" or node.input[0] not in g.inits:
            continue
        if node.input[1] not in g.consts or node.input[2] not in g.consts:
            raise OnnxExportError(f"export_int8_onnx: the scale of weight {node.input[0]!r} is computed in "
                                  "the graph, not a constant", hint="re-create the model with quantize()")
        w = g.consts[node.input[0]].astype(np.float32)
        scale = g.consts[node.input[1]].astype(np.float32)
        zero = g.consts[node.input[2]]
        axis = _attr(node, "axis", 1) % max(w.ndim, 1)
        info = np.iinfo(zero.dtype)
        q = np.round(w / _axis_view(scale, w.ndim, axis)) + _axis_view(zero.astype(np.float32), w.ndim, axis)
        base = node.input[0]
        q_name = g.add_init(np.clip(q, info.min, info.max).astype(zero.dtype), f"{base}_quantized")
        s_name = g.add_init(scale, f"{base}_scale")
        z_name = g.add_init(zero, f"{base}_zero_point")
        for dq in g.consumers(node.output[0]):
            dq.input[0], dq.input[1], dq.input[2] = q_name, s_name, z_name
        g.graph.node.remove(node)
        done += 1
    return done


def _dq_source(g: _Graph, name: str):
    node = g.producer.get(name)
    return node if node is not None and node.op_type == "DequantizeLinear" else None


def _store_int32_biases(g: _Graph) -> int:
    """Conv / Gemm biases as int32 (scale = input scale * weight scale) behind a DequantizeLinear."""
    from onnx import helper

    done = 0
    for node in list(g.graph.node):
        if node.op_type not in ("Conv", "Gemm") or len(node.input) < 3 or node.input[2] not in g.inits:
            continue
        if node.op_type == "Gemm" and (_attr(node, "transB", 0) != 1 or _attr(node, "transA", 0) != 0
                                       or _attr(node, "alpha", 1.0) != 1.0 or _attr(node, "beta", 1.0) != 1.0):
            continue
        x_dq, w_dq = _dq_source(g, node.input[0]), _dq_source(g, node.input[1])
        if x_dq is None or w_dq is None or w_dq.input[0] not in g.inits:
            continue
        s_in = g.consts[x_dq.input[1]].astype(np.float32).reshape(-1)
        if s_in.size != 1:
            continue  # per-channel activations: no int32 bias form
        b = g.consts[node.input[2]].astype(np.float32)
        step = (s_in[0] * g.consts[w_dq.input[1]].astype(np.float32)).reshape(-1)
        q = np.clip(np.round(b / step), np.iinfo(np.int32).min, np.iinfo(np.int32).max).astype(np.int32)
        base = node.input[2]
        names = (g.add_init(q, f"{base}_quantized"), g.add_init(step.astype(np.float32), f"{base}_scale"),
                 g.add_init(np.zeros(step.shape, np.int32), f"{base}_zero_point"))
        dq = helper.make_node("DequantizeLinear", list(names), [f"{base}_dequantized"],
                              name=f"{base}_DequantizeLinear", axis=0)
        g.graph.node.insert(list(g.graph.node).index(node), dq)
        node.input[2] = dq.output[0]
        done += 1
    return done


def _scalar_qparams(g: _Graph) -> None:
    """Per-tensor scales / zero points as scalars: ONNX Runtime fuses ``DQ -> Add -> Q`` into
    ``QLinearAdd`` only then (the exporter writes them as 1-element vectors)."""
    from onnx import numpy_helper

    names = {n.input[i] for n in g.graph.node if n.op_type in ("QuantizeLinear", "DequantizeLinear")
             for i in (1, 2) if i < len(n.input)}
    for node in g.graph.node:
        if node.op_type == "Constant" and node.output[0] in names:
            t = node.attribute[0].t
            if len(t.dims) == 1 and t.dims[0] == 1:
                t.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(t).reshape(()), t.name))
    for i, t in enumerate(g.graph.initializer):
        if t.name in names and len(t.dims) == 1 and t.dims[0] == 1:
            g.graph.initializer[i].CopyFrom(numpy_helper.from_array(numpy_helper.to_array(t).reshape(()), t.name))


def _drop_unused(g: _Graph) -> None:
    used = {i for n in g.graph.node for i in n.input} | {o.name for o in g.graph.output}
    for t in list(g.graph.initializer):
        if t.name not in used:
            g.graph.initializer.remove(t)
    for n in list(g.graph.node):
        if n.op_type == "Constant" and not any(o in used for o in n.output):
            g.graph.node.remove(n)


def export_int8_onnx(qmodel: nn.Module, example_inputs: Any, path: str | os.PathLike, *,
                     opset: int = 17) -> Path:
    """Write the static int8 fake-quant model ``qmodel`` as an ONNX QDQ model at ``path``.

    ``qmodel`` is what ``quantize(model, StaticInt8(...), data)`` returns; ``example_inputs``
    follows :func:`~modelpress.export.onnx.export_onnx` (batch axis dynamic). Returns the path.
    """
    import onnx

    _check_quantized(qmodel)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".onnx")
    os.close(fd)
    try:
        export_onnx(qmodel, example_inputs, tmp, opset=opset, exporter="torchscript")
        model = onnx.load(tmp)
        g = _Graph(model)
        if not _store_int8_weights(g):
            raise OnnxExportError("export_int8_onnx: the exported graph has no quantized weights",
                                  hint="was the model quantized with quant.static_int8?")
        _store_int32_biases(g)
        _drop_unused(g)
        _scalar_qparams(g)
        onnx.checker.check_model(model)
        onnx.save(model, tmp)
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
    return path
