"""RULER's frequent words extraction (fwe_utils.py): the 3 most frequent coded words.

A vocabulary of random 6-letter "coded" words (length // 50 of them, at least 10) is ranked at
random; word k appears int(n * k^-alpha / zeta(alpha)) times (Zipf, alpha = 2) in a shuffled
text of about n words. The top-ranked word is replaced by "..." (noise the question says to
ignore), so the answer is the words ranked 2-4.
"""

from __future__ import annotations

import math
import random
import string
from collections.abc import Iterator

import numpy as np

from longctx.eval.ruler import Draft, Plan
from longctx.eval.ruler.sources import TextSources
from longctx.eval.samples import PromptMeasure
from longctx.llm.base import derive_seed

TEMPLATE = (
    "Read the following coded text and track the frequency of each coded word. Find the three "
    "most frequently appeared coded words. {context}\nQuestion: Do not provide any explanation. "
    "Please ignore the dots '....'. What are the three most frequently appeared words in the "
    "above coded text?"
)
ANSWER_PREFIX = (" Answer: According to the coded text above, the three most frequently "
                 "appeared words are:")
ALPHA = 2.0
ZETA = math.pi ** 2 / 6  # zeta(ALPHA), RULER's scipy.special.zeta(2.0)
CODED_WORDLEN = 6
MAX_NEW_TOKENS = 50
METRIC = "all"


def vocab_size(length: int) -> int:
    return max(length // 50, 10)


def counts(n: int, size: int) -> np.ndarray:
    """Occurrences of each ranked word in a text of about n words."""
    k = np.arange(1, size + 1)
    return (n * (k ** -ALPHA) / ZETA).astype(int)


def smallest_text(size: int) -> int:
    """The smallest n whose answer is well defined: rank 4 strictly more frequent than 5."""
    n = 1
    while True:
        c = counts(n, size)
        if c[3] > 0 and (size < 5 or c[3] > c[4]):
            return n
        n += 1


def _builder(size: int, sample_seed: int):
    def build(n: int) -> Draft:
        rng = random.Random(sample_seed)
        vocab = {"".join(rng.choices(string.ascii_lowercase, k=CODED_WORDLEN))
                 for _ in range(size)}
        while len(vocab) < size:
            vocab.add("".join(rng.choices(string.ascii_lowercase, k=CODED_WORDLEN)))
        ranked = sorted(vocab)
        rng.shuffle(ranked)
        ranked[0] = "..."  # the most frequent "word" is noise
        text = [w for w, c in zip(ranked, counts(n, size), strict=True) for _ in range(c)]
        rng.shuffle(text)
        return Draft(TEMPLATE.format(context=" ".join(text)), ANSWER_PREFIX.strip(),
                     tuple(ranked[1:4]), {"haystack": "coded words"})

    return build


def plans(task: str, length: int, seed: int, measure: PromptMeasure,
          sources: TextSources) -> Iterator[Plan]:
    size = vocab_size(length)
    lo = smallest_text(size)
    index = 0
    while True:
        # n words cost at least 0.6 n tokens (rank 1 alone is 0.61 n of them)
        yield Plan(_builder(size, derive_seed(seed, task, length, index)), lo, 2 * length,
                   "words")
        index += 1
