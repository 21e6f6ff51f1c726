"""Task quality of a model: accuracy for classifiers, Spearman + fidelity for sentence encoders."""
from __future__ import annotations

from typing import Any

from torch import nn

from ..core.training import evaluate_accuracy


def evaluate_quality(model: nn.Module, bundle: Any, reference: nn.Module | None = None) -> dict[str, float]:
    """Quality metrics of ``model`` on a :class:`~modelpress.zoo.datasets.DatasetBundle`.

    * classification: ``{"accuracy": top-1 on the test split}``;
    * embedding: ``{"spearman": ..., "fidelity": ...}`` on the graded sentence pairs, fidelity
      being the mean cosine to ``reference``'s embeddings (1.0 when no reference is given).
    """
    if bundle.task == "embedding":
        from ..zoo.text import embedding_quality, load_sts_pairs

        q = embedding_quality(model, load_sts_pairs(), reference=reference)
        q.setdefault("fidelity", 1.0)
        return {k: float(v) for k, v in q.items()}
    return {"accuracy": evaluate_accuracy(model, bundle.test)}


def primary_metric(bundle: Any) -> str:
    return "spearman" if bundle.task == "embedding" else "accuracy"
