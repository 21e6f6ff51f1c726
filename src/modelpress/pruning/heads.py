"""Attention-head and FFN-neuron pruning for BERT-style encoders (``prune.heads``).

In every selected transformer layer, the least important ``head_ratio`` of the attention
heads and ``ffn_ratio`` of the intermediate (FFN) neurons are physically removed:

* a head is ``attention_head_size`` rows of the query, key and value Linears plus the same
  columns of the attention output projection; the attention module's ``num_attention_heads``
  and ``all_head_size`` follow (``attention_head_size`` stays), so eager and SDPA attention
  both keep working;
* an FFN neuron is one row of ``intermediate.dense`` and one column of ``output.dense``.

The hidden size (embeddings, residual stream, LayerNorms, the model's output) never changes.
Importance is ``l1`` (L1 norm of a head's q/k/v rows and output columns, each matrix
normalised by its mean, as in :mod:`.importance`) or ``taylor`` (``|sum(w * grad)|`` over the
same weights, from a few batches of data with a loss). Works on the zoo's ``minilm`` and on
any ``transformers`` BERT/RoBERTa-style model; the saved artifact records the new head counts
(:mod:`modelpress.nn.records`) so it reloads.

    >>> import torch, transformers
    >>> from modelpress import prune
    >>> from modelpress.artifact.hf import SentenceEncoder
    >>> cfg = transformers.BertConfig(vocab_size=50, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
    ...                               intermediate_size=64, max_position_embeddings=16)
    >>> model = SentenceEncoder(transformers.BertModel(cfg, add_pooling_layer=False))
    >>> small = prune(model, HeadPruning(head_ratio=0.5, ffn_ratio=0.25))
    >>> attn = small.backbone.encoder.layer[0].attention.self
    >>> ffn = small.backbone.encoder.layer[0].intermediate.dense
    >>> attn.num_attention_heads, attn.query.out_features, ffn.out_features
    (2, 16, 48)

Returns a pruned copy (``inplace=True`` edits the model).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
from pydantic import Field
from torch import nn

from ..core.config import MethodConfig
from ..core.errors import DataError, ScopeError, UnsupportedError
from ..core.scope import Scope
from ..engine import MethodInputs, MethodResult, register_method
from ..graph.surgery import prune_axis
from .importance import gradient_batches, normalised_mean

LAYER_TYPES = ("BertLayer", "RobertaLayer", "XLMRobertaLayer", "CamembertLayer", "ElectraLayer")


class HeadPruning(MethodConfig):
    """Remove attention heads and FFN neurons of BERT-style encoder layers."""

    head_ratio: float = Field(0.25, ge=0, lt=1, description="fraction of the heads removed in each layer")
    ffn_ratio: float = Field(0.0, ge=0, lt=1, description="fraction of the FFN neurons removed in each layer")
    importance: Literal["l1", "taylor"] = "l1"
    scope: Scope = Scope()
    min_heads: int = Field(1, ge=1, description="heads every layer keeps at least")
    taylor_batches: int = Field(4, ge=1, description="batches of data used by taylor importance")


@dataclass
class EncoderLayer:
    """The parts of one BERT-style layer that head/FFN pruning edits."""

    name: str
    attention: nn.Module   # has num_attention_heads, attention_head_size, all_head_size
    query: nn.Linear
    key: nn.Linear
    value: nn.Linear
    attn_out: nn.Linear    # attention.output.dense: input columns are the heads
    ffn_in: nn.Linear      # intermediate.dense: output rows are the FFN neurons
    ffn_out: nn.Linear     # output.dense: input columns are the FFN neurons

    @property
    def heads(self) -> int:
        return int(self.attention.num_attention_heads)

    @property
    def head_size(self) -> int:
        return int(self.attention.attention_head_size)

    def head_rows(self, heads: list[int]) -> list[int]:
        d = self.head_size
        return [h * d + i for h in heads for i in range(d)]


def _linear(module: nn.Module, path: str) -> nn.Linear | None:
    for part in path.split("."):
        module = getattr(module, part, None)
        if module is None:
            return None
    return module if isinstance(module, nn.Linear) else None


def find_encoder_layers(model: nn.Module) -> list[EncoderLayer]:
    """Every BERT-style layer of ``model`` (found by structure, not by class name)."""
    layers = []
    for name, m in model.named_modules():
        attn = getattr(getattr(m, "attention", None), "self", None)
        parts = {p: _linear(m, p) for p in ("attention.self.query", "attention.self.key", "attention.self.value",
                                            "attention.output.dense", "intermediate.dense", "output.dense")}
        if attn is None or any(v is None for v in parts.values()):
            continue
        if not all(isinstance(getattr(attn, a, None), int) for a in ("num_attention_heads", "attention_head_size")):
            continue
        q, k, v, o, fi, fo = parts.values()
        if not (q.out_features == k.out_features == v.out_features == o.in_features
                == attn.num_attention_heads * attn.attention_head_size and fi.out_features == fo.in_features):
            raise UnsupportedError(f"layer {name!r} looks BERT-style but its head sizes do not add up",
                                   hint="prune.heads supports BERT/RoBERTa-style self-attention")
        layers.append(EncoderLayer(name, attn, q, k, v, o, fi, fo))
    return layers


def select_layers(model: nn.Module, cfg: HeadPruning) -> list[EncoderLayer]:
    layers = find_encoder_layers(model)
    if not layers:
        raise UnsupportedError(f"{type(model).__name__} has no BERT-style encoder layer "
                               "(attention.self.query/key/value, attention.output.dense, intermediate.dense, "
                               "output.dense)", hint="prune.heads is for transformer encoders; use prune.channels "
                                                     "for CNNs and MLPs")
    types = tuple(sorted({type(model.get_submodule(x.name)).__name__ for x in layers}))
    chosen = {n for n, _ in cfg.scope.resolve(model, types)}
    layers = [x for x in layers if x.name in chosen]
    if not layers:
        raise ScopeError("the scope selects no encoder layer", hint=f"encoder layers are of type {', '.join(types)}")
    return layers


# -- importance ----------------------------------------------------------------------------------
def _head_parts(layer: EncoderLayer, rows: dict[str, torch.Tensor]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per-head sums of ``rows`` (per-weight values of q, k, v rows and output columns)."""
    h, d = layer.heads, layer.head_size
    parts = []
    for key in ("query", "key", "value"):
        parts.append(rows[key].reshape(h, d, -1).sum((1, 2)).double())
    parts.append(rows["attn_out"].reshape(-1, h, d).sum((0, 2)).double())
    return [(p, torch.ones(h, dtype=torch.bool)) for p in parts]


def _ffn_parts(layer: EncoderLayer, rows: dict[str, torch.Tensor]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    n = layer.ffn_in.out_features
    return [(rows["ffn_in"].sum(1).double(), torch.ones(n, dtype=torch.bool)),
            (rows["ffn_out"].sum(0).double(), torch.ones(n, dtype=torch.bool))]


_WEIGHTS = ("query", "key", "value", "attn_out", "ffn_in", "ffn_out")


def _accumulate(total, parts):
    """Add ``|parts|`` (per-head or per-neuron Taylor terms of one batch) to ``total``."""
    parts = [(p.abs(), covered) for p, covered in parts]
    return parts if total is None else [(a + p, c) for (a, c), (p, _) in zip(total, parts)]


def _weights(layer: EncoderLayer) -> list[torch.Tensor]:
    return [getattr(layer, k).weight for k in _WEIGHTS]


def layer_importance(model: nn.Module, layers: list[EncoderLayer], cfg: HeadPruning,
                     inputs: MethodInputs | None = None):
    """``[(head_scores[H], ffn_scores[I])]`` per layer; higher = keep."""
    if cfg.importance == "l1":
        rows = [{k: getattr(layer, k).weight.detach().abs() for k in _WEIGHTS} for layer in layers]
        heads = [_head_parts(layer, r) for layer, r in zip(layers, rows)]
        ffn = [_ffn_parts(layer, r) for layer, r in zip(layers, rows)]
    else:
        if inputs is None or inputs.data is None:
            raise DataError("importance='taylor' needs data with a loss", hint="pass data=..., or use 'l1'")
        heads, ffn = [None] * len(layers), [None] * len(layers)
        weights = [w for layer in layers for w in _weights(layer)]
        for grads in gradient_batches(model, weights, inputs.data, inputs.loss_fn, cfg.taylor_batches,
                                      "taylor importance"):
            for i, layer in enumerate(layers):  # |sum(w * grad)| per head / neuron, per batch
                g = grads[i * len(_WEIGHTS):(i + 1) * len(_WEIGHTS)]
                wg = {k: w.detach() * gk for k, w, gk in zip(_WEIGHTS, _weights(layer), g)}
                heads[i] = _accumulate(heads[i], _head_parts(layer, wg))
                ffn[i] = _accumulate(ffn[i], _ffn_parts(layer, wg))
    return [(normalised_mean(h, layer.heads), normalised_mean(f, layer.ffn_in.out_features))
            for layer, h, f in zip(layers, heads, ffn)]


# -- removal -------------------------------------------------------------------------------------
def _lowest(scores: torch.Tensor, k: int) -> list[int]:
    order = sorted(range(len(scores)), key=lambda i: (float(scores[i]), i))
    return sorted(order[:k])


def prune_heads(layer: EncoderLayer, heads: list[int]) -> None:
    """Physically remove attention ``heads`` (indices) of ``layer``."""
    if not heads:
        return
    keep_heads = [h for h in range(layer.heads) if h not in set(heads)]
    if not keep_heads:
        raise UnsupportedError(f"cannot remove every head of {layer.name!r}")
    rows = layer.head_rows(keep_heads)
    for lin in (layer.query, layer.key, layer.value):
        prune_axis(lin, "out", rows)
    prune_axis(layer.attn_out, "in", rows)
    layer.attention.num_attention_heads = len(keep_heads)
    layer.attention.all_head_size = len(keep_heads) * layer.head_size


def prune_ffn(layer: EncoderLayer, neurons: list[int]) -> None:
    """Physically remove FFN ``neurons`` (indices) of ``layer``."""
    if not neurons:
        return
    drop = set(neurons)
    keep = [i for i in range(layer.ffn_in.out_features) if i not in drop]
    prune_axis(layer.ffn_in, "out", keep)
    prune_axis(layer.ffn_out, "in", keep)


def _count(ratio: float, n: int, floor_keep: int) -> int:
    return min(math.floor(ratio * n + 0.5), max(0, n - floor_keep))


@register_method("prune.heads", HeadPruning, structural=True, layer_types=LAYER_TYPES)
def head_prune(model: nn.Module, cfg: HeadPruning, inputs: MethodInputs) -> MethodResult:
    """Remove attention heads and FFN neurons of BERT-style encoder layers."""
    layers = select_layers(model, cfg)
    params0 = sum(p.numel() for p in model.parameters())
    scores = layer_importance(model, layers, cfg, inputs)
    heads, ffn = {}, {}
    for layer, (head_scores, ffn_scores) in zip(layers, scores):
        h0, f0 = layer.heads, layer.ffn_in.out_features
        prune_heads(layer, _lowest(head_scores, _count(cfg.head_ratio, h0, cfg.min_heads)))
        prune_ffn(layer, _lowest(ffn_scores, _count(cfg.ffn_ratio, f0, 1)))
        heads[layer.name] = [h0, layer.heads]
        ffn[layer.name] = [f0, layer.ffn_in.out_features]
    params1 = sum(p.numel() for p in model.parameters())
    inputs.log(f"prune.heads: {sum(h[0] for h in heads.values())} -> {sum(h[1] for h in heads.values())} heads, "
               f"params {params0:,} -> {params1:,}")
    return MethodResult(model, {"heads": heads, "ffn": ffn, "params": [params0, params1]})
