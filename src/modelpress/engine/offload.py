"""Layers whose weights wait on disk while a model is calibrated layer by layer.

Layer-by-layer calibration (:mod:`.layerwise`) holds one group of layers' statistics at a time, but
the model's weights stay in memory throughout. With :class:`DiskOffload` the layers being calibrated
keep their tensors (parameters and buffers: weights, biases, the masks a pruner adds) in one
file each in a temporary folder, and memory holds a layer's tensors only while it runs (a forward
pre-hook loads them, a forward hook drops them) or while the method compresses it
(:meth:`DiskOffload.held`, which writes what the method changed back to the file). A dropped tensor
is a ``meta`` tensor of the same shape and dtype, so code that reads a layer's shape still works.
:meth:`DiskOffload.restore` loads every layer back, one at a time, and deletes the files.

The layers' weights leave memory as each file is written, so the calibration's own memory (one
batch's activations, one group's statistics) no longer adds to the model's: what a
``MODELPRESS_MEMORY_LIMIT`` or a container limit must leave room for is the larger of the two, not
their sum. The price is reading each layer's file once per calibration batch per group of layers
after it (the operating system's page cache usually holds them).

:func:`should_offload` makes the ``offload="auto"`` decision: offload when the layers' weights plus
the calibration's estimated working memory exceed :func:`~modelpress.core.resources.available_memory_bytes`.

    >>> import tempfile, torch
    >>> net = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2))
    >>> x = torch.randn(3, 4)
    >>> y = net(x)
    >>> with tempfile.TemporaryDirectory() as tmp:
    ...     store = DiskOffload(net, {"0": net[0], "2": net[2]}, tmp)
    ...     net[0].weight.device.type, torch.equal(net(x), y)
    ...     store.restore()
    ('meta', True)
    >>> net[0].weight.device.type
    'cpu'
"""
from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import functools
import os
import re
import shutil
from pathlib import Path
from typing import Any, Iterator, Literal

import torch
from torch import nn

from ..core.errors import ResourceError
from ..core.resources import available_memory_bytes

Offload = Literal["none", "disk", "auto"]


def _own_tensors(module: nn.Module) -> dict[str, torch.Tensor]:
    tensors = {n: p for n, p in module.named_parameters(recurse=False) if p is not None}
    tensors.update({n: b for n, b in module.named_buffers(recurse=False) if b is not None})
    return tensors


def _shared(model: nn.Module) -> set[int]:
    """ids of tensors held by more than one module (tied weights) or by a module the model holds at
    more than one place: they stay in memory (a method replacing the layer at one place would leave
    the other without its weights)."""
    seen: dict[int, int] = {}
    for _, module in model.named_modules(remove_duplicate=False):
        for t in _own_tensors(module).values():
            seen[id(t)] = seen.get(id(t), 0) + 1
    return {i for i, n in seen.items() if n > 1}


def _set(module: nn.Module, name: str, value: torch.Tensor, requires_grad: bool) -> None:
    if name in module._parameters:
        # setattr, not _parameters[...]: an nn.LSTM refreshes the flat weight list its forward reads
        setattr(module, name, nn.Parameter(value, requires_grad=requires_grad and value.is_floating_point()))
    else:
        module._buffers[name] = value


class DiskOffload:
    """Keep ``layers`` (``{name: module}`` of ``model``) on disk in ``folder`` except while they run
    or are :meth:`held`; see the module docstring. Layers sharing a tensor with another module (tied
    weights), layers the model holds at two places and layers with children stay in memory."""

    def __init__(self, model: nn.Module, layers: dict[str, nn.Module], folder: str | os.PathLike):
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        shared = _shared(model)
        self._files: dict[nn.Module, Path] = {}
        self._grad: dict[nn.Module, dict[str, bool]] = {}
        self._device: dict[nn.Module, torch.device] = {}
        self._held: set[nn.Module] = set()
        self._hooks: list[Any] = []
        try:
            for i, (name, layer) in enumerate(layers.items()):
                tensors = _own_tensors(layer)
                if not tensors or any(id(t) in shared for t in tensors.values()) or next(layer.children(), None):
                    continue
                self._files[layer] = self.folder / f"{i:05d}-{re.sub(r'[^A-Za-z0-9_.-]', '_', name)[:80]}.pt"
                self._grad[layer] = {n: p.requires_grad for n, p in layer.named_parameters(recurse=False)}
                self._device[layer] = next(iter(tensors.values())).device
                self._write(layer)
                self._drop(layer)
                self._hooks.append(layer.register_forward_pre_hook(self._before))
                self._hooks.append(layer.register_forward_hook(self._after))
        except BaseException:
            self.restore()
            raise
        release_free_memory()  # the weights just written out

    @property
    def layers(self) -> int:
        """How many layers live on disk."""
        return len(self._files)

    def _write(self, layer: nn.Module) -> None:
        tensors = {n: t.detach().cpu().contiguous() for n, t in _own_tensors(layer).items()}
        path = self._files[layer]
        partial = path.with_suffix(".partial")
        try:
            torch.save(tensors, partial)
        except OSError as err:
            raise ResourceError(f"cannot write offloaded weights to {path.parent}: {err}",
                                hint="free disk space, or calibrate without offload (offload='none')") from None
        partial.replace(path)  # a layer's file is whole or absent

    def _drop(self, layer: nn.Module) -> None:
        grads = self._grad[layer]
        for name, t in _own_tensors(layer).items():
            _set(layer, name, torch.empty_like(t, device="meta"), grads.get(name, False))

    def _load(self, layer: nn.Module, skip: set[str] = frozenset()) -> None:
        grads = self._grad[layer]
        # read, not memory-mapped: a mapping would outlive the file's next write and count twice
        for name, t in torch.load(self._files[layer], map_location="cpu", weights_only=True).items():
            if name not in skip:
                _set(layer, name, t.to(self._device[layer]), grads.get(name, False))

    def _before(self, layer: nn.Module, _args) -> None:
        if layer not in self._held:
            self._load(layer)

    def _after(self, layer: nn.Module, _args, _out) -> None:
        if layer not in self._held:
            self._drop(layer)

    @contextlib.contextmanager
    def held(self, layers: list[nn.Module]) -> Iterator[None]:
        """Keep ``layers`` in memory inside the block (a method compresses them), then write them
        back (with whatever the method changed or added, e.g. a mask) and drop them."""
        mine = [m for m in layers if m in self._files and m not in self._held]
        for m in mine:
            self._load(m)
            self._held.add(m)
        try:
            yield
        finally:
            for m in mine:
                self._held.discard(m)
                self._write(m)
                self._drop(m)

    def restore(self, discard: dict[nn.Module, set[str]] | None = None) -> None:
        """Every layer back in memory, hooks removed, files deleted (idempotent). ``discard`` names
        tensors per layer not to load back (a method replaced them: they stay ``meta``)."""
        for h in self._hooks:
            h.remove()
        self._hooks.clear()
        for layer in list(self._files):
            if self._files[layer].exists():
                self._load(layer, (discard or {}).get(layer, set()))
            del self._files[layer]
        self._held.clear()
        shutil.rmtree(self.folder, ignore_errors=True)


@functools.cache
def _malloc_trim():
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
    except (OSError, AttributeError):  # not glibc
        return None


def release_free_memory() -> None:
    """Hand memory the process freed back to the system (glibc's ``malloc_trim``; no-op elsewhere).

    Loading and dropping each layer's tensors again and again frees blocks of many sizes; glibc keeps
    freed blocks below its (self-raising) mmap threshold in its heap, so without this the resident
    memory of an offloaded calibration grew past an in-memory one (measured: +524 MB against +371 MB
    on an 8-block Llama)."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


def layer_bytes(layers: dict[str, nn.Module]) -> int:
    """Bytes of the layers' own parameters and buffers."""
    return sum(t.numel() * t.element_size() for m in layers.values() for t in _own_tensors(m).values())


def should_offload(mode: Offload, weights: int, working: int) -> tuple[bool, str]:
    """Whether layer-by-layer calibration keeps its layers on disk, and why (for the log).

    ``weights``: bytes of the layers' tensors; ``working``: an estimate of what calibration
    allocates besides them. ``"auto"`` offloads when both do not fit in the memory available."""
    if mode == "none":
        return False, ""
    if mode == "disk":
        return True, "offload='disk'"
    free = available_memory_bytes()
    if free is None or weights + working <= free:
        return False, ""
    return True, (f"the layers' weights ({weights / 2**20:,.0f} MB) and calibration (~{working / 2**20:,.0f} MB) "
                  f"exceed the {free / 2**20:,.0f} MB available")
