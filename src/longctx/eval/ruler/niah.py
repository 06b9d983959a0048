"""RULER's eight needle-in-a-haystack tasks (prepare_niah.py / niah_utils.py).

Needles "One of the special magic {numbers} for {key} is: {value}." hide in a haystack:
"repeat" (one noise sentence, one per line), "essay" (corpus text; needles go between
sentences at depths drawn from RULER's 40 depths) or "needle" (every line a distractor needle
with another random key). The question asks for the values of one or more keys; with a single
expected value the template is rewritten to the singular, exactly as RULER does. Keys are
wonderwords "adjective-noun" pairs (or uuids), values 7-digit numbers (or uuids).
"""

from __future__ import annotations

import random
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from functools import cache

import numpy as np

from longctx.eval.ruler import Draft, Plan
from longctx.eval.ruler.sources import TextSources
from longctx.eval.samples import PromptMeasure
from longctx.llm.base import derive_seed

TEMPLATE = (
    "Some special magic {type_needle_v} are hidden within the following text. Make sure to "
    "memorize it. I will quiz you about the {type_needle_v} afterwards.\n{context}\nWhat are "
    "all the special magic {type_needle_v} for {query} mentioned in the provided text?"
)
NEEDLE = "One of the special magic {type_needle_v} for {key} is: {value}."
NOISE = ("The grass is green. The sky is blue. The sun is yellow. Here we go. There and back "
         "again.")
ANSWER_PREFIX = "The special magic {type_needle_v} for {query} mentioned in the provided text"
# RULER's gen_prefix ends "are" (several values asked) or "is" (one)
DEPTHS = [int(d) for d in np.round(np.linspace(0, 100, num=40, endpoint=True))]
MAX_NEW_TOKENS = 128
METRIC = "all"


@dataclass(frozen=True)
class NiahTask:
    haystack: str  # "repeat" | "essay" | "needle"
    type_needle_k: str  # "words" | "numbers" | "uuids"
    type_needle_v: str
    num_needle_k: int = 1
    num_needle_v: int = 1
    num_needle_q: int = 1


NIAH_TASKS = {
    "niah_single_1": NiahTask("repeat", "words", "numbers"),
    "niah_single_2": NiahTask("essay", "words", "numbers"),
    "niah_single_3": NiahTask("essay", "words", "uuids"),
    "niah_multikey_1": NiahTask("essay", "words", "numbers", num_needle_k=4),
    "niah_multikey_2": NiahTask("needle", "words", "numbers"),
    "niah_multikey_3": NiahTask("needle", "uuids", "uuids"),
    "niah_multivalue": NiahTask("essay", "words", "numbers", num_needle_v=4),
    "niah_multiquery": NiahTask("essay", "words", "numbers", num_needle_q=4),
}


@cache
def _word_lists() -> tuple[list[str], list[str]]:
    """wonderwords' adjectives and nouns, sorted (RULER's WORDS are all their pairs)."""
    from wonderwords import RandomWord

    categories = RandomWord()._categories
    return sorted(set(categories["adjectives"])), sorted(set(categories["nouns"]))


def random_value(rng: random.Random, kind: str) -> str:
    """RULER's generate_random: a 7-digit number, an "adjective-noun" key or a uuid4."""
    if kind == "numbers":
        return str(rng.randint(10**6, 10**7 - 1))
    if kind == "words":
        adjectives, nouns = _word_lists()
        return f"{rng.choice(adjectives)}-{rng.choice(nouns)}"
    if kind == "uuids":
        return str(uuid.UUID(int=rng.getrandbits(128), version=4))
    raise ValueError(f"unknown needle type {kind!r}")


def instruction(context: str, query: str, type_needle_v: str, singular: bool) -> str:
    """The task text; RULER's singular rewrite when exactly one value is asked for."""
    template = TEMPLATE
    if singular:
        template = (template.replace("Some", "A").replace("are all", "is")
                    .replace("are", "is").replace("answers", "answer"))
        type_needle_v = type_needle_v[:-1]
    return template.format(type_needle_v=type_needle_v, context=context, query=query)


def answer_prefix(query: str, type_needle_v: str, singular: bool) -> str:
    """RULER's gen_prefix, which opens the assistant turn."""
    if singular:
        return ANSWER_PREFIX.format(type_needle_v=type_needle_v[:-1], query=query) + " is"
    return ANSWER_PREFIX.format(type_needle_v=type_needle_v, query=query) + " are"


def insert_between(sentences: list[str], needles: list[str], positions: list[int]) -> str:
    """The sentences with needles[i] before sentences[positions[i]] (sorted positions;
    len(sentences) = at the end), space separated."""
    parts, last = [], 0
    for needle, pos in zip(needles, positions, strict=True):
        parts.extend(sentences[last:pos])
        parts.append(needle)
        last = pos
    parts.extend(sentences[last:])
    return " ".join(parts)


def _builder(spec: NiahTask, sample_seed: int, sources: TextSources):
    num_k = max(spec.num_needle_k, spec.num_needle_q)  # as RULER's generate_samples

    def build(n: int) -> Draft:
        rng = random.Random(sample_seed)
        keys, values, needles = [], [], []
        for _ in range(num_k):
            keys.append(random_value(rng, spec.type_needle_k))
            values.append([random_value(rng, spec.type_needle_v)
                           for _ in range(spec.num_needle_v)])
            needles.extend(NEEDLE.format(type_needle_v=spec.type_needle_v, key=keys[-1], value=v)
                           for v in values[-1])
        rng.shuffle(needles)
        if spec.haystack == "essay":
            sentences = sources.essay_sentences(n)
            positions = sorted(int(len(sentences) * depth / 100)
                               for depth in rng.sample(DEPTHS, len(needles)))
            context = insert_between(sentences, needles, positions)
        else:
            if spec.haystack == "repeat":
                lines = [NOISE] * n
            else:  # distractor needles; a key equal to a real one would make two answers
                lines = []
                while len(lines) < n:
                    key = random_value(rng, spec.type_needle_k)
                    if key not in keys:
                        lines.append(NEEDLE.format(type_needle_v=spec.type_needle_v, key=key,
                                                   value=random_value(rng, spec.type_needle_v)))
            for index, needle in zip(sorted(rng.sample(range(n), len(needles)), reverse=True),
                                     needles, strict=True):
                lines.insert(index, needle)
            context = "\n".join(lines)
        asked = rng.sample(range(num_k), spec.num_needle_q)
        queries = [keys[i] for i in asked]
        query = (", ".join(queries[:-1]) + ", and " + queries[-1] if len(queries) > 1
                 else queries[0])
        singular = spec.num_needle_q * spec.num_needle_v == 1
        return Draft(instruction(context, query, spec.type_needle_v, singular),
                     answer_prefix(query, spec.type_needle_v, singular),
                     tuple(v for i in asked for v in values[i]), {"haystack": spec.haystack})

    return build


def plans(task: str, length: int, seed: int, measure: PromptMeasure,
          sources: TextSources) -> Iterator[Plan]:
    spec = NIAH_TASKS[task]
    needles = max(spec.num_needle_k, spec.num_needle_q) * spec.num_needle_v
    # Haystack units: essay words, else lines; each costs at least one token.
    lo, unit = (1, "words") if spec.haystack == "essay" else (needles, "lines")
    index = 0
    while True:
        build = _builder(spec, derive_seed(seed, task, length, index), sources)
        yield Plan(build, lo, length, unit)
        index += 1
