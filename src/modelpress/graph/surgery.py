"""Physically remove channels from layers: the only place that resizes parameters.

Each function keeps the positions ``keep`` (sorted indices) along one *axis* of a layer
and updates the constructor attributes (``out_channels``, ``in_features``, ``groups`` ...)
so that :mod:`modelpress.nn.records` records the new architecture and a checkpoint
reloads. Parameters are replaced by new, smaller ``nn.Parameter`` objects (an optimizer
built before pruning must be rebuilt).

Axis kinds:

* ``out``  Conv/Linear output channels (weight dim 0 and bias);
* ``in``   Conv/Linear input channels (weight dim 1);
* ``dw``   depthwise conv: its channels pass through, weight dim 0 + bias + ``groups``;
* ``norm`` BatchNorm: affine weight/bias and running statistics;
* ``ln``   LayerNorm/RMSNorm over the channels: weight, bias and ``normalized_shape``;
* ``emb``  Embedding: the embedding dim (weight dim 1) and ``embedding_dim``;
* ``attr:NAME`` an int attribute the module's forward uses as this width (set to the new count);
* ``param:NAME:DIM`` a parameter (or buffer) ``NAME`` the module owns directly, sliced along
  ``DIM`` (ConvNeXt's layer scale, a class token); recorded with
  :func:`~modelpress.nn.records.mark_resized` so that an artifact reloads it at its new shape.

A *grouped* conv (``1 < groups``, not depthwise) keeps its ``groups``: its weight is
``[out_channels, in_channels // groups, ...]``, conv group ``j`` owning output channels
``j*cout_g ...`` and input channels ``j*cin_g ...``. Both its ``out`` and ``in`` axes can only
lose the same number of positions in every conv group (see :func:`group_counts`); its ``in``
axis is sliced per conv group, since each group reads its own columns of the weight.

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

from ..nn.records import is_rebuilt, mark_resized

AXIS_KINDS = ("out", "in", "dw", "norm", "ln", "emb", "attr:NAME", "param:NAME:DIM")


def param_kind(kind: str) -> tuple[str, int] | None:
    """``(name, dim)`` of a ``param:NAME:DIM`` axis kind, else None."""
    if not kind.startswith("param:"):
        return None
    name, _, dim = kind[len("param:"):].rpartition(":")
    return name, int(dim)


def _replace_param(module: nn.Module, name: str, dim: int, keep: torch.Tensor) -> None:
    p = getattr(module, name, None)
    if p is None:
        return
    new = p.detach().index_select(dim, keep.to(p.device)).clone()
    if isinstance(p, nn.Parameter):
        setattr(module, name, nn.Parameter(new, requires_grad=p.requires_grad))
    else:  # a buffer (running statistics)
        setattr(module, name, new)


def conv_groups(module: nn.Module, kind: str) -> int:
    """How many conv groups split axis ``kind`` of ``module`` into equal slices (1: none).

    Only the ``out``/``in`` axes of a grouped conv are split; a depthwise conv is pruned
    through its ``dw`` axis instead, one channel at a time.
    """
    if kind in ("out", "in") and isinstance(module, nn.modules.conv._ConvNd) and module.groups > 1:
        return module.groups
    return 1


def group_counts(module: nn.Module, kind: str, positions, size: int) -> list[int]:
    """How many of ``positions`` (of an axis with ``size`` positions) fall in each conv group."""
    groups = conv_groups(module, kind)
    width = size // groups
    counts = [0] * groups
    for p in positions:
        counts[int(p) // width] += 1
    return counts


def _check_equal_groups(module: nn.Module, kind: str, keep: torch.Tensor, size: int) -> None:
    counts = group_counts(module, kind, keep.tolist(), size)
    if len(set(counts)) > 1:
        raise ValueError(f"a grouped conv (groups={module.groups}) must keep the same number of {kind}put "
                         f"channels in every group; keeping {counts}")


def _slice_grouped_inputs(module: nn.Module, keep: torch.Tensor) -> None:
    # Conv group j reads input channels j*cin_g ... (j+1)*cin_g - 1 through columns 0..cin_g-1
    # of its own rows of the weight, so each group keeps its own columns (which may differ
    # between groups), and the widths stay equal so that in_channels // groups is exact.
    groups, w = module.groups, module.weight
    cin_g, cout_g = module.in_channels // groups, w.shape[0] // groups
    _check_equal_groups(module, "in", keep, module.in_channels)
    keep = keep.to(w.device)
    parts = []
    for j in range(groups):
        local = keep[(keep >= j * cin_g) & (keep < (j + 1) * cin_g)] - j * cin_g
        parts.append(w.detach()[j * cout_g:(j + 1) * cout_g].index_select(1, local))
    module.weight = nn.Parameter(torch.cat(parts).clone(), requires_grad=w.requires_grad)
    module.in_channels = int(keep.numel())


def _conv_or_linear(module: nn.Module) -> str:
    if isinstance(module, nn.modules.conv._ConvNd):
        return "conv"
    if isinstance(module, nn.Linear):
        return "linear"
    raise TypeError(f"cannot slice a {type(module).__name__} as a Conv/Linear")


def prune_axis(module: nn.Module, kind: str, keep: torch.Tensor | list[int]) -> None:
    """Keep only the positions ``keep`` of ``module`` along the axis ``kind`` (in place). A module
    artifacts do not rebuild from its arguments (a subclass: timm's Linear, BatchNormAct2d) has
    what changed recorded by shape, so it reloads."""
    before = None if is_rebuilt(module) else _sizes(module)
    _prune_axis(module, kind, keep)
    if before is not None:
        after = _sizes(module)
        for name, size in after.items():
            if before.get(name) != size:
                mark_resized(module, name)


_WIDTHS = ("in_features", "out_features", "in_channels", "out_channels", "groups", "num_features",
           "embedding_dim")


def _sizes(module: nn.Module) -> dict:
    sizes = {n: tuple(t.shape) for n, t in [*module.named_parameters(recurse=False),
                                            *module.named_buffers(recurse=False)]}
    sizes.update({a: getattr(module, a) for a in _WIDTHS if type(getattr(module, a, None)) is int})
    return sizes


def _prune_axis(module: nn.Module, kind: str, keep: torch.Tensor | list[int]) -> None:
    keep = torch.as_tensor(keep, dtype=torch.long)
    if keep.numel() == 0:
        raise ValueError(f"cannot remove every channel of a {type(module).__name__} ({kind} axis)")
    n = int(keep.numel())
    if kind == "out":
        if conv_groups(module, kind) > 1:  # rows stay ordered by group: equal counts keep them aligned
            _check_equal_groups(module, kind, keep, module.out_channels)
        _replace_param(module, "weight", 0, keep)
        _replace_param(module, "bias", 0, keep)
        if _conv_or_linear(module) == "conv":
            module.out_channels = n
        else:
            module.out_features = n
    elif kind == "in":
        if _conv_or_linear(module) == "conv":
            if module.groups != 1:
                _slice_grouped_inputs(module, keep)
            else:
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
    elif kind == "emb":
        _replace_param(module, "weight", 1, keep)
        module.embedding_dim = n
    elif kind == "ln":
        for name in ("weight", "bias"):
            _replace_param(module, name, 0, keep)
        module.normalized_shape = (n,)
    elif kind.startswith("attr:"):  # an int attribute the module's forward reads as the width
        setattr(module, kind[len("attr:"):], n)
        mark_resized(module, kind[len("attr:"):])
    elif param_kind(kind):
        name, dim = param_kind(kind)
        _replace_param(module, name, dim, keep)
        if isinstance(module, (nn.LayerNorm, nn.RMSNorm)) and name in ("weight", "bias"):
            module.normalized_shape = (n,)  # a LayerNorm subclass normalising through F.layer_norm
        mark_resized(module, name)
    else:
        raise ValueError(f"unknown axis kind {kind!r}; expected one of {AXIS_KINDS}")


def _input_rows(module: nn.Module, w: torch.Tensor) -> torch.Tensor:
    """``w`` (shaped like the weight) as one row per input channel: what that channel feeds."""
    groups = module.groups if isinstance(module, nn.modules.conv._ConvNd) else 1
    if groups == 1:
        return w.transpose(0, 1).reshape(w.shape[1], -1)
    # grouped conv: input channel j*cin_g + i feeds column i of group j's rows only
    cout_g, cin_g = w.shape[0] // groups, w.shape[1]
    return w.reshape(groups, cout_g, cin_g, -1).transpose(1, 2).reshape(groups * cin_g, -1)


def axis_rows(module: nn.Module, kind: str) -> torch.Tensor:
    """The parameters of each position of an axis as rows ``[positions, values]`` (detached).

    ``out``/``dw``: the filter of each output channel; ``in``: what each input channel
    feeds into (a column of the weight; for a grouped conv, of its group's rows only);
    ``norm``: the BatchNorm scale (gamma), one value per channel (ones when the norm has no
    affine weight).
    """
    if kind in ("out", "dw"):
        w = module.weight.detach()
        return w.reshape(w.shape[0], -1)
    if kind == "in":
        return _input_rows(module, module.weight.detach())
    if kind == "emb":
        return module.weight.detach().t()
    if kind in ("norm", "ln"):
        w = getattr(module, "weight", None)
        n = module.num_features if kind == "norm" else module.normalized_shape[0]
        return (w.detach() if w is not None else torch.ones(n)).reshape(n, 1)
    if param_kind(kind):
        name, dim = param_kind(kind)
        p = getattr(module, name).detach().movedim(dim, 0)
        return p.reshape(p.shape[0], -1)
    raise ValueError(f"unknown axis kind {kind!r}")


def has_rows(kind: str) -> bool:
    """Whether an axis of this kind holds weights (an ``attr:`` axis is a count, scored by the others)."""
    return not kind.startswith("attr:")


def axis_grad_rows(module: nn.Module, kind: str, grad: torch.Tensor) -> torch.Tensor:
    """``weight * grad`` (``grad``: of the loss w.r.t. the weight) arranged like :func:`axis_rows`."""
    wg = module.weight.detach() * grad.detach()
    if kind in ("out", "dw"):
        return wg.reshape(wg.shape[0], -1)
    if kind == "in":
        return _input_rows(module, wg)
    if kind == "emb":
        return wg.t()
    return wg.reshape(-1, 1)
