"""The real bundled model answers a factual question through both local paths: the
transformers backend, and the OpenAI client talking to `longctx serve` over HTTP."""

import threading

import pytest

from longctx.config import LLMConfig
from longctx.llm import Sampling, make_llm
from longctx.llm.serve import make_server

QUESTION = [{"role": "user", "content": "What is the capital of France?"}]
GREEDY = Sampling(max_new_tokens=16)


@pytest.fixture(scope="module")
def server(bundled_model_dir):
    server = make_server(bundled_model_dir, "127.0.0.1", 0)  # serves it as "base"
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05},
                              daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_port}/v1"
    server.shutdown()
    server.server_close()


def test_hf_backend_knows_the_capital_of_france(bundled_model_dir, tmp_path):
    llm = make_llm(LLMConfig(), bundled_model_dir, cache_path=tmp_path / "calls.sqlite")
    (out,) = llm.chat([QUESTION], GREEDY, "t/1")
    assert "Paris" in out.text and out.finish_reason == "stop"
    assert llm.identity["model"]["files"]["model.safetensors"]  # from the base manifest
    assert llm.count_tokens(["Paris is the capital of France."]) == [7]


def test_openai_backend_through_longctx_serve(server, bundled_model_dir, tmp_path):
    cfg = LLMConfig(backend="openai", base_url=server, max_retries=0)
    llm = make_llm(cfg, bundled_model_dir, cache_path=tmp_path / "calls.sqlite")
    (out,) = llm.chat([QUESTION], GREEDY, "t/1")
    assert "Paris" in out.text and out.finish_reason == "stop"
    assert llm.identity == {"backend": "openai", "base_url": server, "model": "base"}
    assert llm.count_tokens(["Paris is the capital of France."]) == [7]  # base tokenizer
