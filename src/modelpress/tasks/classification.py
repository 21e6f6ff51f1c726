"""Classification: labelled ``(input, class)`` batches, cross-entropy, top-1 accuracy.

    >>> import torch
    >>> from modelpress.tasks import Classification
    >>> task = Classification()
    >>> model = torch.nn.Linear(2, 2)
    >>> with torch.no_grad():
    ...     _ = model.weight.copy_(torch.eye(2)); _ = model.bias.zero_()
    >>> task.evaluate(model, [(torch.tensor([[1.0, 0.0], [0.0, 1.0]]), torch.tensor([0, 0]))])
    {'accuracy': 0.5}
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..core.training import evaluate_accuracy
from .base import Task


class Classification(Task):
    name = "classification"
    metrics = ("accuracy",)
    labelled = True
    distill_loss = "kd"

    def evaluate(self, model: nn.Module, data: Any, reference: nn.Module | None = None) -> dict[str, float]:
        return {"accuracy": evaluate_accuracy(model, data)}

    def output_divergence(self, output: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
        """KL divergence of the predicted class distributions (logits in, batch mean)."""
        return F.kl_div(F.log_softmax(output, dim=-1), F.log_softmax(reference.float(), dim=-1),
                        log_target=True, reduction="batchmean")
