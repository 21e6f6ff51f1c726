"""Training, fine-tuning and evaluation loops shared by every method.

``fit`` is deliberately small: the methods that need more (pruning schedules, QAT,
distillation) hook into it through callbacks instead of writing their own loops.

    >>> import torch
    >>> from torch import nn
    >>> from modelpress.core.training import TrainConfig, fit, evaluate_accuracy
    >>> torch.manual_seed(0)  # doctest: +ELLIPSIS
    <...>
    >>> x = torch.randn(256, 4); y = (x[:, 0] > 0).long()
    >>> model = nn.Linear(4, 2)
    >>> _ = fit(model, [(x[i:i+32], y[i:i+32]) for i in range(0, 256, 32)], TrainConfig(epochs=20, lr=0.05))
    >>> evaluate_accuracy(model, [(x, y)]) > 0.9
    True
"""
from __future__ import annotations

import math
from typing import Any, Callable, Literal, Protocol

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from .config import StrictModel
from .data import Data, as_data, call_model, check_finite, split_batch
from .errors import DataError
from .masks import apply_masks
from .progress import progress_bar


class TrainConfig(StrictModel):
    """How to (fine-)tune: epochs, optimizer and learning rate."""

    epochs: float = Field(1.0, ge=0, description="passes over the training data (fractions allowed)")
    lr: float = Field(1e-3, gt=0, le=10)
    optimizer: Literal["adam", "adamw", "sgd"] = "adam"
    momentum: float = Field(0.9, ge=0, lt=1)
    weight_decay: float = Field(0.0, ge=0)
    lr_schedule: Literal["constant", "cosine"] = "cosine"
    batch_size: int = Field(64, ge=1)
    max_steps: int | None = Field(None, ge=1)


class Callback(Protocol):  # pragma: no cover - structural type only
    def on_step_end(self, step: int, model: nn.Module) -> None: ...


def make_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise DataError("the model has no trainable parameters", hint="unfreeze some layers before fine-tuning")
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    return torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)


def classification_loss(model: nn.Module, inputs: Any, target: torch.Tensor | None) -> torch.Tensor:
    if target is None:
        raise DataError("classification training needs labelled batches (inputs, target)",
                        hint="pass (inputs, target) batches or give a loss_fn")
    return F.cross_entropy(call_model(model, inputs), target)


LossFn = Callable[[nn.Module, Any, Any], torch.Tensor]


def total_steps(data: Data, cfg: TrainConfig) -> int:
    try:
        per_epoch = len(data)
    except TypeError:
        per_epoch = cfg.max_steps or 1
    steps = max(1, math.ceil(per_epoch * cfg.epochs))
    return min(steps, cfg.max_steps) if cfg.max_steps else steps


def fit(model: nn.Module, data: Any, cfg: TrainConfig | None = None, *, loss_fn: LossFn | None = None,
        callbacks: list | tuple = (), description: str = "fine-tune") -> nn.Module:
    """Train ``model`` in place on ``data`` and return it.

    ``loss_fn(model, inputs, target) -> loss`` defaults to cross-entropy. Pruning masks
    (see :mod:`modelpress.core.masks`) are re-applied after every optimizer step.
    Callbacks may define ``on_step_begin(step, model)`` and ``on_step_end(step, model)``.
    """
    cfg = cfg or TrainConfig()
    data = as_data(data, batch_size=cfg.batch_size, shuffle=True)
    loss_fn = loss_fn or classification_loss
    steps = total_steps(data, cfg)
    if steps == 0 or cfg.epochs == 0:
        return model
    opt = make_optimizer(model, cfg)
    sched = (torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=steps)
             if cfg.lr_schedule == "cosine" else None)
    was_training = model.training
    model.train()
    step = 0
    with progress_bar(description, total=steps) as advance:
        while step < steps:
            for batch in data:
                inputs, target = split_batch(batch)
                if step == 0:
                    check_finite(inputs, "training data")
                for cb in callbacks:
                    if hasattr(cb, "on_step_begin"):
                        cb.on_step_begin(step, model)
                opt.zero_grad(set_to_none=True)
                loss = loss_fn(model, inputs, target)
                if not torch.isfinite(loss):
                    raise DataError(f"training loss became {loss.item()} at step {step}",
                                    hint="lower the learning rate (TrainConfig.lr)")
                loss.backward()
                opt.step()
                if sched:
                    sched.step()
                apply_masks(model)
                for cb in callbacks:
                    if hasattr(cb, "on_step_end"):
                        cb.on_step_end(step, model)
                step += 1
                advance(note=f"loss {loss.item():.3f}")
                if step >= steps:
                    break
    model.train(was_training)
    return model


@torch.no_grad()
def predict(model: nn.Module, data: Any) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Concatenated model outputs and targets over ``data`` (eval mode, no grad)."""
    was_training = model.training
    model.eval()
    outs, targets = [], []
    for batch in as_data(data, batch_size=256):
        inputs, target = split_batch(batch)
        outs.append(call_model(model, inputs))
        if target is not None:
            targets.append(target)
    model.train(was_training)
    return torch.cat(outs), (torch.cat(targets) if targets else None)


def evaluate_accuracy(model: nn.Module, data: Any) -> float:
    """Top-1 accuracy in [0, 1] of a classifier on labelled ``data``."""
    logits, target = predict(model, data)
    if target is None:
        raise DataError("accuracy needs labelled data (inputs, target)")
    return float((logits.argmax(dim=1) == target).float().mean())
