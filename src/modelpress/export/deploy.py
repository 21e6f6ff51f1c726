"""Export a compressed model in the format that runs it: the one entry point behind ``modelpress export``.

* a statically quantized model (``quant.static_int8``) -> ONNX QDQ int8
  (:func:`modelpress.export.onnx_quant.export_int8_onnx`);
* a dynamically quantized model (``quant.dynamic_int8``) -> ONNX Runtime dynamic int8, built
  from the float graph by ONNX Runtime's quantizer (:mod:`modelpress.export.onnx_dynamic`;
  ``embedding_bits=4`` stores embedding tables as 4-bit blocks);
* a model with weight-only packed Linear layers (``quant.weight_only``, ``quant.gptq``) -> ONNX
  with those layers as ONNX Runtime's ``MatMulNBits`` (int2/int4/int8 blocks stay integers in the
  file; :mod:`modelpress.export.onnx_nbits`), ``accuracy_level`` 4 (int8 activations per block:
  the fast kernels) unless told otherwise;
* anything else -> fp32 ONNX (:func:`modelpress.export.onnx.export_onnx`); packed conv layers
  export their dequantized weights (the artifact is the compact form).

``fmt="openvino"`` writes OpenVINO IR (``.xml`` + ``.bin``) from that ONNX file
(:mod:`modelpress.export.openvino`). ``fmt="tflite"`` writes a LiteRT file instead, in the
precision its :class:`TfliteOptions` name (fp32, fp16, dynamic-range int8, int8 calibrated on ``calibration``;
:mod:`modelpress.export.tflite`): dynamically quantized layers go in as their dequantized float
weights, which the LiteRT quantizer then quantizes its own way. ``fmt="pt2"`` writes the model as a
``torch.export`` program (:mod:`modelpress.export.torch_program`), what the ``torch-compile`` runtime
compiles where it runs; the check runs the program uncompiled.

With ``check=True`` the file is run in ONNX Runtime (LiteRT's interpreter) on the example input
and compared with the PyTorch model; a mismatch raises instead of leaving a wrong file behind.
"""
from __future__ import annotations

import copy
import os
from pathlib import Path
from typing import Any, Callable, NamedTuple

import torch
from torch import nn

from ..core.data import call_model, output_tensor
from ..core.errors import ConfigError, require
from ..core.io import atomic_path
from ..core.registry import Registry
from ..nn.modules import set_module
from ..quantization.codebook import CodebookConv2d, CodebookLinear
from ..quantization.dynamic import DynamicInt8Linear, Int8Embedding
from ..quantization.modules import QuantLinear
from ..quantization.primitives import sqnr
from ..quantization.rnn import QuantRNN
from ..quantization.static import FakeQuant
from . import openvino as ov_files
from .onnx import OnnxMismatchError, check_onnx, export_onnx, ort_feeds, ort_session
from .onnx_dynamic import quantize_onnx_dynamic
from .onnx_nbits import export_nbits_onnx
from .onnx_quant import export_int8_onnx
from .tflite import TfliteOptions, export_tflite
from .torch_program import export_program

FORMATS = ("onnx", "tflite", "openvino", "pt2")


class Exporter(NamedTuple):
    """How models holding a ``marker`` module export: ``write(model, inputs, path, options) ->
    note`` writes the ONNX file; ``check(path, model, inputs) -> note`` compares it with the
    PyTorch model (raising on a mismatch)."""

    marker: type
    write: Callable[[nn.Module, Any, Path, dict], str]
    check: Callable[[Path, nn.Module, Any], str]


EXPORTERS: Registry[Exporter] = Registry("exporter")


def register_exporter(name: str, exporter: Exporter) -> Exporter:
    return EXPORTERS.register(name, exporter)


def exporter_for(model: nn.Module) -> Exporter | None:
    """The exporter of the first registered marker type found in ``model`` (None: plain fp32)."""
    kinds = {type(m) for m in model.modules()}
    return next((e for _, e in EXPORTERS.items() if any(issubclass(k, e.marker) for k in kinds)), None)


def float_copy(model: nn.Module) -> nn.Module:
    """A copy of a dynamically quantized or weight-shared model with plain ``nn.Linear`` /
    ``nn.Conv2d`` / ``nn.Embedding`` / ``nn.LSTM`` (GRU, RNN) layers holding the dequantized
    (decoded) weights: what ONNX Runtime's quantizer starts from, and what exporters can trace."""
    out = copy.deepcopy(model)
    for name, m in list(out.named_modules()):
        if isinstance(m, DynamicInt8Linear):
            w = m.dequantized_weight()
            new = nn.Linear(w.shape[1], w.shape[0], bias=m.bias is not None)
        elif isinstance(m, CodebookLinear):
            w = m.weight.detach()
            new = nn.Linear(w.shape[1], w.shape[0], bias=m.bias is not None)
        elif isinstance(m, CodebookConv2d):
            w = m.weight.detach()
            new = nn.Conv2d(m.in_channels, m.out_channels, m.kernel_size, m.stride, m.padding, m.dilation, m.groups,
                            bias=m.bias is not None, padding_mode=m.padding_mode)
        elif isinstance(m, Int8Embedding):
            w = m.dequantized_weight()
            new = nn.Embedding(w.shape[0], w.shape[1], padding_idx=getattr(m, "padding_idx", None))
        elif isinstance(m, QuantRNN):  # an LSTM/GRU with packed weights: the float recurrent op
            set_module(out, name, m.to_float())
            continue
        else:
            continue
        with torch.no_grad():
            new.weight.copy_(w)
            if not isinstance(new, nn.Embedding) and m.bias is not None:
                new.bias.copy_(m.bias)
        set_module(out, name, new)
    return out


def export_deployable(model: nn.Module, example_inputs: Any, path: str | os.PathLike, *,
                      check: bool = True, embedding_bits: int | None = 8,
                      accuracy_level: int = 4, fmt: str = "onnx", tflite: TfliteOptions | None = None,
                      calibration: Any = None) -> tuple[Path, str]:
    """Write ``model`` to the ONNX (``fmt="tflite"``: LiteRT) file ``path``; returns ``(path, note)``.

    ONNX: the exporter is chosen by the modules the model holds (:data:`EXPORTERS`); a model without
    any registered marker exports as fp32. ``embedding_bits`` applies to dynamically quantized
    models (8, 4 or None for float tables), ``accuracy_level`` to MatMulNBits layers (0: fp32
    compute, exact; 4: int8 activations, faster). LiteRT: ``tflite`` says the precision and layout,
    ``calibration`` is the data int8 calibrates on (:func:`modelpress.export.tflite.export_tflite`).
    """
    if fmt not in FORMATS:
        raise ConfigError(f"export format {fmt!r} is not known", hint=f"use one of {', '.join(FORMATS)}")
    if fmt == "tflite":
        done = export_tflite(float_copy(model), example_inputs, path, tflite, calibration=calibration, check=check)
        return done.path, done.note
    if fmt == "pt2":
        return _export_program_checked(model, example_inputs, Path(path), check)
    if fmt == "openvino":
        ir = export_openvino(model, example_inputs, path, check=check, embedding_bits=embedding_bits,
                             accuracy_level=accuracy_level)
        return ir.path, ir.note
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.partial.onnx")  # checked first, then moved into place
    exporter = exporter_for(model)
    try:
        if exporter is None:
            packed_rnn = any(isinstance(m, QuantRNN) for m in model.modules())
            export_onnx(float_copy(model) if packed_rnn else model, example_inputs, tmp)
            note = "fp32"
            if check:
                if quantizes_activations(model):  # rounding of an activation may land one step apart
                    err = check_onnx(tmp, model, example_inputs, atol=_int8_tolerance(model, example_inputs))
                else:
                    err = check_onnx(tmp, model, example_inputs, atol=1e-4, relative=True)
                note += f"; ONNX Runtime max abs diff vs PyTorch {err:.2e}"
        else:
            note = exporter.write(model, example_inputs, tmp, {"embedding_bits": embedding_bits,
                                                               "accuracy_level": accuracy_level})
            if check:
                note += "; " + exporter.check(tmp, model, example_inputs)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path, note


def _export_program_checked(model: nn.Module, example_inputs: Any, path: Path, check: bool) -> tuple[Path, str]:
    note = "torch.export program (compiled by torch.compile where it runs)"
    with atomic_path(path) as tmp:  # checked first, then moved into place
        export_program(model, example_inputs, tmp)
        if check:
            with torch.no_grad():
                got = output_tensor(call_model(torch.export.load(str(tmp)).module(), example_inputs))
                want = output_tensor(call_model(model.eval(), example_inputs))
            err = float((got.float() - want.float()).abs().max()) if got.numel() else 0.0
            scale = float(want.float().abs().max()) if want.numel() else 0.0
            if not torch.isfinite(got).all() or err > 1e-4 * max(1.0, scale):
                raise OnnxMismatchError(f"the torch.export program of {type(model).__name__} differs from the "
                                        f"model by {err:.3g} (max abs)", hint="deploy with --runtime onnxruntime")
            note += f"; max abs diff vs PyTorch {err:.2e}"
    return path, note


# -- the built-in exporters ----------------------------------------------------------------------
def _write_static_int8(model: nn.Module, inputs: Any, path: Path, options: dict) -> str:
    export_int8_onnx(model, inputs, path)
    return "int8 QDQ (static W8A8)"


def _check_static_int8(path: Path, model: nn.Module, inputs: Any) -> str:
    # int8 kernels round (x * scale) products differently from the fake-quant model, so the
    # check bounds the difference by the output range instead of a float tolerance
    err = check_onnx(path, model, inputs, atol=_int8_tolerance(model, inputs))
    return f"ONNX Runtime max abs diff vs PyTorch {err:.2e}"


def _write_dynamic_int8(model: nn.Module, inputs: Any, path: Path, options: dict) -> str:
    bits = options.get("embedding_bits")
    flt = path.with_name(f".{path.name}.float.onnx")
    try:
        export_onnx(float_copy(model), inputs, flt, opset=20 if bits == 4 else 17)
        info = quantize_onnx_dynamic(flt, path, embedding_bits=bits)
    finally:
        if flt.exists():
            flt.unlink()
    tables = {8: "int8", 4: f"4-bit ({info['int4_tables']} tables)", None: "float"}[bits]
    return f"ONNX Runtime dynamic int8 (MatMul weights int8 per channel, embedding tables {tables})"


def _check_dynamic_int8(path: Path, model: nn.Module, inputs: Any) -> str:
    return f"ONNX Runtime vs PyTorch output SQNR {_check_sqnr(path, model, inputs):.1f} dB"


def _write_nbits(model: nn.Module, inputs: Any, path: Path, options: dict) -> str:
    level = options.get("accuracy_level", 4)
    info = export_nbits_onnx(model, inputs, path, accuracy_level=level)
    note = (f"MatMulNBits ({info['matmulnbits']} weight-only Linear layers, accuracy_level {level})"
            if info["matmulnbits"] else "fp32 (no layer fits MatMulNBits)")
    if info["left"]:
        note += "; fp32: " + ", ".join(f"{n} ({why})" for n, why in info["left"].items())
    return note


def _check_nbits(path: Path, model: nn.Module, inputs: Any) -> str:
    if quantizes_activations(model):  # QAT layers left in the fp32 export: one rounding step apart
        err = check_onnx(path, model, inputs, atol=_int8_tolerance(model, inputs))
        return f"ONNX Runtime max abs diff vs PyTorch {err:.2e}"
    # accuracy_level 4 rounds activations to int8 per block (MiniLM's embeddings: ~25 dB; level 0:
    # ~70 dB and more); a wrong graph is near 0 dB
    return f"ONNX Runtime vs PyTorch output SQNR {_check_sqnr(path, model, inputs, min_db=15.0):.1f} dB"


register_exporter("static_int8", Exporter(FakeQuant, _write_static_int8, _check_static_int8))
register_exporter("dynamic_int8", Exporter(DynamicInt8Linear, _write_dynamic_int8, _check_dynamic_int8))
register_exporter("nbits", Exporter(QuantLinear, _write_nbits, _check_nbits))


def _check_sqnr(path: Path, model: nn.Module, inputs: Any, min_db: float = 10.0) -> float:
    """Output SQNR of the ONNX file against the PyTorch model. ONNX Runtime's dynamic int8 rounds
    other numbers than ours (its own weight scales, activation ranges per call), so the outputs
    are compared as signals: a correct graph scores ~15-40 dB, a wrong one ~0 dB or less."""
    session = ort_session(path, threads=None)
    got = torch.from_numpy(session.run(None, ort_feeds(session, inputs))[0])
    with torch.no_grad():
        ref = call_model(model.eval(), inputs)
    ref = ref if isinstance(ref, torch.Tensor) else next(iter(ref.values() if isinstance(ref, dict) else ref))
    if got.shape != ref.shape:
        raise OnnxMismatchError(f"{path}: ONNX output has shape {tuple(got.shape)}, PyTorch {tuple(ref.shape)}")
    db = float(sqnr(ref.float(), got.float()))
    if not db >= min_db:  # NaN fails too
        raise OnnxMismatchError(f"{path}: ONNX Runtime output SQNR {db:.1f} dB against PyTorch (< {min_db:g} dB)",
                                hint="the int8 graph does not compute what the model does; report it with the model")
    return db


def quantizes_activations(model: nn.Module) -> bool:
    """True when some layer fake-quantizes its input (QAT / AdaRound / mixed precision with ``act_bits``)."""
    return any(getattr(m, "act_bits", None) is not None for m in model.modules())


def output_tolerance(model: nn.Module, out: torch.Tensor) -> float:
    """How far another runtime's output may be from PyTorch's output ``out``: one rounding step for a
    model that quantizes activations (:func:`_int8_tolerance`), else 1e-3 of the output range (at least 1e-4)."""
    if quantizes_activations(model) or any(isinstance(m, FakeQuant) for m in model.modules()):
        return _int8_bound(out)
    return max(1e-3 * float(out.abs().max()), 1e-4)


def _int8_tolerance(model: nn.Module, inputs: Any) -> float:
    """5% of the largest output magnitude: a wrong graph misses by far more, rounding by less."""
    with torch.no_grad():
        out = call_model(model.eval(), inputs)
    out = out if isinstance(out, torch.Tensor) else next(iter(out.values() if isinstance(out, dict) else out))
    return _int8_bound(out)


def _int8_bound(out: torch.Tensor) -> float:
    return 0.05 * float(out.abs().max()) + 1e-3


# -- OpenVINO IR ---------------------------------------------------------------------------------
def _check_ir_output(model: nn.Module, got: torch.Tensor, ref: torch.Tensor) -> str:
    """OpenVINO's output against PyTorch's. Dynamic int8 and weight-only int4 files quantize activations
    at run time with ranges of their own, so those outputs are compared as signals (SQNR, as their ONNX
    checks do); the others within :func:`output_tolerance`."""
    exporter = exporter_for(model)
    if got.shape != ref.shape:
        raise ov_files.OpenVinoMismatchError(f"OpenVINO's output has shape {tuple(got.shape)}, PyTorch's "
                                             f"{tuple(ref.shape)}; nothing was written",
                                             hint="export to ONNX (-o model.onnx) and report the model")
    if exporter is not None and exporter.marker is not FakeQuant:
        db = float(sqnr(ref.float(), got.float()))
        if not db >= 10.0:
            raise ov_files.OpenVinoMismatchError(f"OpenVINO's output SQNR against PyTorch is {db:.1f} dB (< 10 dB); "
                                                 "nothing was written",
                                                 hint="export to ONNX (-o model.onnx) and report the model")
        return f"OpenVINO vs PyTorch output SQNR {db:.1f} dB"
    err = float((got.float() - ref.float()).abs().max())
    atol = output_tolerance(model, ref)  # from the output just computed: the model runs once
    if not err <= atol:
        raise ov_files.OpenVinoMismatchError(
            f"OpenVINO's output differs from PyTorch's by {err:.3g} (> {atol:.3g}); nothing was written",
            hint="export to ONNX (-o model.onnx) and report the model")
    return f"OpenVINO max abs diff vs PyTorch {err:.2e}"


def export_openvino(model: nn.Module, example_inputs: Any, path: str | os.PathLike, *, check: bool = True,
                    **deploy: Any) -> ov_files.OpenVinoExport:
    """Write ``model`` as OpenVINO IR at ``path`` (``.xml``; the weights go to the ``.bin`` next to it).

    ``deploy`` goes to :func:`~modelpress.export.deploy.export_deployable` (``embedding_bits``,
    ``accuracy_level``). With ``check`` the IR runs on ``example_inputs`` and must match PyTorch (a
    float model within 1e-3 of the output range; a quantized one within one rounding step, as ONNX).
    """
    path = Path(path)
    if path.suffix != ".xml":
        raise ConfigError(f"an OpenVINO IR is written as NAME.xml (+ NAME.bin), not {path.name}",
                          hint="use -o model.xml")
    require("openvino", "openvino")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp_onnx = path.with_name(f".{path.stem}.partial.onnx")
    tmp_xml = path.with_name(f".{path.stem}.partial.xml")
    tmp_bin = tmp_xml.with_suffix(".bin")
    try:
        _, note = export_deployable(model, example_inputs, tmp_onnx, check=False, **deploy)
        ov_files.onnx_to_ir(tmp_onnx, tmp_xml)
        if check:
            got = ov_files.run_ir(tmp_xml, example_inputs)
            with torch.no_grad():
                ref = call_model(model.eval(), example_inputs)
            ref = ref if isinstance(ref, torch.Tensor) else next(iter(ref.values() if isinstance(ref, dict) else ref))
            note += "; " + _check_ir_output(model, got, ref)
        os.replace(tmp_bin, path.with_suffix(".bin"))  # weights first: an .xml never points at a missing .bin
        os.replace(tmp_xml, path)
    finally:
        for f in (tmp_onnx, tmp_xml, tmp_bin):
            if f.exists():
                f.unlink()
    size = path.stat().st_size + path.with_suffix(".bin").stat().st_size
    return ov_files.OpenVinoExport(path, size, f"OpenVINO IR from {note}")
