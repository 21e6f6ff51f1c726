"""Attention-head and FFN-neuron pruning of transformer blocks (``prune.heads``).

Works on the attention of any architecture that projects queries, keys and values with Linear
layers (separate or fused, e.g. GPT-2's ``c_attn``) and splits them into heads: BERT, RoBERTa,
DistilBERT, ALBERT, ViT, Swin, GPT-2, Llama, Qwen2, Mistral, Phi, timm ViTs ... The parts are
found by structure (:func:`find_blocks`), not by module names:

* the *attention*: a module with a head size (``head_dim`` / ``attention_head_size``, or a head
  count that divides its query width) whose first linear children are the query, key and value
  projections (or one fused projection three times as wide as its input); its *output
  projection* is the next linear layer reading all the heads (inside it, or beside it as in BERT);
* the *FFN*: in the nearest enclosing block, one linear layer from the intermediate width back to
  the hidden width and one or two (gated: SwiGLU's gate and up) from the hidden width to it.

In every selected block the least important ``head_ratio`` of the heads and ``ffn_ratio`` of the
FFN neurons are physically removed: a head is its rows of the query/key/value projections and the
same columns of the output projection; an FFN neuron is a row of each input layer and a column of
the output layer. With grouped-query attention (fewer key/value heads than query heads)
``kv_heads="groups"`` removes whole groups (a key/value head with the query heads that share it)
and ``"within"`` removes query heads evenly within every group, keeping the key/value heads. Head
counts the attention module stores (``num_heads``, ``all_head_size``, ``split_size``,
``num_key_value_groups`` ...) follow and are recorded in the artifact. The hidden size never
changes. Given data, the result is checked against the original model with the removed heads and
neurons zeroed (an architecture this does not fit fails loudly instead of giving a wrong model).

Importance is ``l1`` (L1 norm of a head's rows and columns, each matrix normalised by its mean, as
in :mod:`.importance`) or ``taylor`` (``|sum(w * grad)|`` over the same weights from a few batches).

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

import copy
import math
from dataclasses import dataclass, field
from typing import Literal

import torch
from pydantic import Field
from torch import nn

from ..core.config import MethodConfig
from ..core.data import call_model, output_tensor, slice_inputs
from ..core.errors import DataError, ScopeError, UnsupportedError
from ..core.scope import Scope
from ..engine import MethodInputs, MethodResult, register_method
from ..graph.surgery import prune_axis
from ..nn.attention import convert_attention
from ..nn.layer_kinds import is_transposed_linear, linear_equivalent, linear_features
from ..nn.modules import set_module
from ..nn.records import mark_int_attrs
from ..nn.window_attention import is_torchvision_window_attention
from .importance import gradient_batches, normalised_mean

HEAD_SIZE_ATTRS = ("head_dim", "attention_head_size", "dim_per_head")
HEAD_COUNT_ATTRS = ("num_heads", "num_attention_heads", "n_heads", "n_head")
WIDTH_ATTRS = ("all_head_size", "split_size", "inner_dim", "attn_dim")  # heads x head size
KV_COUNT_ATTRS = ("num_key_value_heads", "num_kv_heads")


class HeadPruning(MethodConfig):
    """Remove attention heads and FFN neurons of transformer blocks."""

    head_ratio: float = Field(0.25, ge=0, lt=1, description="fraction of the heads removed in each layer")
    ffn_ratio: float = Field(0.0, ge=0, lt=1, description="fraction of the FFN neurons removed in each layer")
    importance: Literal["l1", "taylor"] = "l1"
    kv_heads: Literal["groups", "within"] = Field(
        "groups", description="grouped-query attention: remove whole key/value groups, or query heads evenly "
                              "within each group")
    scope: Scope = Scope()
    min_heads: int = Field(1, ge=1, description="heads every layer keeps at least")
    taylor_batches: int = Field(4, ge=1, description="batches of data used by taylor importance")


# -- linear maps: nn.Linear and transformers' Conv1D (a Linear storing its weight transposed) -------
def _is_linear(m: nn.Module) -> bool:
    return isinstance(m, nn.Linear) or is_transposed_linear(m)


def _rows(m: nn.Module, w: torch.Tensor | None = None) -> torch.Tensor:
    """The weight (or ``w`` shaped like it) as ``[out, in]``."""
    w = m.weight if w is None else w
    return w.t() if is_transposed_linear(m) else w


# -- finding the parts -------------------------------------------------------------------------------
@dataclass
class Block:
    """One transformer block's attention and FFN, as :func:`find_blocks` found them."""

    name: str                 # the block (scope and report key)
    attention_name: str
    attention: nn.Module      # holds the head counts
    qkv: list[tuple[str, int, int]]  # (module name, first row, rows) of the query, key, value projections
    out_name: str             # the output projection: its input columns are the heads
    head_dim: int
    heads: int
    kv_heads: int
    ffn_in: list[str] = field(default_factory=list)   # hidden -> intermediate (1, or gate + up)
    ffn_out: str | None = None                        # intermediate -> hidden

    @property
    def group_size(self) -> int:
        return self.heads // self.kv_heads


def _head_dim(attn: nn.Module, q_width: int) -> int | None:
    for a in HEAD_SIZE_ATTRS:
        v = getattr(attn, a, None)
        if isinstance(v, int) and v > 0 and q_width % v == 0:
            return v
    for a in HEAD_COUNT_ATTRS:
        v = getattr(attn, a, None)
        if isinstance(v, int) and v > 0 and q_width % v == 0:
            return q_width // v
    return None


def _projections(name: str, attn: nn.Module):
    """``(qkv, rest)``: the query/key/value slices among ``attn``'s linear children, and the others."""
    linears = [(f"{name}.{n}" if name else n, m) for n, m in attn.named_children() if _is_linear(m)]
    if len(linears) >= 3 and all(linear_features(m)[0] == linear_features(linears[0][1])[0] for _, m in linears[:3]):
        (qn, q), (kn, k), (vn, v) = linears[:3]
        q_out, k_out, v_out = (linear_features(m)[1] for m in (q, k, v))
        if k_out == v_out and q_out % k_out == 0:
            return [(qn, 0, q_out), (kn, 0, k_out), (vn, 0, v_out)], linears[3:]
    if len(linears) >= 2:  # one fused projection (q, k, v stacked) read back by the output projection
        (fn, fused), rest = linears[0], linears[1:]
        third = linear_features(fused)[1] // 3
        if linear_features(fused)[1] == 3 * third and any(linear_features(m)[0] == third for _, m in rest):
            return [(fn, 0, third), (fn, third, third), (fn, 2 * third, third)], rest
    return None, []


def _linear_descendants(model: nn.Module, root: str) -> list[tuple[str, nn.Module]]:
    prefix = f"{root}." if root else ""
    base = model.get_submodule(root) if root else model
    return [(prefix + n, m) for n, m in base.named_modules() if n and _is_linear(m)]


def _parent(name: str) -> str:
    return name.rpartition(".")[0]


def _find_ffn(model: nn.Module, root: str, hidden: int, taken: set[str]) -> tuple[list[str], str] | None:
    """The FFN inside ``root``: one layer intermediate -> hidden and one or two hidden -> intermediate."""
    candidates = [(n, m) for n, m in _linear_descendants(model, root) if n not in taken]
    by_width: dict[int, tuple[list[str], list[str]]] = {}
    for n, m in candidates:
        d_in, d_out = linear_features(m)
        if d_in == hidden and d_out != hidden:
            by_width.setdefault(d_out, ([], []))[0].append(n)
        elif d_out == hidden and d_in != hidden:
            by_width.setdefault(d_in, ([], []))[1].append(n)
    found = [(ups, downs[0]) for ups, downs in by_width.values() if len(downs) == 1 and 1 <= len(ups) <= 2]
    return found[0] if len(found) == 1 else None


def _per_head_tensors(attn: nn.Module, heads: int) -> list[tuple[str, int]]:
    """The attention module's own tensors with a dimension of one entry per head (Swin's relative
    position bias table ``[(2W-1)^2, heads]``, a per-head logit scale): ``(name, dim)``, with dim -1
    when more than one dim has that size (which one holds the heads is then unknown)."""
    declared = getattr(attn, "per_head_dims", None)  # a module that says which (WindowAttention)
    if isinstance(declared, dict):
        return [(n, d) for n, d in declared.items() if isinstance(getattr(attn, n, None), torch.Tensor)]
    found = []
    for mname, m in attn.named_modules():
        if _is_linear(m):
            continue  # the projections: their head rows and columns are what is cut
        for tname, t in list(m.named_parameters(recurse=False)) + list(m.named_buffers(recurse=False)):
            dims = [d for d, n in enumerate(t.shape) if n == heads]
            if dims and heads > 1:
                found.append((f"{mname}.{tname}" if mname else tname, dims[0] if len(dims) == 1 else -1))
    return found


# attention whose forward derives the head size from its input width (C // num_heads): removing
# heads would change the head size instead of the head count
_WIDTH_BOUND = {"ShiftedWindowAttention": "torchvision's shifted_window_attention",
                "ShiftedWindowAttentionV2": "torchvision's shifted_window_attention"}


def find_blocks(model: nn.Module, skipped: dict[str, str] | None = None) -> list[Block]:
    """Every transformer block of ``model`` whose attention :func:`prune_heads` can edit; attention
    modules found but left alone are added to ``skipped`` with the reason."""
    blocks, used = [], set()
    for name, attn in model.named_modules():
        qkv, rest = _projections(name, attn)
        if qkv is None:
            continue
        q_width = qkv[0][2]
        head_dim = _head_dim(attn, q_width)
        if head_dim is None or qkv[1][2] % head_dim:
            continue
        out = next((n for n, m in rest if linear_features(m)[0] == q_width), None)
        if out is None:  # BERT-style: the output projection sits beside the attention module
            proj = {n for n, _, _ in qkv}
            out = next((n for n, m in _linear_descendants(model, _parent(name))
                        if n not in proj and not n.startswith(f"{name}.") and linear_features(m)[0] == q_width), None)
        if out is None or out in used:
            continue
        per_head = _per_head_tensors(attn, q_width // head_dim)
        unclear = [n for n, d in per_head if d < 0]
        why = (f"{_WIDTH_BOUND[type(attn).__name__]} derives the head size from the input width"
               if type(attn).__name__ in _WIDTH_BOUND else
               f"per-head tensors {', '.join(unclear)} have several dims of the head count's size" if unclear else
               "per-head tensors with grouped-query attention" if per_head and qkv[1][2] != q_width else None)
        if why:
            if skipped is not None:
                skipped[name] = why
            continue
        hidden = linear_features(model.get_submodule(out))[1]
        taken = {n for n, _, _ in qkv} | {out}
        block, ffn, root = _parent(name), None, _parent(name)
        for _ in range(3):  # the nearest enclosing module holding exactly one FFN
            ffn = _find_ffn(model, root, hidden, taken)
            if ffn is not None or not root:
                block = root if ffn is not None else block
                break
            root = _parent(root)
        used.add(out)
        blocks.append(Block(block, name, attn, qkv, out, head_dim, q_width // head_dim, qkv[1][2] // head_dim,
                            ffn[0] if ffn else [], ffn[1] if ffn else None))
    return blocks


def select_blocks(model: nn.Module, cfg: HeadPruning, skipped: dict[str, str] | None = None) -> list[Block]:
    skipped = {} if skipped is None else skipped
    blocks = find_blocks(model, skipped)
    if not blocks:
        why = "; ".join(f"{n}: {r}" for n, r in list(skipped.items())[:2])
        raise UnsupportedError(
            f"{type(model).__name__} has no transformer attention prune.heads can edit (query, key and value "
            f"Linear projections split into heads, and an output projection){f' ({why})' if why else ''}",
            hint="prune.heads is for transformer blocks; use prune.channels for CNNs and MLPs")
    types = tuple(sorted({type(model.get_submodule(b.name) if b.name else model).__name__ for b in blocks}))
    if all(b.name for b in blocks) or cfg.scope.include or cfg.scope.exclude:
        chosen = {n for n, _ in cfg.scope.resolve(model, types)}
        blocks = [b for b in blocks if b.name in chosen]
    # else: the model is itself the one block (a bare nn.TransformerEncoderLayer); the default scope keeps it
    if not blocks:
        raise ScopeError("the scope selects no transformer block", hint=f"blocks are of type {', '.join(types)}")
    return blocks


# -- importance ------------------------------------------------------------------------------------
def _weights(model: nn.Module, b: Block) -> list[tuple[str, torch.Tensor]]:
    """The weights scored, in a fixed order: q, k, v slices, output, FFN inputs, FFN output."""
    names = [n for n, _, _ in b.qkv] + [b.out_name] + b.ffn_in + ([b.ffn_out] if b.ffn_out else [])
    return [(n, model.get_submodule(n).weight) for n in dict.fromkeys(names)]


def _parts(model: nn.Module, b: Block, values: dict[str, torch.Tensor], unit: str):
    """Per-unit sums of ``values`` (per-weight magnitudes or Taylor terms, keyed by module name):
    the head/group parts and the FFN parts, each ``(scores, covered)``."""
    d = b.head_dim
    rows = {n: _rows(model.get_submodule(n), v) for n, v in values.items()}
    q, k, v = ((rows[n][start:start + size]) for n, start, size in b.qkv)
    o = rows[b.out_name]  # [hidden, heads x d]
    h, g = b.heads, b.kv_heads
    if unit == "group":  # a key/value head with its query heads
        per = [q.reshape(g, -1).sum(1), k.reshape(g, -1).sum(1), v.reshape(g, -1).sum(1),
               o.reshape(o.shape[0], g, -1).sum((0, 2))]
    elif unit == "query":  # a query head alone: its rows and output columns
        per = [q.reshape(h, -1).sum(1), o.reshape(o.shape[0], h, d).sum((0, 2))]
    else:  # a head of plain multi-head attention
        per = [q.reshape(h, d, -1).sum((1, 2)), k.reshape(h, d, -1).sum((1, 2)), v.reshape(h, d, -1).sum((1, 2)),
               o.reshape(o.shape[0], h, d).sum((0, 2))]
    heads = [(p.double(), torch.ones(p.numel(), dtype=torch.bool)) for p in per]
    ffn = []
    if b.ffn_out:
        ffn = [(rows[n].sum(1).double(), torch.ones(rows[n].shape[0], dtype=torch.bool)) for n in b.ffn_in]
        ffn.append((rows[b.ffn_out].sum(0).double(), torch.ones(rows[b.ffn_out].shape[1], dtype=torch.bool)))
    return heads, ffn


def _unit(b: Block, cfg: HeadPruning) -> str:
    if b.kv_heads == b.heads:
        return "head"
    return "group" if cfg.kv_heads == "groups" else "query"


def _accumulate(total, parts):
    """Add ``|parts|`` (per-unit Taylor terms of one batch) to ``total``."""
    parts = [(p.abs(), covered) for p, covered in parts]
    return parts if total is None else [(a + p, c) for (a, c), (p, _) in zip(total, parts)]


def block_importance(model: nn.Module, blocks: list[Block], cfg: HeadPruning, inputs: MethodInputs | None = None):
    """``[(unit_scores, ffn_scores or None)]`` per block; higher = keep."""
    weights = [_weights(model, b) for b in blocks]
    if cfg.importance == "l1":
        parts = [_parts(model, b, {n: w.detach().abs() for n, w in ws}, _unit(b, cfg))
                 for b, ws in zip(blocks, weights)]
        heads, ffn = [p[0] for p in parts], [p[1] for p in parts]
    else:
        if inputs is None or inputs.data is None:
            raise DataError("importance='taylor' needs data with a loss", hint="pass data=..., or use 'l1'")
        heads, ffn = [None] * len(blocks), [None] * len(blocks)
        flat = [w for ws in weights for _, w in ws]
        for grads in gradient_batches(model, flat, inputs.data, inputs.loss_fn, cfg.taylor_batches,
                                      "taylor importance"):
            at = 0
            for i, (b, ws) in enumerate(zip(blocks, weights)):
                terms = {n: w.detach() * g for (n, w), g in zip(ws, grads[at:at + len(ws)])}
                at += len(ws)
                hp, fp = _parts(model, b, terms, _unit(b, cfg))
                heads[i], ffn[i] = _accumulate(heads[i], hp), _accumulate(ffn[i], fp) if fp else None
    return [(normalised_mean(h, len(h[0][0])), normalised_mean(f, len(f[0][0])) if f else None)
            for h, f in zip(heads, ffn)]


# -- removal -----------------------------------------------------------------------------------------
def _lowest(scores: torch.Tensor, k: int) -> list[int]:
    order = sorted(range(len(scores)), key=lambda i: (float(scores[i]), i))
    return sorted(order[:k])


def _count(ratio: float, n: int, floor_keep: int) -> int:
    return min(math.floor(ratio * n + 0.5), max(0, n - floor_keep))


def _linear_for_edit(model: nn.Module, name: str) -> nn.Module:
    """The layer ``name``, a Conv1D turned into the equivalent nn.Linear first (it is resized)."""
    m = model.get_submodule(name)
    if is_transposed_linear(m):
        m = linear_equivalent(m)
        set_module(model, name, m)
    return m


def _removed_heads(b: Block, unit: str, removed_units: list[int]) -> tuple[list[int], list[int]]:
    """``(query heads, key/value heads)`` a choice of units removes."""
    if unit == "group":
        r = b.group_size
        return [g * r + i for g in removed_units for i in range(r)], list(removed_units)
    if unit == "query":
        return list(removed_units), []
    return list(removed_units), list(removed_units)


def prune_heads(model: nn.Module, b: Block, drop_q: list[int], drop_kv: list[int]) -> None:
    """Physically remove query heads ``drop_q`` and key/value heads ``drop_kv`` of block ``b``."""
    if not drop_q:
        return
    d = b.head_dim
    keep_q = [h for h in range(b.heads) if h not in set(drop_q)]
    keep_kv = [h for h in range(b.kv_heads) if h not in set(drop_kv)]
    if not keep_q or not keep_kv:
        raise UnsupportedError(f"cannot remove every head of {b.attention_name!r}")
    if len(keep_q) % len(keep_kv):
        raise UnsupportedError(f"{b.attention_name!r}: {len(keep_q)} query heads cannot share {len(keep_kv)} "
                               "key/value heads evenly", hint="use kv_heads='groups'")
    rows = {"q": [h * d + i for h in keep_q for i in range(d)],
            "kv": [h * d + i for h in keep_kv for i in range(d)]}
    keep_by_module: dict[str, list[int]] = {}
    for (name, start, _), kind in zip(b.qkv, ("q", "kv", "kv")):
        keep_by_module.setdefault(name, []).extend(start + r for r in rows[kind])
    for name, keep in keep_by_module.items():
        prune_axis(_linear_for_edit(model, name), "out", keep)
    prune_axis(_linear_for_edit(model, b.out_name), "in", rows["q"])
    for tname, dim in _per_head_tensors(b.attention, b.heads):  # e.g. Swin's relative position bias
        owner, _, attr = tname.rpartition(".")
        prune_axis(b.attention.get_submodule(owner) if owner else b.attention, f"param:{attr}:{dim}", keep_q)
    _update_counts(b, len(keep_q), len(keep_kv))


def _update_counts(b: Block, heads: int, kv_heads: int) -> None:
    """Set the head counts the attention module stores (those equal to the old counts)."""
    attn, changed = b.attention, []
    olds = {a: getattr(attn, a) for a in (*HEAD_COUNT_ATTRS, *WIDTH_ATTRS, *KV_COUNT_ATTRS, "num_key_value_groups")
            if isinstance(getattr(attn, a, None), int) and not isinstance(getattr(attn, a), bool)}
    for a, old in olds.items():
        new = None
        if a in HEAD_COUNT_ATTRS and old == b.heads:
            new = heads
        elif a in WIDTH_ATTRS and old == b.heads * b.head_dim:
            new = heads * b.head_dim
        elif a in KV_COUNT_ATTRS and old == b.kv_heads:
            new = kv_heads
        elif a == "num_key_value_groups" and old == b.group_size:
            new = heads // kv_heads
        if new is not None and new != old:
            setattr(attn, a, new)
            changed.append(a)
    mark_int_attrs(attn, changed)
    b.heads, b.kv_heads = heads, kv_heads


def prune_ffn(model: nn.Module, b: Block, neurons: list[int]) -> None:
    """Physically remove FFN ``neurons`` (indices) of block ``b``."""
    if not neurons or not b.ffn_out:
        return
    drop = set(neurons)
    width = linear_features(model.get_submodule(b.ffn_out))[0]
    keep = [i for i in range(width) if i not in drop]
    for name in b.ffn_in:
        prune_axis(_linear_for_edit(model, name), "out", keep)
    prune_axis(_linear_for_edit(model, b.ffn_out), "in", keep)


def _zero_removed(reference: nn.Module, b: Block, drop_q: list[int], ffn: list[int]) -> None:
    """In ``reference`` (an unpruned copy) zero what the cut removes: the output projection's columns
    of the removed heads and the FFN output's columns of the removed neurons."""
    with torch.no_grad():
        o = reference.get_submodule(b.out_name)
        cols = [h * b.head_dim + i for h in drop_q for i in range(b.head_dim)]
        _rows(o)[:, cols] = 0
        if ffn:
            _rows(reference.get_submodule(b.ffn_out))[:, ffn] = 0


def _verify(pruned: nn.Module, reference: nn.Module, inputs: MethodInputs) -> tuple[float, float]:
    """``(max abs difference, max abs output)`` of the pruned model against the reference with the
    cut parts zeroed, on two samples of the data."""
    sample = slice_inputs(next(iter(inputs.data.inputs())), 2)
    was_training = pruned.training
    pruned.eval(), reference.eval()
    try:
        with torch.no_grad():
            a, b = output_tensor(call_model(pruned, sample)), output_tensor(call_model(reference, sample))
    except (RuntimeError, ValueError, IndexError, TypeError) as exc:
        raise UnsupportedError(f"prune.heads on {type(pruned).__name__}: the pruned model no longer runs "
                               f"({type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''})",
                               hint="its attention reads head counts prune.heads cannot update; exclude those "
                                    "blocks with scope, or report the model") from None
    finally:
        pruned.train(was_training)
    if a.shape != b.shape:
        return float("inf"), 1.0
    return float((a.float() - b.float()).abs().max()), float(b.abs().max())


def _needs_attention(model: nn.Module) -> str | None:
    if find_blocks(model) or any(type(m) is nn.MultiheadAttention or is_torchvision_window_attention(m)
                                 for m in model.modules()):
        return None
    return "no transformer attention with Linear query/key/value projections"


@register_method("prune.heads", HeadPruning, structural=True, layer_types=("Linear",), requires=_needs_attention)
def head_prune(model: nn.Module, cfg: HeadPruning, inputs: MethodInputs) -> MethodResult:
    """Remove attention heads and FFN neurons of transformer blocks (any attention: MHA, GQA, fused qkv)."""
    skipped: dict[str, str] = {}
    params0 = sum(p.numel() for p in model.parameters())
    # nn.MultiheadAttention and torchvision's Swin tie their head size to their input width: their
    # exact equivalents with a stored head size have heads that can go
    convert_attention(model)
    blocks = select_blocks(model, cfg, skipped)
    scores = block_importance(model, blocks, cfg, inputs)
    reference = copy.deepcopy(model) if inputs.data is not None else None
    heads, ffn = {}, {}
    for b, (unit_scores, ffn_scores) in zip(blocks, scores):
        unit = _unit(b, cfg)
        h0, kv0 = b.heads, b.kv_heads
        if unit == "query":  # the same number from every group, so the groups stay equal
            per_group = _count(cfg.head_ratio, b.group_size, max(1, math.ceil(cfg.min_heads / kv0)))
            r = b.group_size
            removed = sorted(g * r + i for g in range(kv0)
                             for i in _lowest(unit_scores[g * r:(g + 1) * r], per_group))
        else:
            n_units = len(unit_scores)
            floor = max(1, math.ceil(cfg.min_heads / (b.group_size if unit == "group" else 1)))
            removed = _lowest(unit_scores, _count(cfg.head_ratio, n_units, floor))
        drop_q, drop_kv = _removed_heads(b, unit, removed)
        f0 = linear_features(model.get_submodule(b.ffn_out))[0] if b.ffn_out else 0
        drop_ffn = _lowest(ffn_scores, _count(cfg.ffn_ratio, f0, 1)) if ffn_scores is not None else []
        if reference is not None:
            _zero_removed(reference, b, drop_q, drop_ffn)
        prune_heads(model, b, drop_q, drop_kv)
        prune_ffn(model, b, drop_ffn)
        heads[b.name] = [h0, b.heads]
        if kv0 != h0:
            heads[b.name] += [kv0, b.kv_heads]
        if b.ffn_out:
            ffn[b.name] = [f0, linear_features(model.get_submodule(b.ffn_out))[0]]
    info = {"heads": heads, "ffn": ffn}
    if skipped:
        info["skipped"] = skipped
        inputs.log(f"prune.heads: left alone: {', '.join(f'{n} ({r})' for n, r in skipped.items())}")
    if reference is not None:
        err, scale = _verify(model, reference, inputs)
        if not err <= 1e-4 * max(1.0, scale):
            raise UnsupportedError(
                f"prune.heads on {type(model).__name__}: the pruned model does not compute what the original "
                f"does with those heads removed (max difference {err:.3g}); its attention reads head counts "
                "prune.heads cannot update", hint="exclude these blocks with scope, or report the model")
        info["check_max_abs_diff"] = err
    params1 = sum(p.numel() for p in model.parameters())
    info["params"] = [params0, params1]
    inputs.log(f"prune.heads: {sum(h[0] for h in heads.values())} -> {sum(h[1] for h in heads.values())} heads, "
               f"params {params0:,} -> {params1:,}")
    return MethodResult(model, info)
