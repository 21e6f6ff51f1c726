"""Export a compressed model in the format that runs it: the one entry point behind ``modelpress export``.

* a statically quantized model (``quant.static_int8``) -> ONNX QDQ int8
  (:func:`modelpress.export.onnx_quant.export_int8_onnx`);
* a dynamically quantized model (``quant.dynamic_int8``) -> ONNX Runtime dynamic int8, built
  from the float graph by ONNX Runtime's quantizer (:mod:`modelpress.export.onnx_dynamic`;
  ``embedding_bits=4`` stores embedding tables as 4-bit blocks);
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


def is_dynamic_int8(model: nn.Module) -> bool:
    from ..quantization.dynamic import DynamicInt8Linear

    return any(isinstance(m, DynamicInt8Linear) for m in model.modules())


def float_copy(model: nn.Module) -> nn.Module:
    """A copy of a dynamically quantized model with plain ``nn.Linear`` / ``nn.Embedding`` layers
    holding the dequantized weights (what ONNX Runtime's quantizer starts from)."""
    import copy

    import torch

    from ..quantization.dynamic import DynamicInt8Linear, Int8Embedding

    out = copy.deepcopy(model)
    for name, m in list(out.named_modules()):
        if isinstance(m, DynamicInt8Linear):
            w = m.dequantized_weight()
            new = nn.Linear(w.shape[1], w.shape[0], bias=m.bias is not None)
        elif isinstance(m, Int8Embedding):
            w = m.dequantized_weight()
            new = nn.Embedding(w.shape[0], w.shape[1], padding_idx=getattr(m, "padding_idx", None))
        else:
            continue
        with torch.no_grad():
            new.weight.copy_(w)
            if isinstance(new, nn.Linear) and m.bias is not None:
                new.bias.copy_(m.bias)
        parent, _, child = name.rpartition(".")
        setattr(out.get_submodule(parent) if parent else out, child, new)
    return out


def export_deployable(model: nn.Module, example_inputs: Any, path: str | os.PathLike, *,
                      check: bool = True, embedding_bits: int | None = 8) -> tuple[Path, str]:
    """Write ``model`` to the ONNX file ``path``; returns ``(path, note)``.

    ``embedding_bits`` applies to dynamically quantized models (8, 4 or None for float tables).
    """
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
        elif is_dynamic_int8(model):
            from .onnx_dynamic import quantize_onnx_dynamic

            flt = tmp.with_name(f".{path.name}.float.onnx")
            try:
                export_onnx(float_copy(model), example_inputs, flt, opset=20 if embedding_bits == 4 else 17)
                info = quantize_onnx_dynamic(flt, tmp, embedding_bits=embedding_bits)
            finally:
                if flt.exists():
                    flt.unlink()
            tables = {8: "int8", 4: f"4-bit ({info['int4_tables']} tables)", None: "float"}[embedding_bits]
            note, atol = f"ONNX Runtime dynamic int8 (MatMul weights int8 per channel, embedding tables {tables})", None
        else:
            export_onnx(model, example_inputs, tmp)
            note, atol = "fp32", 1e-4
        if check and is_dynamic_int8(model):
            db = _check_sqnr(tmp, model, example_inputs)
            note += f"; ONNX Runtime vs PyTorch output SQNR {db:.1f} dB"
        elif check:
            err = check_onnx(tmp, model, example_inputs, atol=atol if atol is not None else _int8_tolerance(model, example_inputs))
            note += f"; ONNX Runtime max abs diff vs PyTorch {err:.2e}"
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path, note


def _check_sqnr(path: Path, model: nn.Module, inputs: Any, min_db: float = 10.0) -> float:
    """Output SQNR of the ONNX file against the PyTorch model. ONNX Runtime's dynamic int8 rounds
    other numbers than ours (its own weight scales, activation ranges per call), so the outputs
    are compared as signals: a correct graph scores ~15-40 dB, a wrong one ~0 dB or less."""
    import torch

    from ..core.data import call_model
    from ..quantization.primitives import sqnr
    from .onnx import OnnxMismatchError, ort_feeds, ort_session

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


def _int8_tolerance(model: nn.Module, inputs: Any) -> float:
    """5% of the largest output magnitude: a wrong graph misses by far more, rounding by less."""
    import torch

    from ..core.data import call_model

    with torch.no_grad():
        out = call_model(model.eval(), inputs)
    out = out if isinstance(out, torch.Tensor) else next(iter(out.values() if isinstance(out, dict) else out))
    return 0.05 * float(out.abs().max()) + 1e-3
