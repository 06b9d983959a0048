import json

import pytest
import yaml

from longctx.config import Params, json_schema_text, load_params, validate_params
from longctx.errors import ConfigError


def test_every_profile_validates(root):
    profiles = [root / "params.yaml", *sorted((root / "configs").glob("*.yaml"))]
    assert len(profiles) >= 4
    for path in profiles:
        assert isinstance(load_params(path), Params), path


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
    with pytest.raises(ConfigError, match=r"corpus\.sources\[1\]: .*needs at least one .*paths"):
        validate_params({"corpus": {"sources": [{"format": "demo"}, {"format": "parquet"}]}})


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
    with pytest.raises(Exception):
        params.embed.batch_size = 3


def test_schema_file_is_generated_and_current(root):
    """Snakemake validates params.yaml against this file; regenerate with `longctx schema`."""
    committed = (root / "workflow" / "schemas" / "params.schema.json").read_text()
    assert committed == json_schema_text(), "stale schema: run `longctx schema`"
    schema = json.loads(committed)
    assert schema["additionalProperties"] is False
    assert {"corpus", "base_model", "embed", "index", "seed"} <= set(schema["properties"])


def test_schema_rejects_what_pydantic_rejects(root):
    import jsonschema

    schema = json.loads(json_schema_text())
    jsonschema.validate(yaml.safe_load((root / "params.yaml").read_text()), schema)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({"embed": {"batch_size": -1}}, schema)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({"embed": {"batchsize": 1}}, schema)
