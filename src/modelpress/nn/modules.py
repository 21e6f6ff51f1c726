"""Module surgery every method shares: find and replace submodules by dotted name.

    >>> from torch import nn
    >>> from modelpress.nn.modules import set_module
    >>> net = nn.Sequential(nn.Linear(4, 4), nn.Sequential(nn.ReLU()))
    >>> set_module(net, "1.0", nn.Tanh())
    >>> net[1][0]
    Tanh()
"""
from __future__ import annotations

from torch import nn


def get_module(model: nn.Module, name: str) -> nn.Module | None:
    """The submodule called ``name`` (dotted path), or None when there is none."""
    try:
        return model.get_submodule(name)
    except AttributeError:
        return None


def set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    """Replace (or add) the submodule called ``name`` (dotted path) with ``module``.

    An index one past the end of a ``Sequential`` / ``ModuleList`` appends, so a container
    rebuilt empty can receive its children in order.
    """
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    if isinstance(parent, (nn.Sequential, nn.ModuleList)) and child.isdigit() and int(child) >= len(parent):
        parent.append(module)
    else:
        setattr(parent, child, module)

