"""Tensor encodings of the artifact: how a tensor is stored smaller on disk, and read back.

An encoding is ``encode(tensor) -> (parts, info) | None`` (None: it would not make the tensor
smaller) and ``decode(parts, info) -> tensor``. Built in:

=============  =====================================================================  =======
``sparse``     packed bitmask + the non-zero values                                   auto
``relidx``     relative indices + values (Deep Compression; :mod:`.relidx`)            auto
``integral``   a float tensor of whole numbers (an asymmetric quantizer's zero         auto
               points) as bit-packed offsets from its minimum: int4 zero points take
               4 bits, not 32
``huffman``    integer index streams, Huffman-coded (:mod:`.huffman`)                 opt-in
``codes``      integer index streams, bit-packed without Huffman                      opt-in
=============  =====================================================================  =======

*Auto* encodings are exact and tried on every tensor, the smallest result kept (the first
registered wins a tie); opt-in ones are used for the tensors a method names in
``model.modelpress_encodings`` (a quantizer storing codebook indices names ``"huffman"``).

    >>> import torch
    >>> from modelpress.artifact.encodings import smallest_encoding, decode
    >>> t = torch.zeros(256); t[7] = 1.0
    >>> kind, parts, info = smallest_encoding(t, auto_encodings())
    >>> kind, torch.equal(decode(kind, parts, info), t)
    ('relidx', True)
"""
from __future__ import annotations

from typing import Callable, NamedTuple

import numpy as np
import torch

from ..core.errors import ModelLoadError
from ..core.registry import Registry
from .huffman import decode_indices, encode_codes, encode_huffman, encode_indices
from .relidx import decode_relidx, encode_relidx_if_smaller, negative_zeros, restore_negative_zeros

Encoder = Callable[[torch.Tensor], "tuple[dict[str, torch.Tensor], dict] | None"]
Decoder = Callable[[dict[str, torch.Tensor], dict], torch.Tensor]


class Encoding(NamedTuple):
    encode: Encoder
    decode: Decoder
    auto: bool


ENCODINGS: Registry[Encoding] = Registry("tensor encoding", error=ModelLoadError,
                                         hint="the file was written by a newer modelpress version")


def register_encoding(kind: str, encode: Encoder, decode: Decoder, *, auto: bool = False) -> None:
    """Add a tensor encoding; ``auto=True`` (exact encodings only) tries it on every tensor."""
    ENCODINGS.register(kind, Encoding(encode, decode, auto))


def auto_encodings() -> list[str]:
    """The automatic encodings, in registration order (the order that breaks ties)."""
    return [kind for kind, enc in ENCODINGS.items() if enc.auto]


def decode(kind: str, parts: dict[str, torch.Tensor], info: dict) -> torch.Tensor:
    return ENCODINGS.get(kind).decode(parts, info)


def smallest_encoding(t: torch.Tensor, kinds: list[str]):
    """``(kind, parts, info)`` of the encoding with the fewest bytes (first wins ties), or None."""
    best, best_bytes = None, None
    for kind in kinds:
        res = ENCODINGS.get(kind).encode(t)
        if res is None:
            continue
        size = sum(p.numel() * p.element_size() for p in res[0].values())
        if best_bytes is None or size < best_bytes:
            best, best_bytes = (kind, *res), size
    return best


# -- sparse: packed bitmask + non-zero values (exact) ------------------------------
def encode_sparse(t: torch.Tensor):
    if not t.is_floating_point() or t.numel() < 64:
        return None
    flat = t.detach().reshape(-1).contiguous()
    nz = flat != 0
    nnz = int(nz.sum())
    signs = negative_zeros(flat)  # -0.0 entries: their sign bits, so decoding is bit-exact
    encoded = (t.numel() + 7) // 8 + nnz * t.element_size() + sum(v.numel() for v in signs.values())
    if encoded >= t.numel() * t.element_size():
        return None
    bits = torch.from_numpy(np.packbits(nz.numpy().astype(np.uint8)))
    return {"bitmask": bits, "values": flat[nz].clone(), **signs}, {"shape": list(t.shape)}  # dtype: values' own


def decode_sparse(parts, info):
    numel = int(np.prod(info["shape"])) if info["shape"] else 1
    nz = np.unpackbits(parts["bitmask"].numpy())[:numel].astype(bool)
    values = parts["values"]
    if int(nz.sum()) != values.numel():
        raise ModelLoadError("sparse tensor: bitmask and values disagree (corrupt file)")
    out = torch.zeros(numel, dtype=values.dtype)
    out[torch.from_numpy(nz)] = values
    return restore_negative_zeros(out, parts).reshape(info["shape"])


# -- integral: whole numbers stored as packed offsets from the minimum (exact) -------
#: widest range of whole numbers packed (float32 holds every integer up to 2**24 exactly)
INTEGRAL_RANGE = 2 ** 16


def encode_integral(t: torch.Tensor):
    if not t.is_floating_point() or t.numel() < 16:
        return None
    head = t.detach().reshape(-1)[:256]
    if not torch.equal(head, head.round()):  # a weight: rejected without touching the rest
        return None
    flat = t.detach().reshape(-1).cpu().double()
    if not bool(torch.isfinite(flat).all()) or not torch.equal(flat, flat.round()):
        return None
    if bool((torch.signbit(flat) & (flat == 0)).any()):  # -0.0 would come back as +0.0: not exact
        return None
    lo, hi = int(flat.min()), int(flat.max())
    if hi - lo >= INTEGRAL_RANGE:
        return None
    parts, info = encode_indices((flat - lo).to(torch.int32).reshape(t.shape), huffman=False)
    if parts["data"].numel() >= t.numel() * t.element_size():
        return None
    return parts, {**info, "offset": lo, "float": str(t.dtype).replace("torch.", "")}


def decode_integral(parts, info):
    dtype = getattr(torch, str(info.get("float", "float32")), None)
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ModelLoadError(f"integral tensor: unknown float type {info.get('float')!r} (corrupt file)")
    return (decode_indices(parts, info).double() + int(info.get("offset", 0))).to(dtype)


register_encoding("sparse", encode_sparse, decode_sparse, auto=True)
register_encoding("relidx", encode_relidx_if_smaller, decode_relidx, auto=True)
register_encoding("integral", encode_integral, decode_integral, auto=True)
register_encoding("huffman", encode_huffman, decode_indices)
register_encoding("codes", encode_codes, decode_indices)
