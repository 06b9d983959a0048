"""RULER's common words extraction (cwe_utils.py): the 10 most frequent words of a list.

A numbered list repeats 10 common words freq_cw times and every other word freq_ucw times, in
random order. A worked example (a short list and its answer) comes first, joined to the task
by a newline, as RULER's original generator does. Below 4096 tokens RULER uses 6/1
repetitions and a smaller example; below 1024 (lengths RULER does not run, where the 6/1 list
and its example alone overflow 512 tokens) the common words appear twice, the others once, and
the example is a 10-word list shown once (only its format is taught).
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from functools import cache

from longctx.eval.ruler import Draft, Plan
from longctx.eval.ruler.sources import TextSources
from longctx.eval.samples import PromptMeasure
from longctx.llm.base import derive_seed

TEMPLATE = (
    "Below is a numbered list of words. In these words, some appear more often than others. "
    "Memorize the ones that appear most often.\n{context}\nQuestion: What are the 10 most common "
    "words in the above list?"
)
ANSWER_PREFIX = " Answer: The top 10 words that appear most often in the list are:"
FREQ_CW, FREQ_UCW, NUM_CW = 30, 3, 10
MAX_NEW_TOKENS = 120
METRIC = "all"


@cache
def words() -> list[str]:
    """RULER's vocabulary: wonderwords' nouns, adjectives and verbs, unique and sorted."""
    from wonderwords import RandomWord

    categories = RandomWord()._categories
    return sorted({w for kind in ("nouns", "adjectives", "verbs") for w in categories[kind]})


def repeats(length: int) -> tuple[tuple[int, int, int], tuple[int, int]]:
    """((example words, common, uncommon repeats), (task common, uncommon repeats))."""
    if length >= 4096:
        return (40, 10, 3), (FREQ_CW, FREQ_UCW)
    if length >= 1024:
        return (20, 3, 1), (6, 1)
    return (10, 1, 1), (2, 1)


def numbered_list(rng: random.Random, num_words: int, common: int, uncommon: int
                  ) -> tuple[str, list[str]]:
    """RULER's get_example: the list "1. w 2. w ..." and its NUM_CW common words."""
    chosen = rng.sample(words(), num_words)
    top, rest = chosen[:NUM_CW], chosen[NUM_CW:]
    listed = top * common + rest * uncommon
    rng.shuffle(listed)
    return " ".join(f"{i + 1}. {w}" for i, w in enumerate(listed)), top


def _builder(length: int, sample_seed: int):
    (example_words, example_cw, example_ucw), (freq_cw, freq_ucw) = repeats(length)
    template = TEMPLATE + ANSWER_PREFIX

    def build(n: int) -> Draft:
        rng = random.Random(sample_seed)
        example, example_answer = numbered_list(rng, example_words, example_cw, example_ucw)
        context, answer = numbered_list(rng, n, freq_cw, freq_ucw)
        # RULER: the example's answer follows its prefix's colon with no space.
        text = (template.format(context=example)
                + " ".join(f"{i + 1}. {w}" for i, w in enumerate(example_answer))
                + "\n" + template.format(context=context))
        prompt = text[:text.rfind(ANSWER_PREFIX)].strip()
        return Draft(prompt, ANSWER_PREFIX.strip(), tuple(answer), {"haystack": "word list"})

    return build


def plans(task: str, length: int, seed: int, measure: PromptMeasure,
          sources: TextSources) -> Iterator[Plan]:
    index = 0
    while True:
        yield Plan(_builder(length, derive_seed(seed, task, length, index)), NUM_CW,
                   len(words()), "distinct words")
        index += 1
