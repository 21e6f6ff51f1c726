"""OpenVINO IR (``.xml`` + ``.bin``) of a model, from modelpress's own ONNX file.

The model is exported as :func:`~modelpress.export.deploy.export_deployable` would for ONNX Runtime
(fp32; int8 QDQ for a statically quantized model), OpenVINO reads that file and saves it as IR
with fp32 weights kept fp32 (``compress_to_fp16=False``: the default would halve the float weights
and change the numbers); a QDQ file's int8 weights stay int8 in the ``.bin`` and run on OpenVINO's
int8 kernels. The IR is then compiled and run on the example inputs and compared with PyTorch
before both files are moved into place, so a wrong or half-written IR is never left behind.

Needs the ``openvino`` extra (``pip install 'modelpress[openvino]'``).
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
from torch import nn

from ..core.data import call_model
from ..core.errors import ConfigError, ModelpressError, require
from .onnx import onnx_inputs


class OpenVinoMismatchError(ModelpressError):
    """OpenVINO's outputs differ from PyTorch's by more than the tolerance."""


class OpenVinoExport(NamedTuple):
    path: Path  # the .xml; its weights are path.with_suffix(".bin")
    bytes: int  # .xml + .bin
    note: str


def onnx_to_ir(onnx_path: str | os.PathLike, xml_path: str | os.PathLike) -> Path:
    """Save the ONNX file as OpenVINO IR (``xml_path`` and its ``.bin``), float weights kept fp32."""
    ov = require("openvino", "openvino")
    try:
        model = ov.Core().read_model(str(onnx_path))
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelpressError(f"OpenVINO cannot read {Path(onnx_path).name}: {first}",
                              hint="export to ONNX (-o model.onnx) and run it in ONNX Runtime instead") from None
    ov.save_model(model, str(xml_path), compress_to_fp16=False)
    return Path(xml_path)


def run_ir(xml_path: str | os.PathLike, inputs: Any) -> torch.Tensor:
    """The first output of the IR (or ONNX file) on ``inputs``, run by OpenVINO on the CPU."""
    ov = require("openvino", "openvino")
    compiled = ov.Core().compile_model(str(xml_path), "CPU")
    arrays = onnx_inputs(inputs)
    feeds = {p.get_any_name(): arrays[p.get_any_name()] for p in compiled.inputs}
    return torch.from_numpy(np.asarray(compiled(feeds)[compiled.outputs[0]]))


def export_openvino(model: nn.Module, example_inputs: Any, path: str | os.PathLike, *, check: bool = True,
                    **deploy: Any) -> OpenVinoExport:
    """Write ``model`` as OpenVINO IR at ``path`` (``.xml``; the weights go to the ``.bin`` next to it).

    ``deploy`` goes to :func:`~modelpress.export.deploy.export_deployable` (``embedding_bits``,
    ``accuracy_level``). With ``check`` the IR runs on ``example_inputs`` and must match PyTorch (a
    float model within 1e-3 of the output range; a quantized one within one rounding step, as ONNX).
    """
    from .deploy import export_deployable, output_tolerance  # deploy dispatches here: imported when called

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
        onnx_to_ir(tmp_onnx, tmp_xml)
        if check:
            got = run_ir(tmp_xml, example_inputs)
            with torch.no_grad():
                ref = call_model(model.eval(), example_inputs)
            ref = ref if isinstance(ref, torch.Tensor) else next(iter(ref.values() if isinstance(ref, dict) else ref))
            err = float((got.float() - ref.float()).abs().max()) if got.shape == ref.shape else float("inf")
            atol = output_tolerance(model, example_inputs)
            if not err <= atol:
                raise OpenVinoMismatchError(
                    f"OpenVINO's output differs from PyTorch's by {err:.3g} (> {atol:.3g}); nothing was written",
                    hint="export to ONNX (-o model.onnx) and report the model")
            note += f"; OpenVINO max abs diff vs PyTorch {err:.2e}"
        os.replace(tmp_bin, path.with_suffix(".bin"))  # weights first: an .xml never points at a missing .bin
        os.replace(tmp_xml, path)
    finally:
        for f in (tmp_onnx, tmp_xml, tmp_bin):
            if f.exists():
                f.unlink()
    size = path.stat().st_size + path.with_suffix(".bin").stat().st_size
    return OpenVinoExport(path, size, f"OpenVINO IR from {note}")
