"""Token counts and token-exact chunking, in the generator's tokenizer.

The corpus step counts document lengths, and the summarize step cuts documents into chunks
that must fit the short model, so both count the same way: special tokens excluded, no
truncation. Chunks are cut on the largest boundary that works (paragraph, line, sentence,
word, and characters only for a "word" longer than a chunk) and every chunk is verified by
counting it whole, so `chunk_tokens` is a hard limit, not an estimate.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

from longctx.errors import LongctxError, one_line

Counter = Callable[[list[str]], list[int]]

# Boundaries from largest to smallest; each pattern matches the separator between pieces.
_SEPARATORS = [re.compile(r"\n\s*\n"), re.compile(r"\n"), re.compile(r"(?<=[.!?])\s+"),
               re.compile(r"\s+")]


def load_tokenizer(model_dir: str | Path) -> Any:
    """The transformers tokenizer (and chat template) of a local model dir; the errors name
    the dir. Checked first: a missing path would be taken for a hub id."""
    from transformers import AutoTokenizer  # slow import, only when tokens are needed

    if not Path(model_dir).is_dir():
        raise LongctxError(f"{model_dir}: model directory not found")
    try:
        return AutoTokenizer.from_pretrained(str(model_dir))
    except (OSError, ValueError) as exc:
        raise LongctxError(f"{model_dir}: cannot load a tokenizer ({one_line(exc)})") from None


def token_counter(tokenizer: str | Path | Any) -> Counter:
    """Batched token counts without special tokens, of a model dir's tokenizer or of one
    loaded. The fast backend is called directly, with the truncation/padding its
    tokenizer.json may carry switched off (they would cap counts)."""
    tok = load_tokenizer(tokenizer) if isinstance(tokenizer, (str, Path)) else tokenizer
    backend = getattr(tok, "backend_tokenizer", None)
    if backend is None:
        return lambda texts: [
            len(ids) for ids in tok(texts, add_special_tokens=False, verbose=False)["input_ids"]
        ]
    backend.no_truncation()
    backend.no_padding()
    encode = partial(backend.encode_batch_fast, add_special_tokens=False)
    return lambda texts: [len(enc) for enc in encode(texts)]


def _split_keep(text: str, level: int) -> list[str]:
    """Cut `text` at the level's separators; each piece keeps the separator that follows it,
    so joining the pieces gives back `text` exactly."""
    pieces, start = [], 0
    for match in _SEPARATORS[level].finditer(text):
        if match.start() > start:
            pieces.append(text[start:match.end()])
            start = match.end()
    if start < len(text):
        pieces.append(text[start:])
    return pieces or [text]


def _chars(text: str, max_tokens: int, count: Counter) -> list[str]:
    """Last resort for one enormous 'word': the longest prefixes that fit, by bisection."""
    out = []
    while text:
        lo, hi = 1, len(text)
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if count([text[:mid]])[0] <= max_tokens:
                lo = mid
            else:
                hi = mid - 1
        out.append(text[:lo])
        text = text[lo:]
    return out


def _pieces(text: str, max_tokens: int, count: Counter, level: int = 0) -> list[str]:
    """Pieces of `text` in order, each at most `max_tokens`, cut at the largest boundary."""
    if level == len(_SEPARATORS):
        return _chars(text, max_tokens, count)
    parts = _split_keep(text, level)
    sizes = count(parts)
    out: list[str] = []
    for part, n in zip(parts, sizes):
        out.extend([part] if n <= max_tokens else _pieces(part, max_tokens, count, level + 1))
    return out


def split_chunks(text: str, max_tokens: int, count: Counter) -> list[str]:
    """`text` as consecutive chunks of at most `max_tokens` tokens each ("".join(chunks) ==
    text), filled greedily with whole paragraphs, then lines, sentences and words."""
    if max_tokens < 1:
        raise ValueError(f"max_tokens must be positive, got {max_tokens}")
    if not text.strip():
        return []
    if count([text])[0] <= max_tokens:
        return [text]
    pieces = _pieces(text, max_tokens, count)
    sizes = count(pieces)
    groups: list[list[str]] = []
    total = 0
    for piece, n in zip(pieces, sizes):
        if groups and total + n <= max_tokens:  # the sum is an estimate: merges at the seams
            groups[-1].append(piece)
            total += n
        else:
            groups.append([piece])
            total = n
    return _verified(groups, max_tokens, count)


def _verified(groups: list[list[str]], max_tokens: int, count: Counter) -> list[str]:
    """Count every chunk whole; one over the limit (a merge across a seam) is halved."""
    chunks = ["".join(g) for g in groups]
    out: list[str] = []
    for group, chunk, n in zip(groups, chunks, count(chunks)):
        if n <= max_tokens or len(group) == 1:
            out.append(chunk)
        else:
            half = len(group) // 2
            out.extend(_verified([group[:half], group[half:]], max_tokens, count))
    return out
