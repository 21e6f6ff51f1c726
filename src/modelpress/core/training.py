"""Training, fine-tuning and evaluation loops shared by every method.

``fit`` is deliberately small: the methods that need more (pruning schedules, QAT,
distillation) hook into it through callbacks instead of writing their own loops. It also

* evaluates after every epoch when given an :class:`Evaluation` (held-out data and a metric,
  accuracy by default) and keeps the best epoch's weights (restored at the end);
* trains data-parallel when launched with ``torchrun`` (or inside an initialised
  ``torch.distributed`` process group): each process takes every ``world_size``-th batch,
  gradients are averaged with one all-reduce per step, replicas start from rank 0's weights
  and end with rank 0's buffers, so every rank returns the same model. (The gradients are
  reduced explicitly rather than by wrapping the model in ``DistributedDataParallel``:
  distillation losses call into sub-modules of what is trained (the student inside its
  adapters, a pair of peers), which DDP's forward wrapper would bypass.)

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

import copy
import math
import os
from dataclasses import dataclass, field
from typing import Any, Callable, Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from .config import StrictModel
from .data import Data, as_data, call_model, check_finite, split_batch
from .errors import DataError
from .masks import apply_masks
from .progress import log, progress_bar


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
    distributed: Literal["auto", "off"] = Field(
        "auto", description="auto: data-parallel when launched by torchrun (WORLD_SIZE > 1) or inside an "
                            "initialised torch.distributed group; off: always train alone")


@dataclass
class Evaluation:
    """Evaluate during :func:`fit` after every epoch (and at the end) on held-out ``data``.

    ``metric(model, data) -> float`` defaults to top-1 accuracy; ``higher_is_better`` says which
    way is best. With ``keep_best`` the weights of the best evaluation are restored when
    training ends. ``history`` collects one ``{"epoch", "step", "loss", "metric"}`` per evaluation.
    """

    data: Any
    metric: Callable[[nn.Module, Any], float] | None = None
    keep_best: bool = True
    higher_is_better: bool = True
    history: list[dict] = field(default_factory=list)
    best: float | None = None
    best_epoch: float | None = None

    def __post_init__(self):
        if self.data is None:
            raise DataError("Evaluation needs held-out data", hint="pass Evaluation(data=test_batches)")

    def better(self, value: float) -> bool:
        if self.best is None:
            return True
        return value > self.best if self.higher_is_better else value < self.best


def make_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise DataError("the model has no trainable parameters", hint="unfreeze some layers before fine-tuning")
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    return torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)


def as_logits(out: torch.Tensor) -> torch.Tensor:
    """``out`` as logits: a model ending in a softmax (a Keras classifier's ``Dense(10,
    activation="softmax")``) outputs probabilities, and cross-entropy or temperature-scaled soft
    targets on those would squash them twice; their log is a logit vector giving back the same
    probabilities (softmax(log p) = p), so training and distillation work as on logits. Anything
    that is not a probability vector along the last dim (every row in [0, 1], summing to 1) is
    returned as it is."""
    if not isinstance(out, torch.Tensor) or out.dim() < 2 or not out.is_floating_point() or out.shape[-1] < 2:
        return out
    with torch.no_grad():
        probs = bool(out.min() >= 0 and out.max() <= 1 and (out.sum(-1) - 1).abs().max() < 1e-3)
    return torch.log(out.clamp_min(torch.finfo(out.dtype).tiny)) if probs else out


def class_cross_entropy(logits: Any, target: torch.Tensor, where: str = "classification training") -> torch.Tensor:
    """Cross-entropy of ``[batch, classes]`` logits against class indices, or of ``[batch, positions,
    classes]`` logits against one class per position (token classification; a language model's next
    tokens, already aligned with the positions; -100 marks positions without a label). Any other
    output (an embedding, mismatched shapes ...) is a DataError saying so, not a shape crash.
    Probabilities (a model ending in a softmax) are taken as their log (:func:`as_logits`)."""
    logits = as_logits(logits)
    if isinstance(logits, torch.Tensor) and logits.dim() >= 3 and target.dim() == logits.dim() - 1 \
            and tuple(target.shape) == tuple(logits.shape[:-1]) and not target.is_floating_point():
        return F.cross_entropy(logits.flatten(0, -2), target.flatten(), ignore_index=-100)
    if not isinstance(logits, torch.Tensor) or logits.dim() != 2 or target.dim() != 1 \
            or logits.shape[0] != target.shape[0]:
        shape = tuple(logits.shape) if isinstance(logits, torch.Tensor) else type(logits).__name__
        raise DataError(f"{where}: the model outputs {shape}, the labels are {tuple(target.shape)}; cross-entropy "
                        "needs [batch, classes] logits and one class per sample (or one per position)",
                        hint="for a language model or an encoder pass loss_fn=... (e.g. distillation_loss(model)) "
                             "or a task whose loss fits its outputs")
    return F.cross_entropy(logits, target)


def classification_loss(model: nn.Module, inputs: Any, target: torch.Tensor | None) -> torch.Tensor:
    if target is None:
        raise DataError("classification training needs labelled batches (inputs, target)",
                        hint="pass (inputs, target) batches or give a loss_fn")
    return class_cross_entropy(call_model(model, inputs), target)


LossFn = Callable[[nn.Module, Any, Any], torch.Tensor]


def steps_per_epoch(data: Data, world_size: int = 1) -> int | None:
    """Optimizer steps in one pass (each of ``world_size`` processes takes every n-th batch,
    the incomplete last round is dropped); None when the data has no length."""
    try:
        n = len(data)
    except TypeError:
        return None
    if n < world_size:
        raise DataError(f"{n} batches cannot be shared by {world_size} processes",
                        hint="use more data, a smaller batch_size or fewer processes")
    return n // world_size


def total_steps(data: Data, cfg: TrainConfig, world_size: int = 1) -> int:
    per_epoch = steps_per_epoch(data, world_size) or cfg.max_steps or 1
    steps = max(1, math.ceil(per_epoch * cfg.epochs))
    return min(steps, cfg.max_steps) if cfg.max_steps else steps


# -- data parallel ----------------------------------------------------------------------
def distributed_world(cfg: TrainConfig) -> tuple[int, int]:
    """``(rank, world_size)`` of this process; ``(0, 1)`` when training alone.

    With ``cfg.distributed == "auto"`` a process started by ``torchrun`` (``WORLD_SIZE`` > 1)
    joins the default process group (gloo on CPU, nccl when CUDA is available) if nobody has yet.
    """
    import torch.distributed as dist

    if cfg.distributed == "off" or not dist.is_available():
        return 0, 1
    if not dist.is_initialized():
        if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
            return 0, 1
        dist.init_process_group(backend="nccl" if torch.cuda.is_available() else "gloo")
    return dist.get_rank(), dist.get_world_size()


def _broadcast_state(model: nn.Module, params: bool = True) -> None:
    import torch.distributed as dist

    tensors = ([p.data for p in model.parameters()] if params else []) + \
        [b for b in model.buffers() if b.is_floating_point() or b.dtype in (torch.int64, torch.int32)]
    for t in tensors:
        dist.broadcast(t, src=0)


def _average_gradients(model: nn.Module, loss: torch.Tensor, world_size: int) -> torch.Tensor:
    """All-reduce the mean gradient of every trainable parameter and the mean loss (one call)."""
    import torch.distributed as dist

    params = [p for p in model.parameters() if p.requires_grad]
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.reshape(-1) for g in grads] + [loss.detach().reshape(1).to(grads[0].dtype)])
    dist.all_reduce(flat)
    flat /= world_size
    offset = 0
    for p, g in zip(params, grads):
        n = g.numel()
        p.grad = flat[offset:offset + n].view_as(g).clone()
        offset += n
    return flat[-1]


def fit(model: nn.Module, data: Any, cfg: TrainConfig | None = None, *, loss_fn: LossFn | None = None,
        callbacks: list | tuple = (), description: str = "fine-tune",
        evaluation: Evaluation | None = None) -> nn.Module:
    """Train ``model`` in place on ``data`` and return it.

    ``loss_fn(model, inputs, target) -> loss`` defaults to cross-entropy. Pruning masks
    (see :mod:`modelpress.core.masks`) are re-applied after every optimizer step.
    Callbacks may define ``on_step_begin(step, model)`` and ``on_step_end(step, model)``.
    ``evaluation`` (optional) evaluates after every epoch and keeps the best weights.
    Under ``torchrun`` the processes train one model data-parallel (see the module docstring).
    """
    cfg = cfg or TrainConfig()
    data = as_data(data).for_training(cfg)  # TrainConfig decides batching and shuffling, whatever the source
    loss_fn = loss_fn or classification_loss
    if cfg.epochs == 0:
        return model
    rank, world = distributed_world(cfg)
    per_epoch = steps_per_epoch(data, world)
    steps = total_steps(data, cfg, world)
    opt = make_optimizer(model, cfg)
    sched = (torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=steps)
             if cfg.lr_schedule == "cosine" else None)
    if world > 1:
        _broadcast_state(model)  # every replica starts from rank 0's weights
    best_state = None
    if evaluation is not None:
        evaluation.best = evaluation.best_epoch = None  # the best of this run (history accumulates)
    was_training = model.training
    model.train()
    step, loss_value = 0, float("nan")
    with progress_bar(description, total=steps, enabled=rank == 0) as advance:
        while step < steps:
            for i, batch in enumerate(data):
                if world > 1 and (i % world != rank or (per_epoch is not None and i >= per_epoch * world)):
                    continue
                inputs, target = split_batch(batch)
                if step == 0:
                    check_finite(inputs, "training data")
                for cb in callbacks:
                    if hasattr(cb, "on_step_begin"):
                        cb.on_step_begin(step, model)
                opt.zero_grad(set_to_none=True)
                loss = loss_fn(model, inputs, target)
                loss.backward()
                if world > 1:
                    loss = _average_gradients(model, loss, world)
                if not torch.isfinite(loss):
                    raise DataError(f"training loss became {loss.item()} at step {step}",
                                    hint="lower the learning rate (TrainConfig.lr)")
                opt.step()
                if sched:
                    sched.step()
                apply_masks(model)
                for cb in callbacks:
                    if hasattr(cb, "on_step_end"):
                        cb.on_step_end(step, model)
                step += 1
                loss_value = loss.item()
                advance(note=f"loss {loss_value:.3f}")
                epoch_end = per_epoch is not None and step % per_epoch == 0
                if evaluation is not None and (epoch_end or step >= steps):
                    state = _evaluate(model, evaluation, step, per_epoch, loss_value,
                                      description if rank == 0 else None)
                    best_state = state if state is not None else best_state
                if step >= steps:
                    break
    if world > 1:
        _broadcast_state(model, params=False)  # BatchNorm statistics: rank 0's
    if evaluation is not None and evaluation.keep_best and best_state is not None:
        model.load_state_dict(best_state)
    model.train(was_training)
    return model


def _evaluate(model: nn.Module, evaluation: Evaluation, step: int, per_epoch: int | None, loss: float,
              description: str | None) -> dict | None:
    """One evaluation; returns a copy of the weights when they are the best so far (and kept)."""
    value = float((evaluation.metric or evaluate_accuracy)(model, evaluation.data))
    model.train()
    epoch = round(step / per_epoch, 3) if per_epoch else None
    evaluation.history.append({"epoch": epoch, "step": step, "loss": loss, "metric": value})
    improved = evaluation.better(value)
    if description is not None:
        log(f"{description}: epoch {epoch if epoch is not None else '?'} loss {loss:.4f} "
            f"metric {value:.4f}{' (best)' if improved else ''}")
    if not improved:
        return None
    evaluation.best, evaluation.best_epoch = value, epoch
    return copy.deepcopy(model.state_dict()) if evaluation.keep_best else None


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
    """Top-1 accuracy in [0, 1] of a classifier on labelled ``data`` (per position for ``[batch,
    positions, classes]`` logits with one label per position; -100 marks positions without one)."""
    logits, target = predict(model, data)
    if target is None:
        raise DataError("accuracy needs labelled data (inputs, target)")
    pred = logits.argmax(dim=-1)
    if pred.shape != target.shape:
        raise DataError(f"accuracy: the model outputs {tuple(logits.shape)}, the labels are {tuple(target.shape)}",
                        hint="labels hold one class per sample, or per position of [batch, positions, classes]")
    valid = target != -100
    return float((pred == target)[valid].float().mean())
