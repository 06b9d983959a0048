"""The RoPE schedule of progressive stages and the stage config it writes."""

import pytest
from transformers import AutoConfig, LlamaConfig

from longctx.errors import ConfigError, RuleError
from longctx.train.rope import (
    ScheduledStage,
    Stage,
    base_rope,
    check_stages,
    schedule,
    stage_config,
)

LLAMA31_ROPE = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
                "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                "original_max_position_embeddings": 8192}


def test_the_paper_rule_multiplies_the_base_by_4_per_doubling():
    """Llama-3.1 at 128K and 5e5, then 256K -> 512K -> 1M as in the paper."""
    got = schedule([Stage(262144), Stage(524288), Stage(1048576)], 131072, 5e5)
    assert [(s.length, s.rope_theta, s.derived) for s in got] == [
        (262144, 2e6, True), (524288, 8e6, True), (1048576, 3.2e7, True)]


def test_a_non_doubling_step_uses_the_rule_continuously_and_explicit_bases_win():
    got = schedule([Stage(32768), Stage(65536, rope_theta=2e7), Stage(131072)], 8192, 1e5,
                   growth=4.0)
    assert got[0].rope_theta == pytest.approx(1e5 * 16)  # x4 length = two doublings
    assert got[1] == ScheduledStage(1, 65536, 2e7, derived=False)
    assert got[2].rope_theta == pytest.approx(8e7)  # derived from the explicit one before it


@pytest.mark.parametrize("stages, message", [
    ([Stage(8192)], r"train\.stages\[0\]\.length: 8192 must exceed the base model's 8192"),
    ([Stage(16384), Stage(16384)], r"stages\[1\]\.length: 16384 must exceed stage 0's 16384"),
    ([Stage(16384, rope_theta=5e4)], r"stages\[0\]\.rope_theta: 50000 is below the base"),
    ([Stage(16384), Stage(32768, rope_theta=2e5)], r"stages\[1\]\.rope_theta: .* below stage 0"),
    ([], r"train\.stages: at least one stage"),
])
def test_bad_schedules_are_refused_naming_the_stage(stages, message):
    with pytest.raises(ConfigError, match=message):
        schedule(stages, 8192, 1e5)


def test_params_alone_check_what_they_can_decide():
    """Without the base model (`longctx validate`): bases before the first explicit one are
    unknown and not compared; from it on, derived bases are known and checked."""
    assert check_stages([Stage(8192), Stage(16384, 1.0), Stage(32768)], None, None) == [
        None, 1.0, 4.0]
    with pytest.raises(RuleError) as info:
        check_stages([Stage(8192, 1e6), Stage(16384), Stage(32768, 2e6)], None, None)
    assert info.value.problems == [("[2].rope_theta", ("2e+06 is below stage 1's 4e+06 (a "
                                    "longer context needs a RoPE base at least as large)"))]
    with pytest.raises(RuleError) as info:
        check_stages([Stage(8192)], 8192, None, base="stages.base_length")
    assert info.value.problems == [("[0].length", ("8192 must exceed stages.base_length 8192 "
                                    "(stages extend the context, each longer than the last)"))]


def test_growth_below_one_is_refused():
    with pytest.raises(ConfigError, match="growth per doubling must be >= 1"):
        schedule([Stage(16384)], 8192, 1e5, growth=0.5)


def test_stage_config_writes_length_and_base_that_transformers_reads_back(tmp_path):
    config = LlamaConfig(max_position_embeddings=8192, rope_parameters={
        "rope_type": "default", "rope_theta": 1e5})
    stage = schedule([Stage(32768)], *base_rope(config))[0]
    stage_config(config, stage).save_pretrained(tmp_path)
    loaded = AutoConfig.from_pretrained(tmp_path)
    assert loaded.max_position_embeddings == 32768
    assert loaded.rope_parameters == {"rope_type": "default", "rope_theta": 1.6e6}
    assert config.rope_parameters["rope_theta"] == 1e5  # the base config is left alone


def test_llama3_scaling_is_kept_or_dropped_as_asked():
    config = LlamaConfig(max_position_embeddings=131072, rope_parameters=dict(LLAMA31_ROPE))
    stage = schedule([Stage(262144)], *base_rope(config))[0]
    kept = stage_config(config, stage, "keep").rope_parameters
    assert kept == {**LLAMA31_ROPE, "rope_theta": 2e6}
    dropped = stage_config(config, stage, "drop").rope_parameters
    assert dropped == {"rope_type": "default", "rope_theta": 2e6}


def test_a_model_without_rope_is_refused_before_training():
    from transformers import GPT2Config

    with pytest.raises(ConfigError, match=r"\(gpt2\) has no RoPE base"):
        base_rope(GPT2Config())
