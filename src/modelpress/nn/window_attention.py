"""Swin's shifted-window attention with a stored head size: a drop-in for torchvision's
``ShiftedWindowAttention`` and ``ShiftedWindowAttentionV2`` whose heads and widths can be pruned.

torchvision computes the head size as ``C // num_heads`` from the width of the attention's input
(``shifted_window_attention``), so its inner width is tied to the residual width: neither a head
nor a channel of the residual stream can go. :class:`WindowAttention` computes the same function
(padding to whole windows, the cyclic shift and its mask, the relative position bias; V2's cosine
attention with a learned logit scale and the continuous position bias MLP) with a stored
``head_dim`` and an output width of its own. :func:`from_torchvision_window_attention` converts one
exactly (weights and buffers copied). The per-head tensors (the bias table ``[(2w-1)^2, heads]``,
V2's ``logit_scale`` ``[heads, 1, 1]`` and ``cpb_out`` ``[heads, hidden]``, the MLP's last layer kept
as a tensor so it is not taken for a projection) are what ``prune.heads`` slices with the heads.

MaxViT's block and grid attention (torchvision's ``RelativePositionalMultiHeadAttention``) reshapes
its heads back to the input width ``D`` the same way; :class:`PartitionAttention` is its drop-in with
the inner width ``heads x head_dim`` (:func:`from_torchvision_partition_attention`).

    >>> import torch
    >>> attn = WindowAttention(16, num_heads=2, head_dim=8, window_size=(4, 4), shift_size=(2, 2))
    >>> attn(torch.randn(1, 6, 6, 16)).shape  # padded to 8 x 8 inside, cut back
    torch.Size([1, 6, 6, 16])
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .layer_kinds import linear_features
from .modules import set_module
from .records import buildable

_TORCHVISION = ("ShiftedWindowAttention", "ShiftedWindowAttentionV2")
_TORCHVISION_PARTITION = "RelativePositionalMultiHeadAttention"  # MaxViT


def relative_position_index(window: tuple[int, int]) -> torch.Tensor:
    """For each (query, key) pair of a window's ``w0 * w1`` positions, the row of the bias table
    holding their relative offset: ``[(w0 * w1) ** 2]``."""
    w0, w1 = window
    grid = torch.stack(torch.meshgrid(torch.arange(w0), torch.arange(w1), indexing="ij")).flatten(1)
    offset = (grid[:, :, None] - grid[:, None, :]).permute(1, 2, 0)  # [N, N, 2], each in (-w, w)
    return ((offset[..., 0] + w0 - 1) * (2 * w1 - 1) + offset[..., 1] + w1 - 1).flatten()


def log_spaced_coords(window: tuple[int, int]) -> torch.Tensor:
    """Swin V2's relative offsets, scaled to [-8, 8] and log-spaced: ``[1, 2w0-1, 2w1-1, 2]``."""
    w0, w1 = window
    axes = [torch.arange(-(w - 1), w, dtype=torch.float32) / max(w - 1, 1) * 8 for w in (w0, w1)]
    table = torch.stack(torch.meshgrid(*axes, indexing="ij"), dim=-1).unsqueeze(0)
    return torch.sign(table) * torch.log2(table.abs() + 1.0) / 3.0


@buildable
class WindowAttention(nn.Module):
    """Shifted-window multi-head self-attention over ``[B, H, W, C]`` (see the module docstring)."""

    # the tensors with one entry per head, and at which dim (read by prune.heads)
    per_head_dims = {"relative_position_bias_table": 1, "logit_scale": 0, "cpb_out": 0}

    def __init__(self, dim: int, num_heads: int, head_dim: int, window_size, shift_size, out_dim: int | None = None,
                 qkv_bias: bool = True, proj_bias: bool = True, attention_dropout: float = 0.0,
                 dropout: float = 0.0, v2: bool = False, cpb_hidden: int = 512):
        super().__init__()
        inner = num_heads * head_dim
        self.num_heads, self.head_dim, self.v2 = num_heads, head_dim, v2
        self.window_size, self.shift_size = [int(w) for w in window_size], [int(s) for s in shift_size]
        self.attention_dropout, self.dropout = attention_dropout, dropout
        self.qkv = nn.Linear(dim, 3 * inner, bias=qkv_bias)
        self.proj = nn.Linear(inner, out_dim or dim, bias=proj_bias)
        w0, w1 = self.window_size
        if v2:
            self.logit_scale = nn.Parameter(torch.full((num_heads, 1, 1), math.log(10.0)))
            self.cpb_mlp = nn.Sequential(nn.Linear(2, cpb_hidden), nn.ReLU(inplace=True))
            self.cpb_out = nn.Parameter(torch.zeros(num_heads, cpb_hidden))
            self.register_buffer("relative_coords_table", log_spaced_coords((w0, w1)))
        else:
            self.relative_position_bias_table = nn.Parameter(torch.zeros((2 * w0 - 1) * (2 * w1 - 1), num_heads))
        self.register_buffer("relative_position_index", relative_position_index((w0, w1)))

    def spec(self) -> dict:
        # read through linear_features: after quantization the projections may be wrappers
        return {"dim": linear_features(self.qkv)[0], "num_heads": self.num_heads, "head_dim": self.head_dim,
                "window_size": self.window_size, "shift_size": self.shift_size,
                "out_dim": linear_features(self.proj)[1],
                "qkv_bias": self.qkv.bias is not None, "proj_bias": self.proj.bias is not None,
                "attention_dropout": self.attention_dropout, "dropout": self.dropout, "v2": self.v2,
                "cpb_hidden": self.cpb_out.shape[1] if self.v2 else 512}

    @classmethod
    def from_spec(cls, args: dict) -> "WindowAttention":
        return cls(**args)

    def extra_repr(self) -> str:
        return (f"num_heads={self.num_heads}, head_dim={self.head_dim}, window_size={self.window_size}, "
                f"shift_size={self.shift_size}{', v2' if self.v2 else ''}")

    def position_bias(self) -> torch.Tensor:
        """The bias added to each window's attention logits: ``[1, heads, N, N]``."""
        n = self.window_size[0] * self.window_size[1]
        if self.v2:
            table = F.linear(self.cpb_mlp(self.relative_coords_table), self.cpb_out).view(-1, self.num_heads)
        else:
            table = self.relative_position_bias_table
        bias = table[self.relative_position_index].view(n, n, -1).permute(2, 0, 1).contiguous()
        return (16 * torch.sigmoid(bias) if self.v2 else bias).unsqueeze(0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, h, w, _ = x.shape
        w0, w1 = self.window_size
        pad_b, pad_r = (w0 - h % w0) % w0, (w1 - w % w1) % w1
        x = F.pad(x, (0, 0, 0, pad_r, 0, pad_b))
        hp, wp = h + pad_b, w + pad_r
        # a window as large as the (padded) map needs no shift
        s0, s1 = (0 if w0 >= hp else self.shift_size[0]), (0 if w1 >= wp else self.shift_size[1])
        shifted = s0 + s1 > 0
        if shifted:
            x = torch.roll(x, shifts=(-s0, -s1), dims=(1, 2))
        nh, nw = hp // w0, wp // w1
        x = x.view(b, nh, w0, nw, w1, -1).permute(0, 1, 3, 2, 4, 5).reshape(b * nh * nw, w0 * w1, -1)
        windows, n = x.shape[0], x.shape[1]

        if self.v2 and self.qkv.bias is not None:  # V2 has no key bias
            third = self.qkv.bias.numel() // 3
            keep = torch.ones_like(self.qkv.bias)
            keep[third:2 * third] = 0
            qkv = F.linear(x, self.qkv.weight, self.qkv.bias * keep)
        else:
            qkv = self.qkv(x)
        q, k, v = qkv.view(windows, n, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        if self.v2:
            attn = F.normalize(q, dim=-1) @ F.normalize(k, dim=-1).transpose(-2, -1)
            attn = attn * torch.clamp(self.logit_scale, max=math.log(100.0)).exp()
        else:
            attn = (q * self.head_dim ** -0.5) @ k.transpose(-2, -1)
        attn = attn + self.position_bias()
        if shifted:
            mask = self._shift_mask(hp, wp, s0, s1, x)
            attn = attn.view(b, nh * nw, self.num_heads, n, n) + mask.unsqueeze(1).unsqueeze(0)
            attn = attn.view(windows, self.num_heads, n, n)
        attn = F.dropout(F.softmax(attn, dim=-1), p=self.attention_dropout, training=self.training)
        x = (attn @ v).transpose(1, 2).reshape(windows, n, self.num_heads * self.head_dim)
        x = F.dropout(self.proj(x), p=self.dropout, training=self.training)

        x = x.view(b, nh, nw, w0, w1, -1).permute(0, 1, 3, 2, 4, 5).reshape(b, hp, wp, -1)
        if shifted:
            x = torch.roll(x, shifts=(s0, s1), dims=(1, 2))
        return x[:, :h, :w, :].contiguous()

    def _shift_mask(self, hp: int, wp: int, s0: int, s1: int, like: torch.Tensor) -> torch.Tensor:
        """-100 between positions of a window that the cyclic shift brought from different regions
        of the map: ``[windows, N, N]``."""
        w0, w1 = self.window_size
        region = like.new_zeros((hp, wp))
        rows = ((0, -w0), (-w0, -s0), (-s0, None))
        cols = ((0, -w1), (-w1, -s1), (-s1, None))
        for i, (r0, r1) in enumerate(rows):
            for j, (c0, c1) in enumerate(cols):
                region[r0:r1, c0:c1] = 3 * i + j
        region = region.view(hp // w0, w0, wp // w1, w1).permute(0, 2, 1, 3).reshape(-1, w0 * w1)
        diff = region.unsqueeze(1) - region.unsqueeze(2)
        return diff.masked_fill(diff != 0, -100.0).masked_fill(diff == 0, 0.0)


def is_torchvision_window_attention(module: nn.Module) -> bool:
    return type(module).__name__ in _TORCHVISION and type(module).__module__.startswith("torchvision.")


@torch.no_grad()
def from_torchvision_window_attention(m: nn.Module) -> WindowAttention:
    """A :class:`WindowAttention` computing exactly what torchvision's (V1 or V2) module ``m`` computes."""
    v2 = type(m).__name__ == "ShiftedWindowAttentionV2"
    dim = m.qkv.in_features
    hidden = m.cpb_mlp[0].out_features if v2 else 512
    attn = WindowAttention(dim, m.num_heads, dim // m.num_heads, m.window_size, m.shift_size, m.proj.out_features,
                           m.qkv.bias is not None, m.proj.bias is not None, m.attention_dropout, m.dropout, v2,
                           hidden)
    attn.qkv.load_state_dict(m.qkv.state_dict())
    attn.proj.load_state_dict(m.proj.state_dict())
    attn.relative_position_index.copy_(m.relative_position_index.flatten())
    if v2:
        attn.logit_scale.copy_(m.logit_scale)
        attn.cpb_mlp[0].load_state_dict(m.cpb_mlp[0].state_dict())
        attn.cpb_out.copy_(m.cpb_mlp[2].weight)
        attn.relative_coords_table.copy_(m.relative_coords_table)
    else:
        attn.relative_position_bias_table.copy_(m.relative_position_bias_table)
    attn.train(m.training)
    return attn.to(device=m.qkv.weight.device, dtype=m.qkv.weight.dtype)


@buildable
class PartitionAttention(nn.Module):
    """Multi-head self-attention inside each partition of ``[B, G, P, D]`` (``G`` windows or grid
    cells of ``P`` positions) with a relative position bias: MaxViT's, with a stored head size and
    its own inner width (see the module docstring). ``scale`` multiplies the keys (MaxViT uses
    ``D ** -0.5`` of the width it was built with, kept as a number when the width is pruned)."""

    per_head_dims = {"relative_position_bias_table": 1}

    def __init__(self, dim: int, num_heads: int, head_dim: int, max_seq_len: int, scale: float,
                 out_dim: int | None = None):
        super().__init__()
        self.num_heads, self.head_dim, self.max_seq_len, self.scale = num_heads, head_dim, max_seq_len, float(scale)
        size = math.isqrt(max_seq_len)
        self.to_qkv = nn.Linear(dim, 3 * num_heads * head_dim)
        self.merge = nn.Linear(num_heads * head_dim, out_dim or dim)
        self.relative_position_bias_table = nn.Parameter(torch.zeros((2 * size - 1) ** 2, num_heads))
        self.register_buffer("relative_position_index", relative_position_index((size, size)))

    def spec(self) -> dict:
        return {"dim": linear_features(self.to_qkv)[0], "num_heads": self.num_heads, "head_dim": self.head_dim,
                "max_seq_len": self.max_seq_len, "scale": self.scale, "out_dim": linear_features(self.merge)[1]}

    @classmethod
    def from_spec(cls, args: dict) -> "PartitionAttention":
        return cls(**args)

    def extra_repr(self) -> str:
        return f"num_heads={self.num_heads}, head_dim={self.head_dim}, max_seq_len={self.max_seq_len}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, g, p, _ = x.shape
        h, dh = self.num_heads, self.head_dim
        qkv = self.to_qkv(x).chunk(3, dim=-1)  # indexed, not unpacked: torch.fx can trace it
        q, k, v = (qkv[i].reshape(b, g, p, h, dh).transpose(2, 3) for i in range(3))
        n = self.max_seq_len
        bias = self.relative_position_bias_table[self.relative_position_index].view(n, n, -1).permute(2, 0, 1)
        attn = F.softmax(q @ (k * self.scale).transpose(-2, -1) + bias.unsqueeze(0), dim=-1)
        return self.merge((attn @ v).transpose(2, 3).reshape(b, g, p, h * dh))


@torch.no_grad()
def from_torchvision_partition_attention(m: nn.Module) -> PartitionAttention:
    """A :class:`PartitionAttention` computing what torchvision's MaxViT attention ``m`` computes."""
    attn = PartitionAttention(m.to_qkv.in_features, m.n_heads, m.head_dim, m.max_seq_len, m.scale_factor,
                              m.merge.out_features)
    attn.to_qkv.load_state_dict(m.to_qkv.state_dict())
    attn.merge.load_state_dict(m.merge.state_dict())
    attn.relative_position_bias_table.copy_(m.relative_position_bias_table)
    attn.relative_position_index.copy_(m.relative_position_index.flatten())
    attn.train(m.training)
    return attn.to(device=m.to_qkv.weight.device, dtype=m.to_qkv.weight.dtype)


def convert_window_attention(model: nn.Module) -> list[str]:
    """Replace every torchvision shifted-window attention (Swin) and partition attention (MaxViT) of
    ``model`` (in place) by its :class:`WindowAttention` / :class:`PartitionAttention`; returns their names."""
    done = []
    for name, m in list(model.named_modules()):
        if not name or not type(m).__module__.startswith("torchvision."):
            continue
        if is_torchvision_window_attention(m):
            set_module(model, name, from_torchvision_window_attention(m))
            done.append(name)
        elif type(m).__name__ == _TORCHVISION_PARTITION:
            set_module(model, name, from_torchvision_partition_attention(m))
            done.append(name)
    return done
