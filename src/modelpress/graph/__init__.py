"""Tracing and dependency groups for structural edits (channel pruning).

* :func:`build_channel_graph` traces a model (torch.fx + one example forward) and returns a
  :class:`ChannelGraph` whose :class:`Group` objects are the units of structural pruning:
  coupled channels that are removed together;
* :mod:`.channels` holds the rules saying how each op moves channels (what is supported,
  what is skipped and why); :mod:`.surgery` does the physical slicing of layers.

    >>> import torch
    >>> from modelpress.graph import build_channel_graph
    >>> from modelpress.zoo.models import build_model
    >>> graph = build_channel_graph(build_model("resnet_small"), torch.zeros(2, 1, 28, 28))
    >>> group = graph.groups[0]
    >>> len(group), group.producers
    (16, ['conv1', 'layer1.0.conv2'])
"""
from .channels import analyze_channels
from .groups import Axis, ChannelGraph, Group, Member, build_channel_graph
from .surgery import prune_axis
from .tracing import trace_with_shapes

__all__ = ["Axis", "ChannelGraph", "Group", "Member", "analyze_channels", "build_channel_graph",
           "prune_axis", "trace_with_shapes"]
