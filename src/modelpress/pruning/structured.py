"""Structured channel pruning (``prune.channels``): physically remove filters and neurons.

The model is traced into pruning groups (:mod:`modelpress.graph`): a conv's output channels,
its BatchNorm, the next layers' input channels, everything tied by a residual add or a
concat, depthwise convs in between, the inputs of a Linear after a flatten; in transformers the
hidden width of the residual stream (embeddings, LayerNorm/RMSNorm, every projection reading or
writing it, a tied output embedding, class tokens and position embeddings) and the FFN neurons.
The graph comes from torch.fx, or from ``torch.export`` where fx cannot trace the model (Hugging
Face models: keyword inputs, data-dependent branches) or keeps layers opaque
(``nn.TransformerEncoder``); ``info["capture"]`` says which. Attention heads go at the same ratio
(``heads=True``, through :mod:`.heads`); ``nn.MultiheadAttention`` and torchvision's Swin attention,
whose head size is tied to their width, are first swapped for exact equivalents with a stored head
size (:mod:`modelpress.nn.attention`). Channels are scored per group (:mod:`.importance`), the
lowest-scoring ones are cut, and the pruned model is smaller and faster on any hardware: no
masks, no sparse kernels.

* ``ratio``: fraction of each group's channels removed (``ranking="layer"``), or of all
  channels of the selected groups (``ranking="global"``); ``floor(ratio * n + 0.5)``.
* ``target_macs_reduction``: prune in small steps until at least this fraction of the
  multiply-accumulates is gone (give either this or ``ratio``).
* Layers that cannot be pruned safely (the output layer, a reshape mixing channels, an op
  structured pruning does not know) are left intact and listed in the report's ``info["skipped"]``.

An example input is needed to trace the model: the first batch of ``data``, or
``input_shape``. Returns a pruned copy (``prune(..., inplace=True)`` edits the model)::

    >>> import torch
    >>> from modelpress import prune
    >>> from modelpress.zoo.models import build_model
    >>> from modelpress.pruning.structured import ChannelPruning
    >>> model = build_model("lenet5")
    >>> small = prune(model, ChannelPruning(ratio=0.5, input_shape=[1, 1, 28, 28]))
    >>> small.conv1.out_channels, small.conv2.out_channels, small.fc1.in_features, small.fc3.out_features
    (3, 8, 200, 10)

To look at the groups before cutting, use :func:`iter_groups`.
"""
from __future__ import annotations

import copy
import dataclasses
import math
from typing import Any, Iterator, Literal

import torch
from pydantic import Field, field_validator, model_validator
from torch import nn

from ..core.config import MethodConfig, StrictModel
from ..core.data import as_data, call_model, slice_inputs
from ..core.errors import DataError, ScopeError, UnsupportedError
from ..core.scope import Scope
from ..engine import MethodInputs, MethodResult, register_method
from ..graph import ChannelGraph, Group, build_channel_graph
from ..nn.attention import convert_attention
from ..nn.layer_kinds import is_transposed_linear, plain_linears
from ..nn.macs import count_macs as mac_report
from .heads import HeadPruning, find_blocks, head_prune
from .importance import channel_importance, check_criterion

PRUNABLE = ("Conv2d", "Conv1d", "Linear", "Embedding")


class ChannelPruningAdvanced(StrictModel):
    """Rare knobs of :class:`ChannelPruning`."""

    step: float = Field(0.02, gt=0, le=0.5, description="fraction of the channels removed per step while "
                                                         "searching target_macs_reduction")
    taylor_batches: int = Field(4, ge=1, description="batches of data used by taylor importance")
    seed: int = Field(0, description="seed of the random criterion")


class ChannelPruning(MethodConfig):
    """Physically remove channels (filters, neurons) by group, by ``ratio`` or to a MAC target."""

    ratio: float | None = Field(None, ge=0, lt=1, description="fraction of channels removed (default 0.5 "
                                                              "unless target_macs_reduction is given)")
    target_macs_reduction: float | None = Field(None, gt=0, lt=1, description="remove at least this fraction "
                                                                              "of the MACs")
    importance: str = Field("l1", description="importance of each channel (see modelpress.pruning.importance): "
                                              "l1, l2, bn_scale, taylor or random")
    ranking: Literal["layer", "global"] = "layer"
    scope: Scope = Scope()
    min_channels: int = Field(1, ge=1, description="channels every layer keeps at least")
    round_to: int | None = Field(None, ge=1, description="keep a multiple of this many channels per group "
                                                         "(e.g. 8 for SIMD-friendly widths)")
    input_shape: list[int] | None = Field(None, description="example input shape, e.g. [1, 1, 28, 28], "
                                                            "used when no data is given")
    heads: bool = Field(True, description="also remove ``ratio`` of the heads of every transformer attention "
                                          "(prune.heads' rules; with ratio, not target_macs_reduction)")
    advanced: ChannelPruningAdvanced = Field(default_factory=ChannelPruningAdvanced)

    @field_validator("importance")
    @classmethod
    def _importance(cls, v):
        return check_criterion(v, "channels")

    @model_validator(mode="before")
    @classmethod
    def _ratio_or_target(cls, values):
        if isinstance(values, dict):
            ratio, target = values.get("ratio"), values.get("target_macs_reduction")
            if ratio is not None and target is not None:
                raise ValueError("give either ratio or target_macs_reduction, not both")
            if ratio is None and target is None:
                values = {**values, "ratio": 0.5}
        return values


# -- measuring ---------------------------------------------------------------------------------
def count_macs(model: nn.Module, inputs: Any) -> int:
    """MACs of one forward on ``inputs``, as ``modelpress analyze`` counts them."""
    return mac_report(model, inputs).total


def layer_macs(graph: ChannelGraph):
    """A cheap per-sample MAC count of the traced Conv/Linear layers at their current width.

    Spatial sizes do not change when channels are removed, so the traced output shapes
    plus the current weight sizes give the exact conv/linear MACs without a forward pass.
    """
    modules = dict(graph.model.named_modules())
    sites = [(modules[name], per) for name, per in graph.sites.items()]
    return lambda: sum(per * m.weight.numel() for m, per in sites)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def example_inputs(cfg: ChannelPruning, data: Any) -> Any:
    """Two samples of the first data batch, or seeded random values of ``cfg.input_shape``."""
    if cfg.input_shape is not None:
        return torch.randn(*cfg.input_shape, generator=torch.Generator().manual_seed(0))
    data = as_data(data)
    if data is None:
        raise DataError("structured pruning needs one example batch to trace the model",
                        hint="pass data=... (the first batch is used) or set input_shape, e.g. [1, 1, 28, 28]")
    return slice_inputs(data.first_inputs(), 2)


# -- planning ----------------------------------------------------------------------------------
def select_groups(model: nn.Module, graph: ChannelGraph, cfg: ChannelPruning) -> list[Group]:
    """Groups with prunable channels whose producer layers are all in ``cfg.scope``."""
    in_scope = {n for n, _ in cfg.scope.resolve(model, PRUNABLE)}
    groups = [g for g in graph.groups
              if g.producers and set(g.producers) <= in_scope and g.prunable_count() > 0]
    if not groups:
        skipped = "; ".join(f"{s['layer']}: {s['reason']}" for s in graph.skipped if s["layer"] in in_scope)
        raise ScopeError("the scope selects no prunable channel group" + (f" ({skipped})" if skipped else ""),
                         hint="widen Scope(include=...); layers coupled by a residual add are pruned together "
                              "and must all be in scope")
    return groups


def _kept_target(n: int, remove: int, cfg: ChannelPruning, unit: int = 1) -> int:
    """Channels a group of ``n`` keeps; a multiple of ``round_to`` and of ``unit`` (the size of
    the group's removal units, > 1 when grouped convs tie its channels), when they apply."""
    kept = max(n - remove, min(cfg.min_channels, n))
    step = math.lcm(cfg.round_to or 1, unit)
    if step > 1:
        kept = min(n, max(step, step * math.floor(kept / step + 0.5)))
    return kept


class _Budget:
    """How many more channels each member axis and the group may lose."""

    def __init__(self, group: Group, min_channels: int):
        self.members, self.slack = group.removal_limits(min_channels)
        self.group_slack = len(group) - min(min_channels, len(group))

    def _hits(self, channel: int) -> list[int]:
        return [i for i, m in enumerate(self.members) if m.positions[channel]]

    def take_all(self, channels: list[int]) -> bool:
        """Take every channel or none of them."""
        need = len(channels)
        counts: dict[int, int] = {}
        for c in channels:
            for i in self._hits(c):
                counts[i] = counts.get(i, 0) + 1
        if need > self.group_slack or any(self.slack[i] < n for i, n in counts.items()):
            return False
        for i, n in counts.items():
            self.slack[i] -= n
        self.group_slack -= need
        return True


def _units(group: Group, scores: torch.Tensor) -> tuple[list[list[int]], int]:
    """The group's removal units, cheapest first, and their common size (1 when sizes differ).

    A unit is one channel, or one channel of each cell of a grouped-conv tie (see
    :meth:`Group.removal_units`): selecting whole units keeps every conv group equally wide.
    """
    units = group.removal_units(scores)
    sizes = {len(u) for u in units}
    return units, sizes.pop() if len(sizes) == 1 else 1


def plan(groups: list[Group], scores: list[torch.Tensor], cfg: ChannelPruning, fraction: float,
         base_sizes: list[int] | None = None) -> None:
    """Set ``group.selected`` so that ``fraction`` of the channels goes (counted on
    ``base_sizes``, the sizes before pruning started, when given)."""
    base_sizes = base_sizes or [len(g) for g in groups]
    for g, s in zip(groups, scores):
        g.importance, g.selected = s, []
    if cfg.ranking == "layer":
        for g, s, base in zip(groups, scores, base_sizes):
            units, size = _units(g, s)
            kept = _kept_target(base, math.floor(fraction * base + 0.5), cfg, size)
            want = max(0, len(g) - kept)
            budget = _Budget(g, cfg.min_channels)
            for unit in units:
                if len(g.selected) >= want:
                    break
                # units of mixed sizes (rare) may not add up to `want`: never overshoot it
                if len(g.selected) + len(unit) <= want and budget.take_all(unit):
                    g.selected += unit
        return
    # Global: rank blocks of `round_to` channels (single channels without round_to; whole
    # removal units of a grouped-conv tie) across groups by mean score, so every group keeps
    # a multiple of round_to and a MAC search moves one block at a time instead of jumping.
    want = math.floor(fraction * sum(base_sizes) + 0.5) - sum(b - len(g) for g, b in zip(groups, base_sizes))
    pool = []
    for gi, (g, s) in enumerate(zip(groups, scores)):
        units, size = _units(g, s)
        block = math.lcm(cfg.round_to or 1, size)
        start = len(g) % block  # a first, smaller block reaches a multiple
        chunks, chunk = [], []
        for unit in units:  # units are whole: a block gathers them until it is full
            chunk = chunk + unit
            if len(chunk) >= (start if start and not chunks else block):
                chunks.append(chunk)
                chunk = []
        pool += [(float(s[chunk].mean()), gi, k, chunk) for k, chunk in enumerate(chunks)]
    budgets = [_Budget(g, cfg.min_channels) for g in groups]
    stopped: set[int] = set()
    for _, gi, _, chunk in sorted(pool, key=lambda t: t[:3]):
        if want <= 0:
            break
        if gi in stopped:
            continue
        if budgets[gi].take_all(chunk):
            groups[gi].selected += chunk
            want -= len(chunk)
        else:
            stopped.add(gi)  # a group's blocks go in order: once one is refused, the rest are too


def _scores(model, groups, cfg: ChannelPruning, inputs: MethodInputs):
    return channel_importance(groups, cfg.importance, model=model, data=inputs.data,
                              loss_fn=inputs.loss_fn, batches=cfg.advanced.taylor_batches,
                              seed=cfg.advanced.seed)


def iter_groups(model: nn.Module, example_inputs: Any, config: ChannelPruning, *,
                inputs: MethodInputs | None = None) -> Iterator[Group]:
    """Yield the groups ``config`` would prune, each scored and with ``group.selected`` set.

    Nothing is cut until the caller calls ``group.prune()`` (or ``group.prune(indices)``
    with its own choice); pruning edits ``model`` in place. ``inputs`` gives the data taylor
    importance needs. ``target_macs_reduction`` is not planned here (it needs several
    rounds), only ``ratio``::

        >>> import torch
        >>> from modelpress.zoo.models import build_model
        >>> model = build_model("resnet_small")
        >>> for g in iter_groups(model, torch.zeros(2, 1, 28, 28), ChannelPruning(ratio=0.25)):
        ...     print(g.producers, len(g), len(g.selected))
        ...     g.prune()
        ['conv1', 'layer1.0.conv2'] 16 4
        ['layer1.0.conv1'] 16 4
        ['layer2.0.downsample.0', 'layer2.0.conv2'] 32 8
        ['layer2.0.conv1'] 32 8
        ['layer3.0.downsample.0', 'layer3.0.conv2'] 64 16
        ['layer3.0.conv1'] 64 16
        >>> model.layer2[0].conv2.out_channels
        24
    """
    inputs = inputs or MethodInputs()
    if config.importance == "taylor" and inputs.data is None:
        raise DataError("importance='taylor' needs data (a few batches with a loss)",
                        hint="pass inputs=MethodInputs(data=...), or use importance='l1'")
    graph = build_channel_graph(model, example_inputs)
    groups = select_groups(model, graph, config)
    plan(groups, _scores(model, groups, config, inputs), config, config.ratio or 0.0)
    yield from groups


# -- the method --------------------------------------------------------------------------------
def _without(scores: torch.Tensor, removed: list[int]) -> torch.Tensor:
    keep = sorted(set(range(len(scores))) - set(removed))
    return scores[keep]


def _prune_to_macs(model, graph, groups, cfg: ChannelPruning, inputs: MethodInputs, macs0: int) -> float:
    """Cut ``advanced.step`` more of the channels at a time until the MAC target is met."""
    base = [len(g) for g in groups]
    fraction, reduction = 0.0, 0.0
    layers = layer_macs(graph)
    other = macs0 - layers()  # MACs outside traced Conv/Linear layers never change
    scores = _scores(model, groups, cfg, inputs)
    fresh = True
    while reduction < cfg.target_macs_reduction:
        fraction = round(fraction + cfg.advanced.step, 6)
        if fraction >= 1:
            break
        plan(groups, scores, cfg, fraction, base)
        if not any(g.selected for g in groups):
            continue  # rounding leaves nothing to cut at this step
        if not fresh:  # the network changed since the last scoring: rescore before cutting
            scores = _scores(model, groups, cfg, inputs)
            plan(groups, scores, cfg, fraction, base)
        cuts = [list(g.selected) for g in groups]
        for g in groups:
            g.prune()
        scores = [_without(s, cut) for s, cut in zip(scores, cuts)]
        fresh = False
        reduction = 1 - (other + layers()) / macs0
        inputs.log(f"prune.channels: removed {fraction:.0%} of the channels, MACs -{reduction:.1%}")
    if reduction < cfg.target_macs_reduction:
        raise UnsupportedError(f"prune.channels reached only {reduction:.1%} MAC reduction "
                               f"(target {cfg.target_macs_reduction:.0%})",
                               hint="widen the scope or lower min_channels; skipped layers: "
                                    + (", ".join(s["layer"] for s in graph.skipped) or "none"))
    return fraction


def _prune_heads(model: nn.Module, cfg: ChannelPruning, inputs: MethodInputs) -> tuple[nn.Module, dict]:
    """The attention heads: the same fraction, as prune.heads removes them (the channel graph
    keeps an attention's inner width whole, since its heads must stay equally wide). Tried on a
    copy: where the heads cannot go (MaxViT reshapes its heads back to its input width) the model
    is returned as it was, and the report says why."""
    heads_cfg = HeadPruning(head_ratio=cfg.ratio, ffn_ratio=0.0, scope=cfg.scope)
    try:
        result = head_prune(copy.deepcopy(model), heads_cfg, dataclasses.replace(inputs, train=None))
    except UnsupportedError as err:  # e.g. an attention whose head counts cannot follow
        inputs.log(f"prune.channels: attention heads left as they are ({err})")
        return model, {"skipped": str(err)}
    return result.model, result.info["heads"]


@register_method("prune.channels", ChannelPruning, structural=True, layer_types=PRUNABLE)
def channel_prune(model: nn.Module, cfg: ChannelPruning, inputs: MethodInputs) -> MethodResult:
    """Structured channel pruning: remove whole filters/neurons by coupled group."""
    if cfg.importance == "taylor" and inputs.data is None:
        raise DataError("importance='taylor' needs data (a few batches with a loss)",
                        hint="pass data=..., or use importance='l1'")
    example = example_inputs(cfg, inputs.data)
    mac_input = slice_inputs(example, 1)
    macs0, params0 = count_macs(model, mac_input), count_parameters(model)
    # GPT-2's Conv1D (a Linear storing [in, out]) becomes the nn.Linear it computes, which the
    # graph rules and the surgery know; the artifact records it as a Linear
    plain_linears(model, [(n, m) for n, m in model.named_modules() if is_transposed_linear(m)])
    # nn.MultiheadAttention and torchvision's Swin tie their inner width to their input width: their
    # exact equivalents (modelpress Attention, WindowAttention) let the hidden width around them go
    convert_attention(model)
    with torch.no_grad():
        was_training = model.training
        model.eval()
        out_shape = call_model(model, example).shape
        model.train(was_training)
    graph = build_channel_graph(model, example)
    info: dict[str, Any] = {"skipped": graph.skipped, "capture": graph.capture}
    groups = select_groups(model, graph, cfg)
    sizes = [(list(g.producers), len(g)) for g in groups]
    if cfg.target_macs_reduction is None:
        plan(groups, _scores(model, groups, cfg, inputs), cfg, cfg.ratio)
        for g in groups:
            g.prune()
    else:
        info["ratio"] = _prune_to_macs(model, graph, groups, cfg, inputs, macs0)
    blocks = find_blocks(model) if cfg.heads and cfg.target_macs_reduction is None and cfg.ratio else []
    if blocks:
        model, info["heads"] = _prune_heads(model, cfg, inputs)
        if "skipped" not in info["heads"]:  # their outputs are whole heads, and heads went: not left intact
            by_heads = {n for b in blocks for n, _, _ in b.qkv}
            info["skipped"] = [s for s in info["skipped"] if s["layer"] not in by_heads]
    with torch.no_grad():
        was_training = model.training
        model.eval()
        try:
            new_shape = call_model(model, example).shape
        except Exception as exc:  # a width the model's code hard-codes, which a recorded graph cannot show
            raise UnsupportedError(
                f"the pruned {type(model).__name__} no longer runs ({type(exc).__name__}: "
                f"{str(exc).strip().splitlines()[0] if str(exc).strip() else ''}); its code likely hard-codes a "
                f"width (graph captured with {graph.capture})",
                hint="exclude the layers around it with scope, or prune attention with prune.heads") from None
        finally:
            model.train(was_training)
    if new_shape != out_shape:  # a guard: the output layer is never in a prunable group
        raise UnsupportedError(f"structured pruning changed the output shape {tuple(out_shape)} -> "
                               f"{tuple(new_shape)}; please report this model")
    macs1, params1 = count_macs(model, mac_input), count_parameters(model)
    info.update({
        "groups": [{"layers": p, "channels": [n, len(g)]} for (p, n), g in zip(sizes, groups)],
        "params": [params0, params1], "macs": [macs0, macs1], "macs_reduction": 1 - macs1 / macs0,
    })
    inputs.log(f"prune.channels: params {params0:,} -> {params1:,}, MACs {macs0:,} -> {macs1:,}; "
               f"{len(info['skipped'])} layer(s) left intact")
    return MethodResult(model, info)


__all__ = ["ChannelPruning", "ChannelPruningAdvanced", "channel_prune", "count_macs",
           "iter_groups", "layer_macs", "plan", "select_groups"]
