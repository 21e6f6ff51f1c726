"""Deploy a dynamically quantized model (``quant.dynamic_int8``) as an int8 ONNX model for ONNX Runtime.

Our eager ``DynamicInt8Linear`` is the compact *storage* form and runs fbgemm's int8 kernel in
PyTorch; ONNX Runtime's int8 ``MatMulInteger`` / ``DynamicQuantizeMatMul`` kernels are faster on
the CPUs we measured (MiniLM, batch 32, 1 thread: ORT dynamic int8 1.78x fp32 eager against our
eager 1.54x; ``python benchmarks/quant_dynamic.py``). So the deployable file is built by
ONNX Runtime's own quantizer from the float graph:

1. the float model (weights as the quantized model dequantizes them) is exported to ONNX;
2. optionally, ``nn.Embedding`` lookups (``Gather`` on a constant table) are stored as 4-bit
   blocks (``GatherBlockQuantized``, ``onnxruntime.quantization.matmul_nbits_quantizer``): the
   word embeddings are half of a small BERT's bytes, and a lookup costs nothing at run time;
3. ``onnxruntime.quantization.quantize_dynamic`` stores every ``MatMul`` / ``Gemm`` weight as
   int8, one scale per output channel, with ``reduce_range`` (7-bit weights: without VNNI the
   AVX2 int8 kernel adds pairs of u8 x s8 products in a saturating int16, see
   :mod:`modelpress.quantization.dynamic`).

``embedding_bits``: 8 (ONNX Runtime's default int8 ``Gather``), 4, or ``None`` (float tables).
The 4-bit tables need opset >= 18 in the float graph (the quantizer moves the model to opset 21;
from 18 on, reductions take their axes as an input, so older graphs break).
"""
from __future__ import annotations

import contextlib
import logging
import os
import warnings
from pathlib import Path
from typing import Any, Literal

from ..core.errors import ConfigError, MissingDependencyError
from ..core.io import atomic_path

EmbeddingBits = Literal[4, 8, None]


@contextlib.contextmanager
def _quiet_ort():
    """The ORT quantizers log a pre-processing suggestion per call and warn on opset upgrades."""
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        root.setLevel(level)


def _ort_quantization():
    try:
        import onnx
        from onnxruntime import quantization
    except ImportError as exc:  # pragma: no cover - onnxruntime is a core dependency
        raise MissingDependencyError("ONNX Runtime quantization needs onnx and onnxruntime",
                                     hint="pip install 'modelpress[onnx]'") from exc
    return onnx, quantization


def _embedding_int4(onnx, src: Path, dest: Path, block_size: int) -> int:
    """Store constant-table ``Gather`` nodes as 4-bit blocks; returns how many were converted."""
    from onnxruntime.quantization import QuantFormat
    from onnxruntime.quantization import matmul_nbits_quantizer as mnq

    model = onnx.load(str(src))
    cfg = mnq.DefaultWeightOnlyQuantConfig(block_size=block_size, is_symmetric=True, bits=4,
                                           quant_format=QuantFormat.QOperator, op_types_to_quantize=("Gather",))
    q = mnq.MatMulNBitsQuantizer(model, algo_config=cfg)
    q.process()
    q.model.save_model_to_file(str(dest), False)
    return sum(n.op_type == "GatherBlockQuantized" for n in q.model.model.graph.node)


def quantize_onnx_dynamic(src: str | os.PathLike, dest: str | os.PathLike, *, embedding_bits: EmbeddingBits = 8,
                          block_size: int = 32, per_channel: bool = True, reduce_range: bool = True) -> dict[str, Any]:
    """Write the dynamic-int8 version of the float ONNX model ``src`` to ``dest`` (atomically).

    Returns ``{"path", "bytes", "int4_tables"}``.
    """
    if embedding_bits not in (4, 8, None):
        raise ConfigError(f"embedding_bits={embedding_bits!r} is not supported", hint="use 8, 4 or None (float)")
    if block_size < 16 or block_size & (block_size - 1):
        raise ConfigError(f"block_size={block_size} must be a power of two >= 16",
                          hint="32 (the default) keeps 4-bit tables within ~1% of fp32 on MiniLM")
    onnx, quantization = _ort_quantization()
    src, dest = Path(src), Path(dest)
    if not src.is_file():
        raise ConfigError(f"{src} does not exist", hint="export the float model first (export_onnx)")
    dest.parent.mkdir(parents=True, exist_ok=True)
    int4 = 0
    with atomic_path(dest) as tmp, _quiet_ort():
        ops = ["MatMul", "Gemm"] + (["Gather"] if embedding_bits == 8 else [])
        extra: dict[str, Any] = {}
        if embedding_bits == 4:
            mid = Path(tmp).with_name(Path(tmp).name + ".int4.onnx")
            try:
                int4 = _embedding_int4(onnx, src, mid, block_size)
                # the 4-bit Gather is a contrib op shape inference cannot type: its outputs are float
                extra["DefaultTensorType"] = onnx.TensorProto.FLOAT
                quantization.quantize_dynamic(str(mid), str(tmp), weight_type=quantization.QuantType.QInt8,
                                              per_channel=per_channel, reduce_range=reduce_range,
                                              op_types_to_quantize=ops, extra_options=extra)
            finally:
                if mid.exists():
                    mid.unlink()
        else:
            quantization.quantize_dynamic(str(src), str(tmp), weight_type=quantization.QuantType.QInt8,
                                          per_channel=per_channel, reduce_range=reduce_range,
                                          op_types_to_quantize=ops)
    return {"path": dest, "bytes": dest.stat().st_size, "int4_tables": int4}
