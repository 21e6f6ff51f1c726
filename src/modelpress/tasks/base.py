"""What a model is for, as an object: its training loss, its quality metric, its example inputs.

A :class:`Task` is how every part of modelpress learns what "better" means for a model
without branching on a name: recipes fine-tune with :meth:`Task.training_loss`, reports and
search score with :meth:`Task.evaluate`, analysis traces with :meth:`Task.example_inputs`,
mixed precision compares outputs with :meth:`Task.output_divergence`. Three tasks ship
(:class:`~modelpress.tasks.classification.Classification`,
:class:`~modelpress.tasks.embedding.SentenceEmbedding`,
:class:`~modelpress.tasks.language_modelling.LanguageModelling`); a new one subclasses :class:`Task`.
Metrics are higher-is-better unless the task names them in :attr:`Task.lower_is_better`
(perplexity); :meth:`Task.points` turns the primary metric into higher-is-better points.

A :class:`DatasetBundle` pairs a train and a test split with the task that reads them.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar, Mapping

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset

from ..core.data import Data, slice_inputs

LossFn = Callable[[nn.Module, Any, Any], torch.Tensor]


class Task:
    """Base of every task. Subclasses set :attr:`metrics` (the first one is the primary
    metric; higher is better unless listed in :attr:`lower_is_better`) and implement :meth:`evaluate`."""

    name: ClassVar[str] = "task"
    metrics: tuple[str, ...] = ()
    #: metrics where lower is better (perplexity); every other metric is higher-is-better
    lower_is_better: ClassVar[frozenset[str]] = frozenset()
    #: True when the training split carries labels (so a model can be trained from scratch)
    labelled: ClassVar[bool] = False
    #: the ``KD.loss`` that distils this task's outputs
    distill_loss: ClassVar[str] = "kd"

    @property
    def primary(self) -> str:
        return self.metrics[0]

    def points(self, metrics: Mapping[str, float]) -> float:
        """The primary metric as higher-is-better points, what search maximises and measures drops
        in: x 100 for a higher-is-better fraction (accuracy 0.98 -> 98, Spearman x 100), negated for
        a lower-is-better metric (perplexity 12.5 -> -12.5: a drop of 1 point is 1 perplexity more)."""
        value = float(metrics[self.primary])
        return -value if self.primary in self.lower_is_better else 100 * value

    def evaluate(self, model: nn.Module, data: Any, reference: nn.Module | None = None) -> dict[str, float]:
        """Quality metrics of ``model`` on held-out ``data`` (``reference``: the uncompressed model)."""
        raise NotImplementedError

    def training_loss(self, reference: nn.Module | None = None) -> LossFn | None:
        """The loss a compressed model fine-tunes on: None means the labels (cross-entropy);
        a task without labels learns from ``reference``'s outputs instead."""
        return None

    def output_divergence(self, output: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
        """How far ``output`` is from ``reference``'s output on the same inputs (a loss)."""
        return F.mse_loss(output, reference)

    def example_inputs(self, bundle: "DatasetBundle", n: int = 1) -> Any:
        """The first ``n`` model inputs of ``bundle`` (for tracing, analysis and latency)."""
        return slice_inputs(Data(bundle.test, batch_size=max(n, 1)).first_inputs(), n)

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


@dataclass
class DatasetBundle:
    """A train/test pair plus the task that reads it and what a method needs to know about it.

    ``num_classes`` and ``input_shape`` describe classification data (None / the shape of one
    input otherwise); ``meta`` says where the data came from.
    """

    name: str
    train: Dataset
    test: Dataset
    task: Task
    num_classes: int | None
    input_shape: tuple
    meta: dict = field(default_factory=dict)

    def example_inputs(self, n: int = 1) -> Any:
        return self.task.example_inputs(self, n)

    def evaluate(self, model: nn.Module, reference: nn.Module | None = None) -> dict[str, float]:
        """The task's quality metrics of ``model`` on the test split."""
        model.eval()
        return self.task.evaluate(model, self.test, reference=reference)
