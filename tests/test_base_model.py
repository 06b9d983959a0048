import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

from longctx.assets import bundled_embedder
from longctx.base_model import MANIFEST, prepare_base_model, write_model_dir
from longctx.config import BaseModelConfig
from longctx.errors import LongctxError


@pytest.fixture
def tiny_llama_dir(tmp_path):
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=30522, hidden_size=32, intermediate_size=64,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=512)
    config.rope_parameters = {"rope_type": "default", "rope_theta": 10000.0}
    path = tmp_path / "tiny"
    LlamaForCausalLM(config).save_pretrained(path)
    AutoTokenizer.from_pretrained(bundled_embedder()).save_pretrained(path)
    return path


def test_local_directory_becomes_a_safetensors_dir_with_manifest(tiny_llama_dir, tmp_path):
    out = tmp_path / "models" / "base"
    manifest = prepare_base_model(BaseModelConfig(source=str(tiny_llama_dir)), model=out)
    assert manifest["source"]["kind"] == "local-dir"
    assert manifest["source"]["sha256"]["model.safetensors"]
    assert manifest["dtype"] == "bfloat16"
    assert manifest["rope_parameters"]["rope_theta"] == 10000.0
    assert json.loads((out / MANIFEST).read_text()) == manifest
    assert (out / "model.safetensors").is_file()
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.dtype == torch.bfloat16
    original = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    for (name, a), (_, b) in zip(original.named_parameters(), model.named_parameters()):
        assert torch.allclose(a.to(torch.bfloat16), b), name
    assert not list(tmp_path.joinpath("models").glob(".*tmp*"))


def test_model_dir_bytes_do_not_depend_on_offline_mode(tiny_llama_dir, tmp_path):
    """HF_HUB_OFFLINE makes transformers load with local_files_only=True, which it keeps and
    would save into tokenizer_config.json (and so into the manifest and every cache key):
    the same model, loaded offline or not, must give the same bytes."""
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    written = []
    for offline in (True, False):
        tokenizer = AutoTokenizer.from_pretrained(tiny_llama_dir)
        tokenizer.init_kwargs["local_files_only"] = offline  # as from_pretrained records it
        out = tmp_path / f"offline-{offline}"
        write_model_dir(out, model, tokenizer, "float32", {})
        written.append({f.name: f.read_bytes() for f in sorted(out.iterdir())})
        assert tokenizer.init_kwargs["local_files_only"] is offline  # left as it was
    assert written[0] == written[1]
    assert b"local_files_only" not in written[0]["tokenizer_config.json"]


@pytest.mark.parametrize(
    ("source", "message"),
    [
        ("missing/model.gguf", "GGUF file not found"),
        ("./no/such/dir", "no such directory or file"),
    ],
)
def test_bad_local_sources_are_named(source, message, tmp_path):
    with pytest.raises(LongctxError, match=f"base_model.source '{source}': {message}"):
        prepare_base_model(BaseModelConfig(source=source), model=tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_directory_without_config_is_rejected(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(LongctxError, match="directory has no config.json"):
        prepare_base_model(BaseModelConfig(source=str(tmp_path / "empty")),
                           model=tmp_path / "out")


def test_unreachable_hub_id_fails_clearly(tmp_path, monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # no network waits
    with pytest.raises(LongctxError, match="base_model.source 'no-org/no-model': cannot load"):
        prepare_base_model(BaseModelConfig(source="no-org/no-model"), model=tmp_path / "out")
    assert not (tmp_path / "out").exists()
