"""Every prompt the synthesis steps send, in one place, each with a version.

The version is part of every call's cache key: edit a template's wording and bump its
version, and exactly the calls made with it are regenerated. Prompts are written for small
instruction models too (SmolLM2-135M bootstraps itself in the demo): one task per prompt,
plain words, the expected shape of the answer stated last.
"""

from __future__ import annotations

from longctx.llm.base import Chat

VERSIONS = {
    "instructions": "instructions/1",
    "qfs": "qfs/1",
    "merge": "merge/1",
    "respond": "respond/1",
    "backtranslate": "backtranslate/1",
}

NOTHING_RELEVANT = "NOTHING RELEVANT"  # the QFS agent's answer for an irrelevant chunk


def _user(text: str) -> Chat:
    return [{"role": "user", "content": text}]


def _quoted(text: str) -> str:
    return '"""\n' + text.strip() + '\n"""'


def _notes(summaries: list[str]) -> str:
    return "\n\n".join(f"[{i}] {s.strip()}" for i, s in enumerate(summaries, 1))


def instructions_prompt(seed_chunk: str, task_type: str, n: int) -> Chat:
    """Ask for `n` instructions of one task type; the random corpus chunk in front is the
    paper's source of diversity. Asking for "questions or requests" (not "instructions")
    keeps small models from writing about instructions themselves."""
    return _user(
        f"Read this text:\n{_quoted(seed_chunk)}\n\n"
        f"Write {n} questions or requests that a curious user could ask an AI assistant about "
        f"the topics of this text. Each one asks for a {task_type} and needs facts from "
        "several documents. Each must make sense on its own, without the text.\n"
        f"Write one per line, numbered 1 to {n}, and nothing else."
    )


def qfs_prompt(instruction: str, chunk: str) -> Chat:
    """Query-focused summary of one document chunk (level 0)."""
    return _user(
        f"Instruction: {instruction.strip()}\n\nDocument excerpt:\n{_quoted(chunk)}\n\n"
        "Write down, in a few sentences, only the information from the excerpt that helps "
        "to carry out the instruction. If the excerpt contains nothing relevant to the "
        f"instruction, answer exactly: {NOTHING_RELEVANT}"
    )


def merge_prompt(instruction: str, summaries: list[str]) -> Chat:
    """Summary of a group of summaries (level >= 1), when they do not fit the budget yet."""
    return _user(
        f"Instruction: {instruction.strip()}\n\nNotes taken from several documents:\n"
        f"{_notes(summaries)}\n\n"
        "Combine these notes into one shorter text that keeps every fact relevant to the "
        "instruction and drops repetitions. Write only the combined text."
    )


def respond_prompt(instruction: str, summaries: list[str]) -> Chat:
    """The answer to the instruction, written from the final summaries."""
    return _user(
        f"Information from the relevant documents:\n{_notes(summaries)}\n\n"
        f"Using this information, carry out the following instruction.\n\n{instruction.strip()}"
    )


def backtranslate_prompt(excerpt: str, words: int) -> Chat:
    """A writing instruction whose ideal answer is the whole target document."""
    return _user(
        f"Here is a text (its beginning and its end):\n{_quoted(excerpt)}\n\n"
        "Write an instruction that asks an AI assistant to write this text. Start with "
        "\"Write a\", then say what kind of text it is (article, story, report, ...), its topic "
        f"and its length of about {words} words. Answer with the instruction only, in one "
        "sentence."
    )
