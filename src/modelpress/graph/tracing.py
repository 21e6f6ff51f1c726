"""Trace a model into a torch.fx graph and record the shape of every value.

Structural edits need two things the module tree does not say: *how* tensors flow
between layers (a residual add, a concat, a flatten before a Linear) and *how big* each
tensor is (a flatten turns one channel into ``H*W`` input features of the next Linear).
:func:`trace_with_shapes` gets the first from ``torch.fx.symbolic_trace`` and the second
by running the traced graph once on an example input.

    >>> import torch
    >>> from torch import nn
    >>> gm = trace_with_shapes(nn.Sequential(nn.Conv2d(1, 4, 3), nn.Flatten()), torch.zeros(2, 1, 5, 5))
    >>> [(n.name, n.meta["shape"]) for n in gm.graph.nodes if n.op != "output"]
    [('input_1', (2, 1, 5, 5)), ('_0', (2, 4, 3, 3)), ('_1', (2, 36))]
"""
from __future__ import annotations

import os
import traceback
from typing import Any

import torch
from torch import fx, nn

from ..core.errors import UnsupportedError
from ..nn.attention import Attention

_TORCH_DIR = os.path.dirname(torch.__file__)


def _user_frame(exc: BaseException) -> str:
    """``file:line `code``` of the deepest frame outside torch: the untraceable spot."""
    frames = [f for f in traceback.extract_tb(exc.__traceback__) if not f.filename.startswith(_TORCH_DIR)]
    if not frames:
        return "inside torch"
    f = frames[-1]
    return f"{os.path.basename(f.filename)}:{f.lineno} `{(f.line or '').strip()}`"


def node_location(node: fx.Node) -> str:
    """Where ``node`` comes from in the model's source (``file:line `code```), or ''."""
    trace = node.stack_trace or ""
    lines = [ln.strip() for ln in trace.strip().splitlines()]
    for i in range(len(lines) - 1, -1, -1):
        parts = lines[i].split('"')
        if lines[i].startswith("File ") and len(parts) > 1 and not parts[1].startswith(_TORCH_DIR):
            file = os.path.basename(parts[1])
            line_no = lines[i].split("line ")[-1].split(",")[0]
            code = lines[i + 1] if i + 1 < len(lines) else ""
            return f"{file}:{line_no} `{code}`"
    return ""


class _ShapeRecorder(fx.Interpreter):
    """Runs the graph once and stores each node's output shape in ``node.meta["shape"]``
    (a tuple for tensors, None for anything else)."""

    def run_node(self, n: fx.Node) -> Any:
        result = super().run_node(n)
        n.meta["shape"] = tuple(result.shape) if isinstance(result, torch.Tensor) else None
        return result


def _positional(gm: fx.GraphModule, inputs: Any) -> list:
    """The example inputs as positional arguments of the traced graph's placeholders."""
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    if isinstance(inputs, dict):
        args = []
        for p in placeholders:
            name = p.target.lstrip("*")
            args.append(inputs[name] if name in inputs else (p.args[0] if p.args else None))
        return args
    args = list(inputs) if isinstance(inputs, (list, tuple)) else [inputs]
    return args + [p.args[0] if p.args else None for p in placeholders[len(args):]]


_LAYERS = (nn.Linear, nn.modules.conv._ConvNd, nn.modules.batchnorm._BatchNorm)
_BASE_TENSORS = {"weight", "bias", "running_mean", "running_var", "num_batches_tracked"}


class _Tracer(fx.Tracer):
    """fx's tracer, keeping layers with rules of their own whole: modelpress' Attention, and every
    Linear, Conv and BatchNorm, subclasses included (timm's Linear, Conv2dSame and BatchNormAct2d
    compute what their base class does through F.linear / F.conv2d / F.batch_norm on their own
    parameters, plus padding or a channel-wise activation)."""

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return isinstance(m, Attention) or _plain_layer(m) or super().is_leaf_module(m, qualname)


def _plain_layer(m: nn.Module) -> bool:
    """A Linear/Conv/BatchNorm (or subclass) holding only its base class's tensors: the channel
    rules and the surgery of the base class apply (a subclass with tensors of its own, e.g.
    per-channel quantization scales, is traced through instead)."""
    if not isinstance(m, _LAYERS):
        return False
    own = {n for n, _ in m.named_parameters(recurse=False)} | {n for n, _ in m.named_buffers(recurse=False)}
    return own <= _BASE_TENSORS and not any(True for c in m.children() for _ in c.parameters())


def _trace(model: nn.Module) -> tuple[fx.Tracer, fx.Graph]:
    tracer = _Tracer()
    tracer.record_stack_traces = True  # lets a skipped layer's reason name its source line
    try:
        return tracer, tracer.trace(model)
    except Exception as exc:  # fx raises TraceError, TypeError, ... depending on the construct
        raise UnsupportedError(
            f"cannot trace {type(model).__name__} with torch.fx at {_user_frame(exc)}: "
            f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}",
            hint="structural pruning needs an fx-traceable forward (no Python control flow on tensor "
                 "values); for Hugging Face transformer encoders use prune.heads") from None


def _unreached(model: nn.Module, graph: fx.Graph) -> list[str]:
    """Modules with parameters of their own that ``graph`` neither calls nor reads from."""
    reached = {n.target for n in graph.nodes if n.op == "call_module"}
    reached |= {n.target.rpartition(".")[0] for n in graph.nodes if n.op == "get_attr"}
    out = []
    for name, m in model.named_modules():
        if next(m.parameters(recurse=False), None) is None:
            continue
        parts = name.split(".")
        if not any(".".join(parts[:i]) in reached for i in range(1, len(parts) + 1)):
            out.append(name)
    return out


def trace_with_shapes(model: nn.Module, example_inputs: Any) -> fx.GraphModule:
    """Symbolically trace ``model`` and annotate every node with its output shape.

    The GraphModule shares its submodules with ``model`` (no copy). The example forward runs
    in eval mode without grad, so BatchNorm statistics are not touched; the model's training
    flag is restored. Raises :class:`UnsupportedError` naming the source line that cannot be
    traced (data-dependent control flow, calls fx cannot follow).
    """
    tracer, graph = _trace(model)
    unreached = _unreached(model, graph) if not model.training else []
    if unreached:
        # Layers that run only in training (GoogLeNet's and Inception's auxiliary classifiers)
        # read channels too: a cut that missed them would break fine-tuning. Trace the training
        # forward instead when it reaches more of them.
        model.train()
        try:
            train_tracer, train_graph = _trace(model)
            if len(_unreached(model, train_graph)) < len(unreached):
                tracer, graph = train_tracer, train_graph
        except UnsupportedError:
            pass
        finally:
            model.eval()
    gm = fx.GraphModule(tracer.root, graph, class_name=type(model).__name__)
    # get_attr owners are plain Modules in gm (only called modules are shared): keep the model
    gm.meta["root"] = model
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            _ShapeRecorder(gm).run(*_positional(gm, example_inputs))
    except Exception as exc:
        raise UnsupportedError(
            f"running the traced {type(model).__name__} on the example input failed: "
            f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}",
            hint="check that the example input (first batch of the data, or input_shape) fits the model") from None
    finally:
        model.train(was_training)
    return gm
