"""RULER's variable tracking (vt_utils.py): follow a chain of assignments through noise.

One chain "VAR A = 12345", "VAR B = VAR A ", ... (num_hops=4: five variables) is scattered
between repetitions of the noise line; the model names every variable holding the value. A
worked example precedes the task: a shorter instance with 3-letter names and its answer,
whose names are re-randomized for each sample (RULER's randomize_icl). RULER sizes that
example to 500 tokens; below 4096 tokens (lengths RULER does not run) it gets length // 8,
and at least one noise line.
"""

from __future__ import annotations

import random
import string
from collections.abc import Iterator

from longctx.eval.ruler import Draft, Plan
from longctx.eval.ruler.sources import TextSources
from longctx.eval.samples import PromptMeasure, largest_fitting
from longctx.llm.base import derive_seed

TEMPLATE = (
    "Memorize and track the chain(s) of variable assignment hidden in the following text.\n\n"
    "{context}\nQuestion: Find all variables that are assigned the value {query} in the text "
    "above."
)
ANSWER_PREFIX = (  # RULER's typo "assgined" kept: the prompt must be RULER's
    " Answer: According to the chain(s) of variable assignment in the text above, {num_v} "
    "variables are assgined the value {query}, they are: "
)
NOISE = ("The grass is green. The sky is blue. The sun is yellow. Here we go. There and back "
         "again.\n")
NUM_CHAINS, NUM_HOPS = 1, 4
ICL_TOKENS = 500  # RULER's example budget (its max_seq_length), generation included
MAX_NEW_TOKENS = 30
METRIC = "all"


def _chains(rng: random.Random, is_icl: bool) -> tuple[list[list[str]], list[list[str]]]:
    """RULER's generate_chains, with distinct variable names (RULER can repeat one) and never
    "VAR" (re-randomizing the example replaces names everywhere in its text)."""
    k = 3 if is_icl else 5
    hops = min(10, NUM_HOPS) if is_icl else NUM_HOPS
    names: list[str] = []
    while len(names) < (hops + 1) * NUM_CHAINS:
        name = "".join(rng.choices(string.ascii_uppercase, k=k))
        if name not in names and name != "VAR":
            names.append(name)
    variables, chains = [], []
    for i in range(0, len(names), hops + 1):
        these = names[i:i + hops + 1]
        variables.append(these)
        chain = [f"VAR {these[0]} = {rng.randrange(10000, 99999)}"]
        chain += [f"VAR {these[j + 1]} = VAR {these[j]} " for j in range(hops)]
        chains.append(chain)
    return variables, chains


def _input_output(rng: random.Random, num_noises: int, is_icl: bool) -> tuple[str, list[str]]:
    """RULER's generate_input_output: the task text, answer prefix included, and the answer."""
    variables, chains = _chains(rng, is_icl)
    sentences = [NOISE] * num_noises
    if len(sentences) <= len(chains[0]):  # too few lines: use the noise's sentences
        sentences = [s + "." if s.strip() else s
                     for noise in sentences for s in noise.split(".")]
        if len(sentences) <= len(chains[0]):
            chains = [chain[:len(sentences) - 1] for chain in chains]
    for chain in chains:
        positions = sorted(rng.sample(range(len(sentences)), len(chain)))
        for j, pos in enumerate(positions):
            sentences.insert(pos + j, chain[j])
    context = " ".join(sentences).replace(". \n", ".\n")
    value = chains[0][0].split("=")[-1].strip()
    text = (TEMPLATE + ANSWER_PREFIX).format(context=context, query=value,
                                             num_v=len(chains[0]))
    return text, variables[0]


def _example(length: int, seed: int, measure: PromptMeasure) -> tuple[str, list[str]]:
    """The worked example (text + answer + blank line) and its answer, sized to its budget in
    text tokens (measured whole, minus the chat's own tokens)."""
    budget = (ICL_TOKENS if length >= 4096 else length // 8) - MAX_NEW_TOKENS
    overhead = measure("", "")

    def make(n: int) -> tuple[str, list[str]]:
        text, answer = _input_output(random.Random(seed), n, is_icl=True)
        return f"{text} {' '.join(answer)}\n\n", answer

    n = largest_fitting(1, max(1, budget // 16),
                        lambda n: measure(make(n)[0], "") - overhead <= budget)
    return make(max(n, 1))


def plans(task: str, length: int, seed: int, measure: PromptMeasure,
          sources: TextSources) -> Iterator[Plan]:
    example, example_answer = _example(length, derive_seed(seed, task, length, "icl"), measure)
    index = 0
    while True:
        yield Plan(_builder(example, example_answer, derive_seed(seed, task, length, index)),
                   1, length, "noise lines")
        index += 1


def _builder(example: str, example_answer: list[str], sample_seed: int):
    def build(n: int) -> Draft:
        rng = random.Random(sample_seed)
        icl = example
        for name in example_answer:  # RULER's randomize_icl
            icl = icl.replace(name, "".join(rng.choices(string.ascii_uppercase, k=len(name))))
        text, answer = _input_output(rng, n, is_icl=False)
        text = icl + "\n\n" + text
        cut = text.rfind(ANSWER_PREFIX[:30])
        return Draft(text[:cut], text[cut:].strip(), tuple(answer), {"haystack": "noise"})

    return build
