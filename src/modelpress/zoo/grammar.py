"""A template grammar of English sentences, for distilling sentence encoders without the user's text.

``generate_sentences(n, seed)`` gives ``n`` distinct sentences (about 30 kinds: tenses,
negations, questions, passives, descriptions, reasons, people, animals, objects, places,
times); the vocabulary is ``data/sentence_grammar.json``. The ``grammar`` corpus of the
``sentences`` dataset (:func:`modelpress.zoo.corpora.load_corpus`) is its first 20,000 sentences.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable

from ..core.errors import DataError
from .nearcopy import NearCopyFilter

GRAMMAR = Path(__file__).resolve().parent / "data" / "sentence_grammar.json"


def _grammar() -> dict:
    return json.loads(GRAMMAR.read_text(encoding="utf-8"))


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
        (s, _), (v, o) = self.subject(), self.verb_object()
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
        (s, _), (v, o) = self.subject(animals=False), self.verb_object()
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
        (s, _), (v, o) = self.subject(), self.verb_object()
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


def generate_sentences(n: int, seed: int = 0, exclude: Iterable[str] = ()) -> list[str]:
    """``n`` distinct English sentences from a hand-written template grammar (about 30 kinds of
    sentence: tenses, negations, questions, passives, descriptions, reasons, people, animals,
    objects, places, times; vocabulary in ``data/sentence_grammar.json``). Deterministic: the
    same ``(n, seed)`` gives the same list, and a smaller ``n`` a prefix of it.

    Sentences that are near-copies (see :class:`~modelpress.zoo.nearcopy.NearCopyFilter`) of
    ``exclude`` (e.g. the sentences of graded pairs held out for evaluation) are skipped, so
    training on them never sees the evaluation sentences.

        >>> s = generate_sentences(3, seed=1)
        >>> len(s) == len(set(s)) == 3 and s == generate_sentences(5, seed=1)[:3]
        True
    """
    import random

    if n < 0:
        raise DataError(f"generate_sentences: n must be >= 0 (got {n})")
    near_copy = NearCopyFilter(exclude)
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
