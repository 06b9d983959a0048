"""Checks of model output shared by the synthesis steps: refusals and loops.

A small generator often declines or loops on one phrase under greedy decoding; such text must
not become training data. Each check is cheap and conservative: it looks at openings and
repeated word n-grams.
"""

from __future__ import annotations

import re
from collections import Counter

# Openings of an answer that declines or says the notes do not cover the instruction.
_INFO = r"(relevant |specific |sufficient |enough |any |the )?(information|data|details|context)"
_SOURCES = r"(provided |given )?(documents?|texts?|notes|information|excerpts?|sources?)"
REFUSALS = [re.compile(p, re.IGNORECASE) for p in (
    r"(i'?m|i am) (so |very |truly )?sorry\b",
    r"sorry\b",
    r"i (sincerely )?apologi[sz]e\b",
    r"i (cannot|can ?not|can't)\b",
    r"(i'?m|i am) (unable|not able)\b",
    r"as an ai\b",
    rf"i (do not|don't) have {_INFO}\b",
    rf"there (is|are) no {_INFO}\b",
    rf"the {_SOURCES} (do|does) not (contain|mention|provide|include|say|discuss)\b",
    rf"unfortunately,? (i|the {_SOURCES}|there (is|are) no)\b",
)]
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+|\n+")


def first_sentence(text: str) -> str:
    """The opening sentence, without leading markdown or quotes, apostrophes made plain."""
    head = _SENTENCE_END.split(text.strip(), maxsplit=1)[0]
    return head.replace("\u2019", "'").lstrip("*_#>\"' \t")


def is_refusal(text: str) -> bool:
    sentence = first_sentence(text)
    return any(p.match(sentence) for p in REFUSALS)


def repeated_fraction(words: list[str]) -> float:
    """Share of word 4-grams that already occurred earlier in the text (0 for < 4 words)."""
    grams = [tuple(words[i:i + 4]) for i in range(len(words) - 3)]
    return (len(grams) - len(set(grams))) / len(grams) if grams else 0.0


def has_looping_unit(text: str) -> bool:
    """A line or sentence of at least 4 words that occurs 3+ times: the model is looping."""
    units = (" ".join(u.lower().split()) for u in _SENTENCE_END.split(text))
    counts = Counter(u for u in units if len(u.split()) >= 4)
    return any(n >= 3 for n in counts.values())


def is_repetitive(text: str, max_repeated_fraction: float) -> bool:
    """Too many repeated 4-grams, or one unit said three times: the model is looping."""
    words = text.lower().split()
    return repeated_fraction(words) > max_repeated_fraction or has_looping_unit(text)
