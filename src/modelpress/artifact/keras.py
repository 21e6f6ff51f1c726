"""Keras models in: a ``.keras`` (or legacy ``.h5``) file as an equivalent PyTorch module.

    >>> from modelpress.artifact.loading import load_model
    >>> model = load_model("lenet5.keras")  # doctest: +SKIP
    >>> model(torch.randn(8, 28, 28, 1)).shape  # NHWC, as the Keras model takes  # doctest: +SKIP
    torch.Size([8, 10])

The file is read with Keras 3 (``pip install 'modelpress[keras]'``) on its torch backend, which
needs no TensorFlow: ``KERAS_BACKEND`` is set to ``torch`` unless you set it yourself; a Keras
on another backend (your ``KERAS_BACKEND``, or keras imported before) is a ``ModelLoadError``
saying so. The Sequential or Functional model's
layer graph is walked in Keras's own order and every layer becomes ``torch.nn`` modules with
its weights copied (:mod:`.keras_layers` lists them); an unsupported layer is a one-line
:class:`~modelpress.core.errors.UnsupportedError` naming it.

Convention: the module takes the same tensors as the Keras model (channels-last images, NHWC)
and returns the same outputs; inside, convolutions, pooling and BatchNorm run channels-first
(``nn.Conv2d``, ``nn.BatchNorm2d`` ...), with one permute at each image input. Pass
``channels_first=True`` (``keras:model.keras?channels_first=true`` on the command line) for a
module that takes NCHW images instead, as PyTorch datasets give them. The module is an
``nn.Sequential`` for a chain of layers and an ``fx.GraphModule`` otherwise (branches, adds,
concatenations), both plain for ``torch.fx``, ``torch.export`` and structured pruning.
Its source record ``{"keras": PATH}`` rebuilds it from the file, so an artifact of the
compressed model reloads while the file is where it was.
"""
from __future__ import annotations

import importlib
import os
import sys
from pathlib import Path
from typing import NamedTuple

from torch import nn

from ..core.errors import MissingDependencyError, ModelLoadError, UnsupportedError
from .keras_layers import CF, CONVERTERS, KERAS, GraphBuilder, Value
from .libraries import parse_reference
from .loading import ModelSource, register_source


def import_keras():
    """Keras 3 on its torch backend (set unless the user chose one, or imported keras already)."""
    if "keras" not in sys.modules:
        os.environ.setdefault("KERAS_BACKEND", "torch")
    try:
        keras = importlib.import_module("keras")
    except ModuleNotFoundError as exc:
        if exc.name == "keras":
            raise MissingDependencyError("optional dependency 'keras' is not installed",
                                         hint="install it with: pip install 'modelpress[keras]'") from None
        raise ModelLoadError(f"Keras could not start its {os.environ.get('KERAS_BACKEND')!r} backend "
                             f"({exc.name} is not installed)",
                             hint="unset KERAS_BACKEND or set it to torch before Python imports keras") from None
    if not hasattr(keras, "version") or not keras.version().startswith("3"):
        raise ModelLoadError(f"modelpress reads Keras files with Keras 3; this is Keras {keras.__version__}",
                             hint="pip install 'modelpress[keras]'")
    backend = keras.backend.backend()
    if backend != "torch":  # the other backends are not tested here (they need TensorFlow or JAX)
        raise ModelLoadError(f"Keras runs on its {backend!r} backend (KERAS_BACKEND, or keras imported before); "
                             "modelpress converts Keras files on the torch backend",
                             hint="unset KERAS_BACKEND or set it to torch before Python imports keras")
    return keras


def read_keras(path: str | Path):
    """The Keras model in ``path`` (``.keras`` or ``.h5``), not compiled; refuses Lambda layers
    (they hold code)."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise ModelLoadError(f"Keras file {str(path)!r} does not exist",
                             hint="the artifact's source is the .keras file it was converted from")
    keras = import_keras()
    try:
        return keras.saving.load_model(str(path), compile=False, safe_mode=True)
    except Exception as exc:
        why = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelLoadError(f"{path} could not be read as a Keras model ({type(exc).__name__}: {why[:200]})",
                             hint="the file may be truncated or corrupt, or need custom objects: save it again "
                                  "with Keras 3 (model.save('model.keras'))") from None


class Converted(NamedTuple):
    """What one Keras layer became: its torch modules by the name the converter asked for
    (``layer.name``, ``layer.name + "_pointwise"`` ...) and the values it read and wrote."""

    layer: object
    modules: dict[str, str]
    inputs: list[Value]
    outputs: list[Value]


def keras_to_torch(model, *, channels_first: bool = False) -> nn.Module:
    """An ``nn.Module`` computing what the Keras ``model`` computes (see the module docstring)."""
    return convert_keras(model, channels_first=channels_first)[0]


def convert_keras(model, *, channels_first: bool = False) -> tuple[nn.Module, dict[int, Converted]]:
    """:func:`keras_to_torch` and, by ``id(layer)``, what each Keras layer became (the first call
    of a shared layer): the map :mod:`modelpress.export.keras` writes a compressed model back by."""
    keras = import_keras()
    graph = _graph_of(keras, model)
    b = GraphBuilder()
    inputs = []
    for tensor in graph.inputs:
        shape = tuple(tensor.shape)
        layout = CF if channels_first and len(shape) >= 3 else KERAS
        inputs.append(Value(b.placeholder(tensor.name or "input"), layout, shape))
    converted: dict[int, Converted] = {}
    outputs = _walk(keras, graph, inputs, b, converted)
    return b.module([b.as_keras(v).node for v in outputs]).eval(), converted


def _graph_of(keras, model):
    if isinstance(model, keras.Sequential):
        functional = getattr(model, "_functional", None)
        if functional is None:
            raise UnsupportedError(f"Keras Sequential model {model.name!r} has no input shape",
                                   hint="start it with keras.Input(shape=...) so it has a layer graph")
        return functional
    if not hasattr(model, "_nodes_by_depth") or not getattr(model, "inputs", None):
        raise UnsupportedError(f"Keras model {model.name!r} ({type(model).__name__}) is subclassed: it has no "
                               "layer graph to convert", hint="build it as a Sequential or Functional model")
    return model


def _walk(keras, graph, inputs: list[Value], b: GraphBuilder, converted: dict[int, Converted]) -> list[Value]:
    """Convert ``graph``'s nodes in Keras's execution order; the values of its outputs."""
    values = {id(t): v for t, v in zip(graph.inputs, inputs)}
    for depth in sorted(graph._nodes_by_depth, reverse=True):
        for node in graph._nodes_by_depth[depth]:
            layer = node.operation
            if node.is_input or layer is None:
                continue
            ins = [values[id(t)] for t in node.input_tensors]
            if isinstance(layer, keras.Model):  # a model used as a layer: inline its graph
                inner = _graph_of(keras, layer)
                outs = _walk(keras, inner, ins, b, converted)
            else:
                convert = CONVERTERS.get(type(layer).__name__)
                if convert is None:
                    raise UnsupportedError(
                        f"Keras layer {layer.name!r} ({type(layer).__name__}) has no PyTorch conversion",
                        hint=f"replace it with supported layers ({', '.join(sorted(CONVERTERS))}) or convert "
                             "the model by hand")
                start = len(b.added)
                outs = convert(layer, ins, b, [tuple(t.shape) for t in node.outputs])
                outs = outs if isinstance(outs, list) else [outs]
                modules = {}
                for asked, given in b.added[start:]:
                    modules.setdefault(asked, given)
                converted.setdefault(id(layer), Converted(layer, modules, ins, outs))
            for t, v in zip(node.outputs, outs):
                values[id(t)] = v
    return [values[id(t)] for t in graph.outputs]


def load_keras(path: str | Path, *, channels_first: bool = False) -> nn.Module:
    """Read a Keras file and convert it; the module's ``zoo_spec`` rebuilds it from the file."""
    path = Path(path).expanduser().resolve()
    model = keras_to_torch(read_keras(path), channels_first=channels_first)
    model.zoo_spec = {"keras": str(path), "kwargs": {"channels_first": True} if channels_first else {}}
    return model


def _build(record: dict) -> nn.Module:
    return load_keras(record["keras"], **(record.get("kwargs") or {}))


def _resolve(ref: str) -> dict | None:
    """``keras:PATH[?channels_first=true]``; a bare path ending in .keras/.h5 is routed here by load_model."""
    record = parse_reference(ref, "keras")
    if record is None:
        return None
    unknown = set(record["kwargs"]) - {"channels_first"}
    if unknown:
        raise ModelLoadError(f"unknown option(s) {sorted(unknown)} in {ref!r}", hint="keras:PATH?channels_first=true")
    record["keras"] = str(Path(record["keras"]).expanduser().resolve())
    return record


register_source("keras", ModelSource(build=_build, resolve=_resolve))
