"""Pruning groups: coupled channels that must be removed together, and their removal.

A :class:`Group` is the unit of structural pruning. Its *channels* are indices
``0..len(group)-1``; removing channel ``i`` removes, in one consistent cut, every position
that carries it: the producing Conv/Linear's output channel, the BatchNorm entries, a
depthwise conv's filter, the next layers' input channels (``H*W`` inputs of a Linear
after a flatten) and, through a residual add, the same channel of every other branch.

A *grouped* conv must keep its conv groups equally wide, so the channels it reads or
writes cannot go one at a time: they are split into *cells* (its conv groups, or finer
when several grouped convs see the same channels) tied in a :class:`ConvGroupTie`, and
only whole *units* (one channel from every cell of a tie, see
:meth:`Group.removal_units`) may go. Cutting an uneven set raises.

Scoring is not done here (see :mod:`modelpress.pruning.importance`); a caller inspects
the groups, picks indices, and calls :meth:`Group.prune`::

    >>> import torch
    >>> from torch import nn
    >>> from modelpress.graph import build_channel_graph
    >>> model = nn.Sequential(nn.Conv2d(1, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 4 * 4, 2))
    >>> graph = build_channel_graph(model, torch.zeros(2, 1, 6, 6))
    >>> [len(g) for g in graph.groups], graph.groups[0].prunable_count()
    ([8, 2], 8)
    >>> graph.groups[0].prune([0, 1, 2])
    >>> model[0].out_channels, model[1].num_features, model[4].in_features
    (5, 5, 80)
    >>> graph.skipped
    [{'layer': '4', 'reason': 'feeds the model output'}]
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import torch
from torch import fx, nn

from ..core.errors import UnsupportedError
from .aten import analyze_exported, export_with_shapes
from .channels import ChannelAnalysis, UnionFind, analyze_channels
from .surgery import conv_groups, group_counts, prune_axis
from .tracing import trace_with_shapes


@dataclass
class Axis:
    """One prunable axis of one layer: ``positions[i]`` is the channel carried at position i."""

    name: str
    kind: str  # "out" | "in" | "dw" | "norm" (see graph.surgery)
    module: nn.Module
    positions: list[int]  # channel id (union-find root) carried at each position

    @property
    def label(self) -> str:
        if self.kind.startswith(("param:", "attr:")):
            return ".".join(filter(None, (self.name, self.kind.split(":")[1])))
        return f"{self.name}.{self.kind}" if self.kind in ("out", "in") else self.name

    @property
    def conv_groups(self) -> int:
        """Conv groups splitting this axis into slices that must stay equally wide (1: none)."""
        return conv_groups(self.module, self.kind)


@dataclass
class Member:
    """A group's share of one axis: ``positions[c]`` are the axis positions of group channel c
    (several for a Linear after a flatten; none when the axis does not carry that channel)."""

    axis: Axis
    positions: list[list[int]]

    @property
    def name(self) -> str:
        return self.axis.name

    @property
    def kind(self) -> str:
        return self.axis.kind

    @property
    def module(self) -> nn.Module:
        return self.axis.module


@dataclass
class ConvGroupTie:
    """Channels of a group that grouped convs force to go in equal numbers per *cell*.

    A channel's cell is the conv group it sits in, for every grouped-conv axis (``convs``)
    holding it; removing the same count from every cell removes the same count from every
    conv group, as long as each conv group holds the same number of cells. When it does not
    (the conv also reads channels of another group, or two grouped convs slice the channels
    differently) ``problem`` says so and the channels stay.
    """

    cells: list[list[int]]
    convs: list[str]
    problem: str | None = None


class Group:
    """Coupled channels of one or more producer layers. See the module docstring."""

    def __init__(self, graph: "ChannelGraph", producers: list[str], channels: list[int]):
        self.graph = graph
        self.producers = producers          # Conv/Linear layers whose outputs are in the group
        self._roots = channels              # one union-find root per channel
        # Set by a planner (modelpress.pruning.structured.iter_groups): per-channel scores and
        # the channels it proposes to remove, so a caller can look before cutting.
        self.importance: torch.Tensor | None = None
        self.selected: list[int] = []
        roots = set(channels)
        self.axes = [a for a in graph.axes if roots.intersection(a.positions)]
        self._members: list[Member] | None = None
        self._version = -1

    def __len__(self) -> int:
        return len(self._roots)

    @property
    def members(self) -> list[Member]:
        """Every axis holding some of the group's channels (cached until the model is pruned again)."""
        if self._members is not None and self._version == self.graph.version:
            return self._members
        index = {r: i for i, r in enumerate(self._roots)}
        out = []
        for axis in self.axes:
            per_channel: list[list[int]] = [[] for _ in self._roots]
            for pos, root in enumerate(axis.positions):
                c = index.get(root)
                if c is not None:
                    per_channel[c].append(pos)
            if any(per_channel):
                out.append(Member(axis, per_channel))
        self._members, self._version = out, self.graph.version
        return out

    @property
    def ties(self) -> list[ConvGroupTie]:
        """The channels grouped convs constrain, as cells that must lose equal counts."""
        split = [m for m in self.members if m.axis.conv_groups > 1]
        if not split:
            return []
        keys: list[list[tuple[int, int]]] = [[] for _ in range(len(self))]
        twice: dict[int, str] = {}
        for mi, m in enumerate(split):
            width = len(m.axis.positions) // m.axis.conv_groups
            for c, positions in enumerate(m.positions):
                if not positions:
                    continue
                if len(positions) > 1:  # e.g. cat([x, x]): one removal would cut two positions
                    twice[mi] = f"grouped Conv '{m.name}' reads one channel more than once"
                keys[c].append((mi, positions[0] // width))  # the conv group channel c sits in
        cells: dict[tuple, list[int]] = {}
        for c, key in enumerate(keys):
            if key:
                cells.setdefault(tuple(key), []).append(c)
        # Cells sharing a grouped conv lose the same count: they form one tie.
        links = UnionFind()
        for _ in split:
            links.add()
        for key in cells:
            for mi, _ in key[1:]:
                links.union(key[0][0], mi)
        ties: dict[int, ConvGroupTie] = {}
        for key, chans in cells.items():
            tie = ties.setdefault(links.find(key[0][0]), ConvGroupTie([], []))
            tie.cells.append(chans)
        for mi, m in enumerate(split):
            tie = ties[links.find(mi)]
            tie.convs.append(m.axis.label)
            per_group = [0] * m.axis.conv_groups
            for key in cells:
                for mj, j in key:
                    per_group[j] += mj == mi
            if mi in twice:
                tie.problem = tie.problem or twice[mi]
            elif len(set(per_group)) > 1:
                tie.problem = tie.problem or (
                    f"grouped Conv '{m.name}' (groups={m.axis.conv_groups}) cannot keep its groups equally "
                    "wide: these channels fill its groups unevenly (it also reads channels of other layers, "
                    "or grouped convs split them differently)")
        return list(ties.values())

    def removal_units(self, scores: torch.Tensor) -> list[list[int]]:
        """The prunable channels as units that may be removed one at a time, cheapest first.

        A channel no grouped conv constrains is a unit of its own. In a tie, unit ``j`` is the
        ``j``-th lowest-scoring channel of every cell, so any set of units removes the same
        count from each conv group. Units are ordered by their mean score (``scores``: one
        per channel, higher = keep).
        """
        ok = self.prunable()
        by_score = lambda c: (float(scores[c]), c)  # noqa: E731
        units, tied = [], set()
        for tie in self.ties:
            tied.update(c for cell in tie.cells for c in cell)
            cells = [sorted((c for c in cell if ok[c]), key=by_score) for cell in tie.cells]
            depth = min(len(cell) for cell in cells)
            units += [[cell[j] for cell in cells] for j in range(depth)]
        units += [[c] for c in range(len(self)) if ok[c] and c not in tied]
        return sorted(units, key=lambda u: (float(scores[u].double().mean()), min(u)))

    def unprunable_reason(self, channel: int) -> str | None:
        """Why channel ``channel`` must stay (None when it may be removed)."""
        return self.graph.marked.get(self._roots[channel])

    def prunable(self) -> list[bool]:
        return [self.graph.marked.get(r) is None for r in self._roots]

    def prunable_count(self) -> int:
        return sum(self.prunable())

    def removal_limits(self, min_channels: int = 1) -> tuple[list[Member], list[int]]:
        """Members and how many channels each may still lose while keeping ``min_channels``."""
        members = self.members
        slack = []
        for m in members:
            covered = sum(1 for p in m.positions if p)
            slack.append(covered - min(min_channels, covered))
        return members, slack

    def prune(self, indices: Sequence[int] | None = None) -> None:
        """Physically remove the channels ``indices`` (default: :attr:`selected`) from every
        layer of the group, in place. Indices refer to the group as it is now."""
        indices = sorted({int(i) for i in (self.selected if indices is None else indices)})
        if not indices:
            return
        if indices[0] < 0 or indices[-1] >= len(self):
            raise UnsupportedError(f"channel index out of range for a group of {len(self)} channels: {indices}")
        for i in indices:
            reason = self.unprunable_reason(i)
            if reason is not None:
                raise UnsupportedError(f"channel {i} of the group of {', '.join(self.producers) or 'no layer'} "
                                       f"cannot be removed: {reason}")
        roots = {self._roots[i] for i in indices}
        self.graph.remove(roots)
        self._roots = [r for r in self._roots if r not in roots]
        self.importance, self.selected = None, []  # stale once channels moved

    def __repr__(self) -> str:
        labels = [m.axis.label for m in self.members]
        shown = ", ".join(labels[:6]) + (f", ... (+{len(labels) - 6})" if len(labels) > 6 else "")
        return f"Group({len(self)} channels, {self.prunable_count()} prunable: {shown})"


class ChannelGraph:
    """The groups of a model (see :func:`build_channel_graph`). Pruning edits ``model`` in place."""

    def __init__(self, model: nn.Module, analysis: ChannelAnalysis, gm: fx.GraphModule | None = None):
        self.model = model
        self.gm = gm  # the traced graph (node.meta["shape"] holds the example shapes)
        self.capture = "fx"  # or "export" (see build_channel_graph)
        self.sites = analysis.sites  # Conv/Linear layer -> output positions per sample
        self._uf: UnionFind = analysis.uf
        modules = dict(model.named_modules())
        self.version = 0  # bumped by every cut, so cached member positions are refreshed
        self.axes = [Axis(name, kind, modules[name], [self.find(s) for s in slots])
                     for (name, kind), slots in analysis.axes.items()]
        self.marked: dict[int, str] = {}
        self.ties: list[tuple[nn.Module, list[nn.Module]]] = []  # tied embedding -> output layers
        for slot, reason in analysis.marks.items():
            self.marked.setdefault(self.find(slot), reason)
        self._mark_shared_parameters(modules)
        self.groups = self._build_groups(analysis)
        self._mark_uneven_conv_groups()
        self.skipped = self._skipped(analysis)

    def find(self, slot: int) -> int:
        return self._uf.find(slot)

    def _mark_shared_parameters(self, modules: dict[str, nn.Module]) -> None:
        # A weight tied to another layer would be sliced under that layer's feet, except tied
        # input and output embeddings cut along the hidden width at the same channels: both
        # axes slice the weight's dim 1 the same way, and the tie is restored after each cut.
        owners: dict[int, list[str]] = {}
        for name, m in modules.items():
            for p in m.parameters(recurse=False):
                owners.setdefault(id(p), []).append(name)
        by_name = {(a.name, a.kind): a for a in self.axes}
        for axis in self.axes:
            for p in axis.module.parameters(recurse=False):
                others = [o for o in owners.get(id(p), []) if o != axis.name]
                if not others:
                    continue
                if self._tied_embedding(axis, others, modules, by_name):
                    continue
                for root in axis.positions:
                    self.marked.setdefault(root, f"'{axis.name}' shares parameters with '{others[0]}'")

    def _tied_embedding(self, axis: Axis, others: list[str], modules: dict[str, nn.Module], by_name: dict) -> bool:
        """True for an Embedding's ``emb`` axis tied to Linear output layers' ``in`` axes (or the
        reverse) carrying the same channels; the ties are kept in :attr:`ties`."""
        names = [axis.name, *others]
        embs = [n for n in names if isinstance(modules[n], nn.Embedding)]
        if len(embs) != 1 or not all(isinstance(modules[n], nn.Linear) for n in names if n != embs[0]):
            return False
        emb = by_name.get((embs[0], "emb"))
        heads = [by_name.get((n, "in")) for n in names if n != embs[0]]
        if emb is None or any(h is None or h.positions != emb.positions for h in heads):
            return False
        self.ties.append((modules[embs[0]], [modules[n] for n in names if n != embs[0]]))
        return True

    def _build_groups(self, analysis: ChannelAnalysis) -> list[Group]:
        # Spaces linked by any union (a residual add, a shared consumer) form one group.
        spaces = UnionFind()
        for _ in analysis.spaces:
            spaces.add()
        for slot, space in enumerate(analysis.slot_space):
            spaces.union(space, analysis.slot_space[self.find(slot)])
        members: dict[int, list[int]] = {}
        for i in range(len(analysis.spaces)):
            members.setdefault(spaces.find(i), []).append(i)
        groups = []
        for space_ids in members.values():
            roots = sorted({self.find(s) for i in space_ids for s in analysis.spaces[i].slots})
            producers = [analysis.spaces[i].producer for i in space_ids if analysis.spaces[i].producer]
            groups.append(Group(self, producers, roots))
        return groups

    def _mark_uneven_conv_groups(self) -> None:
        # A tie whose cells cannot be removed evenly stays whole (reported in `skipped`).
        for group in self.groups:
            for tie in group.ties:
                if tie.problem is not None:
                    for cell in tie.cells:
                        for c in cell:
                            self.marked.setdefault(group._roots[c], tie.problem)

    def _skipped(self, analysis: ChannelAnalysis) -> list[dict[str, str]]:
        out = []
        for space in analysis.spaces:
            if space.producer is None:
                continue
            reason = next((self.marked[self.find(s)] for s in space.slots if self.find(s) in self.marked), None)
            if reason is not None:
                out.append({"layer": space.producer, "reason": reason})
        return out

    def remove(self, roots: set[int]) -> None:
        """Cut every axis position whose channel is in ``roots`` (all-or-nothing)."""
        plans = []
        for axis in self.axes:
            keep = [i for i, r in enumerate(axis.positions) if r not in roots]
            if len(keep) == len(axis.positions):
                continue
            if not keep:
                raise UnsupportedError(f"pruning would remove every channel of '{axis.name}'",
                                       hint="keep at least one channel per layer (min_channels >= 1)")
            if axis.conv_groups > 1:
                counts = group_counts(axis.module, axis.kind, keep, len(axis.positions))
                if len(set(counts)) > 1:
                    raise UnsupportedError(
                        f"pruning would leave the {axis.conv_groups} groups of grouped Conv '{axis.name}' "
                        f"with unequal {axis.kind}put widths {counts}",
                        hint="remove the same number of channels from each conv group "
                             "(Group.removal_units lists valid units)")
            plans.append((axis, keep))
        for axis, keep in plans:
            prune_axis(axis.module, axis.kind, keep)
            axis.positions = [axis.positions[i] for i in keep]
        for emb, heads in self.ties:  # each side got its own sliced copy: share one again
            for head in heads:
                head.weight = emb.weight
        self.version += 1

    def __repr__(self) -> str:
        return f"ChannelGraph({len(self.groups)} groups, {len(self.skipped)} skipped layers)"


def build_channel_graph(model: nn.Module, example_inputs: Any) -> ChannelGraph:
    """Trace ``model`` on ``example_inputs`` and find its pruning groups.

    The graph comes from torch.fx symbolic tracing (module-level, and it sees widths that the
    code hard-codes) or, for a model fx cannot trace (keyword inputs, ``ModelOutput``s, Python
    control flow: Hugging Face transformers), from ``torch.export`` (:mod:`.aten`).
    ``graph.capture`` says which. The model is not modified until a group is pruned. Raises
    :class:`~modelpress.core.errors.UnsupportedError` when neither can record the model.
    """
    try:
        gm = trace_with_shapes(model, example_inputs)
    except UnsupportedError as fx_error:
        try:
            return _exported_graph(model, example_inputs)
        except UnsupportedError as export_error:
            raise UnsupportedError(f"{fx_error}; and {export_error}", hint=export_error.hint) from None
    analysis = analyze_channels(gm)
    graph = ChannelGraph(model, analysis, gm)
    if analysis.opaque:  # fx kept layers whole (nn.TransformerEncoder ...): export sees inside them
        try:
            exported = _exported_graph(model, example_inputs)
        except UnsupportedError:
            return graph
        if _prunable(exported) > _prunable(graph):
            return exported
    return graph


def _exported_graph(model: nn.Module, example_inputs: Any) -> ChannelGraph:
    gm = export_with_shapes(model, example_inputs)
    graph = ChannelGraph(model, analyze_exported(gm), gm)
    graph.capture = "export"
    return graph


def _prunable(graph: ChannelGraph) -> int:
    return sum(g.prunable_count() for g in graph.groups if g.producers)
