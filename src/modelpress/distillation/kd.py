"""Offline knowledge distillation from one or more frozen teachers (``distill.kd``).

The student trains with :func:`~modelpress.core.training.fit` on a loss that mixes

* soft targets (Hinton et al.): ``alpha * T**2 * KL(p_teacher || softmax(s/T)) + (1 - alpha) * CE``,
  pure soft targets on unlabelled batches; with several teachers ``p_teacher`` is the
  ``weights``-weighted average of their softened probabilities;
* or, for sentence encoders, ``loss="embedding_cosine"`` / ``"embedding_mse"`` against the
  teacher's embeddings (several teachers: weighted average of the per-teacher losses);
* plus, optionally, relational KD (Park et al. 2019): ``relational_weight * (RKD-distance +
  2 * RKD-angle)`` between the structure of the batch's student outputs and the teachers'
  (weighted-average) outputs, useful when a student should keep how samples relate rather
  than the raw values;
* plus optional feature hints: ``hints=[("student_layer", "teacher_layer"), ...]``, taken with
  forward hooks on the first teacher; ``hint_loss="fitnet"`` (MSE through a learned
  :class:`~modelpress.distillation.losses.HintAdapter`, trained with the student and dropped
  after) or ``"attention"`` (attention transfer), weighted by ``hint_weight``.

Teachers are frozen for the run (eval mode, ``requires_grad=False``, forward under
``no_grad``) and restored afterwards. They come from the config (``teacher``: a model
reference for :func:`~modelpress.artifact.loading.load_model`, e.g. an artifact path; a bare zoo
name gives fresh, untrained weights except ``minilm``) or, from Python, as modules through
:func:`distill_from`::

    >>> import torch
    >>> from torch import nn
    >>> from modelpress.core.training import TrainConfig
    >>> teacher = nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, 3))
    >>> student = nn.Linear(4, 3)
    >>> x = torch.randn(64, 4)
    >>> small = distill_from(student, teacher, [x[:32], x[32:]], KD(T=2.0),
    ...                      train=TrainConfig(epochs=5, lr=1e-2))
    >>> small(x).shape, all(p.grad is None for p in teacher.parameters())
    (torch.Size([64, 3]), True)

Like every verb, the student is copied unless ``inplace=True``.
"""
from __future__ import annotations

import difflib
from contextlib import contextmanager
from typing import Any, Literal, Sequence

import torch
from pydantic import Field, field_validator
from torch import nn

from ..core.config import MethodConfig
from ..core.data import call_model, output_tensor, split_batch
from ..core.errors import ConfigError, DataError
from ..core.training import TrainConfig, as_logits
from ..engine import MethodInputs, MethodResult, register_method, run_method
from ..tasks.base import Task
from ..tasks.classification import Classification
from .losses import (
    HintAdapter,
    attention_transfer_loss,
    embedding_cosine_loss,
    embedding_mse_loss,
    ensemble_probs,
    hint_loss,
    rkd_angle_loss,
    rkd_distance_loss,
    soft_hard_loss,
)


class KD(MethodConfig):
    """Offline distillation from frozen teacher(s): soft targets or embeddings, optional hints."""

    teacher: str | list[str] | None = Field(
        None, description="model reference(s) (artifact path, HF dir, file.py:fn, zoo name); "
                          "or pass modules with distill_from()")
    T: float = Field(4.0, gt=0, description="softmax temperature of the soft targets")
    alpha: float = Field(0.9, ge=0, le=1, description="weight of the soft-target term (1 - alpha: labels)")
    loss: Literal["kd", "embedding_cosine", "embedding_mse"] = "kd"
    weights: list[float] | None = Field(None, description="per-teacher weights (default: equal)")
    hints: list[tuple[str, str]] = Field(default_factory=list,
                                         description="(student_layer, teacher_layer) feature pairs")
    hint_loss: Literal["fitnet", "attention"] = "fitnet"
    hint_weight: float = Field(1.0, ge=0, description="weight of the summed hint losses")
    relational_weight: float = Field(0.0, ge=0, description="weight of relational KD (RKD distance + 2 x angle) "
                                                            "between the batch's student and teacher outputs")

    @field_validator("weights")
    @classmethod
    def _weights(cls, v):
        if v is not None and (not v or any(w < 0 for w in v) or sum(v) <= 0):
            raise ValueError(f"teacher weights must be >= 0 with a positive sum, got {v}")
        return v


# -- teachers ---------------------------------------------------------------------------
def resolve_teachers(cfg: KD, inputs: MethodInputs, field: str = "KD.teacher") -> list[nn.Module]:
    """The teacher modules: those given as ``inputs.teachers``, else ``cfg.teacher`` loaded."""
    if inputs.teachers:
        teachers = list(inputs.teachers)
    elif cfg.teacher:
        refs = [cfg.teacher] if isinstance(cfg.teacher, str) else cfg.teacher
        teachers = [inputs.resolve_model(r, field) for r in refs]
    else:
        raise ConfigError("KD.teacher: no teacher was given",
                          hint="set KD(teacher='path/to/teacher.safetensors') "
                               "or call distill_from(student, teacher, data)")
    if not teachers or not all(isinstance(t, nn.Module) for t in teachers):
        raise ConfigError(f"teachers must be nn.Module instances, got {[type(t).__name__ for t in teachers]}")
    if cfg.weights is not None and len(cfg.weights) != len(teachers):
        raise ConfigError(f"KD.weights: {len(cfg.weights)} weights for {len(teachers)} teachers",
                          hint="give one weight per teacher")
    return teachers


@contextmanager
def frozen(modules: Sequence[nn.Module]):
    """Eval mode and ``requires_grad=False`` for the block; the previous state is restored after."""
    saved = [(m.training, [(p, p.requires_grad) for p in m.parameters()]) for m in modules]
    try:
        for m in modules:
            m.eval().requires_grad_(False)
        yield
    finally:
        for m, (training, params) in zip(modules, saved):
            m.train(training)
            for p, flag in params:
                p.requires_grad_(flag)


# -- hints ------------------------------------------------------------------------------
def _find_layer(model: nn.Module, name: str, role: str) -> nn.Module:
    layers = dict(model.named_modules())
    if name not in layers:
        close = difflib.get_close_matches(name, [n for n in layers if n], n=5, cutoff=0.4)
        raise ConfigError(f"KD.hints: the {role} has no layer {name!r}",
                          hint=f"close names: {', '.join(close)}" if close
                          else f"layers: {', '.join(list(n for n in layers if n)[:15])}")
    return layers[name]


def _first_tensor(out: Any) -> torch.Tensor:
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, (list, tuple)) and out and isinstance(out[0], torch.Tensor):
        return out[0]
    if hasattr(out, "last_hidden_state"):
        return out.last_hidden_state
    raise DataError(f"cannot take a feature from a layer output of type {type(out).__name__}",
                    hint="hint a layer that returns a tensor")


class _FeatureTaps:
    """Forward hooks storing the outputs of named layers (removed by :meth:`remove`)."""

    def __init__(self, model: nn.Module, names: Sequence[str], role: str, strict: bool = True):
        self.features: dict[str, torch.Tensor] = {}
        self.handles = []
        self.strict = strict  # False: a layer whose output holds no feature tensor is just not recorded
        for name in names:
            layer = _find_layer(model, name, role)
            self.handles.append(layer.register_forward_hook(self._hook(name)))

    def _hook(self, name: str):
        def hook(module, args, out):
            try:
                self.features[name] = _first_tensor(out)
            except DataError:
                if self.strict:
                    raise
        return hook

    def take(self, name: str, role: str) -> torch.Tensor:
        if name not in self.features:
            raise DataError(f"KD.hints: the {role} layer {name!r} did not run in the forward pass",
                            hint="hint a layer that the model's forward calls")
        return self.features[name]

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


class _StudentWithAdapters(nn.Module):
    """What ``fit`` trains: the student and the hint adapters (so the optimizer sees both)."""

    def __init__(self, student: nn.Module, adapters: list[nn.Module]):
        super().__init__()
        self.student = student
        self.adapters = nn.ModuleList(adapters)

    def forward(self, *args, **kwargs):
        return self.student(*args, **kwargs)


def _output(out: Any) -> torch.Tensor:
    """Logits / embeddings from a model output (tensor, tuple, or an object with ``.logits``)."""
    return output_tensor(out)


# -- the method -------------------------------------------------------------------------
def _response_loss(cfg: KD, weights: list[float], s_out: torch.Tensor, t_outs: list[torch.Tensor],
                   target: torch.Tensor | None) -> torch.Tensor:
    """Soft targets (+ labels) or embedding loss of the student's output against the teachers'."""
    if cfg.loss == "kd":  # a model ending in a softmax: its log-probabilities are its logits
        s_out, t_outs = as_logits(s_out), [as_logits(t) for t in t_outs]
        probs = ensemble_probs(t_outs, weights, cfg.T)
        loss = soft_hard_loss(s_out, probs, target, cfg.T, cfg.alpha, teacher_is_probs=True)
    else:
        emb_loss = embedding_cosine_loss if cfg.loss == "embedding_cosine" else embedding_mse_loss
        total_w = float(sum(weights))
        loss = sum((w / total_w) * emb_loss(s_out, t) for w, t in zip(weights, t_outs))
    if cfg.relational_weight > 0:
        t_rel = sum(w * t for w, t in zip(weights, t_outs)) / float(sum(weights))
        s_flat, t_flat = s_out.reshape(s_out.shape[0], -1), t_rel.reshape(t_rel.shape[0], -1)
        loss = loss + cfg.relational_weight * (rkd_distance_loss(s_flat, t_flat) + 2.0 * rkd_angle_loss(s_flat, t_flat))
    return loss


def _make_loss(cfg: KD, teachers: list[nn.Module], s_taps: _FeatureTaps | None, t_taps: _FeatureTaps | None):
    weights = cfg.weights or [1.0] * len(teachers)

    def loss_fn(model: _StudentWithAdapters, inputs: Any, target: torch.Tensor | None) -> torch.Tensor:
        with torch.no_grad():
            t_outs = [_output(call_model(t, inputs)) for t in teachers]
        s_out = _output(call_model(model.student, inputs))
        loss = _response_loss(cfg, weights, s_out, t_outs, target)
        if cfg.hints and cfg.hint_weight > 0:
            parts = []
            for (s_name, t_name), adapter in zip(cfg.hints, model.adapters):
                s_f, t_f = s_taps.take(s_name, "student"), t_taps.take(t_name, "teacher")
                parts.append(attention_transfer_loss(s_f, t_f) if cfg.hint_loss == "attention"
                             else hint_loss(s_f, t_f, adapter))
            loss = loss + cfg.hint_weight * sum(parts) / len(parts)
        return loss

    return loss_fn


def _build_adapters(cfg: KD, student: nn.Module, teacher: nn.Module, data, s_taps, t_taps) -> list[nn.Module]:
    if cfg.hint_loss == "attention":
        return [nn.Identity() for _ in cfg.hints]
    inputs = split_batch(next(iter(data)))[0]
    was_training = student.training
    student.eval()  # a probe pass must not move BatchNorm statistics
    try:
        with torch.no_grad():
            call_model(student, inputs)
            call_model(teacher, inputs)
    finally:
        student.train(was_training)
    adapters = []
    for s_name, t_name in cfg.hints:
        s_f, t_f = s_taps.take(s_name, "student"), t_taps.take(t_name, "teacher")
        try:
            adapters.append(HintAdapter(s_f, t_f))
        except DataError as exc:
            raise ConfigError(f"KD.hints ({s_name!r}, {t_name!r}): {exc}", hint=exc.hint) from None
    return adapters


@register_method("distill.kd", KD, needs_data=True, needs_training=True,
                 layer_types=())
def knowledge_distillation(student: nn.Module, cfg: KD, inputs: MethodInputs) -> MethodResult:
    """Offline KD (soft targets / embeddings, multi-teacher, FitNets or attention hints)."""
    if inputs.data is None:
        raise DataError("distill.kd needs training data (labelled or not)", hint="pass data=...")
    if cfg.loss != inputs.task.distill_loss:
        inputs.log(f"distill.kd: loss={cfg.loss!r} on a {inputs.task.name} task (which distils with "
                   f"{inputs.task.distill_loss!r})")
    teachers = resolve_teachers(cfg, inputs)
    if any(t is student for t in teachers):
        raise ConfigError("the teacher is the student itself", hint="pass a separate teacher model")
    train = inputs.train or TrainConfig()
    data = inputs.training_data(train)
    s_taps = t_taps = None
    with frozen(teachers):
        try:
            adapters: list[nn.Module] = []
            if cfg.hints:
                s_taps = _FeatureTaps(student, [s for s, _ in cfg.hints], "student")
                t_taps = _FeatureTaps(teachers[0], [t for _, t in cfg.hints], "teacher")
                adapters = _build_adapters(cfg, student, teachers[0], data, s_taps, t_taps)
            wrapped = _StudentWithAdapters(student, adapters)
            inputs.fit(wrapped, "distill", train=train, loss_fn=_make_loss(cfg, teachers, s_taps, t_taps))
        finally:
            for taps in (s_taps, t_taps):
                if taps is not None:
                    taps.remove()
    return MethodResult(student, {"teachers": len(teachers), "T": cfg.T, "alpha": cfg.alpha,
                                  "hints": len(cfg.hints)}, trained=True)


def distillation_loss(teachers: nn.Module | Sequence[nn.Module], cfg: KD | None = None):
    """A ``loss_fn(model, inputs, target)`` that distills ``teachers`` into whatever model is
    trained: pass it as ``loss_fn=`` to any method that trains (pruning with fine-tune, QAT,
    low-rank fine-tune, recipes) to recover accuracy from the uncompressed model's outputs.

    Teachers run in eval mode under ``no_grad`` (they get no gradients). Response terms only
    (soft targets / embeddings / relational); feature hints need :func:`distill_from`.

        >>> import torch
        >>> from modelpress import prune, MagnitudePruning, TrainConfig
        >>> net = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 16),
        ...                           torch.nn.ReLU(), torch.nn.Linear(16, 3))
        >>> x = torch.randn(64, 8); y = x[:, :3].argmax(1)
        >>> small = prune(net, MagnitudePruning(sparsity=0.5), [(x, y)], train=TrainConfig(epochs=2),
        ...               loss_fn=distillation_loss(net, KD(T=2.0)))
    """
    cfg = cfg or KD()
    if cfg.hints:
        raise ConfigError("distillation_loss() takes response distillation only; KD.hints needs distill_from()",
                          hint="drop hints, or distill with distill_from(student, teacher, data, cfg)")
    teachers = [teachers] if isinstance(teachers, nn.Module) else list(teachers)
    if not teachers:
        raise ConfigError("distillation_loss() needs at least one teacher")
    weights = cfg.weights or [1.0] * len(teachers)
    if len(weights) != len(teachers):
        raise ConfigError(f"KD.weights: {len(weights)} weights for {len(teachers)} teachers")

    def loss_fn(model: nn.Module, inputs: Any, target: torch.Tensor | None) -> torch.Tensor:
        if any(t is model for t in teachers):
            raise ConfigError("the teacher is the model being trained", hint="distill from a frozen copy")
        with torch.no_grad():
            t_outs = []
            for t in teachers:
                if t.training:
                    t.eval()
                t_outs.append(_output(call_model(t, inputs)))
        return _response_loss(cfg, weights, _output(call_model(model, inputs)), t_outs, target)

    return loss_fn


def distill_from(student: nn.Module, teachers: nn.Module | Sequence[nn.Module], data: Any,
                 cfg: KD | None = None, train: TrainConfig | None = None, *, inplace: bool = False,
                 task: Task | None = None, evaluation=None, seed: int | None = None) -> nn.Module:
    """Distill ``teachers`` (one module or a list) into ``student``; returns the trained student
    (a copy unless ``inplace``). ``cfg.teacher`` is ignored: the modules given here are used.
    ``task`` (default classification) says what the outputs are; ``evaluation`` (an
    :class:`~modelpress.core.training.Evaluation`) evaluates the student after every epoch and
    keeps its best weights. Runs through :func:`~modelpress.engine.run_method`."""
    teachers = (teachers,) if isinstance(teachers, nn.Module) else tuple(teachers)
    inputs = MethodInputs(data=data, train=train or TrainConfig(), task=task or Classification(),
                          teachers=teachers, evaluation=evaluation)
    return run_method(student, cfg or KD(), inputs, seed=seed, inplace=inplace)[0]
