"""`longctx plan`: what a profile costs, and the profiles it refuses before anything runs."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from retrieval_data import write_topic_docs
from synth_data import run_sharded, scripted_llm

from longctx.cli import main
from longctx.config import load_params, validate_params
from longctx.costs import Models, Rates, estimate
from longctx.costs_models import Corpus, shape_from_config
from longctx.synth.instructions import first_round, gather_instructions

ROOT = Path(__file__).resolve().parent.parent
PAPER = ROOT / "configs" / "paper-8b-1m.yaml"
MICRO = ROOT / "configs" / "micro.yaml"
NOWHERE = ["--docs", "no/such/docs.parquet", "--base-dir", "no/such/model"]


def plan(path: Path, *flags: str) -> int:
    return main(["plan", str(path), *NOWHERE, *flags])


def unfixed_paper(tmp_path: Path) -> Path:
    """The paper profile as it was before `longctx plan` existed: fill_top_k 256, no
    sequences per stage."""
    data = yaml.safe_load(PAPER.read_text())
    data["pack"]["fill_top_k"] = 256
    for stage in data["stages"]["schedule"]:
        stage.pop("sequences", None)
    path = tmp_path / "paper-unfixed.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def test_the_unfixed_paper_profile_is_refused_naming_the_keys(tmp_path, capsys):
    assert plan(unfixed_paper(tmp_path)) == 1
    err = capsys.readouterr().err
    refused = [line for line in err.splitlines() if "refused:" in line]
    assert any("pack.fill_top_k" in line and "stage(s) 1, 2" in line for line in refused)
    for k in range(3):
        assert any(f"stages.schedule[{k}].sequences" in line for line in refused)
    assert len(refused) == 4


def test_the_paper_profile_passes_and_prints_every_step(capsys):
    assert plan(PAPER) == 0
    out = capsys.readouterr().out
    for step in ("embed", "index", "instructions", "summarize", "respond", "long_output",
                 "pack", "train_stage"):
        assert f"\n{step} " in out
    assert "1,048,576" in out and out.rstrip().endswith("ok")


@pytest.mark.parametrize("profile", ["params.yaml", "configs/micro.yaml",
                                     "configs/gpu-small.yaml"])
def test_the_other_profiles_pass(profile):
    assert plan(ROOT / profile) == 0


def test_an_unknown_model_names_the_flag_to_give(tmp_path, capsys):
    data = yaml.safe_load(PAPER.read_text())
    data["embed"]["model"] = "someone/unknown-embedder"
    path = tmp_path / "p.yaml"
    path.write_text(yaml.safe_dump(data))
    assert plan(path) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert "embed.model" in err and "--embed-config" in err


def test_a_params_file_that_does_not_validate_is_one_line(tmp_path, capsys):
    path = tmp_path / "p.yaml"
    path.write_text("pack: {fill_top_k: '8'}\n")
    assert plan(path) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "pack.fill_top_k" in err


# --------------------------------------------------------------------------- by hand

TINY = dict(model_type="llama", hidden_size=8, num_hidden_layers=2, num_attention_heads=2,
            num_key_value_heads=2, head_dim=4, intermediate_size=16, vocab_size=10,
            tie_word_embeddings=False, max_position_embeddings=8192, rope_theta=10000.0)
EMBED = dict(TINY, hidden_size=16, head_dim=8)


def test_a_sharded_step_counts_its_shard_jobs_and_the_gather():
    rows = {r.step: r for r in hand_plan(shards={"default": 3, "respond": 5}).rows}
    assert (rows["summarize"].jobs, rows["respond"].jobs, rows["long_output"].jobs) == (4, 6, 4)
    assert (rows["embed"].jobs, rows["index"].jobs) == (4, 1)


def test_more_shards_than_a_steps_work_is_refused_naming_the_key():
    problems = hand_plan(shards={"default": 2, "summarize": 5, "ruler_samples": 99}).problems
    # 1000 documents make 1 embedding file (8192 each); 4 instructions; 13 tasks x 4 lengths
    assert problems == [
        "shards.embed=2 is more than the 1 embedding files (embed.shard_size documents each) "
        "to split; lower shards.embed",
        "shards.summarize=5 is more than the 4 instructions to split; lower shards.summarize",
        "shards.ruler_samples=99 is more than the 52 RULER task-length pairs to split; lower "
        "shards.ruler_samples"]


def hand_plan(window: int = 8192, shards: dict | None = None):
    params = validate_params({
        "shards": shards or {},
        "retrieve": {"top_k": 8},
        "instructions": {"count": 4, "per_prompt": 2},
        "summarize": {"chunk_tokens": 512, "budget_tokens": 64, "max_new_tokens": 32},
        "embed": {"max_tokens": 256},
        "index": {"type": "flat"},
        "pack": {"fill_top_k": 8, "min_fill": 0.5},
        "stages": {"base_length": 512, "schedule": [{"length": 1024, "steps": 2}]},
        "train": {"attention": "sdpa"},
    })
    base = shape_from_config(TINY | {"max_position_embeddings": window}, "tiny", "test")
    models = Models(base, base, shape_from_config(EMBED, "emb", "test"))
    return estimate(params, models, Corpus(1000, 500.0, "test"), Rates())


def test_flops_bytes_and_calls_of_a_small_config_are_the_hand_computed_ones():
    result = hand_plan()
    rows = {r.step: r for r in result.rows}
    # parameters: 2 layers x (attention 8*4*(2*2 + 2*2) + MLP 3*8*16 + norms 2*8) + norm 8,
    # plus the output projection 10*8 that every token goes through
    n = 2 * (8 * 4 * 8 + 3 * 8 * 16 + 2 * 8) + 8 + 10 * 8
    stage = result.stages[0]
    assert stage.need == 2 and stage.tokens == 2 * 1024
    assert stage.flops_linear == 6 * n * 2048
    assert stage.flops_attention == 6 * 2 * 8 * 2048 * 1024  # sdpa: every pair of the stage
    assert rows["embed"].disk == 1000 * 16 * 2 and rows["index"].disk == 1000 * 16 * 4
    # 8 documents of 500 tokens, one chunk each; 8 x 32 > 64 tokens: one merge of all 8
    # (512 // (32 + 4) = 14 per group), and 32 <= 64 ends it
    assert rows["summarize"].calls == 4 * 8 + 4 * 1
    assert rows["respond"].calls == 4
    assert rows["instructions"].calls == 3  # ceil(1.5 x 4 / 2)
    assert not result.problems


def test_prompts_larger_than_the_generator_window_are_refused_by_key():
    problems = hand_plan(window=600).problems  # respond's default 1024 new tokens do not fit
    assert [p.split(":")[0] for p in problems] == ["summarize.chunk_tokens",
                                                   "summarize.budget_tokens",
                                                   "long_output.excerpt_tokens",
                                                   "instructions.seed_chunk_tokens"]
    assert problems[0].startswith("summarize.chunk_tokens: 512 + ~")
    assert all("600-token window" in p for p in problems)


# --------------------------------------------------------------------------- the steps agree

POOL = [f"Compare what several documents say about {a} and {b} over the last century."
        for a, b in [("volcanoes", "glaciers"), ("jazz", "opera"), ("bees", "coral"),
                     ("chess", "go"), ("bread", "beer"), ("vaccines", "epidemics")]]


def micro_rows() -> dict:
    params = load_params(MICRO)
    base = shape_from_config(TINY, "tiny", "test")
    result = estimate(params, Models(base, base, shape_from_config(EMBED, "e", "test")),
                      Corpus(370, 2114.0, "test"), Rates())
    return params, {r.step: r for r in result.rows}


def test_micro_instruction_prompts_are_what_the_step_sends(tmp_path):
    params, rows = micro_rows()
    served = iter(POOL)

    def reply(prompt):  # per_prompt fresh instructions: the first round is the only one
        return "\n".join(f"{i}. {next(served)}" for i in range(1, params.instructions.per_prompt
                                                                  + 1))

    stats = run_sharded(first_round, gather_instructions, params.instructions,
                        scripted_llm(reply), params.seed,
                        docs=write_topic_docs(tmp_path / "docs.parquet"),
                        instructions=tmp_path / "i.parquet", metrics=tmp_path / "i.json")
    assert stats["rounds"] == 1 and stats["prompts"] == rows["instructions"].calls


def test_micro_respond_calls_are_one_per_instruction(tmp_path):
    import pyarrow as pa

    from longctx.synth.respond import gather_responses, respond
    from longctx.synth.tables import write_table

    params, rows = micro_rows()
    ids = [f"i{k}" for k in range(params.instructions.count)]
    write_table(tmp_path / "ins.parquet", [{"id": i, "instruction": POOL[0] + i} for i in ids],
                pa.schema([("id", pa.string()), ("instruction", pa.string())]))
    write_table(tmp_path / "sum.parquet", [
        {"instruction_id": i, "level": 0, "position": 0, "summary": "a note", "kept": True,
         "final": True} for i in ids], pa.schema([
            ("instruction_id", pa.string()), ("level", pa.int32()), ("position", pa.int32()),
            ("summary", pa.large_string()), ("kept", pa.bool_()), ("final", pa.bool_())]))
    stats = run_sharded(respond, gather_responses, params.respond,
                        scripted_llm(lambda m: "An answer of several words."), params.seed,
                        instructions=tmp_path / "ins.parquet", summaries=tmp_path / "sum.parquet",
                        responses=tmp_path / "r.parquet", metrics=tmp_path / "r.json")
    assert stats["called"] == rows["respond"].calls == params.instructions.count
