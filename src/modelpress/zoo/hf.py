"""Hugging Face sequence classifiers from a local directory, returning plain logits.

Sentence encoders (no classification head) live in :mod:`modelpress.zoo.text`.
"""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn


class HFSequenceClassifier(nn.Module):
    """Wraps ``AutoModelForSequenceClassification`` so ``model(input_ids=..., attention_mask=...)``
    returns the logits tensor (what modelpress' losses and metrics expect)."""

    def __init__(self, hf_model: nn.Module, tokenizer=None):
        super().__init__()
        self.hf = hf_model
        self.tokenizer = tokenizer

    @classmethod
    def from_pretrained(cls, path: str | Path) -> "HFSequenceClassifier":
        from .text import _transformers  # sets offline mode before importing transformers

        transformers = _transformers()
        model = transformers.AutoModelForSequenceClassification.from_pretrained(str(path), local_files_only=True)
        try:
            tok = transformers.AutoTokenizer.from_pretrained(str(path), local_files_only=True)
        except (OSError, ValueError):
            tok = None
        return cls(model, tok)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                token_type_ids: torch.Tensor | None = None) -> torch.Tensor:
        kwargs = {"attention_mask": attention_mask}
        if token_type_ids is not None:
            kwargs["token_type_ids"] = token_type_ids
        return self.hf(input_ids=input_ids, **kwargs).logits
