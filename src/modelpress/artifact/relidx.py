"""Relative-index sparse encoding (``relidx``), as in Deep Compression (Han et al., ICLR 2016).

A sparse tensor is stored as a list of entries ``(gap, value)``: ``gap`` is the number of
zeros skipped since the previous entry, in ``bits`` bits (4, 8 or 16, chosen per tensor),
``value`` the non-zero in the tensor's own dtype. A run of zeros longer than a gap can
say is bridged by *filler* entries (gap ``2**bits - 1``, value 0), exactly the padding
zeros of the paper's Figure 2. Decoding is a cumulative sum and one scatter; it is exact.

Cost per tensor: ``entries * (element_size + bits/8)`` bytes, against the bitmask's
``numel/8 + nnz * element_size``. With fp32 values and 8-bit gaps that is 5 bytes per
non-zero against ``4 + 1/(8*density)``: the relative index wins above ~87.5% sparsity
(uniform zeros), the bitmask below it. :func:`~modelpress.artifact.checkpoint.save_artifact`
tries both and keeps the smaller per tensor, so callers never choose.

    >>> import torch
    >>> from modelpress.artifact.relidx import encode_relidx, decode_relidx
    >>> t = torch.zeros(1000); t[[3, 700, 999]] = torch.tensor([1.5, -2.0, 3.0])
    >>> parts, info = encode_relidx(t, bits=8)
    >>> info["count"]  # 3 values + fillers: 696 zeros need 2 (256 positions each), 298 need 1
    6
    >>> torch.equal(decode_relidx(parts, info), t)
    True
"""
from __future__ import annotations

import numpy as np
import torch

from ..core.errors import ModelLoadError

WIDTHS = (4, 8, 16)


def relative_gaps(positions: np.ndarray, bits: int) -> tuple[np.ndarray, np.ndarray]:
    """Gaps (with fillers) for sorted non-zero ``positions``; also where the real entries are.

    Returns ``(gaps, real)``: ``gaps[i]`` zeros precede entry ``i``; entry ``real[j]``
    holds the ``j``-th non-zero, every other entry is a filler.
    """
    span = 1 << bits
    skipped = np.diff(positions, prepend=-1) - 1  # zeros before each non-zero
    fillers = skipped // span                    # each filler entry moves ``span`` positions
    counts = fillers + 1
    real = np.cumsum(counts) - 1
    gaps = np.full(int(counts.sum()), span - 1, dtype=np.int64)
    gaps[real] = skipped - fillers * span
    return gaps, real


def _pack(gaps: np.ndarray, bits: int) -> np.ndarray:
    if bits == 4:
        if len(gaps) % 2:
            gaps = np.append(gaps, 0)
        return (gaps[0::2] | (gaps[1::2] << 4)).astype(np.uint8)
    if bits == 8:
        return gaps.astype(np.uint8)
    return gaps.astype("<u2").view(np.uint8)


def _unpack(packed: np.ndarray, bits: int, count: int) -> np.ndarray:
    if bits == 4:
        out = np.empty(2 * len(packed), dtype=np.int64)
        out[0::2], out[1::2] = packed & 0xF, packed >> 4
    elif bits == 8:
        out = packed.astype(np.int64)
    else:
        out = packed.view("<u2").astype(np.int64)
    if len(out) < count:
        raise ModelLoadError("relidx tensor: fewer gaps than entries (corrupt file)")
    return out[:count]


def negative_zeros(flat: torch.Tensor) -> dict[str, torch.Tensor]:
    """``{"negzero": bits}``: the sign bits of the zero entries, packed (in order), when any zero is
    -0.0; else ``{}``. The sparse encodings store only the non-zeros and decode zeros as +0.0: this
    part makes them bit-exact, at one bit per zero, paid only by tensors holding a -0.0 (masks that
    multiply a negative weight by 0 make one; modelpress's own masks give +0.0)."""
    if not flat.is_floating_point():
        return {}
    zero = flat == 0
    signs = torch.signbit(flat[zero])
    if not bool(signs.any()):
        return {}
    return {"negzero": torch.from_numpy(np.packbits(signs.numpy().astype(np.uint8)))}


def restore_negative_zeros(out: torch.Tensor, parts: dict[str, torch.Tensor]) -> torch.Tensor:
    """Inverse of :func:`negative_zeros` on a decoded flat tensor (in place); returns ``out``."""
    if "negzero" not in parts:
        return out
    zero = out == 0
    count = int(zero.sum())
    signs = np.unpackbits(parts["negzero"].numpy())
    if signs.size < count or signs.size >= count + 8:
        raise ModelLoadError("sparse tensor: the zeros' sign bits disagree with the bitmask (corrupt file)")
    out[zero] = torch.where(torch.from_numpy(signs[:count].astype(bool)), -0.0, 0.0).to(out.dtype)
    return out


def encoded_bytes(count: int, bits: int, element_size: int) -> int:
    return count * element_size + (count * bits + 7) // 8


def encode_relidx(t: torch.Tensor, bits: int | None = None):
    """``(parts, info)`` of ``t`` with the given gap width (default: the smallest result)."""
    flat = t.detach().reshape(-1).contiguous().cpu()
    positions = torch.nonzero(flat != 0).squeeze(1).numpy()
    widths = (bits,) if bits is not None else WIDTHS
    best = None
    for b in widths:
        gaps, real = relative_gaps(positions, b)
        size = encoded_bytes(len(gaps), b, flat.element_size())
        if best is None or size < best[0]:
            best = (size, b, gaps, real)
    _, b, gaps, real = best
    values = torch.zeros(len(gaps), dtype=flat.dtype)
    values[torch.from_numpy(real)] = flat[torch.from_numpy(positions)]
    parts = {"gaps": torch.from_numpy(_pack(gaps, b)), "values": values, **negative_zeros(flat)}
    return parts, {"shape": list(t.shape), "bits": b, "count": len(gaps)}  # dtype: the values' own


def decode_relidx(parts: dict[str, torch.Tensor], info: dict) -> torch.Tensor:
    numel = int(np.prod(info["shape"])) if info["shape"] else 1
    count, values = int(info["count"]), parts["values"]
    if values.numel() != count:
        raise ModelLoadError("relidx tensor: value count disagrees with the header (corrupt file)")
    gaps = _unpack(parts["gaps"].numpy(), int(info["bits"]), count)
    positions = np.cumsum(gaps + 1) - 1
    if count and positions[-1] >= numel:
        raise ModelLoadError("relidx tensor: indices run past the tensor's end (corrupt file)")
    out = torch.zeros(numel, dtype=values.dtype)
    out[torch.from_numpy(positions)] = values
    return restore_negative_zeros(out, parts).reshape(info["shape"])


def encode_relidx_if_smaller(t: torch.Tensor):
    """:func:`encode_relidx` when it makes ``t`` smaller than its raw bytes, else None."""
    if not t.is_floating_point() or t.numel() < 64:
        return None
    parts, info = encode_relidx(t)
    extra = parts["negzero"].numel() if "negzero" in parts else 0
    if encoded_bytes(info["count"], info["bits"], t.element_size()) + extra >= t.numel() * t.element_size():
        return None
    return parts, info
