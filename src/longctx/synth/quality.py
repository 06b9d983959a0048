"""Checks of model output shared by the synthesis steps: refusals, loops, references to the
prompt.

A small generator often declines or loops on one phrase under greedy decoding; such text must
not become training data. Each check is cheap and conservative: it looks at openings and
repeated word n-grams.
"""

from __future__ import annotations

import re
import zlib
from collections import Counter

LOOP_WINDOW_CHARS = 400
MAX_COMPRESSION_RATIO = 2.4  # Whisper's threshold for looping (hallucinated) segments

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
# A reference to the text the prompt showed, which the training sample will not have.
REFERS_TO_PROMPT_TEXT = (r"\b(?:this|above|given|provided|following|the)\s+"
                         r"(?:text|piece|passage|excerpt|paragraph)\b")
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


def max_compression_ratio(text: str, window: int = LOOP_WINDOW_CHARS) -> float:
    """The highest zlib compression ratio over windows of `window` characters (half
    overlapping). Prose compresses about 1.2-1.9x at this size; a loop, even one that varies
    a word ("Austronesian Austronesic Austronesian ..."), far more. Windows keep the measure
    independent of the text's length, which by itself raises the ratio of long prose."""
    data = text.encode("utf-8")
    starts = range(0, max(1, len(data) - window // 2), window // 2)
    return max(len(part) / len(zlib.compress(part)) for part in
               (data[i:i + window] for i in starts) if part) if data else 0.0


def is_repetitive(text: str, max_repeated_fraction: float) -> bool:
    """Too many repeated 4-grams, one unit said three times, or a window that compresses
    like a loop: the model is looping."""
    words = text.lower().split()
    return (repeated_fraction(words) > max_repeated_fraction or has_looping_unit(text)
            or max_compression_ratio(text) > MAX_COMPRESSION_RATIO)
