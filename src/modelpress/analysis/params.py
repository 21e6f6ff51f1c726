"""Parameter counts, sparsity and dense storage size.

Conventions:

* every parameter is counted once, even when it is shared (tied embeddings, shared blocks);
  a shared parameter is listed under the first module that owns it;
* weights of ``torch.ao`` quantized Linear/Conv (packed, not ``nn.Parameter``) count too, so a
  model keeps its parameter count through quantization;
* a parameter pruned with ``torch.nn.utils.prune`` (``weight_orig`` + ``weight_mask`` buffer)
  counts the non-zeros of ``weight_orig * weight_mask``, i.e. of the weight the model uses;
* :func:`dense_bytes` sizes the ``state_dict`` (parameters *and* buffers) stored densely in
  its current dtypes, which is what ``torch.save`` of an uncompressed model roughly costs.

Example::

    >>> import torch
    >>> from torch import nn
    >>> m = nn.Linear(4, 2)
    >>> with torch.no_grad():
    ...     _ = m.weight[0].zero_()
    >>> count_params(m)["nonzero"]  # 4 remaining weights + 2 biases
    6
    >>> dense_bytes(m)  # (8 + 2) fp32 values
    40
"""
from __future__ import annotations

from typing import Any, Iterator

import torch
from torch import nn


def _effective_tensor(module: nn.Module, name: str, param: torch.Tensor) -> torch.Tensor:
    """The tensor the forward actually uses for ``param`` (applies a prune mask if any)."""
    if name.endswith("_orig"):
        mask = getattr(module, name[: -len("_orig")] + "_mask", None)
        if isinstance(mask, torch.Tensor) and mask.shape == param.shape:
            return param * mask
    return param


def _packed_weights(module: nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """Weights stored as integers, not parameters: modelpress's quantized layers (they expose
    ``dequantized_weight()`` or a ``weight`` property) and torch.ao quantized Linear/Conv (packed params)."""
    if "weight" not in module._parameters:
        if callable(getattr(module, "dequantized_weight", None)):
            yield "weight", module.dequantized_weight().detach()
            bias = getattr(module, "bias", None)
            if "bias" not in module._parameters and isinstance(bias, torch.Tensor):
                yield "bias", bias.detach()  # int8 layers keep their bias as a buffer
            return
        # e.g. codebook layers; not a wrapper whose weight is computed from its children's
        # parameters, counted there (FactorizedLayer, static int8's QuantizedLayer)
        if isinstance(getattr(type(module), "weight", None), property) and \
                not any(True for child in module.children() for _ in child.parameters()):
            yield "weight", module.weight.detach()
            return
    if not type(module).__module__.startswith("torch.ao.nn.quantized"):
        return
    for attr in ("weight", "bias"):
        getter = getattr(module, attr, None)
        if callable(getter):
            t = getter()
            if isinstance(t, torch.Tensor):
                yield attr, t.dequantize() if t.is_quantized else t


def _unique_params(model: nn.Module) -> Iterator[tuple[str, str, nn.Module, torch.Tensor]]:
    """Yield ``(module_name, param_name, module, param)`` once per distinct parameter."""
    seen: set[int] = set()
    for mod_name, module in model.named_modules():
        for p_name, p in module.named_parameters(recurse=False):
            if id(p) in seen:
                continue
            seen.add(id(p))
            yield mod_name, p_name, module, p
        for p_name, t in _packed_weights(module):
            yield mod_name, p_name, module, t


def count_params(model: nn.Module) -> dict[str, Any]:
    """Count parameters: ``{"total", "nonzero", "by_layer": {module_name: (total, nonzero)}}``.

    ``by_layer`` holds the modules that directly own parameters (root params under ``""``).
    """
    total = nonzero = 0
    by_layer: dict[str, tuple[int, int]] = {}
    with torch.no_grad():
        for mod_name, p_name, module, p in _unique_params(model):
            n = p.numel()
            nz = int(torch.count_nonzero(_effective_tensor(module, p_name, p.detach())))
            total += n
            nonzero += nz
            t, z = by_layer.get(mod_name, (0, 0))
            by_layer[mod_name] = (t + n, z + nz)
    return {"total": total, "nonzero": nonzero, "by_layer": by_layer}


def sparsity(model: nn.Module) -> float:
    """Fraction of parameters that are exactly zero (0.0 for a model without parameters)."""
    counts = count_params(model)
    return 1.0 - counts["nonzero"] / counts["total"] if counts["total"] else 0.0


def _tensors(value: Any) -> Iterator[torch.Tensor]:
    # quantized modules keep packed params as tuples inside the state_dict
    if isinstance(value, torch.Tensor):
        yield value
    elif isinstance(value, (list, tuple)):
        for v in value:
            yield from _tensors(v)


def _storage_key(t: torch.Tensor) -> tuple:
    try:
        ptr = t.untyped_storage().data_ptr()
    except (RuntimeError, NotImplementedError):  # quantized / opaque tensors
        ptr = id(t)
    return ptr, t.storage_offset() if not t.is_quantized else 0, tuple(t.shape), t.dtype


def dense_bytes(model: nn.Module) -> int:
    """Bytes of the model's ``state_dict`` stored densely: sum of ``numel * element_size``.

    Tensors that alias the same memory (tied weights) are counted once.
    """
    seen: set[tuple] = set()
    total = 0
    for value in model.state_dict(keep_vars=True).values():
        for t in _tensors(value):
            key = _storage_key(t)
            if key in seen:
                continue
            seen.add(key)
            total += t.numel() * t.element_size()
    return total
