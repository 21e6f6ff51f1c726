"""Student builders: smaller copies of a teacher, initialised from the teacher's own weights.

* :func:`keep_layers` drops whole blocks from a ``ModuleList`` / ``Sequential`` (a transformer's
  layer stack, a ResNet stage) and keeps the named ones, initialised from the teacher as
  DistilBERT does. :func:`bert_student` picks every k-th layer of a BERT-style encoder
  (ending at the last layer, whose output the pooling reads); :func:`shallower` keeps every
  k-th shape-preserving block of each stage of a CNN.
* :func:`narrower` removes channels (``width`` < 1) with structured L1 pruning, so the narrow
  student starts from the teacher's most important filters rather than from random weights.

The teacher is never modified. Students save and reload as artifacts: a dropped-layer student
records the step (``distill.keep_layers`` + the kept indices), replayed on load.

    >>> import torch
    >>> from torch import nn
    >>> teacher = nn.Sequential(nn.Linear(8, 8), nn.Sequential(*[nn.Linear(8, 8) for _ in range(4)]), nn.Linear(8, 2))
    >>> student = keep_layers(teacher, "1", [1, 3])
    >>> len(student[1]), torch.equal(student[1][0].weight, teacher[1][1].weight)
    (2, True)
"""
from __future__ import annotations

import copy
from typing import Any, Sequence

import torch
from torch import nn

from ..core.errors import ConfigError, UnsupportedError
from ..engine import MethodInputs, run_method
from ..nn.modules import set_module
from ..nn.records import mark_replay, register_replay
from ..pruning.structured import ChannelPruning

_STACKS = (nn.ModuleList, nn.Sequential)


def _stack(model: nn.Module, path: str) -> nn.Module:
    try:
        stack = model.get_submodule(path) if path else model
    except AttributeError:
        names = [n for n, m in model.named_modules() if isinstance(m, _STACKS) and len(m) > 1]
        raise ConfigError(f"keep_layers: the model has no module {path!r} (layer stacks: "
                          f"{', '.join(names[:8]) or 'none'})", hint="name one of the layer stacks") from None
    if not isinstance(stack, _STACKS):
        raise ConfigError(f"keep_layers: {path!r} is a {type(stack).__name__}, not a ModuleList/Sequential")
    return stack


def keep_in_place(model: nn.Module, path: str, keep: Sequence[int]) -> nn.Module:
    """``model`` with its stack at ``path`` holding only the blocks ``keep`` (edited in place; the
    stack itself is returned when ``path`` is empty). A Hugging Face config's layer count and the
    blocks' ``layer_idx`` (the key-value cache slot of a decoder layer) follow the new depth."""
    stack = _stack(model, path)
    n = len(stack)
    keep = list(keep)
    if not keep or sorted(set(keep)) != keep or keep[0] < 0 or keep[-1] >= n:
        raise ConfigError(f"keep_layers: indices {keep} for {path!r} must be increasing, unique and in [0, {n})")
    kept = [stack[i] for i in keep]
    new = nn.Sequential(*kept) if isinstance(stack, nn.Sequential) else nn.ModuleList(kept)
    if path:
        set_module(model, path, new)
    for position, block in enumerate(kept):
        for m in block.modules():
            if isinstance(getattr(m, "layer_idx", None), int):
                m.layer_idx = position
    config = config_of(model, path)
    for key in DEPTH_KEYS:  # HF reads it for masks / caches (DistilBERT n_layers, GPT-2 n_layer ...)
        if config is not None and getattr(config, key, None) == n:
            setattr(config, key, len(kept))
    return model if path else new


DEPTH_KEYS = ("num_hidden_layers", "n_layers", "n_layer", "num_layers")


def config_of(model: nn.Module, path: str) -> Any:
    """The Hugging Face ``config`` of the nearest module above ``path`` that carries one, or None."""
    parts = path.split(".")
    for i in range(len(parts) - 1, -1, -1):
        m = model.get_submodule(".".join(parts[:i])) if i else model
        if hasattr(m, "config"):
            return m.config
    return None


def keep_layers(teacher: nn.Module, path: str, keep: Sequence[int]) -> nn.Module:
    """A copy of ``teacher`` whose stack at ``path`` holds only the blocks ``keep`` (teacher weights)."""
    if not path:
        raise ConfigError("keep_layers: name the layer stack, e.g. 'backbone.encoder.layer'")
    student = keep_in_place(copy.deepcopy(teacher), path, keep)
    return mark_replay(student, teacher, "distill.keep_layers", {"path": path, "keep": list(keep)})


register_replay("distill.keep_layers", lambda model, cfg: keep_in_place(model, cfg["path"], cfg["keep"]))


def block_stacks(model: nn.Module) -> list[str]:
    """Names of the model's stacks of blocks: ``ModuleList`` / ``Sequential`` holding two or more
    modules of one type with weights (a transformer's layers, a CNN stage), most parameters first."""
    found = []
    for name, m in model.named_modules():
        if name and isinstance(m, _STACKS) and len(m) > 1 and len({type(c) for c in m}) == 1:
            params = sum(p.numel() for p in m.parameters())
            if params:
                found.append((params, len(m), name))
    return [name for _, _, name in sorted(found, key=lambda t: (-t[0], -t[1]))]


def find_layer_stack(model: nn.Module) -> str:
    """Name of the model's layer stack: a BERT-style encoder's ``*.encoder.layer``, else the stack
    of blocks holding the most parameters (:func:`block_stacks`: ``transformer.layer`` of DistilBERT,
    ``layers`` of Llama, ``h`` of GPT-2, ``blocks`` of a timm ViT)."""
    for name, m in model.named_modules():
        if isinstance(m, nn.ModuleList) and name.endswith("encoder.layer"):
            return name
    stacks = block_stacks(model)
    if not stacks:
        raise UnsupportedError("no stack of two or more blocks of one type (a ModuleList/Sequential of layers)",
                               hint="name the stack: keep_layers(model, path, keep) / ShallowDistillation(stack=...)")
    return stacks[0]


def every_kth(n: int, every: int) -> list[int]:
    """Every ``every``-th of ``n`` indices, ending at the last one (6 layers, every 2: [1, 3, 5])."""
    if every < 1:
        raise ConfigError(f"every must be >= 1 (got {every})")
    return list(range(n - 1, -1, -every))[::-1]


def bert_student(teacher: nn.Module, every: int = 2, keep: Sequence[int] | None = None) -> nn.Module:
    """Keep every ``every``-th transformer layer (or the layers ``keep``), initialised from the teacher.

    6-layer MiniLM with ``every=2`` -> 3 layers (teacher layers 1, 3, 5).
    """
    path = find_layer_stack(teacher)
    n = len(teacher.get_submodule(path))
    return keep_layers(teacher, path, list(keep) if keep is not None else every_kth(n, every))


def shallower(teacher: nn.Module, every: int = 2, example_inputs: Any = None) -> nn.Module:
    """Keep, in every ``Sequential`` stage of residual blocks, the first block (it changes stride or
    width) and every ``every``-th of the shape-preserving rest. Needs ``example_inputs`` to check shapes."""
    if example_inputs is None:
        raise ConfigError("shallower: pass example_inputs (one batch) to find shape-preserving blocks")
    shapes: dict[str, tuple] = {}
    hooks = []
    stacks = [(n, m) for n, m in teacher.named_modules() if isinstance(m, nn.Sequential) and len(m) > 1
              and len({type(c) for c in m}) == 1]
    for name, stack in stacks:
        for i, block in enumerate(stack):
            def hook(mod, args, out, key=f"{name}.{i}"):
                shapes[key] = (tuple(args[0].shape), tuple(out.shape))
            hooks.append(block.register_forward_hook(hook))
    was_training = teacher.training
    try:
        teacher.eval()
        with torch.no_grad():
            teacher(example_inputs)
    finally:
        teacher.train(was_training)
        for h in hooks:
            h.remove()
    student = teacher
    for name, stack in stacks:
        free = [i for i in range(1, len(stack)) if shapes.get(f"{name}.{i}", (0, 1))[0] == shapes[f"{name}.{i}"][1]]
        if not free:
            continue
        drop = set(free) - set(free[every - 1::every])
        keep = [i for i in range(len(stack)) if i not in drop]
        if len(keep) < len(stack):
            student = keep_layers(student, name, keep)
    if student is teacher:
        raise UnsupportedError("shallower: no stage has shape-preserving blocks to drop",
                               hint="build the student with more blocks per stage, or use narrower()")
    return student


def narrower(teacher: nn.Module, width: float, example_inputs: Any, importance: str = "l1") -> nn.Module:
    """A copy with ``width`` of the channels (e.g. 0.5), keeping the teacher's most important ones."""
    if not 0 < width <= 1:
        raise ConfigError(f"narrower: width must be in (0, 1] (got {width})")
    if width == 1:
        return copy.deepcopy(teacher)
    config = ChannelPruning(ratio=1 - width, importance=importance)
    return run_method(teacher, config, MethodInputs(data=[example_inputs]))[0]
