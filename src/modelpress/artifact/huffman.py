"""Huffman coding of integer index streams, and the ``huffman`` / ``codes`` artifact encodings.

Deep Compression (Han et al., ICLR 2016) stores a pruned, weight-shared layer as two integer
streams: the relative positions of the non-zero weights (gaps, see
:mod:`.relidx`) and the codebook index of each of them. Both are skewed (small gaps
and central clusters are common), so the third stage Huffman-codes them.

* :func:`huffman_encode` / :func:`huffman_decode`: one stream of non-negative integers <->
  ``(packed bitstream uint8, code-length table uint8)``. Codes are *canonical* (the table of
  code lengths alone defines them), at most :data:`MAX_CODE_BITS` long, written MSB first.
  Decoding is vectorized: every bit position is decoded at once by table lookup on a
  ``max length``-bit window, then the symbol starts are found by pointer doubling.
* :func:`encode_indices` / :func:`decode_indices`: the artifact encoding of an integer tensor
  (codebook indices, uint8). It tries a *dense* layout (every entry) and a *sparse* one (the
  entries that are not 0, as relative gaps + their values, 0 standing for "pruned"), each
  stream plain bit-packed or Huffman-coded, and keeps the smallest; exact in every case.
  Registered as encoding ``"huffman"`` (smallest of all) and ``"codes"`` (plain packing only,
  i.e. Deep Compression without its Huffman stage). Methods opt in per tensor through
  ``model.modelpress_encodings`` (see :mod:`.encodings`).

    >>> import numpy as np
    >>> from modelpress.artifact.huffman import huffman_encode, huffman_decode
    >>> s = np.array([0] * 90 + [1] * 6 + [2] * 3 + [3])
    >>> bits, lengths = huffman_encode(s)
    >>> lengths.tolist(), bits.nbytes      # 90 + 12 + 9 + 3 bits instead of 2 bits x 100
    ([1, 2, 3, 3], 15)
    >>> bool((huffman_decode(bits, lengths, len(s)) == s).all())
    True
"""
from __future__ import annotations

import heapq

import numpy as np
import torch

from ..core.errors import DataError, ModelLoadError
from .relidx import relative_gaps

MAX_CODE_BITS = 15  # code lengths fit a nibble; the decode table has at most 2**15 entries
GAP_BITS = (2, 3, 4, 5, 6, 7, 8)  # relative-index widths tried by the sparse layout


# -- Huffman codes -----------------------------------------------------------------
def code_lengths(counts: np.ndarray, max_bits: int = MAX_CODE_BITS) -> np.ndarray:
    """Huffman code length of each symbol (0 where the count is 0), at most ``max_bits``.

    A single used symbol gets length 1. Lengths over ``max_bits`` (only for very skewed
    counts) are clipped and the Kraft sum repaired by lengthening the rarest short codes.
    """
    counts = np.asarray(counts, dtype=np.int64)
    lengths = np.zeros(len(counts), dtype=np.int64)
    used = np.flatnonzero(counts)
    if len(used) == 0:
        return lengths.astype(np.uint8)
    if len(used) == 1:
        lengths[used] = 1
        return lengths.astype(np.uint8)
    if len(used) > 1 << max_bits:
        raise DataError(f"{len(used)} distinct symbols do not fit {max_bits}-bit Huffman codes")
    # Classic construction: merge the two lightest nodes; a leaf's depth is its code length.
    parent = np.full(2 * len(used) - 1, -1, dtype=np.int64)
    heap = [(int(counts[s]), i) for i, s in enumerate(used)]  # node ids 0..n-1 are leaves
    heapq.heapify(heap)
    nxt = len(used)
    while len(heap) > 1:
        c1, a = heapq.heappop(heap)
        c2, b = heapq.heappop(heap)
        parent[a] = parent[b] = nxt
        heapq.heappush(heap, (c1 + c2, nxt))
        nxt += 1
    depth = np.zeros(len(parent), dtype=np.int64)
    for node in range(len(parent) - 2, -1, -1):  # parents have larger ids: walk root -> leaves
        depth[node] = depth[parent[node]] + 1
    lengths[used] = depth[: len(used)]
    if lengths.max() > max_bits:
        lengths[used] = _limit_lengths(lengths[used], counts[used], max_bits)
    return lengths.astype(np.uint8)


def _limit_lengths(lengths: np.ndarray, counts: np.ndarray, max_bits: int) -> np.ndarray:
    lengths = np.minimum(lengths, max_bits)
    budget = 1 << max_bits
    kraft = int((1 << (max_bits - lengths)).sum())
    rarest_first = np.lexsort((counts, -lengths))  # longest codes first, rarest among equals
    while kraft > budget:
        for i in rarest_first:
            if lengths[i] < max_bits:
                kraft -= 1 << (max_bits - lengths[i] - 1)
                lengths[i] += 1
                break
        rarest_first = np.lexsort((counts, -lengths))
    return lengths


def canonical_codes(lengths: np.ndarray) -> np.ndarray:
    """Canonical code values for the given lengths (symbols sorted by (length, symbol))."""
    lengths = np.asarray(lengths, dtype=np.int64)
    codes = np.zeros(len(lengths), dtype=np.int64)
    code, prev = 0, 0
    for s in np.lexsort((np.arange(len(lengths)), lengths)):
        if lengths[s] == 0:
            continue
        code <<= int(lengths[s]) - prev
        codes[s] = code
        code += 1
        prev = int(lengths[s])
    return codes


def huffman_encode(symbols: np.ndarray, lengths: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Huffman-code non-negative integers: ``(bitstream uint8, code-length table uint8)``.

    ``lengths[s]`` is the code length of symbol ``s`` (the table is as long as the largest
    symbol + 1). Pass ``lengths`` to reuse a table; by default it is built from the counts.
    """
    symbols = np.asarray(symbols).reshape(-1).astype(np.int64)
    if symbols.size and symbols.min() < 0:
        raise DataError("Huffman coding takes non-negative integers", hint="offset the values first")
    if lengths is None:
        lengths = code_lengths(np.bincount(symbols) if symbols.size else np.zeros(0, np.int64))
    lengths = np.asarray(lengths, dtype=np.uint8)
    if symbols.size == 0:
        return np.zeros(0, np.uint8), lengths
    codes = canonical_codes(lengths)
    sl = lengths.astype(np.int64)[symbols]
    if (sl == 0).any():
        raise DataError("a symbol has no code in the given code-length table")
    total = int(sl.sum())
    starts = np.repeat(np.cumsum(sl) - sl, sl)
    bit_in_code = np.arange(total) - starts  # 0 = most significant bit of the code
    shift = np.repeat(sl, sl) - 1 - bit_in_code
    bits = (np.repeat(codes[symbols], sl) >> shift) & 1
    return np.packbits(bits.astype(np.uint8)), lengths


def huffman_decode(bitstream: np.ndarray, lengths: np.ndarray, count: int) -> np.ndarray:
    """Inverse of :func:`huffman_encode`: the first ``count`` symbols (int64), bit-exact."""
    lengths = np.asarray(lengths, dtype=np.int64)
    if count == 0:
        return np.zeros(0, np.int64)
    width = int(lengths.max()) if lengths.size else 0
    if width == 0 or width > MAX_CODE_BITS:
        raise ModelLoadError("Huffman stream: invalid code-length table (corrupt file)")
    codes = canonical_codes(lengths)
    # Table: every width-bit window -> (symbol, code length) of the code it starts with.
    table_sym = np.zeros(1 << width, np.int64)
    table_len = np.zeros(1 << width, np.int64)
    for s in np.flatnonzero(lengths):
        lo = int(codes[s]) << (width - int(lengths[s]))
        hi = (int(codes[s]) + 1) << (width - int(lengths[s]))
        if hi > 1 << width:
            raise ModelLoadError("Huffman stream: code-length table violates the Kraft inequality (corrupt file)")
        table_sym[lo:hi], table_len[lo:hi] = s, lengths[s]
    bits = np.unpackbits(np.asarray(bitstream, dtype=np.uint8))
    n = len(bits)
    padded = np.concatenate([bits, np.zeros(width, np.uint8)]).astype(np.int64)
    window = np.zeros(n, np.int64)
    for j in range(width):  # the width-bit window starting at every bit position
        window = (window << 1) | padded[j:j + n]
    step = table_len[window]
    # Symbol i starts at next^i(0), next(p) = p + length of the code at p; n is a sink.
    nxt = np.append(np.minimum(np.arange(n) + np.where(step > 0, step, n + 1), n), n)
    pos = np.zeros(count, np.int64)
    i = np.arange(count)
    jump = nxt
    for k in range(max(1, int(count - 1).bit_length())):
        sel = ((i >> k) & 1).astype(bool)
        pos[sel] = jump[pos[sel]]
        jump = jump[jump]
    if pos[-1] >= n or (step[pos] == 0).any() or pos[-1] + step[pos[-1]] > n:
        raise ModelLoadError("Huffman stream: fewer codes than symbols (corrupt or truncated file)")
    return table_sym[window[pos]]


# -- fixed-width packing -----------------------------------------------------------
def pack_fixed(values: np.ndarray, width: int) -> np.ndarray:
    """Pack non-negative integers ``width`` (1..16) bits each, little-endian bit order."""
    values = np.asarray(values, dtype=np.int64).reshape(-1)
    bits = (values[:, None] >> np.arange(width)) & 1
    return np.packbits(bits.astype(np.uint8).reshape(-1), bitorder="little")


def unpack_fixed(packed: np.ndarray, width: int, count: int) -> np.ndarray:
    bits = np.unpackbits(np.asarray(packed, np.uint8), bitorder="little")
    if len(bits) < count * width:
        raise ModelLoadError("packed stream shorter than its header says (corrupt file)")
    bits = bits[: count * width].reshape(count, width).astype(np.int64)
    return (bits << np.arange(width)).sum(axis=1)


def _width(values: np.ndarray) -> int:
    return max(1, int(values.max()).bit_length()) if values.size else 1


# -- streams ---------------------------------------------------------------------------
PACKED, HUFFMAN = 0, 1
DENSE, SPARSE = 0, 1


def _code_stream(values: np.ndarray, huffman: bool) -> tuple[list[int], np.ndarray]:
    """Smallest form of one stream: ``([mode, param, nbytes], payload)``; ``param`` is the
    bit width (packed) or the alphabet size (Huffman: a nibble per code length, then the bits)."""
    w = _width(values)
    best = ([PACKED, w], pack_fixed(values, w))
    if huffman and values.size:
        bits, lengths = huffman_encode(values)
        payload = np.concatenate([pack_fixed(lengths, 4), bits])
        if payload.nbytes < best[1].nbytes:
            best = ([HUFFMAN, len(lengths)], payload)
    desc, payload = best
    return desc + [int(payload.nbytes)], payload


def _decode_stream(desc: list[int], payload: np.ndarray, count: int) -> np.ndarray:
    mode, param, _ = desc
    if mode == PACKED:
        return unpack_fixed(payload, param, count)
    if mode == HUFFMAN:
        table_bytes = (param * 4 + 7) // 8
        return huffman_decode(payload[table_bytes:], unpack_fixed(payload[:table_bytes], 4, param), count)
    raise ModelLoadError(f"unknown stream mode {mode} in a huffman-encoded tensor (corrupt file)")


def _varints(values: list[int]) -> np.ndarray:
    """Unsigned LEB128: 7 bits per byte, high bit set on all but the last byte of a number."""
    out = []
    for v in values:
        while True:
            out.append((v & 0x7F) | (0x80 if v > 0x7F else 0))
            v >>= 7
            if not v:
                break
    return np.array(out, np.uint8)


def _read_varints(data: np.ndarray, n: int, at: int = 0) -> tuple[list[int], int]:
    values = []
    for _ in range(n):
        v, shift = 0, 0
        while True:
            if at >= len(data):
                raise ModelLoadError("huffman-encoded tensor: truncated stream header (corrupt file)")
            byte = int(data[at])
            at += 1
            v |= (byte & 0x7F) << shift
            shift += 7
            if byte < 0x80:
                break
        values.append(v)
    return values, at


# -- the artifact encoding -------------------------------------------------------------
def encode_indices(t: torch.Tensor, huffman: bool = True) -> tuple[dict[str, torch.Tensor], dict]:
    """Encode a non-negative integer tensor exactly, in the smallest layout found.

    Layouts: *dense* (every entry, one stream) or *sparse* (relative gaps with ``gap_bits``-bit
    fillers, see :func:`~.relidx.relative_gaps`, + the entries that are not 0, two
    streams); each stream plain-packed or (when ``huffman``) Huffman-coded. Returns
    ``({"data": uint8}, {"shape": ...})``: the payload starts with a few varints (layout,
    gap bits, entries, and per stream its mode, width or alphabet, and bytes), because JSON
    in the artifact's header would cost more than the streams of a small layer.

        >>> import torch
        >>> from modelpress.artifact.huffman import encode_indices, decode_indices, describe
        >>> t = torch.zeros(50, 40, dtype=torch.uint8); t[::7, ::3] = 5
        >>> parts, info = encode_indices(t)
        >>> describe(parts["data"])["layout"], parts["data"].numel() < t.numel() // 10
        ('sparse', True)
        >>> torch.equal(decode_indices(parts, info), t)
        True
    """
    flat = t.detach().reshape(-1).cpu().numpy().astype(np.int64)
    if flat.size and flat.min() < 0:
        raise DataError("index encoding takes non-negative integers")
    dense_desc, dense = _code_stream(flat, huffman)
    best = [_varints([DENSE, *dense_desc]), dense]
    positions = np.flatnonzero(flat)
    for gap_bits in GAP_BITS:
        gaps, real = relative_gaps(positions, gap_bits)
        values = np.zeros(len(gaps), np.int64)
        values[real] = flat[positions]  # fillers carry 0, i.e. "still zero"
        gd, gp = _code_stream(gaps, huffman)
        vd, vp = _code_stream(values, huffman)
        candidate = [_varints([SPARSE, gap_bits, len(gaps), *gd, *vd]), gp, vp]
        if sum(c.nbytes for c in candidate) < sum(c.nbytes for c in best):
            best = candidate
    info = {"shape": list(t.shape)}
    if t.dtype != torch.uint8:
        info["dtype"] = str(t.dtype).replace("torch.", "")
    return {"data": torch.from_numpy(np.concatenate(best).astype(np.uint8))}, info


def describe(data: torch.Tensor | np.ndarray) -> dict:
    """The layout an encoded payload uses (for reports): layout, gap bits, entries, streams."""
    data = np.asarray(data)
    (layout,), at = _read_varints(data, 1)
    if layout == DENSE:
        desc, at = _read_varints(data, 3, at)
        return {"layout": "dense", "streams": [_stream_name(desc)], "header_bytes": at}
    (gap_bits, entries, *descs), at = _read_varints(data, 8, at)
    return {"layout": "sparse", "gap_bits": gap_bits, "entries": entries,
            "streams": [_stream_name(descs[:3]), _stream_name(descs[3:])], "header_bytes": at}


def _stream_name(desc: list[int]) -> str:
    mode, param, nbytes = desc
    return f"huffman({param} symbols) {nbytes} B" if mode == HUFFMAN else f"packed({param} bits) {nbytes} B"


_DTYPES = {"uint8": torch.uint8, "int8": torch.int8, "int16": torch.int16, "int32": torch.int32,
           "int64": torch.int64}


def decode_indices(parts: dict[str, torch.Tensor], info: dict) -> torch.Tensor:
    """Inverse of :func:`encode_indices` (bit-exact)."""
    try:
        shape = [int(s) for s in info["shape"]]
        dtype = _DTYPES[info.get("dtype", "uint8")]
        data = parts["data"].numpy()
    except (KeyError, TypeError, ValueError) as exc:
        raise ModelLoadError(f"huffman-encoded tensor: malformed header ({exc!r})",
                             hint="the file may be corrupt; re-create it") from None
    numel = int(np.prod(shape)) if shape else 1
    (layout,), at = _read_varints(data, 1)
    if layout == DENSE:
        desc, at = _read_varints(data, 3, at)
        descs, counts = [desc], [numel]
    elif layout == SPARSE:
        (gap_bits, entries, *flat_descs), at = _read_varints(data, 8, at)
        descs, counts = [flat_descs[:3], flat_descs[3:]], [entries, entries]
    else:
        raise ModelLoadError(f"huffman-encoded tensor: unknown layout {layout} (corrupt file)")
    sizes = [d[2] for d in descs]
    if at + sum(sizes) != data.size:
        raise ModelLoadError("huffman-encoded tensor: payload size disagrees with its header (corrupt file)")
    chunks = np.split(data[at:], np.cumsum(sizes)[:-1])
    streams = [_decode_stream(d, c, n) for d, c, n in zip(descs, chunks, counts)]
    if layout == DENSE:
        flat = streams[0]
    else:
        gaps, values = streams
        positions = np.cumsum(gaps + 1) - 1
        if len(positions) and positions[-1] >= numel:
            raise ModelLoadError("huffman-encoded tensor: indices run past the tensor's end (corrupt file)")
        flat = np.zeros(numel, np.int64)
        flat[positions] = values
    return torch.from_numpy(flat).to(dtype).reshape(shape)


def _encoder(huffman: bool):
    def encode(t: torch.Tensor):
        if t.is_floating_point() or t.is_complex() or t.dtype == torch.bool or t.numel() == 0:
            return None
        if str(t.dtype).replace("torch.", "") not in _DTYPES or int(t.min()) < 0:
            return None
        parts, info = encode_indices(t, huffman=huffman)
        if parts["data"].numel() >= t.numel() * t.element_size():
            return None
        return parts, info
    return encode


encode_huffman = _encoder(True)
encode_codes = _encoder(False)
