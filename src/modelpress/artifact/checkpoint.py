"""The modelpress artifact: one safetensors file holding a compressed model.

Layout of ``model.safetensors`` (format 2, :data:`FORMAT`; any file name works):

* tensors, each stored raw or through an *encoding* that makes it smaller on disk
  (``sparse``: a packed bitmask + the non-zero values; ``relidx``: relative indices + values,
  see :mod:`.relidx`; both exact, the smaller wins; quantization adds its own);
* pieces (raw tensors and encoded parts) under :data:`PACK_BELOW` bytes are concatenated into
  one ``uint8`` tensor named :data:`PACKED`, indexed by the header (name, dtype, shape, in
  order): safetensors spends ~60 header bytes on each tensor it stores, as much as a small
  layer's codebook. Larger pieces stay ordinary safetensors tensors (``name`` or ``name::part``);
* metadata key ``modelpress``: ``"2:"`` + base85 of the deflated JSON header (the model
  *source* (zoo name, Hugging Face directory or factory), the structure records (see
  :mod:`.modules`), the encodings, the packed index, free-form ``meta`` (task, input shape,
  metrics), and ``crc``: the CRC-32 of every stored piece's bytes, in the order of their sorted
  names, as base85 of the 4-byte values: 5 bytes a piece). Deflate starts from a preset
  dictionary of the strings headers repeat, so a small model's header costs a few hundred
  bytes, not a few thousand.

Loading recomputes the CRCs: a piece whose bytes changed after saving (a flipped bit, a bad copy)
is a :class:`ModelLoadError` naming its tensor, never a silently different model (a CRC-32 catches
every single-bit error and every burst of up to 32 bits).

Format 1 (:data:`FORMAT_V1`: one safetensors tensor per piece, the JSON header as plain text)
still loads. Saving is atomic; loading uses safetensors, zlib and json only (never pickle),
validates the header and reports corrupt, truncated or mismatched files as
:class:`ModelLoadError`::

    >>> import torch, tempfile, os
    >>> from torch import nn
    >>> from modelpress.artifact.checkpoint import save_artifact, load_state
    >>> m = nn.Linear(64, 64); _ = m.weight.data.mul_((torch.rand(64, 64) > 0.9).float())
    >>> p = os.path.join(tempfile.mkdtemp(), "m.safetensors")
    >>> _ = save_artifact(m, p)
    >>> state, header = load_state(p)
    >>> torch.equal(state["weight"], m.weight.data), header["format"]
    (True, 'modelpress.artifact/2')
"""
from __future__ import annotations

import base64
import json
import math
import os
import struct
import zlib
from collections import OrderedDict
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..core.errors import ModelLoadError
from ..core.io import atomic_path
from ..core.masks import masked_params
from ..engine.registry import load_method_modules
from ..nn import records as structure
from .encodings import ENCODINGS, auto_encodings, decode, smallest_encoding

FORMAT = "modelpress.artifact/2"
FORMAT_V1 = "modelpress.artifact/1"  # one safetensors tensor per piece, plain JSON header; still loads
SEP = "::"  # separates a tensor's name from its encoded parts
PACKED = SEP + "packed"  # the blob of small pieces (no state_dict key starts with the separator)
PACK_BELOW = 4096  # pieces smaller than this (bytes) go into the blob
_V2_TAG = "2:"  # the metadata value of a format-2 file starts with this, then base85
_MAX_HEADER = 64 << 20  # inflated header bytes a loader accepts (a corrupt stream cannot exhaust memory)

_DTYPE_CODES = {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
                torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
                torch.bool: "BOOL"}  # safetensors' names; other dtypes are stored unpacked
_CODE_DTYPES = {code: dtype for dtype, code in _DTYPE_CODES.items()}

# Preset dictionary of the header's deflate stream: what headers repeat (keys, module records,
# encodings, the zoo models' own layer records), the most common last (closest to the data).
# Part of format 2: changing one byte makes every format-2 file unreadable (a new dictionary
# needs a new format tag).
_HEADER_DICT = "".join((
    '"replay":[{"method":"quant.static_int8","config":{"before":{',
    '"ties":{"source":{"hf_dir":"factory":',
    '"BertSelfAttention","attrs":{"num_attention_heads":12,"attention_head_size":32,"all_head_size":384}},',
    '"LayerNorm","args":{"normalized_shape":[384],"eps":1e-12,"elementwise_affine":true,"bias":true}},',
    '"Embedding","args":{"num_embeddings":"embedding_dim":"padding_idx":null}},',
    '"QuantLinear","args":{"QuantConv2d","args":{"FactorizedLayer","args":{"method":"svd"}},',
    '"source":{"zoo":"resnet_small","kwargs":{}},"structure":{"layer1":{"class":"Sequential","args":{}},',
    '"features.0.0":"BatchNorm2d","args":{"num_features":16,"eps":1e-05,"momentum":0.1,"affine":true,'
    '"track_running_stats":true}},',
    '"Conv2d","args":{"in_channels":16,"out_channels":16,"kernel_size":[3,3],"stride":[1,1],"padding":[1,1],'
    '"dilation":[1,1],"groups":1,"bias":false,"padding_mode":"zeros"}},',
    '"encodings":{"kind":"sparse","shape":[',
    '"kind":"relidx","shape":[,"bits":8,"count":',
    '"meta":{"stage":"baseline"},"masked":["conv1.weight","conv2.weight","fc1.weight","fc2.weight","fc3.weight"]},',
    '"source":{"zoo":"lenet300","kwargs":{}},"structure":{"fc1":{"class":"Linear","args":{"in_features":784,'
    '"out_features":300,"bias":true}},',
    '"meta":{"stage":"prune","method":"prune.magnitude"},',
    '"packed":[["conv1.weight::bitmask","U8",[","conv1.weight::values","F32",[","fc1.weight::gaps","U8",[",'
    '"conv1.weight","F32",[6,1,5,5]],["conv1.bias","F32",[6]],',
    '"source":{"zoo":"lenet5","kwargs":{"num_classes":10,"in_channels":1,"image_size":28}},"structure":{'
    '"conv1":{"class":"Conv2d","args":{"in_channels":1,"out_channels":6,"kernel_size":[5,5],"stride":[1,1],'
    '"padding":[2,2],"dilation":[1,1],"groups":1,"bias":true,"padding_mode":"zeros"}},'
    '"conv2":{"class":"Conv2d","args":{"in_channels":6,"out_channels":16,"kernel_size":[5,5],',
    '"fc2":{"class":"Linear","args":{"in_features":120,"out_features":84,"bias":true}},',
    '"source":{"zoo":"lenet5","kwargs":{"num_classes":10,"in_channels":1,"image_size":28}},"structure":{'
    '"conv1":{"class":"CodebookConv2d","args":{"in_channels":1,"out_channels":6,"kernel_size":[5,5],'
    '"padding":[2,2]}},"conv2":{"class":"CodebookConv2d","args":{"in_channels":6,"out_channels":16,'
    '"kernel_size":[5,5]}},',
    '"fc1":{"class":"CodebookLinear","args":{"in_features":400,"out_features":120}},'
    '"fc2":{"class":"CodebookLinear","args":{"in_features":120,"out_features":84}},'
    '"fc3":{"class":"CodebookLinear","args":{"in_features":84,"out_features":10}}},',
    '"encodings":{"conv1.indices":{"kind":"huffman","shape":[6,1,5,5]},"conv2.indices":{"kind":"huffman",'
    '"shape":[16,6,5,5]},"fc1.indices":{"kind":"huffman","shape":[120,400]},',
    '"meta":{"stage":"share","method":"quant.kmeans"},"packed":[["conv1.table","F16",[",'
    '"conv1.indices::data","U8",[","conv2.table","F16",[","conv2.indices::data","U8",[',
)).encode()

def _unique_state(model: nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """state_dict with tied tensors stored once (safetensors refuses shared storage)."""
    seen: dict[tuple, str] = {}
    out, ties = {}, {}
    for k, v in model.state_dict().items():
        key = (v.untyped_storage().data_ptr(), v.storage_offset(), tuple(v.shape), v.dtype) if v.numel() else None
        if key is not None and key in seen:
            ties[k] = seen[key]
            continue
        if key is not None:
            seen[key] = k
        out[k] = v.detach().cpu().contiguous()
    return out, ties


def save_artifact(model: nn.Module, path: str | os.PathLike, *, source: dict | None = None,
                  meta: dict | None = None, encode: bool = True) -> Path:
    """Write ``model`` as a modelpress artifact (atomic). Returns the path.

    ``source`` says how to rebuild the architecture (defaults to ``model.zoo_spec`` when the
    model comes from the zoo). Each tensor is stored with the smallest of the exact
    encodings (``sparse`` bitmask, ``relidx`` relative index, or raw); ``encode=False``
    stores every tensor raw.
    """
    from safetensors.torch import save_file

    replayed = structure.get_replay(model)
    if source is None:
        source = getattr(model, "zoo_spec", None) or (replayed or {}).get("source")
    state, ties = _unique_state(model)
    tensors, encodings = {}, {}
    extra_encodings = getattr(model, "modelpress_encodings", {})  # set by quantizers
    for name, t in state.items():
        kinds = [extra_encodings[name]] if name in extra_encodings else (auto_encodings() if encode else [])
        best = smallest_encoding(t, kinds)
        if best is None:
            tensors[name] = t
            continue
        kind, parts, info = best
        for part, pt in parts.items():
            tensors[f"{name}{SEP}{part}"] = pt.contiguous()
        encodings[name] = {"kind": kind, **info}
    meta = dict(meta or {})
    masked = [f"{mname}.{pname}" if mname else pname for mname, _, pname, _ in masked_params(model)]
    if masked:
        meta["masked"] = masked  # restored as masks on load, so later fine-tuning keeps them zero
    header = {"source": source, "structure": structure.describe(model), "encodings": encodings, "ties": ties,
              "meta": meta}
    if replayed:  # loading replays these rewrites, then applies "structure" (see modules.replay)
        header["replay"] = replayed["steps"]
    header["crc"] = _pack_crcs([_crc(tensors[k]) for k in sorted(tensors)])
    tensors, header["packed"] = _pack(tensors)
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata={"modelpress": _V2_TAG + _compress_header(header)})
    return Path(path)


def _crc(t: torch.Tensor) -> int:
    """CRC-32 of a tensor's bytes (as stored: contiguous, native byte order)."""
    return zlib.crc32(t.detach().contiguous().reshape(-1).view(torch.uint8).cpu().numpy())


def _pack_crcs(crcs: list[int]) -> str:
    """The CRCs as base85 of their little-endian 4-byte values: 5 characters each (JSON digits cost ~2x)."""
    return base64.b85encode(struct.pack(f"<{len(crcs)}I", *crcs)).decode("ascii")


def _unpack_crcs(text: Any) -> list[int] | None:
    try:
        raw = base64.b85decode(text)
        return list(struct.unpack(f"<{len(raw) // 4}I", raw)) if len(raw) % 4 == 0 else None
    except (TypeError, ValueError, struct.error):
        return None


def _verify(pieces: dict[str, torch.Tensor], packed: Any, where: str) -> None:
    """Raise naming the first piece whose bytes differ from what was saved."""
    names = sorted(pieces)
    crcs = _unpack_crcs(packed)
    if crcs is None or len(crcs) != len(names):
        raise ModelLoadError(f"checkpoint {where} lists {len(crcs) if isinstance(crcs, list) else 'no'} checksums "
                             f"for {len(names)} stored tensors", hint="the file is corrupt; re-create it")
    for name, crc in zip(names, crcs):
        if _crc(pieces[name]) != crc:
            tensor = name.split(SEP)[0]
            raise ModelLoadError(f"checkpoint {where}: tensor {tensor!r} is corrupt (its bytes do not match the "
                                 "checksum saved with them)",
                                 hint="the file changed after it was written (a flipped bit, a bad copy): copy it "
                                      "again or re-create it")


def _pack(tensors: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], list[list]]:
    """Move the pieces under :data:`PACK_BELOW` bytes into one uint8 blob: ``(tensors, index)``,
    the index listing ``[name, dtype code, shape]`` in blob order."""
    out, index, chunks = {}, [], []
    for key, t in tensors.items():
        if t.dtype not in _DTYPE_CODES or t.numel() * t.element_size() >= PACK_BELOW:
            out[key] = t
            continue
        index.append([key, _DTYPE_CODES[t.dtype], list(t.shape)])
        chunks.append(t.contiguous().reshape(-1).view(torch.uint8))
    if chunks:
        out[PACKED] = torch.cat(chunks)
    return out, index


def _unpack(blob: torch.Tensor | None, index: Any, where: str) -> dict[str, torch.Tensor]:
    """Inverse of :func:`_pack` (bit-exact): the packed pieces by name."""
    corrupt = ModelLoadError(f"checkpoint {where} has a corrupt packed-tensor index",
                             hint="the file may be truncated or corrupt; re-create it")
    if not index:
        if blob is not None:
            raise corrupt
        return {}
    if blob is None or blob.dtype != torch.uint8 or blob.dim() != 1 or not isinstance(index, list):
        raise corrupt
    out, at = {}, 0
    try:
        for key, code, shape in index:
            dtype, shape = _CODE_DTYPES[code], [int(n) for n in shape]
            nbytes = math.prod(shape) * dtype.itemsize
            if not isinstance(key, str) or min(shape, default=0) < 0 or at + nbytes > blob.numel():
                raise corrupt
            out[key] = blob[at:at + nbytes].clone().view(dtype).reshape(shape)
            at += nbytes
    except (KeyError, TypeError, ValueError):
        raise corrupt from None
    if at != blob.numel():
        raise corrupt
    return out


def _compress_header(header: dict) -> str:
    """The header as base85 of raw deflate (preset dictionary :data:`_HEADER_DICT`); empty fields
    are left out (loading restores them)."""
    body = {k: v for k, v in header.items() if v}
    text = json.dumps(body, separators=(",", ":")).encode()
    deflate = zlib.compressobj(9, zlib.DEFLATED, -15, 9, zlib.Z_DEFAULT_STRATEGY, zdict=_HEADER_DICT)
    return base64.b85encode(deflate.compress(text) + deflate.flush()).decode("ascii")


def _expand_header(raw: str, where: str) -> dict:
    """Inverse of :func:`_compress_header`, with the left-out fields restored."""
    try:
        inflate = zlib.decompressobj(-15, zdict=_HEADER_DICT)
        text = inflate.decompress(base64.b85decode(raw), _MAX_HEADER)
        if not inflate.eof or inflate.unconsumed_tail:
            raise ValueError("incomplete or oversized header")
        body = json.loads(text)
    except (ValueError, zlib.error):
        body = None
    if not isinstance(body, dict):
        raise ModelLoadError(f"checkpoint {where} has a corrupt modelpress header",
                             hint="the file may be truncated or corrupt; re-create it")
    return {"format": FORMAT, "source": None, "structure": {}, "encodings": {}, "ties": {}, "meta": {}, **body}


def read_header(path: str | os.PathLike) -> dict:
    """The artifact's header (format 2 or 1), validated: ``format``, ``source``, ``structure``,
    ``encodings``, ``ties``, ``meta`` and, when present, ``replay`` and ``packed``."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise ModelLoadError(f"checkpoint {str(path)!r} does not exist", hint="check the path")
    if path.stat().st_size < 8:
        raise ModelLoadError(f"checkpoint {str(path)!r} is empty or truncated ({path.stat().st_size} bytes)")
    try:
        with safe_open(str(path), framework="pt") as fh:
            raw = (fh.metadata() or {}).get("modelpress")
    except Exception as exc:  # safetensors raises its own error types for bad headers
        raise ModelLoadError(f"checkpoint {str(path)!r} is not a valid safetensors file ({exc})",
                             hint="the file may be truncated or corrupt; re-create it") from None
    if raw is None:
        raise ModelLoadError(f"{str(path)!r} is a safetensors file without modelpress metadata",
                             hint="load plain weights with torch/safetensors, or save with modelpress")
    if raw.startswith(_V2_TAG):
        return _expand_header(raw[len(_V2_TAG):], repr(str(path)))
    if not raw.startswith("{"):
        raise ModelLoadError(f"checkpoint {str(path)!r} has a modelpress header this version cannot read "
                             f"(it starts {raw[:8]!r})", hint="it was written by a newer modelpress version")
    try:
        header = json.loads(raw)
    except json.JSONDecodeError:
        raise ModelLoadError(f"checkpoint {str(path)!r} has a corrupt modelpress header") from None
    if not isinstance(header, dict) or header.get("format") != FORMAT_V1:
        found = header.get("format") if isinstance(header, dict) else None
        raise ModelLoadError(f"checkpoint {str(path)!r} has format {found!r}, expected {FORMAT!r} or {FORMAT_V1!r}",
                             hint="it was written by another modelpress version")
    return header


def read_stored(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict]:
    """The stored pieces of an artifact, still encoded (``"fc1.weight::bitmask"``, ...), with the
    packed blob split back into its pieces: ``(pieces, header)``. For inspecting what is stored;
    :func:`load_state` decodes them."""
    from safetensors.torch import load_file

    header = read_header(path)
    try:
        raw = load_file(str(path))
    except Exception as exc:
        raise ModelLoadError(f"checkpoint {str(path)!r} could not be read ({exc})",
                             hint="the file may be truncated or corrupt; re-create it") from None
    if header["format"] == FORMAT:
        blob = raw.pop(PACKED, None)
        raw.update(_unpack(blob, header.get("packed"), repr(str(path))))
        if "crc" in header:  # files written before checksums load as they did
            _verify(raw, header["crc"], repr(str(path)))
    return raw, header


def load_state(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict]:
    """Decode all tensors of an artifact: ``(state_dict, header)``."""
    raw, header = read_stored(path)
    state: dict[str, torch.Tensor] = {k: v for k, v in raw.items() if SEP not in k}
    for name, info in header.get("encodings", {}).items():
        kind = info.get("kind")
        if not isinstance(kind, str) or kind not in ENCODINGS:
            raise ModelLoadError(f"tensor {name!r} uses unknown encoding {kind!r}",
                                 hint="the file was written by a newer modelpress version, or is corrupt")
        prefix = f"{name}{SEP}"
        parts = {k[len(prefix):]: v for k, v in raw.items() if k.startswith(prefix)}
        state[name] = decode(kind, parts, info)
    for k, target in header.get("ties", {}).items():
        state[k] = state[target]
    return state, header


def _load_methods_it_names(header: dict) -> None:
    """Import the method modules when the header names a module class or a replayed rewrite not
    registered yet (methods register theirs on import); an artifact of plain layers imports none."""
    records = header.get("structure") if isinstance(header.get("structure"), dict) else {}
    steps = header.get("replay") if isinstance(header.get("replay"), list) else []
    classes = {r.get("class") for r in records.values() if isinstance(r, dict)}
    classes |= {c.get("class") for st in steps if isinstance(st, dict) and isinstance(st.get("before"), dict)
                for c in st["before"].values() if isinstance(c, dict)}
    methods = {st.get("method") for st in steps if isinstance(st, dict)}
    if any(c not in structure.BUILDABLES and c not in structure.ATTRS for c in classes) or \
            any(m not in structure.REPLAYS for m in methods):
        load_method_modules()


def _untie_stored_apart(model: nn.Module, ties: dict[str, str]) -> None:
    """Give a parameter ``model`` shares between modules one copy per tensor the artifact stores
    for it: a method that scaled GPT-2's ``lm_head`` untied it from the token embedding, and
    loading both into the one shared tensor would make the last one win."""
    aliases: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        aliases.setdefault(id(p), []).append(name)
    for names in aliases.values():
        stored = {}  # the tensor each name loads from -> names loading it
        for name in names:
            stored.setdefault(ties.get(name, name), []).append(name)
        for group in list(stored.values())[1:]:
            first = model.get_parameter(group[0])
            copy = nn.Parameter(first.detach().clone(), requires_grad=first.requires_grad)
            for name in group:
                owner, _, attr = name.rpartition(".")
                setattr(model.get_submodule(owner), attr, copy)


def load_into(model: nn.Module, state: dict[str, torch.Tensor], header: dict, where: str = "") -> nn.Module:
    """Rebuild ``model``'s structure from the header and load ``state`` strictly."""
    _load_methods_it_names(header)
    steps = header.get("replay") or []
    current = structure.get_replay(model)
    if steps and not (current and current["steps"] == steps):  # else: the model already has this form
        model = structure.replay(model, steps)
    structure.rebuild(model, header.get("structure", {}))
    # Tensors a method chose a non-automatic encoding for (e.g. Huffman-coded codebook indices)
    # keep it when the loaded model is saved again.
    auto = auto_encodings()
    chosen = {name: info["kind"] for name, info in header.get("encodings", {}).items()
              if isinstance(info, dict) and info.get("kind") in ENCODINGS and info["kind"] not in auto}
    if chosen:
        model.modelpress_encodings = {**getattr(model, "modelpress_encodings", {}), **chosen}
    # A safetensors file holds no state-dict metadata; modules that read their version from it
    # while loading (torchvision's MNASNet raises without one) get the current modules' versions,
    # those of the very classes the tensors were saved from.
    _untie_stored_apart(model, header.get("ties", {}))
    state = OrderedDict(state)
    state._metadata = getattr(model.state_dict(), "_metadata", None)  # type: ignore[attr-defined]
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()
        detail = first[1].strip() if len(first) > 1 else first[0]
        raise ModelLoadError(f"checkpoint {where} does not fit the model: {detail}",
                             hint="it was saved from a different architecture") from None
    # Non-persistent buffers are not in a state_dict, so only persistent keys count as missing.
    if missing or unexpected:
        raise ModelLoadError(f"checkpoint {where} does not fit the model: missing {sorted(missing)[:5]}, "
                             f"unexpected {sorted(unexpected)[:5]}", hint="it was saved from a different architecture")
    return model


def artifact_bytes(path: str | os.PathLike) -> int:
    return Path(path).stat().st_size


def artifact_size_of(model: nn.Module, **kwargs: Any) -> int:
    """Bytes the model would take as an artifact (written to a temp file and measured)."""
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        return artifact_bytes(save_artifact(model, Path(d) / "m.safetensors", **kwargs))


