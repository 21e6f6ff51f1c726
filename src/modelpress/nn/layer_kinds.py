"""The layer kinds real models use besides ``nn.Linear`` / ``nn.Conv2d``, as every method sees them.

* **Linear maps stored another way.** GPT-2's ``Conv1D`` (``transformers.pytorch_utils``) is a
  Linear whose weight is stored ``[in, out]``. Scopes match it as ``"Linear"`` (the alias is
  registered in :mod:`modelpress.core.scope`); :func:`linear_equivalent` builds the ``nn.Linear``
  computing the same map, so a method that replaces the layer anyway converts it first
  (:func:`plain_linears`) and needs no case of its own.
* **Recurrent layers** (``nn.LSTM``, ``nn.GRU``, ``nn.RNN``): several weight matrices per module,
  ``weight_ih_l0``, ``weight_hh_l0``, ... (``_reverse`` when bidirectional), each ``[gates*hidden, in]``.
* **Weights edited in place**: :class:`WeightRef` is one weight matrix of a module, ``weight`` of a
  Linear/conv or one matrix of a recurrent layer, with its layout; :func:`weight_refs` lists those
  of some layers. Unstructured and N:M pruning mask them (masks live on the owning module, see
  :mod:`modelpress.core.masks`).
* **Parents that read a child's weight** instead of (or besides) calling it: ``nn.MultiheadAttention``
  passes ``out_proj.weight`` to its functional form, ``nn.TransformerEncoderLayer``'s inference
  fast path passes ``linear1``/``linear2``'s weights to a fused kernel. A replacement there must
  offer ``weight`` / ``bias`` and compute nothing else; :func:`parent_reads_weight` says so.

    >>> from torch import nn
    >>> net = nn.Sequential(nn.Linear(4, 8), nn.LSTM(8, 8))
    >>> [name for name, _ in weight_refs([("0", net[0]), ("1", net[1])])]
    ['0', '1.weight_ih_l0', '1.weight_hh_l0']
    >>> mha = nn.MultiheadAttention(8, 2)
    >>> parent_reads_weight(mha, "out_proj").calls_layer
    False
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import nn

from ..core.masks import get_mask, set_mask
from ..core.scope import type_alias
from .modules import get_module, set_module

# torch's recurrent layers (nn.LSTM, nn.GRU, nn.RNN) by their common base: a model's own class
# called "LSTM" (holding Linears of its own) is not one of them.
RECURRENT = ("RNNBase",)


# -- linear maps -------------------------------------------------------------------------------
def is_transposed_linear(module: nn.Module) -> bool:
    """True for a Linear-kind layer storing its weight ``[in, out]`` (GPT-2's ``Conv1D``)."""
    alias = type_alias(module)
    return alias is not None and alias.type_name == "Linear" and alias.transposed


@torch.no_grad()
def linear_equivalent(module: nn.Module) -> nn.Linear:
    """An ``nn.Linear`` computing what the Linear-kind ``module`` computes (its own weight when it is
    already one). A copy: ``module`` is not changed."""
    if isinstance(module, nn.Linear) or not is_transposed_linear(module):
        return module
    w = module.weight
    bias = getattr(module, "bias", None)
    linear = nn.Linear(w.shape[0], w.shape[1], bias=bias is not None, device=w.device, dtype=w.dtype)
    linear.weight.copy_(w.t())
    if bias is not None:
        linear.bias.copy_(bias)
    return linear


def plain_linears(model: nn.Module, layers: list[tuple[str, nn.Module]]) -> list[tuple[str, nn.Module]]:
    """Replace (in ``model``) each transposed Linear of ``layers`` by its :func:`linear_equivalent`;
    returns ``layers`` with the new modules. For methods that replace every selected layer anyway."""
    out = []
    for name, layer in layers:
        if is_transposed_linear(layer):
            layer = linear_equivalent(layer)
            set_module(model, name, layer)
        out.append((name, layer))
    return out


# -- weights edited in place -------------------------------------------------------------------
def recurrent_weight_names(module: nn.Module) -> list[str]:
    """The weight matrices of a recurrent layer, in torch's order (biases left out)."""
    return [n for n in getattr(module, "_flat_weights_names", []) if n.startswith("weight_")]


@dataclass(frozen=True, eq=False)
class WeightRef:
    """One weight matrix a method edits in place: ``module.<param>`` of the layer called ``owner``.

    ``transposed``: stored ``[in, out]``; :meth:`out_in` / :meth:`from_out_in` convert tensors of
    its shape to and from the usual ``[out, in, ...]`` layout. ``weight`` is the parameter itself,
    so code written for layers (``layer.weight``) reads a ``WeightRef`` the same way.
    """

    owner: str
    module: nn.Module
    param: str = "weight"
    transposed: bool = False

    @property
    def weight(self) -> torch.Tensor:
        return getattr(self.module, self.param)

    def mask(self) -> torch.Tensor | None:
        return get_mask(self.module, self.param)

    def set_mask(self, mask: torch.Tensor) -> None:
        """Mask (in the weight's own layout) that keeps pruned weights at zero through training."""
        set_mask(self.module, self.param, mask.contiguous())

    def out_in(self, t: torch.Tensor | None = None) -> torch.Tensor:
        """``t`` (default: the weight) as ``[out, in, ...]`` (a view)."""
        t = self.weight if t is None else t
        return t.t() if self.transposed else t

    def from_out_in(self, t: torch.Tensor) -> torch.Tensor:
        """Inverse of :meth:`out_in`."""
        return t.t() if self.transposed else t


def linear_features(layer: nn.Module) -> tuple[int, int]:
    """``(in_features, out_features)`` of a Linear, GPT-2's Conv1D (weight ``[in, out]``), or a layer
    standing in for a Linear (quantized, factorized ...: every replacement exposes the ``weight`` it
    computes with, ``[out, in]``)."""
    if isinstance(layer, nn.Linear):
        return layer.in_features, layer.out_features
    rows, cols = (int(n) for n in layer.weight.shape[:2])
    return (rows, cols) if is_transposed_linear(layer) else (cols, rows)


def weight_refs(layers: list[tuple[str, nn.Module]]) -> list[tuple[str, WeightRef]]:
    """``(name, WeightRef)`` of every weight matrix of ``layers``: ``name`` for a layer with one
    ``weight``, ``name.weight_ih_l0`` ... for a recurrent layer."""
    out = []
    for name, layer in layers:
        params = recurrent_weight_names(layer) if isinstance(layer, nn.RNNBase) else ["weight"]
        for p in params:
            full = name if p == "weight" else f"{name}.{p}"
            out.append((full, WeightRef(name, layer, p, is_transposed_linear(layer))))
    return out


# -- parents that read a child's weight --------------------------------------------------------
class WeightRead(NamedTuple):
    """Why a parent reads a child layer's ``weight``/``bias`` itself; ``calls_layer``: whether the
    parent also calls the layer (False: the layer's ``forward`` never runs)."""

    reason: str
    calls_layer: bool


# parent type name -> {child attribute: how the parent uses it}
WEIGHT_READERS: dict[str, dict[str, WeightRead]] = {
    "MultiheadAttention": {"out_proj": WeightRead(
        "nn.MultiheadAttention reads out_proj.weight itself and never calls out_proj", False)},
    "WindowAttention": {"qkv": WeightRead(
        "Swin V2 window attention computes qkv with F.linear (no key bias) and never calls qkv", False)},
    "TransformerEncoderLayer": {child: WeightRead(
        f"nn.TransformerEncoderLayer's inference fast path reads {child}.weight itself", True)
        for child in ("linear1", "linear2")},
}


# subclasses whose forward computes what their base class's does (timm's Linear adds only a
# TorchScript branch): methods may replace them like their base class
SAME_FORWARD = {"timm.layers.linear.Linear"}


def overrides_forward(module: nn.Module, base: type[nn.Module]) -> bool:
    """True when ``module``'s class changes what ``base.forward`` computes (see :data:`SAME_FORWARD`)."""
    cls = type(module)
    return cls.forward is not base.forward and f"{cls.__module__}.{cls.__qualname__}" not in SAME_FORWARD


def parent_reads_weight(model: nn.Module, name: str) -> WeightRead | None:
    """How the parent of layer ``name`` reads its weight directly, or None when it only calls it."""
    parent_name, _, child = name.rpartition(".")
    parent = get_module(model, parent_name) if parent_name else model
    if parent is None:
        return None
    if isinstance(parent, nn.TransformerEncoderLayer) and getattr(parent.self_attn, "in_proj_bias", None) is None:
        return None  # its fast path needs packed attention with a bias (modelpress' Attention has none)
    if type(parent).__name__ == "WindowAttention" and not (getattr(parent, "v2", False) and child == "qkv"
                                                           and parent.qkv.bias is not None):
        return None  # V1 calls its qkv; V2 computes it with F.linear to leave out the key bias
    for c in type(parent).__mro__:
        read = WEIGHT_READERS.get(c.__name__, {}).get(child)
        if read is not None:
            return read
    return None
