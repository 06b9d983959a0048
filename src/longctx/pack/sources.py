"""The other sample kinds: long_output (a writing instruction -> a long document, every token
learnt) and short (chats whose assistant turns are learnt): by default the summarization calls
themselves, their prompts rebuilt exactly as summarize sent them, or the chats of a file."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from tqdm import tqdm

from longctx.config import PackConfig
from longctx.errors import LongctxError
from longctx.pack.chat import ROLES, Chat, ChatTokenizer
from longctx.pack.spill import Spill, Spilled
from longctx.synth.prompts import merge_prompt, qfs_prompt
from longctx.synth.tables import (
    check_instruction_ids,
    read_documents,
    read_instructions,
    read_table,
)


def long_output_samples(chat: ChatTokenizer, length: int, path: Path, spill: Spill
                         ) -> tuple[list[Spilled], dict]:
    rows = [r for r in read_table(path, ["id", "instruction", "target", "kept"]) if r["kept"]]
    samples, reasons = [], []
    for row in tqdm(rows, desc="pack long_output", unit="sample", disable=None):
        messages = [{"role": "user", "content": row["instruction"]},
                    {"role": "assistant", "content": row["target"]}]
        sample = chat.all_learnt(row["id"], messages)
        if len(sample) > length:
            reasons.append("too_long")
        else:
            samples.append(spill.add(sample))
    return samples, {"available_samples": len(rows), "reasons": reasons}


def qfs_chats(summaries_path: Path, instructions_path: Path, docs_path: Path
              ) -> list[tuple[str, Chat]]:
    """Every summarization call with a kept answer, as (instruction_id/level/position, the
    prompt exactly as summarize sent it + the summary)."""
    columns = ["instruction_id", "level", "position", "doc_id", "char_start", "char_end",
               "children", "summary", "kept", "finish_reason"]
    rows = read_table(summaries_path, columns)
    texts = read_instructions(instructions_path)
    by_key = {(r["instruction_id"], r["level"], r["position"]): r for r in rows}
    calls = [r for r in rows if r["kept"] and r["finish_reason"] != "carried"]
    docs = read_documents(docs_path, [r["doc_id"] for r in calls if r["level"] == 0])
    check_instruction_ids([r["instruction_id"] for r in calls], texts, summaries_path,
                          instructions_path, "summarize")
    out = []
    for r in calls:
        key = f"{r['instruction_id']}/{r['level']}/{r['position']}"
        instruction = texts[r["instruction_id"]]
        if r["level"] == 0:
            if r["char_start"] is None or r["char_end"] is None:
                raise LongctxError(f"{summaries_path}: summary {key} has no chunk offsets "
                                   "(rerun summarize)")
            prompt = qfs_prompt(instruction, docs[r["doc_id"]]["text"][
                r["char_start"]:r["char_end"]])
        else:
            prompt = merge_prompt(instruction, _merged_notes(r, by_key, key, summaries_path))
        out.append((key, prompt + [{"role": "assistant", "content": r["summary"]}]))
    return out


def _merged_notes(row: dict, by_key: dict, key: str, summaries_path: Path) -> list[str]:
    """The summaries one level down that a merge call read, in its order."""
    notes = []
    for child in row["children"] or []:
        below = by_key.get((row["instruction_id"], row["level"] - 1, child))
        if below is None:
            raise LongctxError(f"{summaries_path}: summary {key} merges position "
                               f"{child} of level {row['level'] - 1}, which is missing")
        notes.append(below["summary"])
    return notes


def _check_chat(chat: Any, where: str) -> Chat:
    if not isinstance(chat, list) or not chat:
        raise LongctxError(f"{where}: `messages` must be a non-empty list of {{role, content}}")
    for i, m in enumerate(chat):
        if not isinstance(m, dict) or m.get("role") not in ROLES \
                or not isinstance(m.get("content"), str):
            raise LongctxError(f"{where}: message {i} must be {{role: one of "
                               f"{'/'.join(ROLES)}, content: a string}}, got {str(m)[:80]!r}")
    if not any(m["role"] == "assistant" for m in chat):
        raise LongctxError(f"{where}: no assistant message to learn from")
    return [{"role": m["role"], "content": m["content"]} for m in chat]


def file_chats(path: str | Path) -> list[tuple[str, Chat]]:
    """The chats of a parquet or jsonl file with a `messages` column/key, as ("file:<record>",
    chat); errors name the file and the record (0-based; jsonl also the line). A file without
    records is an error: else the stage's short share would silently go to the other kinds."""
    path = Path(path)
    if not path.is_file():
        raise LongctxError(f"{path}: chat file not found (pack.short_path)")
    if path.stat().st_size == 0:
        raise LongctxError(f"pack.short_path: {path} holds no records (0 bytes)")
    records: list[tuple[str, Any]] = []
    if path.suffix == ".parquet":
        for i, chat in enumerate(read_table(path, ["messages"])):
            records.append((f"{path}: record {i}", chat["messages"]))
    elif path.suffix in (".jsonl", ".json"):
        records = _jsonl_records(path)
    else:
        raise LongctxError(f"{path}: chat files are .parquet or .jsonl")
    if not records:
        raise LongctxError(f"pack.short_path: {path} holds no records")
    return [(f"file:{i}", _check_chat(chat, where)) for i, (where, chat) in enumerate(records)]


def _jsonl_records(path: Path) -> list[tuple[str, Any]]:
    """(where, messages) of each non-blank line of a jsonl chat file."""
    records: list[tuple[str, Any]] = []
    for line_no, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        where = f"{path}: record {len(records)} (line {line_no})"
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise LongctxError(f"{where}: not JSON ({exc.msg})") from None
        if not isinstance(record, dict) or "messages" not in record:
            raise LongctxError(f"{where}: no `messages` key")
        records.append((where, record["messages"]))
    return records


def short_samples(cfg: PackConfig, chat: ChatTokenizer, length: int, paths: dict[str, Path],
                  spill: Spill) -> tuple[list[Spilled], dict]:
    if cfg.short_source == "file":
        chats = file_chats(cfg.short_path)
    else:
        chats = qfs_chats(paths["summaries"], paths["instructions"], paths["docs"])
    samples, reasons = [], []
    for key, messages in tqdm(chats, desc="pack short", unit="sample", disable=None):
        sample = chat.assistant_learnt(key, messages)
        if len(sample) > length:
            reasons.append("too_long")
        else:
            samples.append(spill.add(sample))
    return samples, {"available_samples": len(chats), "reasons": reasons}

