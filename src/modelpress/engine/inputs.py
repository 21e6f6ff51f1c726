"""What a method receives and what it gives back.

* :class:`MethodInputs` (immutable): the data, the training config, the task, an optional loss
  override, teachers, held-out evaluation and a log function. Methods read it, never write it.
* :class:`MethodResult`: what a method function returns, its model, what it reports and
  whether it trained the model itself.
* :class:`MethodReport`: what :func:`~modelpress.engine.run.run_method` returns beside the
  model, for the caller (report rows, recipe stage info).

``TrainConfig`` means the same on every path: training inside or after a method batches the
data with ``train.batch_size`` and shuffles it (:meth:`MethodInputs.training_data`); a
``DataLoader`` the caller built is used as it is.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Callable

from torch import nn

from ..core.data import Data, as_data
from ..core.errors import ConfigError
from ..core.training import Evaluation, LossFn, TrainConfig, fit
from ..tasks.base import Task
from ..tasks.classification import Classification


def _silent(message: str) -> None:
    pass


@dataclass(frozen=True)
class MethodInputs:
    """Everything a method may use besides the model and its config.

    * ``data``: calibration / training data (anything :class:`~modelpress.core.data.Data`
      accepts; stored as a ``Data``), or None;
    * ``train``: training inside the method (a pruning schedule, QAT, distillation) or a
      fine-tune after it; None: no training;
    * ``task``: what the model is for (default: classification);
    * ``loss_fn``: overrides the task's training loss (e.g. distillation from the original);
    * ``teachers``: frozen models that distillation methods learn from;
    * ``evaluation``: evaluate on held-out data after each training epoch, keep the best weights;
    * ``log``: where progress notes go;
    * ``load_model``: turns a model reference in a config (``KD.teacher``, ``MutualLearning.peer``)
      into a module; the verbs and recipes pass :func:`modelpress.artifact.loading.load_model`.
    """

    data: Data | None = None
    train: TrainConfig | None = None
    task: Task = field(default_factory=Classification)
    loss_fn: LossFn | None = None
    teachers: tuple[nn.Module, ...] = ()
    evaluation: Evaluation | None = None
    log: Callable[[str], None] = _silent
    load_model: Callable[[str], nn.Module] | None = None

    def __post_init__(self):
        object.__setattr__(self, "data", as_data(self.data))
        teachers = self.teachers
        object.__setattr__(self, "teachers", (teachers,) if isinstance(teachers, nn.Module) else tuple(teachers))

    def resolve_model(self, ref: str, field: str) -> nn.Module:
        """The module a config field's model reference names (see :attr:`load_model`)."""
        if self.load_model is None:
            raise ConfigError(f"{field}: the model reference {ref!r} cannot be loaded here",
                              hint="pass the module itself (e.g. distill_from(student, teacher, data)), or run "
                                   "through modelpress.apply / a recipe, which load references")
        return self.load_model(ref)

    @property
    def can_train(self) -> bool:
        return self.train is not None and self.data is not None

    def training_data(self, train: TrainConfig | None = None) -> Data:
        """The data batched for training with ``train`` (default: :attr:`train`)."""
        return self.data.for_training(train or self.train or TrainConfig())

    def fit(self, model: nn.Module, description: str, *, train: TrainConfig | None = None,
            callbacks: list | tuple = (), loss_fn: LossFn | None = None) -> nn.Module:
        """Train ``model`` in place on :attr:`data` with ``train`` (default :attr:`train`), the
        loss ``loss_fn`` (default :attr:`loss_fn`, else the labels) and :attr:`evaluation`."""
        return fit(model, self.data, train or self.train or TrainConfig(), loss_fn=loss_fn or self.loss_fn,
                   callbacks=callbacks, description=description, evaluation=self.evaluation)


@dataclass
class MethodResult:
    """A method's output: the compressed ``model``, what it reports (``info``: per-layer ratios,
    skipped layers ...; plain JSON-able values) and whether it ``trained`` the model itself
    (otherwise the engine fine-tunes it when training was asked for)."""

    model: nn.Module
    info: dict = field(default_factory=dict)
    trained: bool = False


@dataclass(frozen=True)
class MethodReport:
    """What :func:`~modelpress.engine.run.run_method` reports about one method run."""

    method: str
    info: dict
    trained: bool  # the method trained the model itself
    fine_tuned: bool  # the engine fine-tuned it after the method
    unsupported_layers: dict[str, str] = field(default_factory=dict)  # left as they are: {name: type}

    def to_dict(self) -> dict:
        """``{"method", **info, "unsupported_layers"?}`` with JSON-able values."""
        out: dict[str, Any] = {"method": self.method, **json.loads(json.dumps(self.info, default=str))}
        if self.unsupported_layers:
            out["unsupported_layers"] = dict(self.unsupported_layers)
        return out
