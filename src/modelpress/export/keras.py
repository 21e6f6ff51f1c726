"""Keras out: a compressed model that came from a Keras file, written back as a ``.keras`` file.

    >>> from modelpress.export.keras import export_keras
    >>> done = export_keras(pruned, "lenet5-small.keras")  # doctest: +SKIP
    >>> done.note  # doctest: +SKIP
    'Keras 3; narrower: conv2d 16 -> 8, dense 120 -> 60; Keras vs PyTorch max abs diff 2.4e-07'

The model must have been converted by modelpress from a Keras file (``-m model.keras``; its
``zoo_spec`` names the file): that file is read again and converted again, which tells, for
every Keras layer, the torch modules it became (:func:`modelpress.artifact.keras.convert_keras`).
The Keras model is then cloned layer by layer (``keras.models.clone_model``, nested models too)
with each layer's width taken from the compressed module (``filters``, ``units``, an embedding's
size, a reshape's target), so Keras itself re-infers every other shape, and the compressed
weights are written into the clone in Keras's layout. So structured pruning comes back as
narrower layers, and sparse, clustered or weight-only quantized weights as their float values
(what TF Model Optimization's ``strip_pruning`` / ``strip_clustering`` leave too).

What does not map to one Keras layer is a one-line :class:`~modelpress.core.errors.UnsupportedError`
before anything is written: quantized activations (static int8, QAT: export a LiteRT int8 file
instead) and layers a method replaced by several (low-rank factors). The file is written next
to ``path``, read back by Keras and compared with the PyTorch model on ``example_inputs`` (or
random inputs of the model's input shape) before it is moved into place.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable, NamedTuple

import numpy as np
import torch
from torch import nn

from ..artifact.keras import Converted, convert_keras, import_keras, read_keras
from ..artifact.keras_layers import CF, FLAT
from ..core.errors import ModelpressError, UnsupportedError
from ..quantization.static import FakeQuant
from .deploy import quantizes_activations


class KerasExportError(ModelpressError):
    """The written Keras file does not compute what the PyTorch model computes."""


class KerasExport(NamedTuple):
    path: Path
    bytes: int
    max_abs_diff: float | None
    note: str


class _Update(NamedTuple):
    """A layer's new config entries and its weights by Keras variable name (Keras's layout)."""

    config: dict
    weights: dict[str, np.ndarray]


def _array(t: torch.Tensor | None) -> np.ndarray | None:
    return None if t is None else t.detach().float().cpu().numpy()


def _weight(module: nn.Module, layer) -> np.ndarray:
    """The float weight a (possibly quantized or clustered) module computes with."""
    w = getattr(module, "weight", None)
    if not isinstance(w, torch.Tensor):
        raise UnsupportedError(f"Keras layer {layer.name!r} became {type(module).__name__} in the compressed model, "
                               "which has no single weight to write back (a low-rank factorization?)",
                               hint="write it back before factorizing, or export ONNX / LiteRT instead")
    return _array(w)


def _to_keras_kernel(w: np.ndarray) -> np.ndarray:
    """torch ``(out, in, *k)`` (``(in, out, *k)`` for transposed) -> Keras ``(*k, in, out)``."""
    return w.transpose(*range(2, w.ndim), 1, 0)


class _Layer(NamedTuple):
    """The compressed modules of one Keras layer, by the names the converter gave them."""

    record: Converted
    model: nn.Module

    def module(self, suffix: str = "") -> nn.Module:
        name = self.record.modules[self.record.layer.name + suffix]
        return self.model.get_submodule(name)

    def bias(self, suffix: str = "") -> dict[str, np.ndarray]:
        if not getattr(self.record.layer, "use_bias", False):
            return {}
        m = self.module(suffix)
        bias = m.bias if hasattr(m, "bias") else m.layer.bias  # a wrapper (QAT) holds the float layer
        return {"bias": _array(bias)}


def _conv(c: _Layer) -> _Update:
    w = _weight(c.module(), c.record.layer)
    return _Update({"filters": w.shape[0]}, {"kernel": _to_keras_kernel(w), **c.bias()})


def _depthwise_kernel(module: nn.Module, layer) -> tuple[int, np.ndarray]:
    """(depth multiplier, Keras ``(*k, in, multiplier)`` kernel) of a torch depthwise conv
    ``(in * multiplier, 1, *k)``; pruning may have left another multiplier than Keras's."""
    w = _weight(module, layer)
    groups = getattr(module, "groups", None) or w.shape[0] // layer.depth_multiplier
    mult = w.shape[0] // groups
    kernel = w.reshape(groups, mult, *w.shape[2:])
    return mult, kernel.transpose(*range(2, kernel.ndim), 0, 1)


def _depthwise(c: _Layer) -> _Update:
    mult, kernel = _depthwise_kernel(c.module(), c.record.layer)
    return _Update({"depth_multiplier": mult}, {"kernel": kernel, **c.bias()})


def _separable(c: _Layer) -> _Update:
    layer = c.record.layer
    mult, dw = _depthwise_kernel(c.module(), layer)
    pw = _weight(c.module("_pointwise"), layer)
    return _Update({"filters": pw.shape[0], "depth_multiplier": mult},
                   {"depthwise_kernel": dw, "pointwise_kernel": _to_keras_kernel(pw), **c.bias("_pointwise")})


def _transpose(c: _Layer) -> _Update:
    w = _weight(c.module(), c.record.layer)  # (in, out, *k) -> Keras (*k, out, in)
    return _Update({"filters": w.shape[1]}, {"kernel": w.transpose(*range(2, w.ndim), 1, 0), **c.bias()})


def _dense(c: _Layer) -> _Update:
    w = _weight(c.module(), c.record.layer)  # (out, in)
    kernel = w.T
    x = c.record.inputs[0]
    if x.layout == FLAT:  # rows in the CHW order nn.Flatten gives -> Keras's HWC order
        spatial = x.unflat[:-1]
        channels = kernel.shape[0] // int(np.prod(spatial))
        nd = len(spatial)
        kernel = kernel.reshape(channels, *spatial, -1).transpose(*range(1, nd + 1), 0, nd + 1).reshape(
            kernel.shape)
    return _Update({"units": w.shape[0]}, {"kernel": kernel, **c.bias()})


def _layer_norm(c: _Layer) -> _Update:
    m, layer = c.module(), c.record.layer
    weights = {}
    if layer.scale:
        weights["gamma"] = _array(m.weight)
    if layer.center:
        weights["beta"] = _array(m.bias)
    return _Update({}, weights)


def _batch_norm(c: _Layer) -> _Update:
    m = c.module()
    return _Update({}, {**_layer_norm(c).weights, "moving_mean": _array(m.running_mean),
                        "moving_variance": _array(m.running_var)})


def _embedding(c: _Layer) -> _Update:
    w = _weight(c.module(), c.record.layer)
    return _Update({"input_dim": w.shape[0], "output_dim": w.shape[1]}, {"embeddings": w})


def _reshape(c: _Layer, shapes: dict[str, tuple]) -> _Update:
    out = c.record.outputs[0]
    shape = shapes.get(c.record.modules[c.record.layer.name])
    if shape is None:
        return _Update({}, {})
    keras_shape = (*shape[2:], shape[1]) if out.layout == CF else tuple(shape[1:])
    old = tuple(c.record.layer.target_shape)
    target = tuple(-1 if o == -1 else n for o, n in zip(old, keras_shape)) if len(old) == len(keras_shape) else old
    return _Update({"target_shape": target}, {})


_WRITERS: dict[str, Callable[[_Layer], _Update]] = {
    "Conv1D": _conv, "Conv2D": _conv, "Conv3D": _conv, "DepthwiseConv1D": _depthwise,
    "DepthwiseConv2D": _depthwise, "SeparableConv1D": _separable, "SeparableConv2D": _separable,
    "Conv1DTranspose": _transpose, "Conv2DTranspose": _transpose, "Dense": _dense,
    "BatchNormalization": _batch_norm, "LayerNormalization": _layer_norm, "Embedding": _embedding,
}


def _refuse_unmappable(model: nn.Module) -> None:
    if quantizes_activations(model) or any(isinstance(m, FakeQuant) for m in model.modules()):
        raise UnsupportedError("the model quantizes activations (static int8 or QAT); a Keras float model cannot hold "
                               "that", hint="export a LiteRT int8 file instead: modelpress export --format tflite "
                                            "--set precision=int8")


def _output_shapes(model: nn.Module, inputs: list[torch.Tensor], names: set[str]) -> dict[str, tuple]:
    """Output shapes of the named modules on one forward pass."""
    shapes: dict[str, tuple] = {}

    def hook(name):
        def record(module, args, out) -> None:  # returns None: the output stays as it is
            shapes.setdefault(name, tuple(out.shape))
        return record

    handles = [model.get_submodule(n).register_forward_hook(hook(n)) for n in names]
    try:
        with torch.no_grad():
            model(*inputs)
    finally:
        for h in handles:
            h.remove()
    return shapes


def _random_inputs(keras_model, channels_first: bool, batch: int = 2) -> tuple[list[np.ndarray], list[torch.Tensor]]:
    """Inputs for both models: Keras's (channels-last) and the torch module's (its layout)."""
    rng = np.random.default_rng(0)
    keras_in, torch_in = [], []
    for t in keras_model.inputs:
        if any(d is None for d in t.shape[1:]):
            raise UnsupportedError(f"Keras input {t.name!r} has an unknown size {tuple(t.shape)}",
                                   hint="pass example_inputs, or build the model with keras.Input(shape=...)")
        shape = (batch, *t.shape[1:])
        x = rng.integers(0, 2, shape) if "int" in str(t.dtype) else rng.standard_normal(shape).astype("float32")
        keras_in.append(x)
        tx = torch.from_numpy(x)
        torch_in.append(tx.permute(0, tx.ndim - 1, *range(1, tx.ndim - 1)) if channels_first and tx.ndim >= 3
                        else tx)
    return keras_in, torch_in


def _keras_inputs(example_inputs: Any, channels_first: bool) -> tuple[list[np.ndarray], list[torch.Tensor]]:
    xs = list(example_inputs) if isinstance(example_inputs, (list, tuple)) else [example_inputs]
    torch_in = [torch.as_tensor(x).cpu() for x in xs]
    keras_in = [(x.permute(0, *range(2, x.ndim), 1) if channels_first and x.ndim >= 3 else x).numpy()
                for x in torch_in]
    return keras_in, torch_in


def _clone(keras, source, records: dict[int, Converted], model: nn.Module, shapes: dict[str, tuple]):
    """The Keras model with every layer's width and weights from the compressed ``model``."""
    updates: dict[int, _Update] = {}
    clones: dict[int, Any] = {}

    def clone(layer):
        record = records.get(id(layer))
        kind = type(layer).__name__
        if record is not None and kind in _WRITERS:
            updates[id(layer)] = _WRITERS[kind](_Layer(record, model))
        elif record is not None and kind == "Reshape":
            updates[id(layer)] = _reshape(_Layer(record, model), shapes)
        config = {**layer.get_config(), **updates.get(id(layer), _Update({}, {})).config}
        clones[id(layer)] = new = type(layer).from_config(config)
        return new

    try:
        out = keras.models.clone_model(source, clone_function=clone, recursive=True)
    except UnsupportedError:
        raise
    except Exception as exc:
        raise UnsupportedError(f"the compressed model does not fit back into {source.name!r}'s Keras layers "
                               f"({type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''})",
                               hint="methods that change the architecture beyond layer widths have no Keras form; "
                                    "export ONNX / LiteRT instead") from None
    originals = {id(layer): layer for layer in _all_layers(keras, source)}
    for key, new in clones.items():
        update = updates.get(key)
        if update is None or not update.weights:
            old = originals[key].get_weights()
            if old:
                _set_weights(new, old)
            continue
        for name, value in update.weights.items():
            var = getattr(new, name)
            if tuple(var.shape) != value.shape:
                raise UnsupportedError(f"Keras layer {new.name!r}: {name} is {tuple(var.shape)} in the rebuilt model "
                                       f"but {value.shape} in the compressed one",
                                       hint="the compressed model's widths do not chain in Keras; export ONNX / "
                                            "LiteRT instead")
            var.assign(value)
    return out


def _all_layers(keras, model) -> list:
    out = []
    for layer in model.layers:
        out.append(layer)
        if isinstance(layer, keras.Model):
            out.extend(_all_layers(keras, layer))
    return out


def _set_weights(layer, weights: list[np.ndarray]) -> None:
    have = [tuple(w.shape) for w in layer.weights]
    if have != [w.shape for w in weights]:
        raise UnsupportedError(f"Keras layer {layer.name!r} ({type(layer).__name__}) has weights {have} in the "
                               f"rebuilt model but {[w.shape for w in weights]} in the original",
                               hint="pruning reached a layer whose width Keras cannot change; export ONNX / LiteRT "
                                    "instead")
    layer.set_weights(weights)


def _widths(source_layers: list, rebuilt: list) -> list[str]:
    """``"name old -> new"`` for every layer whose width changed."""
    out = []
    new_by_name = {layer.name: layer for layer in rebuilt}
    for old in source_layers:
        new = new_by_name.get(old.name)
        for attr in ("filters", "units", "output_dim", "depth_multiplier"):
            a, b = getattr(old, attr, None), getattr(new, attr, None)
            if a is not None and b is not None and a != b:
                out.append(f"{old.name} {a} -> {b}")
    return out


def _run_keras(keras, model, xs: list[np.ndarray]) -> list[np.ndarray]:
    out = model(xs if len(xs) > 1 else xs[0], training=False)
    return [keras.ops.convert_to_numpy(o) for o in (out if isinstance(out, (list, tuple)) else [out])]


def _max_diff(keras, keras_model, model: nn.Module, keras_in, torch_in) -> tuple[float, float]:
    """(max abs difference of the outputs, the largest PyTorch output magnitude)."""
    with torch.no_grad():
        ref = model(*torch_in)
    ref = [r.numpy() for r in (ref if isinstance(ref, tuple) else (ref,))]
    got = _run_keras(keras, keras_model, keras_in)
    if [r.shape for r in ref] != [g.shape for g in got]:
        raise KerasExportError(f"the written Keras model's outputs are {[g.shape for g in got]}, PyTorch's "
                          f"{[r.shape for r in ref]}", hint="report this: the Keras write-back lost a dimension")
    return max(float(np.abs(r - g).max()) for r, g in zip(ref, got)), max(float(np.abs(r).max()) for r in ref)


def export_keras(model: nn.Module, path: str | os.PathLike, *, example_inputs: Any = None, check: bool = True,
                 atol: float = 1e-4) -> KerasExport:
    """Write ``model`` (converted from a Keras file, then compressed) as the Keras file ``path``.

    ``example_inputs`` are the torch module's inputs (its layout); without them the check runs on
    random inputs of the Keras model's input shape. The check allows ``atol`` times the largest
    output magnitude (at least 1).
    """
    path = Path(path)
    if path.suffix != ".keras":
        raise KerasExportError(f"a Keras export is a .keras file, not {path.name!r}", hint="name the output FILE.keras")
    spec = getattr(model, "zoo_spec", None) or {}
    if "keras" not in spec:
        raise UnsupportedError("only a model converted from a Keras file (-m model.keras) can be written back to "
                               "Keras", hint="export ONNX (-o model.onnx) or LiteRT (-o model.tflite) instead")
    _refuse_unmappable(model)
    keras = import_keras()
    channels_first = bool((spec.get("kwargs") or {}).get("channels_first"))
    source = read_keras(spec["keras"])
    _, records = convert_keras(source, channels_first=channels_first)
    model = model.eval()
    keras_in, torch_in = (_keras_inputs(example_inputs, channels_first) if example_inputs is not None
                          else _random_inputs(source, channels_first))
    reshapes = {r.modules[r.layer.name] for r in records.values() if type(r.layer).__name__ == "Reshape"
                and r.layer.name in r.modules}
    shapes = _output_shapes(model, torch_in, reshapes)
    rebuilt = _clone(keras, source, records, model, shapes)
    narrower = _widths(_all_layers(keras, source), _all_layers(keras, rebuilt))
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.partial.keras")
    try:
        rebuilt.save(tmp)
        err = None
        if check:
            err, largest = _max_diff(keras, read_keras(tmp), model, keras_in, torch_in)
            scale = max(1.0, largest)
            if err > atol * scale:
                raise KerasExportError(f"the Keras file computes other outputs than the PyTorch model (max abs diff "
                                  f"{err:.2e} > {atol * scale:.1e})", hint="report this; nothing was written")
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    note = f"Keras {keras.version()}"
    if narrower:
        more = f", ... ({len(narrower)} layers)" if len(narrower) > 4 else ""
        note += "; narrower: " + ", ".join(narrower[:4]) + more
    else:
        note += "; same widths"
    if err is not None:
        note += f"; Keras vs PyTorch max abs diff {err:.1e}"
    return KerasExport(path, path.stat().st_size, err, note)
