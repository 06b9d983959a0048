"""One evaluation sample, the token-exact prompt measure and the samples table.

Every generator (NIAH grid, RULER tasks) produces `EvalSample`s sized so that the prompt the
model really sees (chat template, user turn, the answer prefix opening the assistant turn)
plus `max_new_tokens` fits `length`, counted in the model's own tokenizer. All evaluated
models share the base model's tokenizer, so samples are generated once and reused.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import pyarrow as pa

from longctx.errors import LongctxError, one_line
from longctx.llm.hf import render_chat
from longctx.repro import atomic_path
from longctx.tokens import load_tokenizer

Metric = Literal["all", "part"]  # RULER's string_match_all / string_match_part
PromptMeasure = Callable[[str, str], int]  # (user prompt, answer prefix) -> rendered tokens


@dataclass(frozen=True)
class EvalSample:
    task: str  # "niah" (the grid) or a RULER task name
    length: int  # target: prompt tokens + max_new_tokens <= length
    index: int  # sample number within (task, length[, depth])
    prompt: str  # the user turn
    answer_prefix: str  # opens the assistant turn; the model continues it
    references: tuple[str, ...]  # what a correct answer contains
    metric: Metric
    max_new_tokens: int
    prompt_tokens: int  # measured: the rendered chat, answer prefix included
    depth: float | None = None  # NIAH grid: needle depth in percent of the haystack
    meta: dict[str, str] = field(default_factory=dict)  # e.g. the haystack kind


def chat_messages(prompt: str, answer_prefix: str) -> list[dict[str, str]]:
    """The chat a sample is generated from: the user turn, then the assistant's prefix."""
    chat = [{"role": "user", "content": prompt}]
    if answer_prefix:
        chat.append({"role": "assistant", "content": answer_prefix})
    return chat


class ChatMeasure:
    """Token counts of prompts as rendered by the tokenizer's chat template (exact)."""

    def __init__(self, tokenizer_dir: str | Path) -> None:
        self.tokenizer = load_tokenizer(tokenizer_dir)

    def render(self, prompt: str, answer_prefix: str) -> str:
        return render_chat(self.tokenizer, chat_messages(prompt, answer_prefix))

    def __call__(self, prompt: str, answer_prefix: str) -> int:
        text = self.render(prompt, answer_prefix)
        return len(self.tokenizer(text, add_special_tokens=False)["input_ids"])


def largest_fitting(lo: int, hi: int, fits: Callable[[int], bool]) -> int:
    """The largest n in [lo, hi] with fits(n), for a fits that is monotone (true, then false).

    Returns lo - 1 when even lo does not fit. Binary search: O(log(hi - lo)) measurements of
    long prompts instead of RULER's linear growth in fixed increments.
    """
    if hi < lo or not fits(lo):
        return lo - 1
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if fits(mid):
            lo = mid
        else:
            hi = mid - 1
    return lo


_COLUMNS = [f for f in EvalSample.__dataclass_fields__]
# The samples table, one column per EvalSample field, as `sample_row` lays them out.
SCHEMA = pa.schema([
    ("task", pa.string()),
    ("length", pa.int64()),
    ("index", pa.int64()),
    ("prompt", pa.large_string()),  # up to a 1M-token haystack each
    ("answer_prefix", pa.string()),
    ("references", pa.list_(pa.string())),
    ("metric", pa.string()),
    ("max_new_tokens", pa.int64()),
    ("prompt_tokens", pa.int64()),
    ("depth", pa.float64()),
    ("meta", pa.list_(pa.struct([("key", pa.string()), ("value", pa.string())]))),
])


def sample_row(sample: EvalSample) -> dict[str, Any]:
    """A sample as a table row, in the samples table and in a shard's part alike: the
    references a list, the meta its key/value pairs in key order (a stable layout)."""
    row = asdict(sample) | {"references": list(sample.references)}
    row["meta"] = [{"key": k, "value": v} for k, v in sorted(sample.meta.items())]
    return row


def sample_from_row(row: dict[str, Any]) -> EvalSample:
    """The sample of a `sample_row` read back (other columns, as a part's unit, ignored)."""
    return EvalSample(**{name: row[name] for name in _COLUMNS}
                      | {"references": tuple(row["references"]),
                         "meta": {m["key"]: m["value"] for m in row["meta"]}})


def write_samples(path: str | Path, samples: list[EvalSample]) -> None:
    """The samples table (parquet), written atomically."""
    import polars as pl

    schema = pl.from_arrow(SCHEMA.empty_table()).schema
    frame = pl.DataFrame([sample_row(s) for s in samples], schema=schema)
    with atomic_path(path) as tmp:
        frame.write_parquet(tmp)


def read_samples(path: str | Path) -> list[EvalSample]:
    import polars as pl

    try:
        frame = pl.read_parquet(path)
    except (OSError, pl.exceptions.PolarsError) as exc:
        raise LongctxError(f"{path}: cannot read evaluation samples ({one_line(exc)})") from None
    missing = [c for c in _COLUMNS if c not in frame.columns]
    if missing:
        raise LongctxError(f"{path}: not an evaluation samples table (missing {missing})")
    return [sample_from_row(row) for row in frame.iter_rows(named=True)]
