"""NVIDIA RULER's 13 tasks, generated offline and sized token-exactly.

Each task family lives in its own module (niah, vt, cwe, fwe, qa) with RULER's templates at
its top, and follows RULER's generators (as ported to lm-eval-harness): same templates, needle
sentences, answer prefixes, haystack kinds and task parameters. What differs is the sizing.
RULER grows a haystack in fixed increments, counting raw text tokens; here every sample is
sized by binary search on its haystack (words, noise sentences, list entries or documents)
against `measure` = the tokens of the rendered chat the model really sees (user turn + answer
prefix), so that prompt + max_new_tokens <= length, as tightly as the haystack allows.

A family module has MAX_NEW_TOKENS, METRIC and `plans(task, length, seed, measure, sources)`:
an endless iterator of `Plan`s, one per sample. A plan builds its sample from a haystack size
with a fresh `random.Random` derived from (seed, task, length, index): the same size always
gives the same text, and the search (`fit`) only changes the size.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from types import ModuleType
from typing import TYPE_CHECKING, NamedTuple

from longctx.config import RULER_TASKS
from longctx.errors import LongctxError
from longctx.eval.samples import EvalSample, PromptMeasure, largest_fitting

if TYPE_CHECKING:
    from longctx.eval.ruler.sources import TextSources

TASKS: tuple[str, ...] = tuple(RULER_TASKS)  # the params' `ruler.tasks` choices, RULER's order


class Draft(NamedTuple):
    """A sample's text before it is measured."""

    prompt: str  # the user turn
    answer_prefix: str  # opens the assistant turn
    references: tuple[str, ...]
    meta: dict[str, str]


class Plan(NamedTuple):
    """How one sample grows: `build(n)` is the sample with a haystack of n units."""

    build: Callable[[int], Draft]
    lo: int  # the smallest haystack the task allows
    hi: int  # an upper bound on any haystack that can fit
    unit: str  # what n counts, for messages
    # Optional top-up after the search: refine(n, room, accept) offers fuller variants of
    # build(n), which has `room` tokens to spare, to accept(draft), which keeps the last one
    # that fits and returns its room (None: too long). QA: small documents in the gap.
    refine: Callable[[int, int, Callable[[Draft], int | None]], None] | None = None


class Fitted(NamedTuple):
    draft: Draft
    size: int  # haystack units used
    tokens: int  # measure(prompt, answer_prefix)


def fit(task: str, length: int, max_new_tokens: int, measure: PromptMeasure, plan: Plan,
        guess: int | None = None) -> Fitted:
    """The sample with the largest haystack whose prompt + max_new_tokens fits `length`.

    Gallops from `guess` (the previous sample's size: samples of one task and length are
    close; else extrapolated from two small haystacks) in doubling steps to bracket the
    boundary, then bisects, so a sample costs a handful of measurements. Every returned
    sample was measured and fits, even where the token count is not perfectly monotone in the
    size (different random draws per size).
    """
    budget = length - max_new_tokens
    seen: dict[int, tuple[Draft, int]] = {}

    def measured(n: int) -> tuple[Draft, int]:
        if n not in seen:
            draft = plan.build(n)
            seen[n] = (draft, measure(draft.prompt, draft.answer_prefix))
        return seen[n]

    def fits(n: int) -> bool:
        return measured(n)[1] <= budget

    lo, hi = plan.lo, max(plan.lo, plan.hi)
    if not fits(lo):
        raise LongctxError(
            f"{task}: length {length} is too small: even the smallest haystack ({lo} "
            f"{plan.unit}) makes a {measured(lo)[1]}-token prompt, and {max_new_tokens} tokens "
            f"must be left for the answer")
    step = 1  # a previous sample's size is usually within a few units
    if guess is None:  # extrapolate the tokens per unit between lo and a small probe
        guess = lo
        probe = min(hi, lo + 64)
        if probe > lo and fits(probe):
            t_lo, t_probe = measured(lo)[1], measured(probe)[1]
            per_unit = max(t_probe - t_lo, 1) / (probe - lo)
            guess = lo + int((budget - t_lo) / per_unit)
            step = max(1, guess // 64)
    start = min(max(guess, lo), hi)
    if fits(start):
        good, bad = start, hi + 1
        while good + step <= hi:
            if not fits(good + step):
                bad = good + step
                break
            good += step
            step *= 2
    else:
        good, bad = lo, start
        while bad - step > lo:
            if fits(bad - step):
                good = bad - step
                break
            bad -= step
            step *= 2
    size = largest_fitting(good, bad - 1, fits)
    draft, tokens = measured(size)
    if plan.refine is not None:
        def accept(candidate: Draft) -> int | None:
            nonlocal draft, tokens
            n_tokens = measure(candidate.prompt, candidate.answer_prefix)
            if n_tokens > budget:
                return None
            draft, tokens = candidate, n_tokens
            return budget - n_tokens

        plan.refine(size, budget - tokens, accept)
    return Fitted(draft, size, tokens)


def _family(task: str) -> ModuleType:
    # Imported here, not at the top: the task modules import Draft/Plan/fit from this package.
    from longctx.eval.ruler import cwe, fwe, niah, qa, vt

    if task.startswith("niah_"):
        return niah
    return {"vt": vt, "cwe": cwe, "fwe": fwe, "qa_1": qa, "qa_2": qa}[task]


def generate(task: str, length: int, samples: int, seed: int, measure: PromptMeasure,
             sources: TextSources) -> list[EvalSample]:
    """`samples` samples of one RULER task at one length (index 0..samples-1)."""
    if task not in TASKS:
        raise LongctxError(f"unknown RULER task {task!r}; valid tasks: {', '.join(TASKS)}")
    if length <= 0 or samples < 0:
        raise LongctxError(f"{task}: length must be positive and samples >= 0 "
                           f"(got length={length}, samples={samples})")
    family = _family(task)
    max_new = family.MAX_NEW_TOKENS
    plans: Iterator[Plan] = family.plans(task, length, seed, measure, sources)
    out: list[EvalSample] = []
    guess = None
    for index in range(samples):
        fitted = fit(task, length, max_new, measure, next(plans), guess)
        guess = fitted.size
        d = fitted.draft
        out.append(EvalSample(
            task=task, length=length, index=index, prompt=d.prompt,
            answer_prefix=d.answer_prefix, references=d.references, metric=family.METRIC,
            max_new_tokens=max_new, prompt_tokens=fitted.tokens, meta=d.meta))
    return out
