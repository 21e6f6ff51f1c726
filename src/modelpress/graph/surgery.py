"""Physically remove channels from layers: the only place that resizes parameters.

Each function keeps the positions ``keep`` (sorted indices) along one *axis* of a layer
and updates the constructor attributes (``out_channels``, ``in_features``, ``groups`` ...)
so that :mod:`modelpress.export.modules` records the new architecture and a checkpoint
reloads. Parameters are replaced by new, smaller ``nn.Parameter`` objects (an optimizer
built before pruning must be rebuilt).

Axis kinds:

* ``out``  Conv/Linear output channels (weight dim 0 and bias);
* ``in``   Conv/Linear input channels (weight dim 1; ungrouped convs only);
* ``dw``   depthwise conv: its channels pass through, weight dim 0 + bias + ``groups``;
* ``norm`` BatchNorm: affine weight/bias and running statistics.

    >>> import torch
    >>> from torch import nn
    >>> fc = nn.Linear(4, 3)
    >>> prune_axis(fc, "out", torch.tensor([0, 2]))
    >>> fc
    Linear(in_features=4, out_features=2, bias=True)
"""
from __future__ import annotations

import torch
from torch import nn

AXIS_KINDS = ("out", "in", "dw", "norm")


def _replace_param(module: nn.Module, name: str, dim: int, keep: torch.Tensor) -> None:
    p = getattr(module, name, None)
    if p is None:
        return
    new = p.detach().index_select(dim, keep.to(p.device)).clone()
    if isinstance(p, nn.Parameter):
        setattr(module, name, nn.Parameter(new, requires_grad=p.requires_grad))
    else:  # a buffer (running statistics)
        setattr(module, name, new)


def _conv_or_linear(module: nn.Module) -> str:
    if isinstance(module, nn.modules.conv._ConvNd):
        return "conv"
    if isinstance(module, nn.Linear):
        return "linear"
    raise TypeError(f"cannot slice a {type(module).__name__} as a Conv/Linear")


def prune_axis(module: nn.Module, kind: str, keep: torch.Tensor | list[int]) -> None:
    """Keep only the positions ``keep`` of ``module`` along the axis ``kind`` (in place)."""
    keep = torch.as_tensor(keep, dtype=torch.long)
    if keep.numel() == 0:
        raise ValueError(f"cannot remove every channel of a {type(module).__name__} ({kind} axis)")
    n = int(keep.numel())
    if kind == "out":
        _replace_param(module, "weight", 0, keep)
        _replace_param(module, "bias", 0, keep)
        if _conv_or_linear(module) == "conv":
            module.out_channels = n
        else:
            module.out_features = n
    elif kind == "in":
        if _conv_or_linear(module) == "conv":
            if module.groups != 1:
                raise ValueError("input channels of a grouped conv cannot be sliced one by one")
            _replace_param(module, "weight", 1, keep)
            module.in_channels = n
        else:
            _replace_param(module, "weight", 1, keep)
            module.in_features = n
    elif kind == "dw":
        _replace_param(module, "weight", 0, keep)
        _replace_param(module, "bias", 0, keep)
        module.in_channels = module.out_channels = module.groups = n
    elif kind == "norm":
        for name in ("weight", "bias", "running_mean", "running_var"):
            _replace_param(module, name, 0, keep)
        module.num_features = n
    else:
        raise ValueError(f"unknown axis kind {kind!r}; expected one of {AXIS_KINDS}")


def axis_rows(module: nn.Module, kind: str) -> torch.Tensor:
    """The parameters of each position of an axis as rows ``[positions, values]`` (detached).

    ``out``/``dw``: the filter of each output channel; ``in``: what each input channel
    feeds into (a column of the weight); ``norm``: the BatchNorm scale (gamma), one value per
    channel (ones when the norm has no affine weight).
    """
    if kind in ("out", "dw"):
        w = module.weight.detach()
        return w.reshape(w.shape[0], -1)
    if kind == "in":
        w = module.weight.detach()
        return w.transpose(0, 1).reshape(w.shape[1], -1)
    if kind == "norm":
        w = getattr(module, "weight", None)
        n = module.num_features
        return (w.detach() if w is not None else torch.ones(n)).reshape(n, 1)
    raise ValueError(f"unknown axis kind {kind!r}")


def axis_grad_rows(module: nn.Module, kind: str) -> torch.Tensor | None:
    """``weight * weight.grad`` arranged like :func:`axis_rows` (None when there is no grad)."""
    w = getattr(module, "weight", None)
    if w is None or w.grad is None:
        return None
    wg = (w.detach() * w.grad.detach())
    if kind in ("out", "dw"):
        return wg.reshape(wg.shape[0], -1)
    if kind == "in":
        return wg.transpose(0, 1).reshape(wg.shape[1], -1)
    return wg.reshape(-1, 1)
