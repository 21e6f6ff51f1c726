"""PyTorch's own deployable: a ``torch.export`` program (``.pt2``) that the ``torch-compile`` runtime
compiles with TorchInductor where it runs.

:func:`export_program` captures the model with ``torch.export`` (non-strict: Python control flow in
the model's code runs as Python while tracing) with a dynamic batch dimension, so one file serves
every batch size, and saves it with ``torch.export.save``. The file holds the graph and the weights
(quantized layers as what they store, e.g. packed int4 with its unpacking in the graph); loading it
needs PyTorch only. Compiling happens when a session opens it
(:class:`~modelpress.runtime.builtin.TorchCompile`): Inductor generates C++ for this machine's CPU,
so it needs a C++ compiler, and the first calls are slow (they are the warm-up).

    >>> import tempfile, torch
    >>> net = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.ReLU())
    >>> with tempfile.TemporaryDirectory() as tmp:
    ...     path = export_program(net, torch.randn(2, 4), f"{tmp}/model.pt2")
    ...     program = torch.export.load(path)
    ...     x = torch.randn(5, 4)  # another batch size
    ...     torch.allclose(program.module()(x), net(x))
    True
"""
from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..core.data import args_and_kwargs
from ..core.errors import UnsupportedError
from ..core.io import atomic_path


def _dynamic_batch(inputs: Any) -> Any:
    """``dynamic_shapes`` with dimension 0 of every tensor input dynamic (others static)."""
    batch = torch.export.Dim.DYNAMIC

    def one(x: Any) -> Any:
        return {0: batch} if isinstance(x, torch.Tensor) and x.dim() >= 1 else None

    if isinstance(inputs, dict):
        return {k: one(v) for k, v in inputs.items()}
    if isinstance(inputs, (list, tuple)):
        return tuple(one(v) for v in inputs)
    return (one(inputs),)


def _at_least_two(inputs: Any) -> Any:
    """The inputs with a batch of one repeated to two: ``torch.export`` fixes a dimension traced at
    size 1 (a program exported from one sample would run batch 1 only)."""
    def one(x: Any) -> Any:
        return torch.cat([x, x]) if isinstance(x, torch.Tensor) and x.dim() >= 1 and x.shape[0] == 1 else x

    if isinstance(inputs, dict):
        return {k: one(v) for k, v in inputs.items()}
    if isinstance(inputs, (list, tuple)):
        return type(inputs)(one(v) for v in inputs)
    return one(inputs)


def export_program(model: nn.Module, example_inputs: Any, path: str | os.PathLike) -> Path:
    """Write ``model`` as a ``torch.export`` program to ``path`` (``.pt2``), batch dimension dynamic."""
    path = Path(path)
    example_inputs = _at_least_two(example_inputs)
    args, kwargs = args_and_kwargs(example_inputs)
    was_training = model.training
    model.eval()
    try:
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")
            shapes = _dynamic_batch(example_inputs)
            try:
                program = torch.export.export(model, args, kwargs or None, dynamic_shapes=shapes, strict=False)
            except Exception:  # a model that specializes on its batch size: a fixed-batch program
                program = torch.export.export(model, args, kwargs or None, strict=False)
    except Exception as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise UnsupportedError(f"torch.export could not capture {type(model).__name__}: {first[:300]}",
                               hint="deploy it with ONNX Runtime or OpenVINO instead (--runtime onnxruntime)") from None
    finally:
        model.train(was_training)
    with atomic_path(path) as tmp:
        torch.export.save(program, str(tmp))
    return path
