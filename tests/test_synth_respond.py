"""Rule respond: answers written from the final summaries, filtered with a reason each."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from llm_data import build_tiny_chat_model
from synth_data import run_sharded, scripted_llm

from longctx.config import RespondConfig
from longctx.errors import LongctxError
from longctx.synth.respond import REASONS, RESPONSES_SCHEMA, gather_responses, respond
from longctx.synth.tables import write_table

INSTRUCTIONS_SCHEMA = pa.schema([("id", pa.string()), ("instruction", pa.string())])
SUMMARIES_SCHEMA = pa.schema([
    ("instruction_id", pa.string()), ("level", pa.int32()), ("position", pa.int32()),
    ("summary", pa.large_string()), ("kept", pa.bool_()), ("final", pa.bool_()),
])
GOOD = ("Volcanoes erupt when magma rises through the crust, and the lava and ash that follow "
        "bury the towns around them.")


def write_inputs(tmp: Path, instructions: dict[str, str],
                 summaries: list[tuple[str, int, int, str, bool]]) -> tuple[Path, Path]:
    """instructions: {id: text}; summaries: (instruction_id, level, position, text, final)."""
    ipath, spath = tmp / "instructions.parquet", tmp / "summaries.parquet"
    write_table(ipath, [{"id": k, "instruction": v} for k, v in instructions.items()],
                INSTRUCTIONS_SCHEMA)
    write_table(spath, [{"instruction_id": i, "level": lv, "position": p, "summary": s,
                         "kept": True, "final": f} for i, lv, p, s, f in summaries],
                SUMMARIES_SCHEMA)
    return ipath, spath


def one_each(instructions: dict[str, str]) -> list[tuple[str, int, int, str, bool]]:
    return [(i, 0, 0, f"note for {i}", True) for i in instructions]


def run(tmp: Path, llm, instructions: dict[str, str], summaries=None, seed: int = 7,
        shards: int = 1, **cfg) -> tuple[dict, dict[str, dict]]:
    ipath, spath = write_inputs(tmp, instructions,
                                one_each(instructions) if summaries is None else summaries)
    stats = run_sharded(respond, gather_responses, RespondConfig(**cfg), llm, seed,
                        shards=shards, instructions=ipath, summaries=spath,
                        responses=tmp / "responses.parquet", metrics=tmp / "stats.json")
    rows = pq.read_table(tmp / "responses.parquet").to_pylist()
    return stats, {r["instruction_id"]: r for r in rows}


def by_instruction(answers: dict[str, str]):
    """A reply function answering each instruction (the prompt's last line) from a table."""
    return lambda message: answers[message.strip().splitlines()[-1]]


def test_each_filter_gives_its_reason(tmp_path):
    answers = {
        "good": GOOD,
        "empty": "   \n ",
        "cut": GOOD + " And then\x00",
        "sorry": "I'm sorry, but the documents do not say anything about that topic at all.",
        "cannot": "I cannot answer this question from the information that was given to me.",
        "ai": "As an AI language model, I have no opinions about volcanoes or their eruptions.",
        "noinfo": "The documents do not contain any details about the eruption of this volcano.",
        "short": "Lava flows.",
        "loop": "The lava flows down the hill. " * 6,
        "ngrams": "lava ash lava ash " * 10 + "and then the town was buried under it all",
    }
    llm = scripted_llm(by_instruction(answers))
    stats, rows = run(tmp_path, llm, {k: k for k in answers})
    reasons = {k: rows[k]["reason"] for k in answers}
    assert reasons == {"good": None, "empty": "empty", "cut": "truncated", "sorry": "refusal",
                       "cannot": "refusal", "ai": "refusal", "noinfo": "refusal",
                       "short": "too_short", "loop": "repetitive", "ngrams": "repetitive"}
    assert rows["good"]["kept"] and rows["good"]["response"] == GOOD
    assert rows["good"]["n_tokens"] == len(GOOD.split())
    assert rows["empty"]["response"] == ""
    assert rows["cut"]["finish_reason"] == "length"
    assert stats["kept"] == 1 and stats["instructions"] == len(answers) == stats["called"]
    assert stats["dropped"] == {"no_summaries": 0, "empty": 1, "truncated": 1, "refusal": 4,
                                "too_short": 1, "repetitive": 2}
    assert stats["finish_reasons"] == {"stop": 9, "length": 1, "none": 0}
    assert stats["response_tokens"] == {"mean": len(GOOD.split()), "max": len(GOOD.split())}


def test_keep_truncated_keeps_cut_answers_and_refusal_needs_an_opening(tmp_path):
    answers = {"cut": GOOD + "\x00",
               "later": "The eruption was huge. I cannot say how many people left the town."}
    stats, rows = run(tmp_path, scripted_llm(by_instruction(answers)), {k: k for k in answers},
                      keep_truncated=True)
    assert rows["cut"]["kept"] and rows["cut"]["finish_reason"] == "length"
    assert rows["later"]["kept"]  # "I cannot" in the second sentence is not a refusal
    assert stats["kept"] == 2


def test_thresholds_come_from_the_config(tmp_path):
    half_repeated = "lava ash smoke rock dust heat glow fire " * 2  # 5 of 13 4-grams repeat
    answers = {"three": "Lava is hot.", "half": half_repeated}
    _, strict = run(tmp_path, scripted_llm(by_instruction(answers)), {k: k for k in answers})
    assert strict["three"]["reason"] == "too_short" and strict["half"]["reason"] == "repetitive"
    _, loose = run(tmp_path, scripted_llm(by_instruction(answers)), {k: k for k in answers},
                   min_words=3, max_repeated_fraction=0.5)
    assert loose["three"]["kept"] and loose["half"]["kept"]


def test_a_sentence_said_three_times_is_repetitive(tmp_path):
    filler = [" ".join(f"w{i}x{j}" for j in range(15)) + "." for i in range(4)]
    looping = " It was very hot. ".join(filler)  # 3 repeats, few repeated 4-grams
    twice = " It was very hot. ".join(filler[:3])
    answers = {"looping": looping, "twice": twice}
    _, rows = run(tmp_path, scripted_llm(by_instruction(answers)), {k: k for k in answers})
    assert rows["looping"]["reason"] == "repetitive"
    assert rows["twice"]["kept"]


def test_instructions_without_final_summaries_are_not_sent(tmp_path):
    llm = scripted_llm(lambda message: GOOD)
    summaries = [("a", 0, 0, "final note", True), ("b", 0, 0, "draft note", False)]
    stats, rows = run(tmp_path, llm, {"a": "ask a", "b": "ask b", "c": "ask c"}, summaries)
    assert len(llm.backend.served) == 1 and llm.backend.served[0].endswith("ask a")
    for iid in ("b", "c"):
        assert rows[iid] == {"instruction_id": iid, "response": "", "finish_reason": "none",
                             "n_tokens": 0, "kept": False, "reason": "no_summaries"}
    assert stats["called"] == 1 and stats["dropped"]["no_summaries"] == 2
    assert stats["finish_reasons"]["none"] == 2


def test_prompt_holds_only_final_summaries_in_level_position_order(tmp_path):
    llm = scripted_llm(lambda message: GOOD)
    summaries = [("a", 1, 1, "MERGED-TWO", True), ("a", 0, 3, "LEAF-FINAL", True),
                 ("a", 1, 0, "MERGED-ONE", True), ("a", 0, 0, "LEAF-SUPERSEDED", False),
                 ("a", 0, 1, "LEAF-DROPPED", False)]
    run(tmp_path, llm, {"a": "Describe volcanoes."}, summaries)
    (prompt,) = llm.backend.served
    assert "SUPERSEDED" not in prompt and "DROPPED" not in prompt
    order = [prompt.index(s) for s in ("LEAF-FINAL", "MERGED-ONE", "MERGED-TWO")]
    assert order == sorted(order)
    assert prompt.rstrip().endswith("Describe volcanoes.")


def test_rows_follow_the_instructions_table_and_accounting_holds(tmp_path):
    instructions = {f"id{i}": f"instruction {i}" for i in (3, 1, 2, 0)}
    stats, _ = run(tmp_path, scripted_llm(lambda m: GOOD), instructions,
                   one_each(instructions)[:3])
    table = pq.read_table(tmp_path / "responses.parquet")
    assert table.schema == RESPONSES_SCHEMA
    assert table.column("instruction_id").to_pylist() == list(instructions)
    assert stats["kept"] + sum(stats["dropped"].values()) == stats["instructions"] == 4
    assert set(stats["dropped"]) == set(REASONS)
    assert json.loads((tmp_path / "stats.json").read_text()) == stats


def test_same_seed_gives_identical_bytes_and_the_cache_serves_the_rerun(tmp_path):
    instructions = {"a": "ask a", "b": "ask b"}
    outs = []
    for name in ("one", "two"):
        out = tmp_path / name
        out.mkdir()
        llm = scripted_llm(lambda m: GOOD, cache_path=tmp_path / "cache.sqlite")
        run(out, llm, instructions, temperature=0.7)
        outs.append(((out / "responses.parquet").read_bytes(), (out / "stats.json").read_bytes()))
        llm.close()
    assert outs[0] == outs[1]
    assert llm.backend.served == []  # the second run came from the cache


def test_unknown_instruction_id_in_summaries_is_an_error(tmp_path):
    llm = scripted_llm(lambda m: GOOD)
    with pytest.raises(LongctxError, match=r"summaries\.parquet.*'ghost'"):
        run(tmp_path, llm, {"a": "ask a"}, [("a", 0, 0, "n", True), ("ghost", 0, 0, "n", True)])
    assert llm.backend.served == []
    assert not (tmp_path / "responses.parquet").exists()


def test_runs_on_a_real_transformers_model(tmp_path):
    from longctx.llm import LLM, CallCache
    from longctx.llm.hf import HFBackend

    llm = LLM(HFBackend(build_tiny_chat_model(tmp_path / "tiny")),
              CallCache(tmp_path / "c.sqlite"), batch_size=4)
    instructions = {"a": "Compare two volcanoes.", "b": "Explain jazz.", "c": "List bees."}
    stats, rows = run(tmp_path, llm, instructions, one_each(instructions)[:2],
                      max_new_tokens=8)
    llm.close()
    assert pq.read_table(tmp_path / "responses.parquet").schema == RESPONSES_SCHEMA
    assert stats["called"] == 2 and rows["c"]["reason"] == "no_summaries"
    assert stats["kept"] + sum(stats["dropped"].values()) == stats["instructions"] == 3
    assert all(0 < rows[i]["n_tokens"] <= 8 for i in ("a", "b"))
    assert sum(stats["finish_reasons"].values()) == 3
