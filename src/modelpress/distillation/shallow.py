"""A shallower student distilled from the model itself (``distill.shallow``).

The model's stack of blocks (a transformer's layers, found by the method, or ``stack=``) keeps
``keep`` of its blocks, initialised from the model's own weights (as DistilBERT does), and the
shallow model then learns the original's outputs on the training data (embeddings: ``1 - cos``;
classifiers: soft targets; the task says which). Which blocks stay is chosen by measuring, not
by fixed indices: ``selection="fidelity"`` keeps the subset whose untrained output is closest
(mean cosine) to the original's on a few calibration batches, over every subset when there are
at most 64 of them, else by dropping one block at a time. On all-MiniLM-L6-v2 it keeps layers
0, 4 and 5 (fidelity 0.78 before training, against 0.57 for every other layer, 1, 3, 5).

Only blocks whose output has the shape of their input can go (a stage's first, downsampling
block stays). Word embeddings stay frozen while the student trains (``freeze_embeddings``): the
student must read every token the way the original does, including tokens the training text never
uses. The artifact records the kept blocks (``distill.keep_layers``), so it reloads.

    >>> import torch
    >>> from torch import nn
    >>> from modelpress.core.training import TrainConfig
    >>> from modelpress.engine import MethodInputs, run_method
    >>> model = nn.Sequential(nn.Linear(8, 16), nn.Sequential(*[nn.Linear(16, 16) for _ in range(6)]), nn.Linear(16, 3))
    >>> x = torch.randn(128, 8)
    >>> small, report = run_method(model, ShallowDistillation(keep=2, stack="1"),
    ...                            MethodInputs(data=[x[:64], x[64:]], train=TrainConfig(epochs=1)))
    >>> len(small[1]), len(report.info["kept"])
    (2, 2)
"""
from __future__ import annotations

import copy
import itertools
import math
from contextlib import contextmanager
from typing import Any, Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from ..core.config import MethodConfig
from ..core.data import call_model, output_tensor
from ..core.errors import ConfigError, DataError, UnsupportedError
from ..engine import MethodInputs, MethodResult, register_method
from ..nn.modules import set_module
from ..nn.records import mark_replay
from .kd import KD, distillation_loss, resolve_teachers
from .students import DEPTH_KEYS, block_stacks, config_of, find_layer_stack, keep_in_place

MAX_SUBSETS = 64  # every subset is scored up to this many; beyond it, blocks are dropped one at a time


class ShallowDistillation(MethodConfig):
    """Keep some blocks of the model's layer stack (chosen by output fidelity), then distill the original into it."""

    keep: int | float = Field(0.5, gt=0, description="blocks kept: a count (3) or a fraction of the stack (0.5)")
    stack: str | None = Field(None, description="the layer stack (a ModuleList/Sequential); default: found")
    selection: Literal["fidelity", "uniform"] = Field(
        "fidelity", description="fidelity: the blocks whose untrained output is closest to the original's; "
                                "uniform: every k-th block, ending at the last")
    layers: list[int] | None = Field(None, description="keep exactly these block indices (skips the selection)")
    calibration_batches: int = Field(4, ge=1, description="batches the selection scores candidates on")
    loss: Literal["auto", "kd", "embedding_cosine", "embedding_mse"] = Field(
        "auto", description="what the student learns; auto: the task's (embeddings: embedding_cosine)")
    T: float = Field(4.0, gt=0, description="temperature of the soft targets (loss kd)")
    alpha: float = Field(0.9, ge=0, le=1, description="weight of the soft targets against the labels (loss kd)")
    freeze_embeddings: bool = Field(True, description="keep nn.Embedding tables as they are while training")
    teacher: str | None = Field(None, description="distill from this model instead (artifact, HF dir, zoo name)")


def _n_keep(cfg: ShallowDistillation, n: int) -> int:
    if isinstance(cfg.keep, int) or cfg.keep >= 1:
        k = int(cfg.keep)
        if float(cfg.keep) != k:
            raise ConfigError(f"ShallowDistillation.keep={cfg.keep}: a count must be a whole number")
    else:
        k = max(1, round(cfg.keep * n))
    if not 1 <= k < n:
        raise ConfigError(f"ShallowDistillation.keep={cfg.keep}: keeps {k} of the stack's {n} blocks",
                          hint=f"keep between 1 and {n - 1} blocks (or a fraction below 1)")
    return k


def _first(out: Any) -> Any:
    return out[0] if isinstance(out, (tuple, list)) and out else out


def _shape_preserving(model: nn.Module, stack: nn.Module, batches: list) -> list[bool]:
    """Per block: whether its output has its input's shape (only such blocks can be dropped); one forward."""
    same = [True] * len(stack)
    seen = [False] * len(stack)
    hooks = []
    for i, block in enumerate(stack):
        def hook(mod, args, kwargs, out, i=i):
            x = args[0] if args else next(iter(kwargs.values()), None)
            y = _first(out)
            seen[i] = True
            if not (isinstance(x, torch.Tensor) and isinstance(y, torch.Tensor) and x.shape == y.shape):
                same[i] = False
        hooks.append(block.register_forward_hook(hook, with_kwargs=True))
    try:
        with torch.no_grad():
            call_model(model, batches[0])
    finally:
        for h in hooks:
            h.remove()
    return [s and v for s, v in zip(same, seen)]


@contextmanager
def _view(model: nn.Module, path: str, keep: list[int]):
    """The model running only the blocks ``keep`` of its stack at ``path``, restored after."""
    stack = model.get_submodule(path)
    saved_idx = [(m, m.layer_idx) for m in stack.modules() if isinstance(getattr(m, "layer_idx", None), int)]
    config = config_of(model, path)
    saved_cfg = {k: getattr(config, k) for k in DEPTH_KEYS if config is not None and hasattr(config, k)}
    try:
        keep_in_place(model, path, keep)
        yield model
    finally:
        set_module(model, path, stack)
        for m, idx in saved_idx:
            m.layer_idx = idx
        for k, v in saved_cfg.items():
            setattr(config, k, v)


def _fidelity(model: nn.Module, batches: list, references: list[torch.Tensor]) -> float:
    """Mean cosine between the model's outputs (flattened per sample) and the references."""
    total, count = 0.0, 0
    with torch.no_grad():
        for inputs, ref in zip(batches, references):
            out = output_tensor(call_model(model, inputs)).float()
            cos = F.cosine_similarity(out.reshape(out.shape[0], -1), ref.reshape(ref.shape[0], -1), dim=1)
            total, count = total + float(cos.sum()), count + cos.numel()
    return total / max(count, 1)


def select_blocks(model: nn.Module, path: str, k: int, batches: list, droppable: list[bool],
                  log=lambda _m: None) -> tuple[list[int], float]:
    """The ``k`` blocks of the stack at ``path`` whose output is closest to the full model's on
    ``batches``, only ``droppable`` blocks left out; ``(indices, fidelity)``."""
    n = len(droppable)
    fixed = [i for i in range(n) if not droppable[i]]
    free = [i for i in range(n) if droppable[i]]
    if k < len(fixed):
        raise UnsupportedError(f"distill.shallow: {len(fixed)} of the {n} blocks of {path!r} change the shape of "
                               f"their input and must stay; {k} cannot be kept",
                               hint=f"keep at least {len(fixed)} blocks")
    model.eval()
    with torch.no_grad():
        refs = [output_tensor(call_model(model, b)).float() for b in batches]

    def score(keep: list[int]) -> float:
        with _view(model, path, keep):
            return _fidelity(model, batches, refs)

    drop = n - k
    if math.comb(len(free), drop) <= MAX_SUBSETS:
        scored = [(score(sorted(set(range(n)) - set(d))), sorted(set(range(n)) - set(d)))
                  for d in itertools.combinations(free, drop)]
        best_score, best = max(scored, key=lambda t: t[0])
        log(f"  distill.shallow: scored {len(scored)} subsets of {n} blocks; best {best} (fidelity {best_score:.3f})")
        return best, best_score
    keep = list(range(n))
    best_score = 1.0
    while len(keep) > k:  # drop the block whose removal costs the least
        best_score, keep = max(((score([i for i in keep if i != j]), [i for i in keep if i != j])
                                for j in keep if droppable[j]), key=lambda t: t[0])
    log(f"  distill.shallow: dropped blocks one at a time; kept {keep} (fidelity {best_score:.3f})")
    return keep, best_score


def _choose_stack(model: nn.Module, batches: list) -> str:
    """A BERT-style ``*.encoder.layer``, else of the (up to 8) largest stacks of blocks the one whose
    droppable blocks (output shaped like the input) hold the most parameters: a CNN's stage of
    residual blocks rather than the layers inside one block."""
    stacks = block_stacks(model)
    path = find_layer_stack(model)
    if path.endswith("encoder.layer") or len(stacks) < 2:
        return path
    was_training = model.training
    model.eval()
    try:
        def droppable_params(name: str) -> int:
            stack = model.get_submodule(name)
            return sum(p.numel() for block, ok in zip(stack, _shape_preserving(model, stack, batches)) if ok
                       for p in block.parameters())
        return max(stacks[:8], key=droppable_params)  # ties: the first, i.e. the largest stack
    finally:
        model.train(was_training)


def _uniform(n: int, k: int, droppable: list[bool]) -> list[int]:
    keep = {n - 1 - round(i * n / k) for i in range(k)}  # every (n/k)-th block, ending at the last
    keep |= {i for i in range(n) if not droppable[i]}
    return sorted(keep)


def _requires(model: nn.Module) -> str | None:
    return None if block_stacks(model) else "no stack of two or more blocks of one type (ModuleList/Sequential)"


@register_method("distill.shallow", ShallowDistillation, needs_data=True, needs_training=True, structural=True,
                 layer_types=(), requires=_requires)
def shallow_distillation(model: nn.Module, cfg: ShallowDistillation, inputs: MethodInputs) -> MethodResult:
    """A shallower student: keep the blocks that hold the output best, then distill the original into it."""
    if inputs.data is None:
        raise DataError("distill.shallow needs training data (unlabelled is fine)", hint="pass data=...")
    batches = [b for _, b in zip(range(cfg.calibration_batches), inputs.data.inputs())]
    path = cfg.stack if cfg.stack is not None else _choose_stack(model, batches[:1])
    try:
        stack = model.get_submodule(path) if path else model
    except AttributeError:
        raise ConfigError(f"ShallowDistillation.stack: the model has no module {path!r}",
                          hint=f"layer stacks: {', '.join(block_stacks(model)[:8]) or 'none'}") from None
    if not isinstance(stack, (nn.ModuleList, nn.Sequential)) or not path:
        raise ConfigError(f"ShallowDistillation.stack: {path!r} is not a ModuleList/Sequential inside the model",
                          hint=f"layer stacks: {', '.join(block_stacks(model)[:8]) or 'none'}")
    n = len(stack)
    original = copy.deepcopy(model).eval().requires_grad_(False)  # the teacher, unless one is named
    teachers = (resolve_teachers(KD(teacher=cfg.teacher), inputs, "ShallowDistillation.teacher")
                if cfg.teacher or inputs.teachers else [original])
    was_training = model.training
    model.eval()
    droppable = _shape_preserving(model, stack, batches)
    if cfg.layers is not None:
        keep = sorted(set(cfg.layers))
        if not keep or keep[0] < 0 or keep[-1] >= n or len(keep) == n:
            raise ConfigError(f"ShallowDistillation.layers={cfg.layers}: give some of the indices 0..{n - 1}, not all")
        fidelity = None
    else:
        k = _n_keep(cfg, n)
        if cfg.selection == "uniform":
            keep, fidelity = _uniform(n, k, droppable), None
        else:
            keep, fidelity = select_blocks(model, path, k, batches, droppable, inputs.log)
    missing = [i for i in range(n) if i not in keep and not droppable[i]]
    if missing:
        raise ConfigError(f"distill.shallow: blocks {missing} of {path!r} change their input's shape and cannot go",
                          hint="keep them (layers=...) or use selection: fidelity")
    model.train(was_training)
    student = mark_replay(keep_in_place(model, path, keep), original, "distill.keep_layers",
                          {"path": path, "keep": list(keep)})
    loss = inputs.task.distill_loss if cfg.loss == "auto" else cfg.loss
    info = {"stack": path, "blocks": n, "kept": list(keep), "selection": "layers" if cfg.layers else cfg.selection,
            "fidelity_untrained": fidelity, "loss": loss}
    train = inputs.train
    if train is None:
        inputs.log("  distill.shallow: no training config: the blocks were dropped, nothing was distilled")
        return MethodResult(student, info, trained=False)
    frozen = [p for m in student.modules() if isinstance(m, nn.Embedding) and cfg.freeze_embeddings
              for p in m.parameters() if p.requires_grad]
    for p in frozen:
        p.requires_grad_(False)
    try:
        inputs.fit(student, "distill.shallow", train=train,
                   loss_fn=distillation_loss(teachers, KD(loss=loss, T=cfg.T, alpha=cfg.alpha)))
    finally:
        for p in frozen:
            p.requires_grad_(True)
    return MethodResult(student, info, trained=True)

