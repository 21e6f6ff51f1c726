"""Sentence embeddings: graded pairs for quality, unlabelled sentences for training.

* quality (:func:`embedding_quality`): ``spearman``, the rank correlation between the cosine of
  each graded pair's embeddings and its grade; ``fidelity``, the mean cosine between the
  model's and the uncompressed model's embedding of every sentence;
* training (:meth:`SentenceEmbedding.training_loss`): there are no labels, so a compressed
  encoder learns ``1 - cos`` to the uncompressed encoder's embeddings;
* data: :class:`TokenizedSentences` (unlabelled, batches of token dicts) and
  :class:`SentencePairs` (``(sentence1, sentence2, score)``), read from the user's files by
  :func:`read_pairs` / :func:`read_sentences`.

The model is any module mapping tokenized keyword inputs (``input_ids``, ``attention_mask``
...) to ``[batch, dim]`` embeddings; its tokenizer is ``model.tokenizer`` or the task's.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Iterable, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset

from ..core.data import Data, call_model, slice_inputs
from ..core.errors import DataError, UnsupportedError
from .base import DatasetBundle, LossFn, Task


def tokenize(tokenizer, sentences: Sequence[str], max_length: int = 128,
             padding: bool | str = True) -> dict[str, torch.Tensor]:
    """Tokenize to a dict of int64 tensors holding only the inputs the model takes
    (``input_ids``, ``attention_mask`` and ``token_type_ids`` when the model uses them)."""
    enc = tokenizer(list(sentences), padding=padding, truncation=True, max_length=max_length,
                    return_tensors="pt")
    names = getattr(tokenizer, "model_input_names", ["input_ids", "attention_mask"])
    return {k: enc[k] for k in names if k in enc}


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
    collate stacks items into the dict batches a sentence encoder takes."""

    def __init__(self, tokens: dict[str, torch.Tensor], sentences: Sequence[str] = ()):
        self.tokens = tokens
        self.sentences = list(sentences)

    @classmethod
    def from_sentences(cls, sentences: Sequence[str], tokenizer, max_length: int = 64) -> "TokenizedSentences":
        """Pad to the longest sentence, truncated at ``max_length`` tokens."""
        if not sentences:
            raise DataError("no sentences to tokenize", hint="give at least one non-empty line")
        return cls(tokenize(tokenizer, sentences, max_length, padding="longest"), sentences)

    @property
    def input_shape(self) -> tuple[int]:
        return (int(self.tokens["input_ids"].shape[1]),)

    def __len__(self) -> int:
        return int(self.tokens["input_ids"].shape[0])

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {k: v[i] for k, v in self.tokens.items()}

    @staticmethod
    def collate(items: Sequence[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        """Stack items into a batch cut to its longest sentence: a batch of short sentences does not
        pay for the padding of the corpus's longest one (training and timing see real lengths)."""
        batch = torch.utils.data.default_collate(list(items))
        mask = batch.get("attention_mask")
        if mask is None or mask.ndim != 2 or not bool(mask[:, -1].eq(0).all()):
            return batch
        length = max(int(mask.sum(1).max()), 1)
        return {k: v[:, :length] if v.ndim == 2 and v.shape[1] == mask.shape[1] else v for k, v in batch.items()}


# -- the user's files -----------------------------------------------------------------------
def parse_pairs(text: str, where: str) -> list[tuple[str, str, float]]:
    """``score<TAB>sentence1<TAB>sentence2`` lines (score 0..5; ``#`` comments and blank lines
    skipped) -> ``(sentence1, sentence2, score)``."""
    pairs = []
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip() or line.startswith("#"):
            continue
        fields = line.split("\t")
        try:
            score = float(fields[0])
            if len(fields) != 3 or not 0.0 <= score <= 5.0:
                raise ValueError
        except ValueError:
            raise DataError(f"{where} line {lineno}: expected 'score<TAB>sentence1<TAB>sentence2' with score 0..5",
                            hint="one graded pair per line, fields separated by tabs") from None
        pairs.append((fields[1].strip(), fields[2].strip(), score))
    if len(pairs) < 2:
        raise DataError(f"{where}: {len(pairs)} graded pair(s); Spearman needs at least 2",
                        hint="one 'score<TAB>sentence1<TAB>sentence2' line per pair")
    return pairs


MAX_TEXT_BYTES = 256 << 20  # a sentences or graded-pairs file


def _read_text(path: str | Path, what: str) -> str:
    path = Path(path).expanduser()
    try:
        if path.stat().st_size > MAX_TEXT_BYTES:
            raise DataError(f"{what} file {str(path)!r} is {path.stat().st_size:,} bytes (at most {MAX_TEXT_BYTES:,})",
                            hint="split it, or sample the sentences you need")
        return path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise DataError(f"{what} file {str(path)!r} does not exist", hint="check the path") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"cannot read {what} file {str(path)!r}: {exc}", hint="a UTF-8 text file is expected") from None


def read_pairs(path: str | Path) -> list[tuple[str, str, float]]:
    """Graded pairs from a TSV file (see :func:`parse_pairs`)."""
    return parse_pairs(_read_text(path, "graded pairs"), str(path))


def read_sentences(path: str | Path) -> list[str]:
    """Unlabelled sentences from a text file, one per line (blank lines skipped)."""
    sentences = [s.strip() for s in _read_text(path, "sentences").splitlines() if s.strip()]
    if not sentences:
        raise DataError(f"sentences file {str(path)!r} holds no sentence", hint="one sentence per line")
    return sentences


# -- quality ---------------------------------------------------------------------------------
def embedding_quality(model: nn.Module, pairs: Iterable[tuple[str, str, float]], reference: Any = None,
                      batch_size: int = 32, tokenizer=None) -> dict[str, float]:
    """Score sentence embeddings on graded pairs.

    ``spearman``: rank correlation between the cosine of each pair and its grade.
    ``fidelity`` (only with ``reference``): mean cosine between the model's and the
    reference's embedding of every sentence; ``reference`` is another encoder module
    (using its own ``tokenizer`` attribute if it has one) or a ``[n, dim]`` tensor in
    the order of :func:`pair_sentences`. The model's tokenizer is ``model.tokenizer`` or
    ``tokenizer=``.
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


@torch.no_grad()
def output_fidelity(model: nn.Module, data: Any, reference: nn.Module | None) -> float:
    """Mean cosine between ``model``'s and ``reference``'s outputs over the batches of ``data``
    (1.0 without a reference)."""
    if reference is None:
        return 1.0
    total, count = 0.0, 0
    for inputs in Data(data, batch_size=64).inputs():
        cos = F.cosine_similarity(call_model(model, inputs).float(), call_model(reference, inputs).float(), dim=-1)
        total, count = total + float(cos.sum()), count + cos.numel()
    return total / max(count, 1)


def embedding_distill_loss(teacher: nn.Module) -> LossFn:
    """Training loss without labels: ``1 - cos`` to the teacher's embedding of the same inputs."""
    teacher = teacher.eval()

    def loss_fn(model, inputs, target):
        with torch.no_grad():
            ref = call_model(teacher, inputs)
        return (1 - F.cosine_similarity(call_model(model, inputs), ref, dim=-1)).mean()

    return loss_fn


class SentenceEmbedding(Task):
    """Sentence encoders: trained on unlabelled sentences against the uncompressed encoder.

    ``graded=True``: the test split is a :class:`SentencePairs`, scored by Spearman and
    fidelity; ``graded=False``: it holds unlabelled sentences (token batches), scored by
    fidelity alone. ``tokenizer`` is used for models that carry none."""

    name = "sentence-embedding"
    labelled = False
    distill_loss = "embedding_cosine"

    def __init__(self, tokenizer: Any = None, graded: bool = True):
        self.tokenizer = tokenizer
        self.metrics = ("spearman", "fidelity") if graded else ("fidelity",)

    def evaluate(self, model: nn.Module, data: Any, reference: nn.Module | None = None) -> dict[str, float]:
        if "spearman" not in self.metrics:
            return {"fidelity": output_fidelity(model, data, reference)}
        tokenizer = getattr(model, "tokenizer", None) or self.tokenizer
        q = embedding_quality(model, data, reference=reference, tokenizer=tokenizer)
        q.setdefault("fidelity", 1.0)
        return {k: float(v) for k, v in q.items()}

    def training_loss(self, reference: nn.Module | None = None) -> LossFn | None:
        if reference is None:
            raise DataError("a sentence encoder has no labels to fine-tune on, and no reference model was given",
                            hint="fine-tune against the uncompressed encoder (recipes do this), or pass loss_fn=...")
        return embedding_distill_loss(reference)

    def example_inputs(self, bundle: DatasetBundle, n: int = 1) -> Any:
        # the test split holds raw sentence pairs; the training split holds token batches
        return slice_inputs(Data(bundle.train, batch_size=max(n, 1)).first_inputs(), n)
