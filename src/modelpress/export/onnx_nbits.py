"""Weight-only low-bit Linear layers as ONNX Runtime's ``MatMulNBits`` (int2 / int4 / int8 blocks).

A packed :class:`~modelpress.quantization.modules.QuantLinear` (``quant.weight_only``,
``quant.gptq``) exports as one ``com.microsoft.MatMulNBits`` node: its integers stay integers in
the file (``B``: ``[N, K / block, block * bits / 8]`` bytes) with one fp32 scale per block (and
packed zero points when asymmetric), and ONNX Runtime's CPU kernels dequantize block by block
inside the matmul. The file is as small as the artifact, and the matmul reads a quarter of the
fp32 bytes at int4.

ONNX Runtime supports 2, 4 and 8 bits and power-of-two blocks of at least 16. Every width maps
exactly: 3-bit integers sit in 4-bit containers, 5- to 7-bit in 8-bit ones (the values are the
same integers; the container only has room to spare). A per-channel (or per-tensor) scale is
repeated over the blocks of its row. Layers that cannot go (a group size that is not a power of two
of at least 16, an activation quantizer from QAT) keep the fp32 export of their dequantized
weight; the note names them.

``accuracy_level`` (ONNX Runtime's attribute): 0 computes in fp32 from the dequantized blocks;
4 quantizes the activations to int8 per block as well (faster on some CPUs, a little less exact).
"""
from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ..nn.modules import set_module
from ..quantization.modules import QuantLinear
from ..quantization.primitives import unpack_bits
from .onnx import export_onnx

CONTAINERS = (2, 4, 8)  # widths ONNX Runtime's MatMulNBits supports
MS_DOMAIN = "com.microsoft"


def container_bits(bits: int) -> int:
    """The smallest width MatMulNBits supports that holds ``bits``-bit integers exactly."""
    return next(c for c in CONTAINERS if c >= bits)


def block_size(layer: QuantLinear, preferred: int = 128) -> int | str:
    """The MatMulNBits block of ``layer`` (its group size, or ``preferred`` for per-channel
    scales), or why it has none."""
    spec = layer.qspec
    if spec.granularity == "group":
        g = spec.group_size
        if g < 16 or g & (g - 1):
            return f"group size {g} is not a power of two >= 16 (MatMulNBits blocks)"
        return g
    k = layer.in_features
    return max(16, min(preferred, 1 << max(k - 1, 1).bit_length()))


def _pack_blocks(u: np.ndarray, bits: int) -> np.ndarray:
    """Unsigned ``bits``-bit integers ``[..., n]`` packed little-endian into bytes ``[..., n * bits / 8]``."""
    stream = np.unpackbits(u[..., None].astype(np.uint8), axis=-1, bitorder="little")[..., :bits]
    return np.packbits(stream.reshape(*u.shape[:-1], -1), axis=-1, bitorder="little")


def _per_block(t: torch.Tensor, n: int, blocks: int) -> torch.Tensor:
    """A layer's scales or zero points (one per tensor, output channel or block) as ``(N, blocks)``."""
    t = t.detach().float().cpu().reshape(-1)
    if t.numel() == 1:
        return t.reshape(1, 1).expand(n, blocks)
    t = t.reshape(n, -1)
    return t if t.shape[1] == blocks else t[:, :1].expand(n, blocks)


def nbits_tensors(layer: QuantLinear, block: int) -> dict[str, Any]:
    """``B`` (uint8 ``[N, blocks, block * c / 8]``), ``scales`` (fp32 ``[N * blocks]``), ``zero_points``
    (uint8, packed per row, or None when symmetric) and the attributes of ``layer``'s MatMulNBits."""
    spec = layer.qspec
    n, k = layer.out_features, layer.in_features
    c = container_bits(spec.bits)
    blocks = -(-k // block)
    ints = unpack_bits(layer.qweight.cpu(), spec.bits, n * k, spec.signed).reshape(n, k).numpy().astype(np.int32)
    scales = _per_block(layer.scale, n, blocks)
    if spec.symmetric:
        offset = 1 << (c - 1)                      # MatMulNBits' default zero point
        u = ints + offset
        zeros, pad = None, np.full((n, 1), offset, np.int32)
    else:
        z = _per_block(layer.zero, n, blocks).round().to(torch.int32).numpy()
        u = ints
        zeros = _pack_blocks(z.astype(np.uint8), c).reshape(-1)
        pad = z[:, -1:]
    if blocks * block > k:                         # the last block padded with its zero point: exact zeros
        u = np.concatenate([u, np.repeat(pad, blocks * block - k, axis=1)], axis=1)
    packed = _pack_blocks(u.reshape(n, blocks, block).astype(np.uint8), c)
    return {"B": packed, "scales": scales.contiguous().reshape(-1).numpy().astype(np.float32), "zero_points": zeros,
            "K": k, "N": n, "bits": c, "block_size": block}


class _MatMulNBits(torch.autograd.Function):
    """Eager: ``x @ W^T`` with the dequantized weight; ONNX (TorchScript exporter): one MatMulNBits node."""

    @staticmethod
    def forward(ctx, x, weight, packed, scales, zeros, k, n, bits, block, level):
        return x.matmul(weight.t())

    @staticmethod
    def symbolic(g, x, weight, packed, scales, zeros, k, n, bits, block, level):
        inputs = [x, packed, scales] + ([zeros] if zeros is not None else [])
        out = g.op(f"{MS_DOMAIN}::MatMulNBits", *inputs, K_i=k, N_i=n, bits_i=bits, block_size_i=block,
                   accuracy_level_i=level)
        sizes = x.type().varyingSizes() if hasattr(x.type(), "varyingSizes") else None
        if sizes:  # the output's type, for the exporter's shape inference: [..., N]
            out.setType(x.type().with_sizes([*sizes[:-1], n]))
        return out


class NBitsLinear(nn.Module):
    """Export-only stand-in for a :class:`QuantLinear`: computes the same, traces as MatMulNBits."""

    def __init__(self, layer: QuantLinear, block: int, accuracy_level: int = 0):
        super().__init__()
        t = nbits_tensors(layer, block)
        self.k, self.n, self.bits, self.block, self.level = t["K"], t["N"], t["bits"], block, accuracy_level
        device = layer.qweight.device
        self.register_buffer("packed", torch.from_numpy(t["B"].copy()).to(device))
        self.register_buffer("scales", torch.from_numpy(t["scales"].copy()).to(device))
        zeros = t["zero_points"]
        self.register_buffer("zeros", None if zeros is None else torch.from_numpy(zeros.copy()).to(device))
        self.register_buffer("weight", layer.weight.detach().clone())
        self.bias = None if layer.bias is None else nn.Parameter(layer.bias.detach().clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = _MatMulNBits.apply(x, self.weight, self.packed, self.scales, self.zeros, self.k, self.n, self.bits,
                               self.block, self.level)
        return y if self.bias is None else y + self.bias


def nbits_copy(model: nn.Module, accuracy_level: int = 0) -> tuple[nn.Module, list[str], dict[str, str]]:
    """A copy of ``model`` whose weight-only QuantLinear layers are :class:`NBitsLinear`:
    ``(copy, replaced, left)`` (``left``: layer -> why it keeps an fp32 export)."""
    out = copy.deepcopy(model)
    replaced, left = [], {}
    for name, m in list(out.named_modules()):
        if not isinstance(m, QuantLinear):
            continue
        if m.act_bits is not None:
            left[name] = "quantizes its activations (QAT): exported as QDQ-free fp32"
            continue
        block = block_size(m)
        if isinstance(block, str):
            left[name] = block
            continue
        set_module(out, name, NBitsLinear(m, block, accuracy_level))
        replaced.append(name)
    return out, replaced, left


def export_nbits_onnx(model: nn.Module, example_inputs: Any, path: str | Path, *, accuracy_level: int = 0,
                      opset: int = 17) -> dict:
    """Write ``model`` with its weight-only Linear layers as MatMulNBits; returns what went where."""
    copy_, replaced, left = nbits_copy(model, accuracy_level)
    path = Path(path)
    export_onnx(copy_, example_inputs, path, opset=opset, exporter="torchscript")
    import onnx  # here, not at the top: ml_dtypes costs every command 0.5 s of start-up

    proto = onnx.load(str(path))
    if replaced and not any(op.domain == MS_DOMAIN for op in proto.opset_import):
        proto.opset_import.append(onnx.helper.make_opsetid(MS_DOMAIN, 1))
        onnx.save(proto, str(path))
    nodes = sum(1 for node in proto.graph.node if node.op_type == "MatMulNBits")
    return {"matmulnbits": nodes, "replaced": replaced, "left": left}
