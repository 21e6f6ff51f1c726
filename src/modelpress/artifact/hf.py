"""Hugging Face models from a local folder (never downloaded), as modules modelpress methods take.

* :class:`SentenceEncoder`: an encoder + mean pooling + L2 normalisation (what
  sentence-transformers does for all-MiniLM-L6-v2); ``model(**tokens) -> [batch, dim]``;
* :class:`HFSequenceClassifier`: ``AutoModelForSequenceClassification`` returning plain logits.

:func:`load_hf_dir` picks one from the folder's ``config.json`` and records the folder as the
model's source, so an artifact of the compressed model reloads from the same folder.
Needs the ``[nlp]`` extra (transformers).
"""
from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..core.compat import prepare_torchvision
from ..core.errors import ModelLoadError, UnsupportedError, require
from ..tasks.embedding import embed_sentences


def import_transformers():
    """``transformers``, offline unless the user set ``HF_HUB_OFFLINE`` themselves (and importable
    next to a torchvision built for another torch: :func:`~modelpress.core.compat.prepare_torchvision`)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    prepare_torchvision()
    return require("transformers", "nlp")


@contextlib.contextmanager
def quiet_loading(transformers):
    """Hide transformers' weight-loading progress bar, restoring the user's setting after."""
    logging = transformers.utils.logging
    was_enabled = logging.is_progress_bar_enabled()
    logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            logging.enable_progress_bar()


class SentenceEncoder(nn.Module):
    """A Hugging Face encoder + mean pooling + L2 normalisation, i.e. exactly what
    sentence-transformers does for all-MiniLM-L6-v2.

    ``backbone`` is the ``transformers`` model (the part compression methods edit);
    ``tokenizer`` is a plain attribute, not a submodule, so it never appears in
    ``state_dict()``.
    """

    def __init__(self, backbone: nn.Module, tokenizer: Any = None):
        super().__init__()
        self.backbone = backbone
        self.tokenizer = tokenizer

    @classmethod
    def from_pretrained(cls, path: str | Path) -> "SentenceEncoder":
        """Load any local HF model folder (config.json + weights + tokenizer files)."""
        transformers = import_transformers()
        path = Path(path).expanduser()
        if not (path / "config.json").is_file():
            raise ModelLoadError(f"{path} is not a Hugging Face model folder (no config.json)",
                                 hint="pass a local folder saved with save_pretrained()")
        try:
            with quiet_loading(transformers):
                backbone = transformers.AutoModel.from_pretrained(path, local_files_only=True)
            tokenizer = transformers.AutoTokenizer.from_pretrained(path, local_files_only=True)
        except (OSError, ValueError, KeyError) as exc:
            raise ModelLoadError(f"cannot load the Hugging Face model in {path}: {exc}",
                                 hint="the folder needs config.json, weights and tokenizer files") from exc
        return cls(backbone, tokenizer)

    @property
    def dim(self) -> int:
        """Embedding width."""
        return int(self.backbone.config.hidden_size)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                token_type_ids: torch.Tensor | None = None) -> torch.Tensor:
        kwargs = {} if token_type_ids is None else {"token_type_ids": token_type_ids}
        hidden = self.backbone(input_ids=input_ids, attention_mask=attention_mask, **kwargs)[0]
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
        return F.normalize(pooled, p=2, dim=1)

    def encode(self, sentences: Sequence[str], batch_size: int = 32) -> torch.Tensor:
        """Embed sentences (no grad, eval mode; the training flag is restored after)."""
        if self.tokenizer is None:
            raise UnsupportedError("this SentenceEncoder has no tokenizer",
                                   hint="build it with SentenceEncoder.from_pretrained(path)")
        return embed_sentences(self, self.tokenizer, sentences, batch_size)


class HFSequenceClassifier(nn.Module):
    """Wraps ``AutoModelForSequenceClassification`` so ``model(input_ids=..., attention_mask=...)``
    returns the logits tensor (what modelpress' losses and metrics expect)."""

    def __init__(self, hf_model: nn.Module, tokenizer=None):
        super().__init__()
        self.hf = hf_model
        self.tokenizer = tokenizer

    @classmethod
    def from_pretrained(cls, path: str | Path) -> "HFSequenceClassifier":
        transformers = import_transformers()
        with quiet_loading(transformers):
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


def load_hf_dir(path: str | Path) -> nn.Module:
    """The model in a local Hugging Face folder: a classifier when ``config.json`` names a
    ``...ForSequenceClassification`` architecture, else a :class:`SentenceEncoder`."""
    path = Path(path).expanduser()
    try:
        cfg = json.loads((path / "config.json").read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ModelLoadError(f"{path}/config.json is unreadable ({exc})") from None
    archs = cfg.get("architectures") or [] if isinstance(cfg, dict) else []
    if any(isinstance(a, str) and a.endswith("ForSequenceClassification") for a in archs):
        model = HFSequenceClassifier.from_pretrained(path)
    else:
        model = SentenceEncoder.from_pretrained(path)
    model.zoo_spec = {"hf_dir": str(path.resolve())}
    return model
