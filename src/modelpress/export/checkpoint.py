"""The modelpress artifact: one safetensors file holding a compressed model.

Layout of ``model.mpz.safetensors`` (any name works):

* tensors, each stored raw or through an *encoding* that makes it smaller on disk
  (``sparse``: a packed bitmask + the non-zero values; ``relidx``: relative indices + values,
  see :mod:`.sparse_encodings`; both exact, the smaller wins; quantization adds its own);
* metadata key ``modelpress``: JSON with the format version, the model *source* (zoo name,
  Hugging Face directory or factory), the structure records (see :mod:`.modules`) and the
  encodings, plus free-form ``meta`` (task, input shape, metrics).

Saving is atomic; loading uses safetensors only (never pickle), validates the header and
reports corrupt, truncated or mismatched files as :class:`ModelLoadError`::

    >>> import torch, tempfile, os
    >>> from torch import nn
    >>> from modelpress.export.checkpoint import save_artifact, load_state
    >>> m = nn.Linear(64, 64); _ = m.weight.data.mul_((torch.rand(64, 64) > 0.9).float())
    >>> p = os.path.join(tempfile.mkdtemp(), "m.safetensors")
    >>> _ = save_artifact(m, p)
    >>> state, header = load_state(p)
    >>> torch.equal(state["weight"], m.weight.data)
    True
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch import nn

from ..core.errors import ModelLoadError
from ..core.io import atomic_path
from . import modules as structure

FORMAT = "modelpress.artifact/1"
SEP = "::"  # separates a tensor's name from its encoded parts

# kind -> (encode(tensor) -> (parts dict, info dict) | None, decode(parts, info) -> tensor)
Encoder = Callable[[torch.Tensor], tuple[dict[str, torch.Tensor], dict] | None]
Decoder = Callable[[dict[str, torch.Tensor], dict], torch.Tensor]
_ENCODINGS: dict[str, tuple[Encoder, Decoder]] = {}
_AUTO: list[str] = []  # exact encodings tried on every tensor; the smallest result is kept


def register_encoding(kind: str, encode: Encoder, decode: Decoder, *, auto: bool = False) -> None:
    """Add a tensor encoding. ``encode`` returns None when it would not make the tensor smaller.

    ``auto=True`` (only for exact encodings) makes :func:`save_artifact` try it on every
    tensor and keep whichever encoding is smallest. Other encodings (e.g. quantized
    formats) are used only for the tensors a method lists in ``model.modelpress_encodings``.
    """
    _ENCODINGS[kind] = (encode, decode)
    if auto and kind not in _AUTO:
        _AUTO.append(kind)


# -- sparse: packed bitmask + non-zero values (exact) ------------------------------
def _encode_sparse(t: torch.Tensor):
    if not t.is_floating_point() or t.numel() < 64:
        return None
    flat = t.detach().reshape(-1).contiguous()
    nz = flat != 0
    nnz = int(nz.sum())
    encoded = (t.numel() + 7) // 8 + nnz * t.element_size()
    if encoded >= t.numel() * t.element_size():
        return None
    bits = torch.from_numpy(np.packbits(nz.numpy().astype(np.uint8)))
    return {"bitmask": bits, "values": flat[nz].clone()}, {"shape": list(t.shape), "dtype": str(t.dtype)}


def _decode_sparse(parts, info):
    numel = int(np.prod(info["shape"])) if info["shape"] else 1
    nz = np.unpackbits(parts["bitmask"].numpy())[:numel].astype(bool)
    values = parts["values"]
    if int(nz.sum()) != values.numel():
        raise ModelLoadError("sparse tensor: bitmask and values disagree (corrupt file)")
    out = torch.zeros(numel, dtype=values.dtype)
    out[torch.from_numpy(nz)] = values
    return out.reshape(info["shape"])


register_encoding("sparse", _encode_sparse, _decode_sparse, auto=True)


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


def _smallest_encoding(t: torch.Tensor, kinds: list[str]):
    """``(kind, parts, info)`` of the encoding with the fewest bytes (first wins ties), or None."""
    best, best_bytes = None, None
    for kind in kinds:
        res = _ENCODINGS[kind][0](t)
        if res is None:
            continue
        size = sum(p.numel() * p.element_size() for p in res[0].values())
        if best_bytes is None or size < best_bytes:
            best, best_bytes = (kind, *res), size
    return best


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
        kinds = [extra_encodings[name]] if name in extra_encodings else (list(_AUTO) if encode else [])
        best = _smallest_encoding(t, kinds)
        if best is None:
            tensors[name] = t
            continue
        kind, parts, info = best
        for part, pt in parts.items():
            tensors[f"{name}{SEP}{part}"] = pt.contiguous()
        encodings[name] = {"kind": kind, **info}
    from ..core.masks import masked_params

    meta = dict(meta or {})
    masked = [f"{mname}.{pname}" if mname else pname for mname, _, pname, _ in masked_params(model)]
    if masked:
        meta["masked"] = masked  # restored as masks on load, so later fine-tuning keeps them zero
    header = {"format": FORMAT, "source": source, "structure": structure.describe(model),
              "encodings": encodings, "ties": ties, "meta": meta}
    if replayed:  # loading replays these rewrites, then applies "structure" (see modules.replay)
        header["replay"] = replayed["steps"]
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata={"modelpress": json.dumps(header)})
    return Path(path)


def read_header(path: str | os.PathLike) -> dict:
    """The artifact's JSON header, validated."""
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
    try:
        header = json.loads(raw)
    except json.JSONDecodeError:
        raise ModelLoadError(f"checkpoint {str(path)!r} has a corrupt modelpress header") from None
    if not isinstance(header, dict) or header.get("format") != FORMAT:
        raise ModelLoadError(f"checkpoint {str(path)!r} has format {header.get('format')!r}, expected {FORMAT!r}",
                             hint="it was written by another modelpress version")
    return header


def load_state(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict]:
    """Decode all tensors of an artifact: ``(state_dict, header)``."""
    from safetensors.torch import load_file

    header = read_header(path)
    try:
        raw = load_file(str(path))
    except Exception as exc:
        raise ModelLoadError(f"checkpoint {str(path)!r} could not be read ({exc})",
                             hint="the file may be truncated or corrupt; re-create it") from None
    state: dict[str, torch.Tensor] = {k: v for k, v in raw.items() if SEP not in k}
    for name, info in header.get("encodings", {}).items():
        kind = info.get("kind")
        if kind not in _ENCODINGS:
            _load_encoding_plugins()
        if kind not in _ENCODINGS:
            raise ModelLoadError(f"tensor {name!r} uses unknown encoding {kind!r}")
        prefix = f"{name}{SEP}"
        parts = {k[len(prefix):]: v for k, v in raw.items() if k.startswith(prefix)}
        state[name] = _ENCODINGS[kind][1](parts, info)
    for k, target in header.get("ties", {}).items():
        state[k] = state[target]
    return state, header


def _load_encoding_plugins() -> None:
    """Import the method modules: they register more encodings and buildable module classes
    (packed quantized layers, codebooks), which a checkpoint may name."""
    from ..core.registry import list_methods

    list_methods()


def load_into(model: nn.Module, state: dict[str, torch.Tensor], header: dict, where: str = "") -> nn.Module:
    """Rebuild ``model``'s structure from the header and load ``state`` strictly."""
    _load_encoding_plugins()  # so every buildable class a method defines is known
    steps = header.get("replay") or []
    current = structure.get_replay(model)
    if steps and not (current and current["steps"] == steps):  # else: the model already has this form
        model = structure.replay(model, steps)
    structure.rebuild(model, header.get("structure", {}))
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()
        raise ModelLoadError(f"checkpoint {where} does not fit the model: {first[1].strip() if len(first) > 1 else first[0]}",
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


# Registers "relidx" (imported last: it needs register_encoding from this module).
from . import sparse_encodings  # noqa: E402,F401
