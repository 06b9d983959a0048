"""The needle-in-a-haystack grid: one needle at chosen depths, at each length.

RULER's niah_single template (singular), needle sentence and answer prefix, with one
"adjective-noun" key and a 7-digit value, in the essay haystack. Unlike RULER's random
depths, the needle goes at the sentence boundary nearest to `depth` percent of the haystack's
characters (0 = before the first sentence, 100 = after the last; the haystack ends with a
whole sentence), so results can be plotted as a length x depth grid. A trial's key and value
are the same at every depth of its length, so the depths of one trial differ only in where
the needle is.
"""

from __future__ import annotations

import random

from longctx.errors import LongctxError
from longctx.eval.ruler import Draft, Plan, fit
from longctx.eval.ruler.niah import NEEDLE, answer_prefix, insert_between, instruction, random_value
from longctx.eval.ruler.sources import TextSources, ends_sentence
from longctx.eval.samples import EvalSample, PromptMeasure
from longctx.llm.base import derive_seed

TASK = "niah"


def nearest_boundary(sentences: list[str], depth: float) -> int:
    """The index i (0..len) of the boundary before sentences[i] nearest to depth percent of
    the text's characters (sentences joined by spaces)."""
    total = sum(map(len, sentences)) + max(len(sentences) - 1, 0)
    target = total * depth / 100
    best, best_gap, offset = 0, target, 0
    for i, sentence in enumerate(sentences, 1):
        offset += len(sentence) + (1 if i > 1 else 0)
        gap = abs(offset - target)
        if gap < best_gap:
            best, best_gap = i, gap
    return best


def _builder(depth: float, sample_seed: int, sources: TextSources):
    def build(n: int) -> Draft:
        rng = random.Random(sample_seed)
        key, value = random_value(rng, "words"), random_value(rng, "numbers")
        needle = NEEDLE.format(type_needle_v="numbers", key=key, value=value)
        sentences = sources.essay_sentences(n)
        if len(sentences) > 1 and not ends_sentence(sentences[-1]):
            sentences.pop()  # a cut-off last sentence would swallow a needle put after it
        at = nearest_boundary(sentences, depth)
        context = insert_between(sentences, [needle], [at])
        return Draft(instruction(context, key, "numbers", singular=True),
                     answer_prefix(key, "numbers", singular=True), (value,),
                     {"haystack": "essay", "needle_sentence": f"{at}/{len(sentences)}"})

    return build


def niah_grid(lengths: list[int], depths: list[float], trials: int, seed: int,
              measure: PromptMeasure, sources: TextSources, *, max_new_tokens: int = 16
              ) -> list[EvalSample]:
    """One sample per (length, depth, trial), in that order; index = the trial."""
    bad = [d for d in depths if not 0 <= d <= 100]
    if bad:
        raise LongctxError(f"niah: depths must be percentages in [0, 100], got {bad}")
    if trials < 0 or any(n <= 0 for n in lengths):
        raise LongctxError(f"niah: lengths must be positive and trials >= 0 "
                           f"(got lengths={lengths}, trials={trials})")
    out = []
    for length in lengths:
        guess = None  # the haystack size hardly changes with depth or trial: start from it
        for depth in depths:
            for trial in range(trials):
                build = _builder(depth, derive_seed(seed, TASK, length, trial), sources)
                fitted = fit(TASK, length, max_new_tokens, measure,
                             Plan(build, 1, length, "words"), guess)
                guess = fitted.size
                d = fitted.draft
                out.append(EvalSample(
                    task=TASK, length=length, index=trial, prompt=d.prompt,
                    answer_prefix=d.answer_prefix, references=d.references, metric="all",
                    max_new_tokens=max_new_tokens, prompt_tokens=fitted.tokens,
                    depth=float(depth), meta=d.meta))
    return out
