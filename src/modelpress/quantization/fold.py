"""Fold BatchNorm into the Conv / Linear before it, for inference (eval-mode statistics).

``bn(conv(x)) == conv'(x)`` with ``w' = w * gamma / sqrt(var + eps)`` per output channel and
``b' = (b - mean) * gamma / sqrt(var + eps) + beta``; the arithmetic is torch's
``fuse_conv_bn_eval`` / ``fuse_linear_bn_eval``. Pairs are found with ``torch.fx`` symbolic
tracing: a BatchNorm is folded only when its input is the output of a Conv/Linear that nothing
else reads, and both modules are called exactly once. The folded layer takes the conv's name and
the BatchNorm becomes ``nn.Identity``, so the model keeps its class, its forward code and its
module names (scopes and checkpoints still apply). A model fx cannot trace is returned unchanged
with the reason in :attr:`FoldResult.note`.

    >>> import torch
    >>> from torch import nn
    >>> from modelpress.quantization.fold import fold_batchnorm
    >>> m = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU()).eval()
    >>> m[1].running_mean.fill_(0.5); m[1].running_var.fill_(4.0)  # doctest: +ELLIPSIS
    tensor(...)
    >>> res = fold_batchnorm(m)
    >>> res.folded, type(res.model[1]).__name__
    ([('0', '1')], 'Identity')
    >>> x = torch.randn(2, 1, 8, 8)
    >>> bool(torch.allclose(res.model(x), m(x), atol=1e-6))
    True
"""
from __future__ import annotations

import copy
from collections import Counter
from dataclasses import dataclass, field

from torch import fx, nn
from torch.nn.utils.fusion import fuse_conv_bn_eval, fuse_linear_bn_eval

from ..nn.modules import set_module

_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_BNS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


@dataclass
class FoldResult:
    """The folded model (a copy, eval mode), the ``(layer, batchnorm)`` name pairs folded, the
    BatchNorms left in place and, when tracing failed, why."""

    model: nn.Module
    folded: list[tuple[str, str]] = field(default_factory=list)
    kept: list[str] = field(default_factory=list)
    note: str | None = None


def find_bn_pairs(model: nn.Module) -> tuple[list[tuple[str, str]], list[str]]:
    """``(layer name, batchnorm name)`` pairs that can be folded, and the BatchNorms that cannot.

    Raises whatever ``torch.fx.symbolic_trace`` raises on untraceable models.
    """
    graph = fx.symbolic_trace(model).graph
    modules = dict(model.named_modules())
    calls = Counter(n.target for n in graph.nodes if n.op == "call_module")
    pairs, kept = [], []
    for node in graph.nodes:
        if node.op != "call_module" or not isinstance(modules.get(node.target), _BNS):
            continue
        src = node.args[0] if node.args else None
        ok = (isinstance(src, fx.Node) and src.op == "call_module" and len(src.users) == 1
              and calls[node.target] == 1 and calls.get(src.target) == 1)
        layer = modules.get(src.target) if ok else None
        bn = modules[node.target]
        fits = (isinstance(layer, _CONVS) and layer.out_channels == bn.num_features) or (
            isinstance(layer, nn.Linear) and isinstance(bn, nn.BatchNorm1d) and layer.out_features == bn.num_features)
        if fits and bn.track_running_stats and bn.running_mean is not None:
            pairs.append((src.target, node.target))
        else:
            kept.append(node.target)
    return pairs, kept


def fold_batchnorm(model: nn.Module) -> FoldResult:
    """A copy of ``model`` in eval mode with every foldable BatchNorm folded (see module docstring).

    The input model is not modified.
    """
    folded_model = copy.deepcopy(model).eval()
    try:
        pairs, kept = find_bn_pairs(folded_model)
    except Exception as exc:  # noqa: BLE001 - fx raises many types on dynamic control flow
        bns = [n for n, m in folded_model.named_modules() if isinstance(m, _BNS)]
        first = (str(exc).splitlines() or [""])[0][:200]
        return FoldResult(folded_model, [], bns, note=f"torch.fx could not trace {type(model).__name__} "
                                                      f"({type(exc).__name__}: {first}); BatchNorm left in place")
    for layer_name, bn_name in pairs:
        layer, bn = folded_model.get_submodule(layer_name), folded_model.get_submodule(bn_name)
        fuse = fuse_linear_bn_eval if isinstance(layer, nn.Linear) else fuse_conv_bn_eval
        set_module(folded_model, layer_name, fuse(layer, bn))
        set_module(folded_model, bn_name, nn.Identity())
    return FoldResult(folded_model, pairs, kept)
