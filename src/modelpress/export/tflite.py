"""Export to LiteRT (``.tflite``) in four precisions, run the file in the LiteRT interpreter, check it.

``litert-torch`` converts the PyTorch model (through ``torch.export``) to a float32 ``.tflite``;
``ai-edge-quantizer`` (installed with it) makes the other precisions from that file:

* ``fp32``: the converted graph as is;
* ``fp16``: weights stored as float16 (dequantized to float32 when the interpreter loads them);
* ``dynamic_int8``: int8 weights per output channel, float activations quantized per call by the
  kernels (dynamic range quantization);
* ``int8``: int8 weights and activations, activation ranges calibrated on the user's data, int8
  input and output tensors (their scale and zero point are in the file; :class:`LiteRTRunner`
  applies them, so callers feed and get floats).

The file has a fixed batch of 1 (what phones run) and takes the inputs in the PyTorch model's
layout (NCHW images) unless ``channels_last=True``, which makes 4-D inputs NHWC (the usual LiteRT
layout; the graph transposes them back). Before the file is moved into place it is loaded in the
LiteRT interpreter and run on a few of the user's inputs, one at a time, against the PyTorch model:
fp32 within 1e-4 and fp16 within 1e-2 of the largest output magnitude, int8 above an output SQNR
floor (``min_sqnr_db``; a wrong graph scores near 0 dB). A failed check leaves no file.

Needs the ``tflite`` extra (``pip install 'modelpress[tflite]'``: litert-torch, ai-edge-litert).

Example (not run by the doctests: the extra is optional)::

    from modelpress.export.tflite import TfliteOptions, export_tflite
    done = export_tflite(model, images[:8], "m.tflite", TfliteOptions(precision="int8"), calibration=train)
    print(done.note)  # LiteRT int8 ...; 73,288 bytes, 66,141 gzipped; ... SQNR 28.0 dB ...
"""
from __future__ import annotations

import contextlib
import gzip
import logging
import os
import re
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Literal

import numpy as np
import torch
from pydantic import Field
from torch import nn

from ..core.config import StrictModel
from ..core.data import as_data, batch_size_of, call_model, output_tensor
from ..core.errors import DataError, ModelpressError, UnsupportedError, require
from ..core.io import atomic_path

Precision = Literal["fp32", "fp16", "dynamic_int8", "int8"]
PRECISIONS: tuple[str, ...] = ("fp32", "fp16", "dynamic_int8", "int8")
#: the check's bound per precision: float ones a max abs difference relative to the largest output
#: magnitude (as ONNX's check), int8 ones an output SQNR floor in dB (overridable)
FLOAT_TOLERANCE = {"fp32": 1e-4, "fp16": 1e-2}
DEFAULT_MIN_SQNR_DB = 10.0  # trained LeNet-5 full int8 on digits: 15 dB with 100% top-1 agreement; wrong graphs ~0
CALIBRATION_BATCH = 32  # batch size a Dataset given as calibration data is read with


class TfliteOptions(StrictModel):
    """How :func:`export_tflite` writes the file (``--set KEY=VALUE`` on ``modelpress export --format tflite``)."""

    precision: Precision = Field("fp32", description="fp32, fp16, dynamic_int8 (int8 weights, float "
                                                     "activations) or int8 (weights and activations)")
    channels_last: bool = Field(False, description="4-D inputs as NHWC in the file (default: the model's NCHW)")
    calibration_batches: int = Field(8, ge=1, description="batches of the calibration data (int8)")
    check_samples: int = Field(8, ge=1, description="inputs the LiteRT file is checked on (one at a time)")
    min_sqnr_db: float = Field(DEFAULT_MIN_SQNR_DB, description="int8 precisions: least output SQNR (dB) "
                                                                 "against PyTorch for the file to be written")
    weight_granularity: Literal["channel", "tensor"] = Field(
        "channel", description="int8: one weight scale per output channel (LiteRT's default) or per layer (a "
                               "layer's shared or clustered weights stay few distinct bytes, which gzip shrinks)")
    strip_names: bool = Field(False, description="drop the debug names of the inner tensors (litert-torch's "
                                                 "module paths: ~2 KB on LeNet-5); inputs and outputs keep theirs")


class TfliteExportError(UnsupportedError):
    """The LiteRT converter or quantizer could not handle the model."""


class TfliteMismatchError(ModelpressError):
    """The ``.tflite`` file's outputs in the LiteRT interpreter are too far from PyTorch's."""


@dataclass
class TfliteExport:
    """What :func:`export_tflite` wrote: ``check`` is None when the check was skipped."""

    path: Path
    precision: str
    bytes: int
    gzip_bytes: int
    input_shapes: dict[str, tuple[int, ...]]
    check: "TfliteCheck | None"
    note: str


@dataclass
class TfliteCheck:
    """LiteRT against PyTorch on ``samples`` inputs: the largest difference, the output SQNR in dB and,
    for ``(N, classes)`` outputs, the share of inputs whose top-1 class agrees."""

    samples: int
    max_abs_diff: float
    sqnr_db: float
    top1_agreement: float | None

    def summary(self) -> str:
        top1 = "" if self.top1_agreement is None else f", top-1 agreement {self.top1_agreement:.0%}"
        return (f"LiteRT vs PyTorch on {self.samples} inputs: max abs diff {self.max_abs_diff:.2e}, "
                f"SQNR {self.sqnr_db:.1f} dB{top1}")


# -- running a .tflite file ----------------------------------------------------------------------
def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:300] if text else type(exc).__name__


def _named(inputs: Any) -> dict[str, torch.Tensor]:
    """Inputs under the names litert-torch gives the file's inputs (``args_0, ...`` or the keywords)."""
    if isinstance(inputs, dict):
        return dict(inputs)
    if isinstance(inputs, (list, tuple)):
        return {f"args_{i}": t for i, t in enumerate(inputs)}
    return {"args_0": inputs}


def _nhwc(t: torch.Tensor) -> torch.Tensor:
    return t.permute(0, 2, 3, 1) if t.dim() == 4 else t


class LiteRTRunner:
    """A ``.tflite`` file (path or bytes) loaded in the LiteRT interpreter, fed the way the PyTorch
    model is (a tensor, a tuple or a dict of batch-1 tensors); int8 input/output tensors are
    quantized/dequantized with the scale and zero point the file gives them."""

    def __init__(self, model: str | os.PathLike | bytes, threads: int | None = None):
        interpreter_lib = require("ai_edge_litert.interpreter", "tflite")
        source = {"model_content": bytes(model)} if isinstance(model, (bytes, bytearray)) else \
            {"model_path": str(model)}
        try:
            self.interpreter = interpreter_lib.Interpreter(**source, num_threads=threads)
            self.runner = self.interpreter.get_signature_runner()
        except (ValueError, RuntimeError) as exc:
            raise TfliteMismatchError(f"the LiteRT interpreter cannot load the file: {_first_line(exc)}",
                                      hint="the converter wrote a file this ai-edge-litert cannot run") from None
        self.inputs = self.runner.get_input_details()
        self.input_order = sorted(self.inputs, key=lambda k: self.inputs[k]["index"])
        outputs = self.runner.get_output_details()
        self.output_names = sorted(outputs, key=lambda n: int(re.sub(r"\D", "", n) or 0))
        self.output = outputs[self.output_names[0]]

    @property
    def input_shapes(self) -> dict[str, tuple[int, ...]]:
        return {k: tuple(int(s) for s in d["shape"]) for k, d in self.inputs.items()}

    def takes_nhwc(self, inputs: Any) -> bool:
        """True when the file's 4-D inputs are NHWC permutations of these NCHW tensors (a
        ``channels_last`` export) rather than their own shapes."""
        shapes = self.input_shapes
        named = {k: tuple(t.shape) for k, t in self._named(inputs).items() if t.dim() == 4 and k in shapes}
        return bool(named) and all(shapes[k] != s and shapes[k] == (s[0], *s[2:], s[1]) for k, s in named.items())

    def _named(self, inputs: Any) -> dict[str, torch.Tensor]:
        named = _named(inputs)
        if set(named) != set(self.inputs) and not isinstance(inputs, dict) and len(named) == len(self.inputs):
            # a file from another converter (TensorFlow names its inputs after the Keras layers): in order
            named = dict(zip(self.input_order, named.values()))
        return named

    def feeds(self, inputs: Any, channels_last: bool = False) -> dict[str, np.ndarray]:
        """Numpy feeds for one call (``channels_last``: turn 4-D NCHW tensors to NHWC first)."""
        named = self._named(inputs)
        if set(named) != set(self.inputs):
            raise DataError(f"the .tflite takes inputs {sorted(self.inputs)}, got {sorted(named)}",
                            hint="pass the inputs the model was exported with, in the same structure")
        out = {}
        for name, t in named.items():
            detail = self.inputs[name]
            a = (_nhwc(t) if channels_last else t).detach().cpu().numpy()
            if tuple(a.shape) != tuple(detail["shape"]):
                raise DataError(f".tflite input {name} has shape {tuple(int(s) for s in detail['shape'])}, "
                                f"got {tuple(a.shape)}", hint="the file takes batch 1 in the layout it was "
                                                               "exported with (channels_last=True: NHWC)")
            scale, zero = detail["quantization"]
            if detail["dtype"] in (np.int8, np.uint8, np.int16) and scale and np.issubdtype(a.dtype, np.floating):
                info = np.iinfo(detail["dtype"])
                a = np.clip(np.round(a / scale) + zero, info.min, info.max)
            out[name] = a.astype(detail["dtype"])
        return out

    def invoke(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return self.runner(**feeds)

    def __call__(self, inputs: Any, channels_last: bool = False) -> np.ndarray:
        """The file's first output on ``inputs``, as float32."""
        y = self.invoke(self.feeds(inputs, channels_last))[self.output_names[0]]
        scale, zero = self.output["quantization"]
        if scale and not np.issubdtype(y.dtype, np.floating):
            y = (y.astype(np.float32) - zero) * scale
        return y.astype(np.float32)


# -- converting ------------------------------------------------------------------------------------
@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """litert-torch prints a progress tree, torchao (which it imports) a warning per CUDA kernel
    library it cannot load on a CPU machine, torch.export deprecation warnings: keep the CLI's
    output to modelpress's own lines (errors still raise)."""
    previous = os.environ.get("LITERT_TORCH_SHOW_PROGRESS")
    os.environ["LITERT_TORCH_SHOW_PROGRESS"] = "n"
    loggers = [logging.getLogger(name) for name in ("torchao", "torch.utils._pytree")]
    levels = [lg.level for lg in loggers]
    try:
        for lg in loggers:
            lg.setLevel(logging.ERROR)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)
        if previous is None:
            os.environ.pop("LITERT_TORCH_SHOW_PROGRESS", None)
        else:
            os.environ["LITERT_TORCH_SHOW_PROGRESS"] = previous


def _row(inputs: Any, i: int) -> Any:
    """Sample ``i`` of a batch, kept as a batch of 1 (any convention)."""
    if isinstance(inputs, dict):
        return {k: v[i:i + 1] for k, v in inputs.items()}
    if isinstance(inputs, (list, tuple)):
        return type(inputs)(_row(v, i) for v in inputs)
    return inputs[i:i + 1]


def _rows(inputs: Any, limit: int) -> list[Any]:
    return [_row(inputs, i) for i in range(min(batch_size_of(inputs), limit))]


def _convert_float(model: nn.Module, sample: Any, channels_last: bool) -> bytes:
    with _quiet():
        litert_torch = require("litert_torch", "tflite")
    named, name = _named(sample), type(model).__name__
    if channels_last:
        positions = [i for i, t in enumerate(named.values()) if t.dim() == 4]
        if isinstance(sample, dict) or not positions:
            raise DataError("channels_last=True needs positional 4-D image inputs (N, C, H, W)",
                            hint="leave channels_last off: the file then takes the model's own layout")
        model = litert_torch.to_channel_last_io(model, args=positions)
        sample = tuple(_nhwc(t) if i in positions else t for i, t in enumerate(named.values()))
    args, kwargs = (None, sample) if isinstance(sample, dict) else \
        (tuple(sample) if isinstance(sample, (list, tuple)) else (sample,), None)
    try:
        with _quiet():
            return bytes(litert_torch.convert(model, args, kwargs).model_content())
    except ModelpressError:
        raise
    except Exception as exc:  # torch.export and the MLIR converter raise many types
        raise TfliteExportError(f"LiteRT cannot convert {name}: {type(exc).__name__}: "
                                f"{_first_line(exc)}",
                                hint="litert-torch converts what torch.export captures: no Python control "
                                     "flow on tensor values, standard ops only") from None


def _quantize(float_bytes: bytes, precision: str, calibration: list[dict[str, np.ndarray]] | None,
              granularity: str = "channel") -> bytes:
    aeq = require("ai_edge_quantizer.quantizer", "tflite")
    recipe = require("ai_edge_quantizer.recipe", "tflite")
    qtyping = require("ai_edge_quantizer.qtyping", "tflite")
    try:
        with _quiet():
            q = aeq.Quantizer(bytearray(float_bytes))
            if precision == "fp16":
                q.add_weight_only_config(regex=".*", operation_name=qtyping.TFLOperationName.ALL_SUPPORTED,
                                         num_bits=16, algorithm_key=recipe.AlgorithmName.FLOAT_CASTING)
            elif precision == "dynamic_int8":
                q.load_quantization_recipe(recipe.dynamic_wi8_afp32())
            elif granularity == "channel":
                q.load_quantization_recipe(recipe.static_wi8_ai8())
            else:
                q.add_static_config(regex=".*", operation_name=qtyping.TFLOperationName.ALL_SUPPORTED,
                                    activation_num_bits=8, weight_num_bits=8,
                                    weight_granularity=qtyping.QuantGranularity.TENSORWISE)
            stats = None
            if q.need_calibration:
                key = next(iter(LiteRTRunner(float_bytes).interpreter.get_signature_list()))
                stats = q.calibrate({key: calibration}, num_threads=os.cpu_count() or 1)
            return bytes(q.quantize(stats, enable_progress_report=False).quantized_model)
    except ModelpressError:
        raise
    except Exception as exc:
        raise TfliteExportError(f"the LiteRT quantizer cannot make {precision}: {type(exc).__name__}: "
                                f"{_first_line(exc)}", hint="export fp32 or another precision") from None


def strip_tensor_names(data: bytes) -> bytes:
    """The file without the names of its inner tensors (LiteRT's own flatbuffer tools; the signature's
    input and output tensors keep their names, so the file is fed and read as before)."""
    fb = require("ai_edge_litert.tools.flatbuffer_utils", "tflite")
    model = fb.convert_bytearray_to_object(bytearray(data))
    model.description = None
    for subgraph in model.subgraphs:
        keep = set(subgraph.inputs) | set(subgraph.outputs)
        for i, tensor in enumerate(subgraph.tensors):
            if i not in keep:
                tensor.name = None
    return bytes(fb.convert_object_to_bytearray(model))


def _calibration_feeds(data: Any, runner: LiteRTRunner, options: TfliteOptions) -> list[dict[str, np.ndarray]]:
    feeds = []
    for b, inputs in enumerate(as_data(data, batch_size=CALIBRATION_BATCH).inputs()):
        if b >= options.calibration_batches:
            break
        feeds += [runner.feeds(row, options.channels_last) for row in _rows(inputs, batch_size_of(inputs))]
    if not feeds:
        raise DataError("the int8 calibration data is empty (no batch)", hint="pass a few hundred samples")
    return feeds


# -- checking --------------------------------------------------------------------------------------
def check_tflite(path: str | os.PathLike | bytes, model: nn.Module, inputs: Any, *, precision: str = "fp32",
                 channels_last: bool = False, min_sqnr_db: float = DEFAULT_MIN_SQNR_DB,
                 samples: int = 8) -> TfliteCheck:
    """Run the file on up to ``samples`` rows of ``inputs`` (one at a time) and compare with ``model``.

    Raises :class:`TfliteMismatchError` when fp32/fp16 outputs differ by more than
    :data:`FLOAT_TOLERANCE` times the largest output magnitude (at least 1), or int8 outputs score
    an SQNR below ``min_sqnr_db``.
    """
    runner = LiteRTRunner(path)
    rows = _rows(inputs, samples)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            ref = np.concatenate([output_tensor(call_model(model, r)).float().numpy() for r in rows])
    finally:
        model.train(was_training)
    got = np.concatenate([runner(r, channels_last) for r in rows])
    if got.shape != ref.shape:
        raise TfliteMismatchError(f"the .tflite output has shape {got.shape}, PyTorch {ref.shape}",
                                  hint="the converted graph computes something else; report it with the model")
    diff = np.abs(got.astype(np.float64) - ref.astype(np.float64))
    noise = float((diff ** 2).sum())
    signal = float((ref.astype(np.float64) ** 2).sum())
    db = float("inf") if noise == 0 else 10 * np.log10(signal / noise) if signal > 0 else float("-inf")
    top1 = float((got.argmax(1) == ref.argmax(1)).mean()) if ref.ndim == 2 and ref.shape[1] > 1 else None
    result = TfliteCheck(samples=len(rows), max_abs_diff=float(diff.max()) if diff.size else 0.0, sqnr_db=db,
                         top1_agreement=top1)
    if precision in FLOAT_TOLERANCE:
        atol = FLOAT_TOLERANCE[precision] * max(1.0, float(np.abs(ref).max()) if ref.size else 1.0)
        if not result.max_abs_diff <= atol:  # NaN fails too
            raise TfliteMismatchError(f"LiteRT {precision} differs from PyTorch by {result.max_abs_diff:.3g} "
                                      f"(> {atol:.3g})", hint="look for ops the converter approximates; "
                                                              "report it with the model")
    elif not db >= min_sqnr_db:
        raise TfliteMismatchError(f"LiteRT {precision} output SQNR {db:.1f} dB against PyTorch (< {min_sqnr_db:g} dB)",
                                  hint="calibrate on more representative data, export dynamic_int8 or fp16, "
                                       "or lower min_sqnr_db if this is good enough")
    return result


# -- the export ------------------------------------------------------------------------------------
_DESCRIPTION = {  # how each precision is stored, after "LiteRT <precision>"
    "fp32": "",
    "fp16": " (float16 weights, float32 compute)",
    "dynamic_int8": " (dynamic range: int8 weights per channel, float activations)",
    "int8": " (int8 weights per channel and activations, int8 in/out",
}


def export_tflite(model: nn.Module, example_inputs: Any, path: str | os.PathLike,
                  options: TfliteOptions | None = None, *, calibration: Any = None,
                  check: bool = True) -> TfliteExport:
    """Write ``model`` as a LiteRT ``.tflite`` file at ``path`` (atomically) and return what was written.

    ``example_inputs``: a batch in the model's input convention; its first row fixes the file's
    input shapes (batch 1) and up to ``options.check_samples`` rows check the file.
    ``calibration``: data for ``precision="int8"`` (anything :class:`~modelpress.core.data.Data`
    takes; ``options.calibration_batches`` batches are read). The model is not changed.
    """
    options = options or TfliteOptions()
    if options.precision == "int8" and calibration is None:  # before the conversion's seconds are spent
        raise DataError("precision int8 calibrates activation ranges on data and got none",
                        hint="pass calibration=... (a Dataset, DataLoader or list of batches; the CLI uses -d's "
                             "training split)")
    model_was_training = model.training
    model.eval()
    try:
        float_bytes = _convert_float(model, _row(example_inputs, 0), options.channels_last)
        calib = None
        if options.precision == "int8":
            calib = _calibration_feeds(calibration, LiteRTRunner(float_bytes), options)
        data = (float_bytes if options.precision == "fp32" else
                _quantize(float_bytes, options.precision, calib, options.weight_granularity))
        if options.strip_names:
            data = strip_tensor_names(data)
        result = None
        with atomic_path(path) as tmp:
            tmp.write_bytes(data)
            if check:  # the file on disk is what is checked: a failure leaves no file
                result = check_tflite(tmp, model, example_inputs, precision=options.precision,
                                      channels_last=options.channels_last, min_sqnr_db=options.min_sqnr_db,
                                      samples=options.check_samples)
            shapes = LiteRTRunner(tmp).input_shapes
    finally:
        model.train(model_was_training)
    gz = len(gzip.compress(data, 9))
    what = f"LiteRT {options.precision}{_DESCRIPTION[options.precision]}"
    if options.precision == "int8":
        what += f", calibrated on {len(calib)} samples)"
    layout = "NHWC" if options.channels_last else "the model's layout"
    inputs = ", ".join("x".join(map(str, s)) for s in shapes.values())
    note = f"{what}; {len(data):,} bytes, {gz:,} gzipped; input {inputs} ({layout}); "
    if result is None:
        note += "not checked"
    else:
        floor = (f"bound {FLOAT_TOLERANCE[options.precision]:g} x max |output|" if options.precision in
                 FLOAT_TOLERANCE else f"floor {options.min_sqnr_db:g} dB")
        note += f"{result.summary()} ({floor})"
    return TfliteExport(path=Path(path), precision=options.precision, bytes=len(data), gzip_bytes=gz,
                        input_shapes=shapes, check=result, note=note)
