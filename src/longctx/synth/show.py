"""`longctx show <instruction id>`: one instruction's whole story, readable in a terminal.

The instruction and the corpus chunk that inspired it, the retrieved documents (title, score,
length), every summary by level (what it summarises, kept or why dropped, which are final),
and the response with its filter verdict. Tables of steps that have not run yet are skipped.
"""

from __future__ import annotations

import textwrap
from pathlib import Path

import pyarrow.parquet as pq

from longctx.errors import LongctxError
from longctx.retrieval.search import label
from longctx.synth.tables import read_documents, read_table

WIDTH = 100
SEED_CHARS = 300


def _wrap(text: str, indent: str = "    ") -> str:
    paragraphs = [p for p in text.strip().split("\n") if p.strip()] or ["(empty)"]
    return "\n".join(
        textwrap.fill(p, WIDTH, initial_indent=indent, subsequent_indent=indent)
        for p in paragraphs
    )


def _rows_for(path: Path, key: str, value: str) -> list[dict] | None:
    """Rows of one instruction, or None when the step has not written its table yet."""
    if not path.is_file():
        return None
    return pq.read_table(path, filters=[(key, "==", value)]).to_pylist()


def find_instruction(instructions: list[dict], prefix: str, path: Path) -> dict:
    matches = [row for row in instructions if row["id"].startswith(prefix)]
    if len(matches) == 1:
        return matches[0]
    examples = ", ".join(row["id"] for row in (matches or instructions)[:5])
    what = "matches several instructions" if matches else "matches no instruction"
    raise LongctxError(f"{path}: id {prefix!r} {what} (e.g. {examples})")


def _verdict(row: dict) -> str:
    return "kept" if row["kept"] else f"dropped: {row['reason']}"


def show(instruction_id: str, synth_dir: str | Path, docs_path: str | Path) -> str:
    synth = Path(synth_dir)
    path = synth / "instructions.parquet"
    inst = find_instruction(read_table(path, ["id", "instruction", "task_type", "seed_doc_id",
                                              "seed_chunk", "round", "prompt"]),
                            instruction_id, path)
    retrieved = _rows_for(synth / "retrieved.parquet", "instruction_id", inst["id"])
    summaries = _rows_for(synth / "summaries.parquet", "instruction_id", inst["id"])
    responses = _rows_for(synth / "responses.parquet", "instruction_id", inst["id"])
    doc_ids = [inst["seed_doc_id"]] + [d for r in retrieved or [] for d in r["doc_ids"]]
    docs = read_documents(docs_path, doc_ids)

    def title(doc: str) -> str:
        return label(docs[doc]["title"], docs[doc]["text"])

    out = [f"Instruction {inst['id']}  [{inst['task_type']}]  (round {inst['round']}, "
           f"prompt {inst['prompt']})", _wrap(inst["instruction"]), "",
           f"Inspired by a chunk of {inst['seed_doc_id']} ({title(inst['seed_doc_id'])}):",
           _wrap(inst["seed_chunk"][:SEED_CHARS] + (" ..." if len(inst["seed_chunk"]) >
                                                   SEED_CHARS else "")), ""]
    if retrieved is None:
        return "\n".join(out + ["(retrieve has not run yet)"])
    hits = list(zip(retrieved[0]["doc_ids"], retrieved[0]["scores"])) if retrieved else []
    rank = {doc: i for i, (doc, _) in enumerate(hits, 1)}
    out.append(f"Retrieved documents ({len(hits)}):")
    out += [f"  {i:>2}  {score:.4f}  {doc}  {title(doc)}  ({docs[doc]['n_tokens']:,} tokens)"
            for i, (doc, score) in enumerate(hits, 1)]
    out.append("")
    if summaries is None:
        return "\n".join(out + ["(summarize has not run yet)"])
    out.append(f"Summaries ({sum(r['final'] for r in summaries)} final):")
    for row in sorted(summaries, key=lambda r: (r["level"], r["position"])):
        if row["level"] == 0:
            doc = row["doc_id"]
            what = f"doc {rank.get(doc, '?')} ({title(doc)}), chunk {row['chunk']}"
        else:
            what = f"merges level-{row['level'] - 1} #{','.join(map(str, row['children']))}"
        final = ", FINAL" if row["final"] else ""
        out.append(f"  level {row['level']} #{row['position']}  {what}  "
                   f"[{_verdict(row)}{final}, {row['n_tokens']} tokens]")
        if row["kept"] or row["summary"].strip():
            out.append(_wrap(row["summary"], "      "))
    out.append("")
    if not responses:
        return "\n".join(out + ["(respond has not run yet)"])
    row = responses[0]
    out += [f"Response [{_verdict(row)}, finish {row['finish_reason']}, "
            f"{row['n_tokens']} tokens]:", _wrap(row["response"])]
    return "\n".join(out)
