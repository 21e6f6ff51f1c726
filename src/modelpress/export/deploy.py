"""Export a compressed model in the format that runs it: the one entry point behind ``modelpress export``.

* a statically quantized model (``quant.static_int8``) -> ONNX QDQ int8
  (:func:`modelpress.export.onnx_quant.export_int8_onnx`);
* anything else -> fp32 ONNX (:func:`modelpress.export.onnx.export_onnx`); layers that store
  packed low-bit weights export their dequantized weights (the artifact is the compact form).

With ``check=True`` the file is run in ONNX Runtime on the example input and compared with
the PyTorch model; a mismatch raises instead of leaving a wrong file behind.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from torch import nn


def is_static_int8(model: nn.Module) -> bool:
    from ..quantization.static import FakeQuant

    return any(isinstance(m, FakeQuant) for m in model.modules())


def export_deployable(model: nn.Module, example_inputs: Any, path: str | os.PathLike, *,
                      check: bool = True) -> tuple[Path, str]:
    """Write ``model`` to the ONNX file ``path``; returns ``(path, note)``."""
    from .onnx import check_onnx, export_onnx

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.partial.onnx")  # checked first, then moved into place
    try:
        if is_static_int8(model):
            from .onnx_quant import export_int8_onnx

            export_int8_onnx(model, example_inputs, tmp)
            # int8 kernels round (x * scale) products differently from the fake-quant model, so the
            # check bounds the difference by the output range instead of a float tolerance
            note, atol = "int8 QDQ (static W8A8)", None
        else:
            export_onnx(model, example_inputs, tmp)
            note, atol = "fp32", 1e-4
        if check:
            err = check_onnx(tmp, model, example_inputs, atol=atol if atol is not None else _int8_tolerance(model, example_inputs))
            note += f"; ONNX Runtime max abs diff vs PyTorch {err:.2e}"
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path, note


def _int8_tolerance(model: nn.Module, inputs: Any) -> float:
    """5% of the largest output magnitude: a wrong graph misses by far more, rounding by less."""
    import torch

    from ..core.data import call_model

    with torch.no_grad():
        out = call_model(model.eval(), inputs)
    out = out if isinstance(out, torch.Tensor) else next(iter(out.values() if isinstance(out, dict) else out))
    return 0.05 * float(out.abs().max()) + 1e-3
