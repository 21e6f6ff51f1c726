"""Export to ONNX, feed ONNX Runtime with the same inputs, check it agrees with PyTorch.

Inputs follow the batch convention of :mod:`modelpress.core.data`: a tensor is exported as
``input``, a tuple as ``input_0, input_1, ...`` and a dict (``input_ids``, ``attention_mask`` ...)
under its own keys. Axis 0 of every input is dynamic (``batch``) and axis 1 of 2-D integer inputs
(token ids, masks) is dynamic too (``sequence``).

Exporter choice (measured with torch 2.13, onnx 1.23, onnxruntime 1.32): both the TorchScript
exporter (``dynamo=False``) and the ``torch.export`` based one export a CNN and a Hugging Face
BERT (keyword inputs) that match PyTorch within 2e-7 at a new batch/sequence size. TorchScript
does it in 0.1-0.2 s instead of 2-6 s, emits opset 17 as asked (the dynamo exporter starts at
18 and needs a version converter below that) and names dynamic axes. It is deprecated upstream,
so ``exporter="auto"`` uses it first and falls back to the dynamo exporter when it fails.
Tracing bakes Python control flow on tensor values into the graph: run :func:`check_onnx` on
inputs of another batch/sequence size than the export example to catch that.

Example::

    >>> import torch, tempfile, os
    >>> from torch import nn
    >>> model = nn.Sequential(nn.Linear(4, 3), nn.ReLU())
    >>> path = export_onnx(model, torch.randn(2, 4), os.path.join(tempfile.mkdtemp(), "m.onnx"))
    >>> check_onnx(path, model, torch.randn(5, 4)) < 1e-5
    True
"""
from __future__ import annotations

import contextlib
import logging
import os
import warnings
from pathlib import Path
from typing import Any, Iterator, Literal

import numpy as np
import torch
from torch import nn

from ..core.data import call_model
from ..core.errors import ModelpressError, UnsupportedError
from ..core.io import atomic_path

Exporter = Literal["auto", "torchscript", "dynamo"]


class OnnxExportError(UnsupportedError):
    """The model could not be exported to ONNX (or the ONNX file could not be loaded)."""


class OnnxMismatchError(ModelpressError):
    """ONNX Runtime's outputs differ from PyTorch's by more than the tolerance."""


# -- names ---------------------------------------------------------------------------------
def _named_inputs(example_inputs: Any) -> dict[str, torch.Tensor]:
    if isinstance(example_inputs, dict):
        return dict(example_inputs)
    if isinstance(example_inputs, (list, tuple)):
        return {f"input_{i}": t for i, t in enumerate(example_inputs)}
    return {"input": example_inputs}


def onnx_inputs(example_inputs: Any) -> dict[str, np.ndarray]:
    """The inputs as ``{graph input name: numpy array}``, the names :func:`export_onnx` uses.

    >>> sorted(onnx_inputs({"input_ids": torch.zeros(1, 3, dtype=torch.long)}))
    ['input_ids']
    """
    return {name: t.detach().cpu().numpy() for name, t in _named_inputs(example_inputs).items()
            if isinstance(t, torch.Tensor)}


def _flatten_outputs(out: Any, prefix: str = "output") -> Iterator[tuple[str, torch.Tensor]]:
    """Output tensors in the order the exporters flatten them, with readable names."""
    if isinstance(out, torch.Tensor):
        yield prefix, out
    elif hasattr(out, "items"):  # dict or Hugging Face ModelOutput
        for key, value in out.items():
            yield from _flatten_outputs(value, key)
    elif isinstance(out, (list, tuple)):
        for i, value in enumerate(out):
            yield from _flatten_outputs(value, f"{prefix}_{i}")


def _dynamic_dims(t: torch.Tensor, dynamic_batch: bool) -> dict[int, str]:
    dims: dict[int, str] = {}
    if dynamic_batch and t.dim() >= 1:
        dims[0] = "batch"
    if t.dim() == 2 and not t.is_floating_point():  # token ids / masks: (batch, sequence)
        dims[1] = "sequence"
    return dims


def _first_line(exc: BaseException) -> str:
    return (str(exc).splitlines() or [""])[0]


@contextlib.contextmanager
def _eval(model: nn.Module):
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


# -- exporters -----------------------------------------------------------------------------
class _KeywordAdapter(nn.Module):
    """Positional -> keyword call: the tracer binds a trailing kwargs dict to ``forward``'s
    signature positionally, which breaks on Hugging Face models (``got multiple values``)."""

    def __init__(self, model: nn.Module, names: list[str]):
        super().__init__()
        self.model, self.names = model, names

    def forward(self, *args):
        return self.model(**dict(zip(self.names, args)))


@contextlib.contextmanager
def quiet_exporters():
    """Silence torch.onnx's own log lines for the duration (e.g. 'torchvision is not installed.
    Skipping torchvision::nms', printed while the dynamo exporter registers its ops): they are
    about torch's internals, not about the user's model, and would bury modelpress's output.
    Errors still show."""
    logger = logging.getLogger("torch.onnx")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def _export_torchscript(model, inputs, named, out_names, dynamic_axes, opset, dest) -> None:
    if isinstance(inputs, dict):
        model, args = _KeywordAdapter(model, list(named)), tuple(named.values())
    elif isinstance(inputs, (list, tuple)):
        args = tuple(inputs)
    else:
        args: tuple = (inputs,)
    with warnings.catch_warnings(), quiet_exporters():
        # we chose this exporter on purpose (see module docstring); numerics are checked by
        # check_onnx, which is what the tracer warnings ask for
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.simplefilter("ignore", FutureWarning)
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        warnings.filterwarnings("ignore", message=".*aten::index operator of advanced indexing.*")
        warnings.filterwarnings("ignore", message=".*legacy TorchScript-based ONNX export.*")
        warnings.filterwarnings("ignore", message=".*feature will be removed.*")
        torch.onnx.export(model, args, str(dest), dynamo=False, opset_version=opset,
                          input_names=list(named), output_names=out_names,
                          dynamic_axes=dynamic_axes or None, do_constant_folding=True)


def _export_dynamo(model, inputs, named, out_names, dynamic_axes, opset, dest) -> None:
    dyn = torch.export.Dim.DYNAMIC
    shapes = {name: {axis: dyn for axis in dynamic_axes.get(name, {})} for name in named}
    if isinstance(inputs, dict):
        args, kwargs, dynamic_shapes = (), dict(inputs), shapes
    else:
        args = tuple(inputs) if isinstance(inputs, (list, tuple)) else (inputs,)
        kwargs, dynamic_shapes = None, tuple(shapes.values())
    with warnings.catch_warnings(), quiet_exporters(), open(os.devnull, "w") as devnull, \
            contextlib.redirect_stdout(devnull):  # it prints progress lines
        warnings.simplefilter("ignore")
        program = torch.onnx.export(model, args, None, kwargs=kwargs, dynamo=True,
                                    opset_version=max(opset, 18),  # its lowest native opset
                                    input_names=list(named), output_names=out_names,
                                    dynamic_shapes=dynamic_shapes, verbose=False)
    program.save(str(dest), external_data=False)  # one self-contained file


def export_onnx(model: nn.Module, example_inputs: Any, path: str | os.PathLike, *, opset: int = 17,
                dynamic_batch: bool = True, exporter: Exporter = "auto") -> Path:
    """Export ``model`` (in eval mode, training flag restored) to the ONNX file ``path``.

    The file is written to a temporary name in the same folder and moved into place with
    ``os.replace``, so a failed export never leaves a partial file or clobbers an old one.
    ``exporter``: ``"torchscript"``, ``"dynamo"`` or ``"auto"`` (TorchScript, then dynamo).
    Returns the path. Raises :class:`OnnxExportError` when no exporter succeeds.
    """
    if exporter not in ("auto", "torchscript", "dynamo"):
        raise OnnxExportError(f"export_onnx: unknown exporter {exporter!r}",
                              hint="use 'auto', 'torchscript' or 'dynamo'")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    named = _named_inputs(example_inputs)
    if not named or not all(isinstance(t, torch.Tensor) for t in named.values()):
        raise OnnxExportError(
            f"export_onnx: example_inputs must be tensors (got {sorted(named)})",
            hint="pass a tensor, a tuple of tensors or a dict of keyword tensors")
    with _eval(model):
        try:
            with torch.no_grad():
                outputs = list(_flatten_outputs(call_model(model, example_inputs)))
        except Exception as exc:
            raise OnnxExportError(
                f"export_onnx: the model's forward raised {type(exc).__name__}: {exc}",
                hint="check that example_inputs match the model's forward signature") from exc
        batch = next(iter(named.values())).shape[0]
        out_names = [name for name, _ in outputs]
        dynamic_axes = {name: _dynamic_dims(t, dynamic_batch) for name, t in named.items()}
        for name, t in outputs:
            if dynamic_batch and t.dim() >= 1 and t.shape[0] == batch:
                dynamic_axes[name] = {0: "batch"}
        dynamic_axes = {k: v for k, v in dynamic_axes.items() if v}

        order = {"auto": ("torchscript", "dynamo"), "torchscript": ("torchscript",),
                 "dynamo": ("dynamo",)}[exporter]
        errors = []
        for name in order:
            try:
                fn = _export_torchscript if name == "torchscript" else _export_dynamo
                # no_grad: layers that decode stored weights (codebooks, packed bits) then hand the
                # tracer their decoded weight as a constant, so the runtime does not decode per call
                with atomic_path(path) as tmp, torch.no_grad():  # a failed exporter leaves nothing behind
                    fn(model, example_inputs, named, out_names, dynamic_axes, opset, str(tmp))
                return path
            except Exception as exc:  # noqa: BLE001 - each exporter fails in its own ways
                errors.append(f"{name}: {type(exc).__name__}: {_first_line(exc)[:300]}")
    raise OnnxExportError(
        f"export_onnx: could not export {type(model).__name__} to {path} ({'; '.join(errors)})",
        hint="replace unsupported ops, or try exporter='dynamo' / a newer opset")


# -- ONNX Runtime --------------------------------------------------------------------------
def ort_session(path: str | os.PathLike, *, threads: int | None = 1, spinning: bool = True):
    """An ``onnxruntime.InferenceSession`` on CPU with all graph optimisations.

    ``threads`` sets the intra-op pool (None: ORT's default); inter-op is 1 (sequential graph).
    ``spinning=False`` stops idle ORT threads from busy-waiting after a call (they would take the
    cores from a PyTorch call timed right after, as in alternating latency comparisons).
    """
    import onnxruntime as ort

    opts = ort.SessionOptions()
    if threads is not None:
        opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if not spinning:
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    try:
        return ort.InferenceSession(str(path), sess_options=opts, providers=["CPUExecutionProvider"])
    except Exception as exc:
        raise OnnxExportError(f"onnxruntime could not load {path}: {_first_line(exc)}",
                              hint="re-export the model with export_onnx") from exc


def ort_feeds(session, inputs: Any) -> dict[str, np.ndarray]:
    """Inputs as the feed dict of ``session`` (inputs the graph dropped are left out)."""
    arrays = onnx_inputs(inputs)
    feeds = {}
    for graph_input in session.get_inputs():
        if graph_input.name not in arrays:
            raise OnnxExportError(
                f"the ONNX graph expects input '{graph_input.name}' but got {sorted(arrays)}",
                hint="pass inputs in the same structure (tensor / tuple / dict) used for export")
        feeds[graph_input.name] = arrays[graph_input.name]
    return feeds


def check_onnx(path: str | os.PathLike, model: nn.Module, inputs: Any, atol: float = 1e-4,
               relative: bool = False) -> float:
    """Max absolute difference between ONNX Runtime and PyTorch outputs on ``inputs``.

    Raises :class:`OnnxMismatchError` when it exceeds ``atol`` (with ``relative``: ``atol`` times
    the largest output magnitude, when that is above 1: float32 sums of outputs around 1e12 differ
    by far more than 1e-4) or output shapes differ.
    """
    session = ort_session(path, threads=None)
    try:
        got = session.run(None, ort_feeds(session, inputs))
    except Exception as exc:  # onnxruntime raises its own Fail/RuntimeException/InvalidArgument types
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise OnnxMismatchError(f"{path}: ONNX Runtime cannot run the exported graph: {first}",
                                hint="the exporter wrote an op ONNX Runtime rejects (e.g. an LSTM with "
                                     "proj_size); keep that layer out of the export or report it") from None
    with _eval(model), torch.no_grad():
        ref = [t.detach().cpu().numpy() for _, t in _flatten_outputs(call_model(model, inputs))]
    if len(got) != len(ref):
        raise OnnxMismatchError(f"{path}: ONNX has {len(got)} outputs, PyTorch {len(ref)}")
    worst = 0.0
    if relative:
        atol *= max([1.0] + [float(np.max(np.abs(b))) for b in ref if b.size and np.isfinite(b).all()])
    for i, (a, b) in enumerate(zip(got, ref)):
        if a.shape != b.shape:
            raise OnnxMismatchError(
                f"{path}: output {i} has shape {a.shape} in ONNX, {b.shape} in PyTorch",
                hint="a shape was baked in at export; export with dynamic_batch=True")
        if a.size:
            diff = float(np.max(np.abs(a.astype(np.float64) - b.astype(np.float64))))
            worst = diff if np.isnan(diff) else max(worst, diff)
            if np.isnan(worst):
                break
    if not worst <= atol:  # NaN fails too
        raise OnnxMismatchError(
            f"{path}: ONNX Runtime differs from PyTorch by {worst:.3g} (> atol {atol:g})",
            hint="look for ops the exporter approximates or control flow baked in by tracing")
    return worst
