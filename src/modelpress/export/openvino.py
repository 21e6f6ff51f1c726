"""OpenVINO IR (``.xml`` + ``.bin``) of a model, from modelpress's own ONNX file: the pieces that
need OpenVINO (:func:`onnx_to_ir`, :func:`run_ir`); :func:`~modelpress.export.deploy.export_openvino`
writes a model with them.

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

from ..core.errors import DataError, ModelpressError, require
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


#: OpenVINO's CPU plug-in computes float layers in bf16 by default on CPUs that have it (AVX-512 BF16,
#: AMX): an fp32 file would then differ from PyTorch by ~1e-3 and fail every check. fp32 means fp32.
CPU_CONFIG = {"INFERENCE_PRECISION_HINT": "f32"}


def run_ir(xml_path: str | os.PathLike, inputs: Any) -> torch.Tensor:
    """The first output of the IR (or ONNX file) on ``inputs``, run by OpenVINO on the CPU."""
    ov = require("openvino", "openvino")
    compiled = ov.Core().compile_model(str(xml_path), "CPU", CPU_CONFIG)
    feeds = feeds_for(compiled.inputs, onnx_inputs(inputs))
    return torch.from_numpy(np.asarray(compiled(feeds)[compiled.outputs[0]]))


def feeds_for(ports: Any, arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """``arrays`` keyed for OpenVINO's input ``ports``: a port may carry several tensor names (the
    graph input's and that of an op OpenVINO fused into it, e.g. a Flatten), so each port is fed by
    whichever of its names the inputs have."""
    feeds = {}
    for port in ports:
        name = next((n for n in sorted(port.get_names()) if n in arrays), None)
        if name is None:
            raise DataError(f"the OpenVINO model takes an input named {port.get_any_name()!r}, got {sorted(arrays)}",
                            hint="pass the inputs in the structure the model was exported with")
        feeds[name] = arrays[name]
    return feeds
