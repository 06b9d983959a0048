"""RULER's question answering (qa_utils.py): qa_1 SQuAD-style, qa_2 HotpotQA-style.

A question's gold documents hide among distractors: first its preferred ones (SQuAD: the
other paragraphs of the same article), then random others, all shuffled and numbered with
RULER's DOCUMENT_PROMPT. Sample i asks question i (RULER's order), cycling when there are
fewer questions than samples; a question whose gold documents alone do not fit the length is
skipped (RULER skips it too). After the search on the number of documents, up to
TOP_UP_TRIES further distractors are tried in the room left, so short lengths stay tight
despite the coarse grain of whole documents. Cloze QA made from the corpus draws its
questions and distractors from the corpus prefix a length needs (`sources.qa_pool_words`), not
from the whole corpus, whose every paragraph a shuffle would otherwise have to hold.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterator

from longctx.errors import LongctxError
from longctx.eval.ruler import Draft, Plan
from longctx.eval.ruler.sources import QAData, QAPair, TextSources
from longctx.eval.samples import PromptMeasure
from longctx.llm.base import derive_seed

TEMPLATE = (
    "Answer the question based on the given documents. Only give me the answer and do not "
    "output any other words.\n\nThe following are given documents.\n\n{context}\n\nAnswer the "
    "question based on the given documents. Only give me the answer and do not output any other "
    "words.\n\nQuestion: {query}"
)
DOCUMENT_PROMPT = "Document {i}:\n{document}"
ANSWER_PREFIX = "Answer:"
MAX_NEW_TOKENS = 32
METRIC = "part"
TOP_UP_TRIES = 8  # measured candidates at most
TOP_UP_SCAN = 64  # candidates looked at


def _sample(data: QAData, pair: QAPair, sample_seed: int, meta: dict[str, str]) -> Plan:
    """Documents in the order they are added: gold, preferred distractors, then the rest."""
    rng = random.Random(sample_seed)
    gold = list(dict.fromkeys(pair.context))
    more = [d for d in dict.fromkeys(pair.more_context) if d not in pair.context]
    rng.shuffle(more)
    taken = set(gold) | set(more)
    others = [d for d in range(len(data.docs)) if d not in taken]
    rng.shuffle(others)
    order = gold + more + others

    def render(chosen: list[int]) -> Draft:
        docs = list(chosen)
        random.Random(sample_seed).shuffle(docs)  # where the gold documents land
        context = "\n\n".join(DOCUMENT_PROMPT.format(i=i + 1, document=data.docs[d])
                              for i, d in enumerate(docs))
        return Draft(TEMPLATE.format(context=context, query=pair.query), ANSWER_PREFIX,
                     pair.outputs, meta | {"documents": str(len(docs))})

    def refine(n: int, room: int, accept: Callable[[Draft], int | None]) -> None:
        chosen, tries = order[:n], TOP_UP_TRIES
        for d in order[n + 1:n + 1 + TOP_UP_SCAN]:  # order[n] did not fit
            if tries == 0:
                break
            # Only documents that might fit (>= 6 characters a token is rare) are measured.
            if len(data.docs[d]) // 6 + 4 > room:
                continue
            tries -= 1
            left = accept(render(chosen + [d]))
            if left is not None:
                chosen, room = chosen + [d], left

    return Plan(lambda n: render(order[:n]), len(gold), len(order), "documents", refine)


def plans(task: str, length: int, seed: int, measure: PromptMeasure,
          sources: TextSources) -> Iterator[Plan]:
    data = sources.qa(task, length)
    budget = length - MAX_NEW_TOKENS
    index, skipped = 0, 0
    for question in _cycle(len(data.pairs)):
        pair = data.pairs[question]
        meta = {"haystack": data.source, "question": str(question)}
        plan = _sample(data, pair, derive_seed(seed, task, length, index), meta)
        gold_only = plan.build(plan.lo)
        if measure(gold_only.prompt, gold_only.answer_prefix) > budget:
            skipped += 1
            if skipped >= len(data.pairs):
                raise LongctxError(
                    f"{task}: length {length} is too small: no question of {data.source} "
                    f"fits with its gold documents and {MAX_NEW_TOKENS} tokens for the answer")
            continue
        skipped = 0
        yield plan
        index += 1


def _cycle(n: int) -> Iterator[int]:
    while True:
        yield from range(n)
