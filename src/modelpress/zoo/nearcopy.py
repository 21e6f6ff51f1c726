"""Keeping evaluation sentences out of training: :class:`NearCopyFilter`."""
from __future__ import annotations

import re
from typing import Iterable

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
