"""Peak memory of one forward pass on CPU.

Measured, not estimated: the forward runs under ``torch.profiler`` with ``profile_memory=True``,
which records every allocation and free made through PyTorch's CPU allocator together with the
allocator's running total. The peak of that running total, relative to its value when profiling
started, is the activation peak (outputs, intermediates, workspaces). Parameters and inputs
already exist before the forward, so they are added separately.

Limits: memory that libraries allocate on their own (oneDNN scratch pads, ONNX Runtime) is not
seen; the numbers are for eager PyTorch. One warm-up forward runs first so one-off caches
(weight pre-packing, lazy initialisation) do not count as activations.

Example (a Linear(1000, 1000) on a batch of 64 allocates one 64x1000 fp32 output)::

    >>> import torch
    >>> from torch import nn
    >>> peak_memory(nn.Linear(1000, 1000), torch.randn(64, 1000))["peak_activation_bytes"]
    256000
"""
from __future__ import annotations

import contextlib
import os
import sys
import tempfile
from typing import Any, Iterator

import torch
from torch import nn
from torch.profiler import ProfilerActivity, profile

from ..core.data import call_model, tensor_bytes
from ..core.errors import UnsupportedError
from .params import dense_bytes


def _allocations(nodes) -> Iterator[tuple[int, int, int]]:
    """(time_ns, bytes (+alloc / -free), allocator total after it) for every allocation event."""
    for node in nodes:
        if str(node.tag).endswith("Allocation"):
            fields = node.extra_fields
            if str(fields.device).startswith("cpu"):
                yield node.start_time_ns, fields.alloc_size, fields.total_allocated
        yield from _allocations(node.children)


@contextlib.contextmanager
def _without_profiler_banner():
    """Drop the ``USDT: ... profiler_start/stop`` lines kineto writes straight to fd 2.

    Other stderr output of the block is written back unchanged.
    """
    try:
        sys.stderr.flush()
        saved = os.dup(2)
    except (OSError, ValueError):  # no real fd 2 (embedded interpreters): leave it alone
        yield
        return
    with tempfile.TemporaryFile() as capture:
        os.dup2(capture.fileno(), 2)
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            capture.seek(0)
            for line in capture.read().decode(errors="replace").splitlines(keepends=True):
                if not (line.startswith("USDT:") and "profiler_st" in line):
                    sys.stderr.write(line)


def _activation_peak(model: nn.Module, inputs: Any) -> int:
    with _without_profiler_banner(), \
            profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        call_model(model, inputs)
    try:
        events = sorted(_allocations(prof.profiler.kineto_results.experimental_event_tree()))
    except AttributeError as exc:  # the profiler's result API moved
        raise UnsupportedError("peak_memory: this torch version's profiler exposes no allocation events",
                               hint="use the torch version pinned in constraints.txt") from exc
    if not events:
        return 0
    _, first_size, first_total = events[0]
    # the allocator total persists across profiling sessions: measure from where this one began
    baseline = first_total - first_size
    return max(0, max(total for _, _, total in events) - baseline)


def peak_memory(model: nn.Module, inputs: Any) -> dict[str, int]:
    """Memory of one forward on CPU, in bytes.

    Returns ``param_bytes`` (dense state_dict), ``input_bytes``, ``peak_activation_bytes``
    (highest memory allocated during the forward, outputs included) and ``peak_total_bytes``
    (their sum). Runs in eval mode under ``torch.inference_mode()``; the training flag is restored.
    """
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            call_model(model, inputs)  # warm-up: one-off caches are not activations
            activations = _activation_peak(model, inputs)
    finally:
        model.train(was_training)
    params, input_bytes = dense_bytes(model), tensor_bytes(inputs)
    return {"param_bytes": params, "input_bytes": input_bytes, "peak_activation_bytes": activations,
            "peak_total_bytes": params + input_bytes + activations}
