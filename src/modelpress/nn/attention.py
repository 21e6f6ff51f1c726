"""Multi-head attention whose heads and widths can be pruned: a drop-in for ``nn.MultiheadAttention``.

``nn.MultiheadAttention`` packs the query/key/value projections in one ``in_proj_weight`` and
derives its head size as ``embed_dim // num_heads``: it cannot lose a head (the head size would
change) nor a channel of its input (``embed_dim`` is also the inner width). :class:`Attention`
computes the same function with separate ``q_proj``/``k_proj``/``v_proj``/``out_proj`` Linear
layers and a stored ``head_dim``, so :func:`from_multihead_attention` converts one exactly and
the structural methods then edit it like any transformer attention (``prune.heads`` removes heads,
``prune.channels`` the hidden width around it). It takes the same arguments, masks and layouts
(``batch_first``, ``key_padding_mask``, ``attn_mask``, ``need_weights``, ``is_causal``, the nested
tensors of ``nn.TransformerEncoder``'s inference path) and is recorded in artifacts.

    >>> import torch
    >>> from torch import nn
    >>> mha = nn.MultiheadAttention(16, 4, batch_first=True).eval()
    >>> attn = from_multihead_attention(mha)
    >>> x = torch.randn(2, 5, 16)
    >>> torch.allclose(attn(x, x, x)[0], mha(x, x, x)[0], atol=1e-6)
    True
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..core.errors import UnsupportedError
from .layer_kinds import linear_features
from .modules import set_module
from .records import buildable
from .window_attention import convert_window_attention


@buildable
class Attention(nn.Module):
    """Multi-head attention with separate projections and a free head size (see the module docstring)."""

    def __init__(self, embed_dim: int, num_heads: int, head_dim: int, kdim: int | None = None,
                 vdim: int | None = None, out_dim: int | None = None, bias: bool = True,
                 batch_first: bool = False, dropout: float = 0.0):
        super().__init__()
        inner = num_heads * head_dim
        self.num_heads, self.head_dim, self.batch_first, self.dropout = num_heads, head_dim, batch_first, dropout
        self.q_proj = nn.Linear(embed_dim, inner, bias=bias)
        self.k_proj = nn.Linear(kdim or embed_dim, inner, bias=bias)
        self.v_proj = nn.Linear(vdim or embed_dim, inner, bias=bias)
        self.out_proj = nn.Linear(inner, out_dim or embed_dim, bias=bias)

    # nn.TransformerEncoderLayer reads these to choose its fused fast path, which assumes
    # nn.MultiheadAttention's packed layout: in_proj_bias None makes it take the regular path
    in_proj_bias = None
    _qkv_same_embed_dim = False

    @property
    def embed_dim(self) -> int:
        return self.q_proj.in_features

    @property
    def in_proj_weight(self) -> torch.Tensor:  # read by nn.TransformerEncoder before its layers decide
        return torch.cat([self.q_proj.weight, self.k_proj.weight, self.v_proj.weight])

    def spec(self) -> dict:
        # read through linear_features: after quantization the projections may be wrappers
        return {"embed_dim": linear_features(self.q_proj)[0], "num_heads": self.num_heads, "head_dim": self.head_dim,
                "kdim": linear_features(self.k_proj)[0], "vdim": linear_features(self.v_proj)[0],
                "out_dim": linear_features(self.out_proj)[1], "bias": self.q_proj.bias is not None,
                "batch_first": self.batch_first, "dropout": self.dropout}

    @classmethod
    def from_spec(cls, args: dict) -> "Attention":
        return cls(**args)

    def extra_repr(self) -> str:
        return f"num_heads={self.num_heads}, head_dim={self.head_dim}, batch_first={self.batch_first}"

    def forward(self, query, key, value, key_padding_mask=None, need_weights: bool = True, attn_mask=None,
                average_attn_weights: bool = True, is_causal: bool = False):
        if query.is_nested:
            return self._nested(query, key, value, need_weights)
        batched = query.dim() == 3
        if not batched:  # (T, E): one sequence
            query, key, value = query.unsqueeze(1), key.unsqueeze(1), value.unsqueeze(1)
            if key_padding_mask is not None:
                key_padding_mask = key_padding_mask.unsqueeze(0)
        if not self.batch_first or not batched:  # (T, B, E) -> (B, T, E)
            query, key, value = query.transpose(0, 1), key.transpose(0, 1), value.transpose(0, 1)
        b, tq, tk = query.shape[0], query.shape[1], key.shape[1]
        q = self.q_proj(query).view(b, tq, self.num_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(key).view(b, tk, self.num_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(value).view(b, tk, self.num_heads, self.head_dim).transpose(1, 2)
        mask = self._mask(attn_mask, key_padding_mask, is_causal, q, b, tq, tk)
        p = self.dropout if self.training else 0.0
        weights = None
        if need_weights:
            scores = q @ k.transpose(-2, -1) * (self.head_dim ** -0.5)
            if mask is not None:
                scores = scores + mask
            weights = F.dropout(scores.softmax(-1), p) if p else scores.softmax(-1)
            out = weights @ v
            if average_attn_weights:
                weights = weights.mean(1)
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p)
        out = self.out_proj(out.transpose(1, 2).reshape(b, tq, self.num_heads * self.head_dim))
        if not self.batch_first or not batched:
            out = out.transpose(0, 1)
        if not batched:
            out = out.squeeze(1)
            weights = weights.squeeze(0) if weights is not None else None
        return out, weights

    def _mask(self, attn_mask, key_padding_mask, is_causal, q, b, tq, tk):
        """nn.MultiheadAttention's masks (bool: True = not attended, or float: added) as one float mask."""
        def as_float(m):
            return torch.zeros_like(m, dtype=q.dtype).masked_fill(m, float("-inf")) if m.dtype == torch.bool \
                else m.to(q.dtype)

        mask = None
        if attn_mask is None and is_causal:
            attn_mask = torch.ones(tq, tk, dtype=torch.bool, device=q.device).triu(1)
        if attn_mask is not None:
            mask = as_float(attn_mask)
            mask = mask.view(b, self.num_heads, tq, tk) if mask.dim() == 3 else mask
        if key_padding_mask is not None:
            pad = as_float(key_padding_mask).view(b, 1, 1, tk)
            mask = pad if mask is None else mask + pad
        return mask

    def _nested(self, query, key, value, need_weights):
        # nn.TransformerEncoder's inference path packs a padded batch as a nested tensor
        if key is not query or value is not query:
            raise UnsupportedError("Attention: nested tensors are supported for self-attention only")
        lengths = [t.shape[0] for t in query.unbind()]
        padded = query.to_padded_tensor(0.0)
        steps = torch.arange(padded.shape[1], device=padded.device)
        pad = steps[None, :] >= torch.tensor(lengths, device=padded.device)[:, None]
        if not self.batch_first:
            padded = padded.transpose(0, 1)
        out, _ = self.forward(padded, padded, padded, key_padding_mask=pad, need_weights=False)
        if not self.batch_first:
            out = out.transpose(0, 1)
        return torch.nested.nested_tensor([o[:n] for o, n in zip(out, lengths)]), None


@torch.no_grad()
def from_multihead_attention(mha: nn.MultiheadAttention) -> Attention:
    """An :class:`Attention` computing exactly what ``mha`` computes (its weights copied)."""
    if mha.bias_k is not None or mha.add_zero_attn:
        raise UnsupportedError("nn.MultiheadAttention with add_bias_kv or add_zero_attn cannot be converted",
                               hint="leave this attention out of the scope")
    e = mha.embed_dim
    bias = mha.in_proj_bias is not None
    attn = Attention(e, mha.num_heads, mha.head_dim, mha.kdim, mha.vdim, e, bias, mha.batch_first, mha.dropout)
    if mha._qkv_same_embed_dim:
        weights = mha.in_proj_weight.chunk(3)
    else:
        weights = (mha.q_proj_weight, mha.k_proj_weight, mha.v_proj_weight)
    biases = mha.in_proj_bias.chunk(3) if bias else (None, None, None)
    for proj, w, b in zip((attn.q_proj, attn.k_proj, attn.v_proj), weights, biases):
        proj.weight.copy_(w)
        if b is not None:
            proj.bias.copy_(b)
    attn.out_proj.weight.copy_(mha.out_proj.weight)
    if bias:
        attn.out_proj.bias.copy_(mha.out_proj.bias)
    attn.train(mha.training)
    return attn.to(device=mha.out_proj.weight.device, dtype=mha.out_proj.weight.dtype)


def convert_multihead_attention(model: nn.Module) -> list[str]:
    """Replace every ``nn.MultiheadAttention`` of ``model`` (in place) by its :class:`Attention`;
    returns their names. One that cannot be converted is left as it is."""
    done = []
    for name, m in list(model.named_modules()):
        if type(m) is nn.MultiheadAttention and m.bias_k is None and not m.add_zero_attn:
            set_module(model, name, from_multihead_attention(m))
            done.append(name)
    return done


def convert_attention(model: nn.Module) -> list[str]:
    """Replace (in place) the attention whose head size is tied to its input width, and whose
    projections are packed parameters or read with F.linear, by the exact equivalents with a stored
    head size and Linear projections they call (so heads can be cut, and projections pruned or
    quantized like any Linear): ``nn.MultiheadAttention`` by :class:`Attention`,
    torchvision's Swin attention by :class:`~.window_attention.WindowAttention`; returns their names."""
    return convert_multihead_attention(model) + convert_window_attention(model)
