"""`longctx pack-show`: the token-role view of packed sequences (as open-instruct's
visualize_token_role): each sample's text with the tokens that carry loss marked, so a wrong
loss mask is seen at a glance rather than inferred from a loss curve."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from longctx.errors import LongctxError
from longctx.sequences import read_sequences
from longctx.tokens import load_tokenizer

GREEN, GREY, RESET = "\x1b[32m", "\x1b[90m", "\x1b[0m"


def _spans(tokenizer: Any, ids: list[int], learn: list[bool], color: bool) -> str:
    """Decoded text, runs of learnt tokens green (or in [[ ]]) and the others grey."""
    out, start = [], 0
    while start < len(ids):
        end = start
        while end < len(ids) and learn[end] == learn[start]:
            end += 1
        text = tokenizer.decode(ids[start:end], skip_special_tokens=False,
                                clean_up_tokenization_spaces=False)
        if color:
            out.append((GREEN if learn[start] else GREY) + text + RESET)
        else:
            out.append(f"[[{text}]]" if learn[start] else text)
        start = end
    return "".join(out)


def render_sample(tokenizer: Any, ids: list[int], learn: list[bool], color: bool,
                  max_tokens: int | None = None) -> str:
    """One sample's text; with max_tokens, its middle is elided."""
    if max_tokens is None or len(ids) <= max_tokens:
        return _spans(tokenizer, ids, learn, color)
    head, tail = (max_tokens + 1) // 2, max_tokens // 2
    skipped = f"\n… {len(ids) - head - tail} tokens …\n"
    end = _spans(tokenizer, ids[len(ids) - tail:], learn[len(learn) - tail:], color) \
        if tail else ""
    return _spans(tokenizer, ids[:head], learn[:head], color) + \
        (GREY + skipped + RESET if color else skipped) + end


def pack_show(path: str | Path, model_dir: str | Path, sequence: int | None = None,
              color: str = "auto", max_tokens: int | None = None) -> str:
    """The token-role view of sequences.parquet: every sequence (or one), sample by sample,
    with the tokens that carry loss marked."""
    if max_tokens is not None and max_tokens < 1:
        raise LongctxError(f"--max-tokens must be positive, got {max_tokens}")
    table = read_sequences(path)
    if not Path(model_dir).is_dir():
        raise LongctxError(f"{model_dir}: model directory not found (--model)")
    tokenizer = load_tokenizer(model_dir)
    use_color = color == "always" or (color == "auto" and sys.stdout.isatty())
    if sequence is not None and not 0 <= sequence < len(table):
        raise LongctxError(f"{path}: no sequence {sequence} (it has {len(table)})")
    out = []
    for i in [sequence] if sequence is not None else range(len(table)):
        ids, learn, lengths, kind = table[i]
        names = table.sample_ids(i)
        out.append(f"═══ sequence {i} of {len(table)} · {kind} · {len(lengths)} samples · "
                   f"{len(ids)} tokens · {sum(learn)} learnt ═══")
        start = 0
        for k, (n, name) in enumerate(zip(lengths, names), 1):
            part_ids, part_learn = ids[start:start + n], learn[start:start + n]
            out.append(f"── sample {k}/{len(lengths)} · {kind} · {name} · {n} tokens · "
                       f"{sum(part_learn)} learnt ──")
            out.append(render_sample(tokenizer, part_ids, part_learn, use_color, max_tokens))
            start += n
    return "\n".join(out)
