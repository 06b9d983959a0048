import json

import jsonschema
import pytest
import yaml
from pydantic import ValidationError

from longctx.config import (
    Params,
    json_schema,
    json_schema_text,
    load_params,
    validate_params,
)
from longctx.errors import ConfigError


def profiles(root):
    found = [root / "params.yaml", *sorted((root / "configs").glob("*.yaml"))]
    assert len(found) >= 4
    return found


def schema_validator():
    return jsonschema.Draft202012Validator(json_schema())


def refusal(data) -> str:
    """validate_params' one-line message for `data`, which it must refuse."""
    with pytest.raises(ConfigError) as info:
        validate_params(data)
    message = str(info.value)
    assert "\n" not in message and "Value error" not in message
    return message


def test_every_profile_validates(root):
    """Every shipped profile passes both `longctx validate` and the schema Snakemake uses."""
    validator = schema_validator()
    for path in profiles(root):
        assert isinstance(load_params(path), Params), path
        assert not list(validator.iter_errors(yaml.safe_load(path.read_text()))), path


def test_demo_profile_spells_out_every_key(root):
    """params.yaml is the documented default: every key is written, none is left implicit."""
    written = yaml.safe_load((root / "params.yaml").read_text())
    defaults = Params().model_dump(mode="json")
    for section, values in defaults.items():
        assert section in written, section
        if isinstance(values, dict):
            assert set(written[section]) == set(values), section


def test_unknown_key_is_rejected_with_its_path():
    with pytest.raises(ConfigError, match=r"embed\.batchsize: unknown key"):
        validate_params({"embed": {"batchsize": 8}})


def test_unknown_section_is_rejected():
    with pytest.raises(ConfigError, match=r"trainn: unknown key"):
        validate_params({"trainn": {}})


def test_wrong_type_names_key_and_reason():
    with pytest.raises(ConfigError, match=r"index\.nlist: .*integer"):
        validate_params({"index": {"nlist": "many"}})
    with pytest.raises(ConfigError, match=r"corpus\.min_tokens: .*greater than 0"):
        validate_params({"corpus": {"min_tokens": 0}})
    with pytest.raises(ConfigError, match=r"index\.type: .*'flat'"):
        validate_params({"index": {"type": "annoy"}})


def test_nested_list_errors_name_the_item():
    assert refusal({"corpus": {"sources": [{"format": "demo"}, {"format": "parquet"}]}}) == (
        "params: corpus.sources[1].paths: format 'parquet' needs at least one file or glob")


def test_file_errors_name_the_file(tmp_path):
    with pytest.raises(ConfigError, match="missing.yaml: params file not found"):
        load_params(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("embed: [unclosed\n")
    with pytest.raises(ConfigError, match="bad.yaml: not valid YAML"):
        load_params(bad)
    typo = tmp_path / "typo.yaml"
    typo.write_text("index:\n  typ: flat\n")
    with pytest.raises(ConfigError, match=r"typo.yaml: index\.typ: unknown key"):
        load_params(typo)


def test_values_are_frozen():
    params = Params()
    with pytest.raises(ValidationError, match="frozen"):
        params.embed.batch_size = 3


def test_schema_file_is_generated_and_current(root):
    """Snakemake validates params.yaml against this file; regenerate with `longctx schema`."""
    committed = (root / "workflow" / "schemas" / "params.schema.json").read_text()
    assert committed == json_schema_text(), "stale schema: run `longctx schema`"
    schema = json.loads(committed)
    assert schema["additionalProperties"] is False
    assert {"corpus", "base_model", "embed", "index", "seed"} <= set(schema["properties"])


# --------------------------------------------------------------------------- strict types


@pytest.mark.parametrize("data, message", [
    ({"instructions": {"count": "8"}},
     "instructions.count: Input should be a valid integer, got '8'"),
    ({"instructions": {"count": 8.5}},
     "instructions.count: Input should be a valid integer, got 8.5"),
    ({"train": {"activation_checkpointing": 1}},
     "train.activation_checkpointing: Input should be a valid boolean, got 1"),
    ({"train": {"activation_checkpointing": "true"}},
     "train.activation_checkpointing: Input should be a valid boolean, got 'true'"),
    ({"train": {"lr": "2e-5"}},  # YAML 1.1 reads 2e-5 (no dot) as a string
     "train.lr: Input should be a valid number, got '2e-5'"),
    ({"seed": True}, "seed: Input should be a valid integer, got True"),
    ({"train": {"betas": ["0.9", 0.95]}},
     "train.betas[0]: Input should be a valid number, got '0.9'"),
    ({"train": {"betas": "0.9, 0.95"}},
     "train.betas: Input should be a valid tuple, got '0.9, 0.95'"),
    ({"train": {"betas": [0.9, 0.95, 0.99]}},
     "train.betas: Tuple should have at most 2 items after validation, not 3"),
])
def test_values_of_the_wrong_type_are_not_coerced(data, message):
    assert refusal(data) == f"params: {message}"


def test_an_int_is_a_float_and_a_list_is_a_tuple():
    params = validate_params({"train": {"lr": 1, "betas": [1, 0.5]}, "niah": {"depths": [0, 50]}})
    assert params.train.lr == 1.0 and isinstance(params.train.lr, float)
    assert params.train.betas == (1.0, 0.5)
    assert params.niah.depths == [0.0, 50.0]


# --------------------------------------------------------------------------- cross-field rules

RULES = [
    ({"stages": {"schedule": [{"length": 4096}, {"length": 4096}]}},
     ("stages.schedule[1].length: 4096 must exceed stage 0's 4096 (stages extend the context, "
     "each longer than the last)")),
    ({"stages": {"base_length": 8192, "schedule": [{"length": 8192}]}},
     ("stages.schedule[0].length: 8192 must exceed stages.base_length 8192 (stages extend the "
     "context, each longer than the last)")),
    ({"stages": {"schedule": [{"length": 4096, "rope_theta": 1e6},
                              {"length": 8192, "rope_theta": 5e5}]}},
     ("stages.schedule[1].rope_theta: 500000 is below stage 0's 1e+06 (a longer context needs "
     "a RoPE base at least as large)")),
    ({"stages": {"rope_growth": 4.0, "schedule": [{"length": 4096, "rope_theta": 1e6},
                                                  {"length": 8192},
                                                  {"length": 16384, "rope_theta": 2e6}]}},
     ("stages.schedule[2].rope_theta: 2e+06 is below stage 1's 4e+06 (a longer context needs "
     "a RoPE base at least as large)")),  # stage 1's base is derived: 1e6 x 4
    ({"pack": {"mixture": {"long": 1.0}}},
     ("pack.mixture: shares must sum to 1, got 1.4 (long 1.0, long_output 0.2, short 0.2); "
     "set all three")),
    ({"stages": {"schedule": [{"length": 4096, "mixture": {"long": 0, "long_output": 0,
                                                           "short": 0}}]}},
     ("stages.schedule[0].mixture: shares must sum to 1, got 0.0 (long 0.0, long_output 0.0, "
     "short 0.0); set all three")),
    ({"stages": {"schedule": [{"length": 4096, "steps": 10, "sequences": 30}]},
      "train": {"batch_size": 2, "global_batch": 4}},
     ("stages.schedule[0].sequences: 30 are too few: 10 steps x 4 sequences per step "
     "(train.global_batch) need 40: raise it (samples repeat) or lower "
     "stages.schedule[0].steps")),
    ({"index": {"type": "ivf_flat", "nlist": 64, "train_size": 50}},
     "index.train_size: 50 is below index.nlist 64 (IVF needs at least nlist training vectors)"),
    ({"index": {"type": "ivf_pq", "nlist": 4, "pq_bits": 8, "train_size": 100}},
     ("index.train_size: 100 is below 2**index.pq_bits = 256 (PQ needs at least that many "
     "training vectors)")),
    ({"llm": {"backend": "openai"}}, "llm.base_url: required when llm.backend is 'openai'"),
    ({"llm": {"backend": "openai", "base_url": []}}, "llm.base_url: an empty list names no server"),
    ({"llm": {"base_url": "localhost:8000/v1"}},
     "llm.base_url: 'localhost:8000/v1' is not an http(s) URL (e.g. http://localhost:8000/v1)"),
    ({"llm": {"base_url": ["http://a:8000/v1", "ftp://b/v1"]}},
     "llm.base_url[1]: 'ftp://b/v1' is not an http(s) URL (e.g. http://localhost:8000/v1)"),
    ({"llm": {"base_url": ["http://a:8000/v1", "http://a:8000/v1/"]}},
     "llm.base_url[1]: 'http://a:8000/v1/' is listed twice"),
    ({"llm": {"base_url": 8000}}, "llm.base_url: expected a URL or a list of URLs, got 8000"),
    ({"eval": {"backend": "openai"}}, "eval.base_url: required when eval.backend is 'openai'"),
    ({"eval": {"backend": "openai", "base_url": ["http://a:8000/v1", "http://a:8000/v1"]}},
     "eval.base_url[1]: 'http://a:8000/v1' is listed twice"),
    ({"eval": {"backend": "vllm", "max_model_len": 16384}, "niah": {"lengths": [8192]},
      "ruler": {"lengths": [4096, 32768]}},
     ("eval.max_model_len: 16384 is below the longest evaluation sample (32768 tokens, "
      "niah.lengths/ruler.lengths): raise it or leave it unset")),
    ({"lmeval": {"tasks": ["longctx_cloze", "ifeval", "longctx_cloze"]}},
     "lmeval.tasks[2]: 'longctx_cloze' is listed twice"),
    ({"lmeval": {"tasks": ["longctx_clozes"]}},
     "lmeval.tasks[0]: unknown task 'longctx_clozes' (shipped: longctx_cloze, longctx_ruler)"),
    ({"train": {"processes": 3, "context_parallel": 2}},
     "train.context_parallel: 2 must divide train.processes 3"),
    ({"train": {"processes": 4, "nodes": 3, "global_batch": 4}},
     "train.nodes: 3 machines do not split train.processes 4 evenly: make processes a "
     "multiple of nodes"),
    ({"train": {"processes": 2, "global_batch": 3}},
     ("train.global_batch: 3 sequences do not split into micro-batches of batch_size 1 over 2 "
      "data-parallel replicas (processes / context_parallel): make it a multiple of 2")),
    ({"train": {"processes": 2, "nodes": 2, "global_batch": 2, "rendezvous": "node0"}},
     "train.rendezvous: 'node0' is not HOST:PORT"),
    ({"train": {"grad_accum": 4}},
     ("train.grad_accum: replaced by train.global_batch, the sequences per optimizer step "
      "(batch_size x grad_accum x processes / context_parallel before)")),
    ({"pack": {"short_source": "file"}},
     "pack.short_path: required when pack.short_source is 'file'"),
    ({"long_output": {"min_tokens": 4096, "max_tokens": 2048}},
     "long_output.min_tokens: 4096 exceeds max_tokens (2048)"),
]


@pytest.mark.parametrize("data, message", RULES)
def test_cross_field_rules_name_the_file_and_the_key(tmp_path, data, message):
    """The rules that once failed only inside a step, refused by `longctx validate`."""
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(data))
    with pytest.raises(ConfigError) as info:
        load_params(path)
    assert str(info.value) == f"{path}: {message}"


def test_rules_hold_at_their_edges():
    """What the rules allow: a growing schedule, bases unknown before the first explicit
    one, shares summing to 1 within 1e-6, exactly enough sequences."""
    validate_params({"stages": {"base_length": 4096, "schedule": [
        {"length": 8192}, {"length": 16384, "rope_theta": 1.0},  # stage 0's base is unknown
        {"length": 32768}, {"length": 65536, "rope_theta": 16.0}]}})  # 1 x 4 x 4 (derived)
    validate_params({"pack": {"mixture": {"long": 0.7, "long_output": 0.1, "short": 0.2}}})
    validate_params({"pack": {"mixture": {"long": 1, "long_output": 0, "short": 0}}})
    validate_params({"stages": {"schedule": [{"length": 4096, "steps": 10, "sequences": 40}]},
                     "train": {"batch_size": 2, "global_batch": 4}})
    validate_params({"index": {"type": "ivf_flat", "nlist": 64, "train_size": 64}})
    replicas = validate_params({"llm": {"backend": "openai", "base_url": [
        "http://10.0.0.1:8000/v1/", "https://gpu-2.cluster/v1"]}}).llm
    assert replicas.base_urls == ["http://10.0.0.1:8000/v1", "https://gpu-2.cluster/v1"]
    assert validate_params({"llm": {"base_url": "http://h/v1/"}}).llm.base_urls == ["http://h/v1"]
    validate_params({"eval": {"backend": "vllm", "max_model_len": 32768}})  # the longest, exactly
    validate_params({"eval": {"max_model_len": 512}})  # only vllm's engine has that window


WINDOW = {"llm": {"context_tokens": 1000},
          "summarize": {"chunk_tokens": 100, "max_new_tokens": 100, "budget_tokens": 100},
          "respond": {"max_new_tokens": 100},
          "long_output": {"excerpt_tokens": 100, "max_new_tokens": 100},
          "instructions": {"seed_chunk_tokens": 100, "max_new_tokens": 100}}


def with_value(base, key, value):
    section, name = key.split(".")
    return {**base, section: {**base[section], name: value}}


@pytest.mark.parametrize("held, generated", [
    ("summarize.chunk_tokens", "summarize.max_new_tokens"),
    ("summarize.budget_tokens", "respond.max_new_tokens"),
    ("long_output.excerpt_tokens", "long_output.max_new_tokens"),
    ("instructions.seed_chunk_tokens", "instructions.max_new_tokens"),
])
def test_prompts_must_fit_below_the_generators_window(held, generated):
    """Input + generated tokens equal to the window leave no room for the prompt."""
    validate_params(with_value(WINDOW, held, 899))
    assert refusal(with_value(WINDOW, held, 900)) == (
        f"params: {held}: 900 + {generated} 100 = 1000 tokens leave no room for the prompt in "
        f"llm.context_tokens 1000: lower {held}")
    validate_params(with_value(with_value(WINDOW, held, 5000), "llm.context_tokens", None))


def test_several_problems_are_one_line_joined():
    message = refusal({"index": {"nlist": "many"}, "embed": {"batchsize": 8},
                       "llm": {"context_tokens": 300},
                       "summarize": {"chunk_tokens": 512, "max_new_tokens": 64}})
    assert message == ("params: embed.batchsize: unknown key; index.nlist: Input should be a "
                       "valid integer, got 'many'")  # sections first: the rest needs them
    message = refusal({**WINDOW, "summarize": {"chunk_tokens": 950, "max_new_tokens": 100,
                                               "budget_tokens": 950}})
    assert message == (
        "params: summarize.chunk_tokens: 950 + summarize.max_new_tokens 100 = 1050 tokens leave "
        "no room for the prompt in llm.context_tokens 1000: lower summarize.chunk_tokens; "
        "summarize.budget_tokens: 950 + respond.max_new_tokens 100 = 1050 tokens leave no room "
        "for the prompt in llm.context_tokens 1000: lower summarize.budget_tokens")


# --------------------------------------------------------------------------- schema agreement

WRONG = {"integer": ["1", True, 1.5, None], "number": ["1.0", True, None],
         "boolean": [1, 0, "true", None], "string": [1, True], "array": ["x", {}],
         "object": ["x", []]}


def _alternatives(prop: dict, defs: dict) -> list[dict]:
    alts = prop.get("anyOf", [prop])
    return [defs[a["$ref"].rsplit("/", 1)[1]] if "$ref" in a else a for a in alts]


def _wrong_values(prop: dict, defs: dict) -> list:
    """Values of the wrong type (or enum, or sign) for a property of the schema."""
    alts = _alternatives(prop, defs)
    out = []
    for alt in alts:
        out += WRONG.get(alt.get("type"), [])
        out += ["no-such-choice"] if "enum" in alt else []
        out += [-1] if "minimum" in alt or "exclusiveMinimum" in alt else []
    nullable = any(alt.get("type") == "null" for alt in alts)
    return [v for v in out if not (v is None and nullable)]


def generated_faults() -> list[dict]:
    """For every key of every section (and the top level): a wrong value of each kind."""
    schema = json_schema()
    defs = schema["$defs"]
    faults = [{"no_such_section": {}}]
    for section, prop in schema["properties"].items():
        body = _alternatives(prop, defs)[0]
        if body.get("type") != "object":
            faults += [{section: bad} for bad in _wrong_values(prop, defs)]
            continue
        faults.append({section: {"no_such_key": 1}})
        for key, sub in body["properties"].items():
            faults += [{section: {key: bad}} for bad in _wrong_values(sub, defs)]
    return faults


NESTED_FAULTS = [
    ({"stages": {"schedule": [{"length": 4096, "stepz": 1}]}}, "stages.schedule[0].stepz"),
    ({"stages": {"schedule": [{"length": "4096"}]}}, "stages.schedule[0].length"),
    ({"stages": {"schedule": [{"length": -4096}]}}, "stages.schedule[0].length"),
    ({"corpus": {"sources": [{"format": "csv", "paths": ["x"]}]}}, "corpus.sources[0].format"),
    ({"corpus": {"sources": [{"format": "jsonl", "paths": "x.jsonl"}]}},
     "corpus.sources[0].paths"),
    ({"pack": {"mixture": {"long": "0.6", "long_output": 0.2, "short": 0.2}}},
     "pack.mixture.long"),
    ({"pack": {"mixture": {"lng": 0.6}}}, "pack.mixture.lng"),
    ({"train": {"betas": [0.9, "0.95"]}}, "train.betas[1]"),
    ({"train": {"betas": [0.9]}}, "train.betas[1]"),  # "Field required"
    ({"niah": {"depths": [0, "50"]}}, "niah.depths[1]"),
    ({"ruler": {"tasks": ["niah_single_9"]}}, "ruler.tasks[0]"),
    ({"instructions": {"task_types": []}}, "instructions.task_types"),
]


def test_pydantic_refuses_everything_the_schema_refuses():
    """Snakemake checks params.yaml against the JSON schema, every step through pydantic:
    a file one accepts and the other refuses would fail at a different moment. Each fault
    the schema refuses must be refused by validate_params, naming the key."""
    validator = schema_validator()
    faults = generated_faults()
    assert len(faults) > 300  # every key of every section, several ways
    for fault in faults:
        assert not validator.is_valid(fault), fault  # each is a real fault
        message = refusal(fault)
        section, body = next(iter(fault.items()))
        key = f"{section}.{next(iter(body))}" if isinstance(body, dict) and body else section
        assert f"params: {key}" in message, (fault, message)
    for fault, key in NESTED_FAULTS:
        assert not validator.is_valid(fault), fault
        assert f"params: {key}: " in refusal(fault), fault
