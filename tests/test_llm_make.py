"""`make_llm` turns params into a backend, or says exactly what is missing."""

import importlib.util

import pytest

from longctx.config import LLMConfig, validate_params
from longctx.errors import ConfigError, LongctxError
from longctx.llm import make_llm


@pytest.mark.skipif(importlib.util.find_spec("vllm") is not None, reason="vllm is installed")
def test_vllm_without_the_extra_says_how_to_install(tmp_path):
    with pytest.raises(LongctxError, match=r"pip install 'longctx\[vllm\]'"):
        make_llm(LLMConfig(backend="vllm"), tmp_path, cache_path=tmp_path / "c.sqlite")


def test_openai_needs_a_base_url():
    """Refused with the params, not when the synthesis step first opens the LLM."""
    with pytest.raises(ConfigError, match=r"^params: llm\.base_url: required when llm\.backend "
                                          r"is 'openai'$"):
        validate_params({"llm": {"backend": "openai"}})


def test_openai_batches_keep_every_connection_busy(tmp_path):
    cfg = LLMConfig(backend="openai", base_url="http://127.0.0.1:9/v1/", max_concurrency=3)
    with make_llm(cfg, tmp_path, cache_path=tmp_path / "c.sqlite") as llm:
        assert llm.batch_size == 12
        assert llm.backend.replicas.urls == ["http://127.0.0.1:9/v1"]  # one spelling per server


def test_openai_base_is_asked_for_by_path_and_identified_by_its_weights(tmp_path):
    """Replicas and hosts may change between runs; the weights behind `base` decide."""
    base = tmp_path / "base"
    base.mkdir()
    (base / "longctx_manifest.json").write_text('{"files": {"model.safetensors": "ab12"}}')
    cfg = LLMConfig(backend="openai", base_url=["http://10.0.0.1:8000/v1",
                                                "http://10.0.0.2:8000/v1"])
    with make_llm(cfg, base, cache_path=tmp_path / "c.sqlite") as llm:
        assert llm.backend.model == str(base)  # what `transformers serve <dir>` answers to
        assert llm.identity == {"backend": "openai",
                                "model": {"files": {"model.safetensors": "ab12"}}}
        assert len(llm.backend.replicas.urls) == 2
    named = LLMConfig(backend="openai", base_url="http://h/v1", model="org/served-name")
    with make_llm(named, base, cache_path=tmp_path / "c.sqlite") as llm:
        assert llm.identity == {"backend": "openai", "model": "org/served-name"}
