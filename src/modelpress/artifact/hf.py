"""Hugging Face models from a local folder (never downloaded), as modules modelpress methods take.

* :class:`SentenceEncoder`: an encoder + mean pooling + L2 normalisation (what
  sentence-transformers does for all-MiniLM-L6-v2); ``model(**tokens) -> [batch, dim]``;
* :class:`HFLogits`: a model with a head (classifier, causal or masked LM ...) returning plain logits.

:func:`load_hf_dir` picks one from the folder's ``config.json`` and records the folder as the
model's source, so an artifact of the compressed model reloads from the same folder. A folder
with a config but no weights gives a randomly initialised model (with a warning).
Needs the ``[nlp]`` extra (transformers).
"""
from __future__ import annotations

import contextlib
import inspect
import os
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..core.compat import prepare_torchvision
from ..core.errors import ConfigError, ModelLoadError, UnsupportedError, require
from ..core.limits import MAX_YAML_BYTES, read_json
from ..core.progress import warn_random_init
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
        path = Path(path).expanduser()
        if not (path / "config.json").is_file():
            raise ModelLoadError(f"{path} is not a Hugging Face model folder (no config.json)",
                                 hint="pass a local folder saved with save_pretrained()")
        tokenizer = _tokenizer(path)
        if tokenizer is None:
            raise ModelLoadError(f"cannot load the tokenizer of the Hugging Face model in {path}",
                                 hint="the folder needs config.json, weights and tokenizer files")
        return cls(build_hf(path), tokenizer)

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


class HFLogits(nn.Module):
    """Wraps a Hugging Face model with a head (``...ForSequenceClassification``,
    ``...ForImageClassification``, ``...ForCausalLM``, ``GPT2LMHeadModel`` ...) so that calling it
    returns the ``logits`` tensor, what modelpress' losses, metrics and exporters expect. The
    arguments are the model's own: ``input_ids=``/``attention_mask=`` for text, pixel values for
    images. Caching of past keys and values is off (one forward, not generation)."""

    def __init__(self, hf_model: nn.Module, tokenizer=None):
        super().__init__()
        self.hf = hf_model
        self.tokenizer = tokenizer
        if hasattr(getattr(hf_model, "config", None), "use_cache"):
            hf_model.config.use_cache = False

    def forward(self, *args, **kwargs) -> torch.Tensor:
        ids = args[0] if args else kwargs.get("input_ids")
        if "_takes_mask" not in self.__dict__:  # looked up once, not on every call
            self.__dict__["_takes_mask"] = _takes_attention_mask(self.hf)
        if isinstance(ids, torch.Tensor) and not ids.is_floating_point() and "attention_mask" not in kwargs \
                and len(args) < 2 and self.__dict__["_takes_mask"]:
            # token ids alone: every position attends (what a missing mask means). Said explicitly,
            # transformers skips its packed-sequence detection (torch.diff), which ONNX cannot export
            kwargs["attention_mask"] = torch.ones_like(ids)
        return self.hf(*args, **kwargs).logits


def _takes_attention_mask(model: nn.Module) -> bool:
    try:
        return "attention_mask" in inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return False


_WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                 "pytorch_model.bin.index.json")


def has_weights(path: Path) -> bool:
    return any((path / f).is_file() for f in _WEIGHT_FILES)


def build_hf(path: str | Path, cls_name: str | None = None) -> nn.Module:
    """The ``transformers`` model of a local folder: ``cls_name`` (e.g. ``"GPT2LMHeadModel"``) or
    ``AutoModel``, with the folder's weights, or randomly initialised (one warning line) when the
    folder holds only a ``config.json``. Nothing is downloaded."""
    transformers = import_transformers()
    path = Path(path).expanduser()
    cls = getattr(transformers, cls_name, None) if cls_name else transformers.AutoModel
    if cls is None or not hasattr(cls, "from_pretrained"):
        raise ModelLoadError(f"{path}/config.json names architecture {cls_name!r}, which this transformers "
                             f"version ({transformers.__version__}) does not have",
                             hint="upgrade transformers, or fix 'architectures' in config.json")
    try:
        with quiet_loading(transformers):
            if has_weights(path):
                return cls.from_pretrained(path, local_files_only=True)
            config = transformers.AutoConfig.from_pretrained(path, local_files_only=True)
            warn_random_init(f"{cls.__name__} in {path}", "the folder holds no weights file")
            return cls.from_config(config) if hasattr(cls, "from_config") else cls._from_config(config)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ModelLoadError(f"cannot load the Hugging Face model in {path}: {type(exc).__name__}: {exc}",
                             hint="the folder needs config.json and, for trained weights, model.safetensors") \
            from None


def _tokenizer(path: Path):
    try:
        return import_transformers().AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    except (OSError, ValueError, KeyError, TypeError):
        return None


def load_hf_dir(path: str | Path) -> nn.Module:
    """The model in a local Hugging Face folder: :class:`HFLogits` around the architecture
    ``config.json`` names when it has a head (classification, causal or masked LM ...), else a
    :class:`SentenceEncoder` (mean-pooled embeddings). The folder is the model's source record."""
    path = Path(path).expanduser()
    try:
        cfg = read_json(path / "config.json", "Hugging Face config", max_bytes=MAX_YAML_BYTES)
    except (OSError, ConfigError) as exc:
        raise ModelLoadError(f"{path}/config.json is unreadable ({exc})",
                             hint="pass a folder saved with save_pretrained()") from None
    archs = (cfg.get("architectures") or []) if isinstance(cfg, dict) else []
    head = next((a for a in archs if isinstance(a, str) and (not a.endswith("Model") or a.endswith("HeadModel")
                                                              or a.endswith("HeadsModel"))), None)
    if head is not None:
        model = HFLogits(build_hf(path, head), _tokenizer(path))
    else:
        model = SentenceEncoder(build_hf(path), _tokenizer(path))
    model.zoo_spec = {"hf_dir": str(path.resolve())}
    return model
