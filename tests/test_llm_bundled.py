"""The real bundled model answers a factual question through the transformers backend (the
OpenAI client talking to `transformers serve` on it is in test_llm_serve.py)."""

from longctx.config import LLMConfig
from longctx.llm import Sampling, make_llm

QUESTION = [{"role": "user", "content": "What is the capital of France?"}]
GREEDY = Sampling(max_new_tokens=16)


def test_hf_backend_knows_the_capital_of_france(bundled_model_dir, tmp_path):
    llm = make_llm(LLMConfig(), bundled_model_dir, cache_path=tmp_path / "calls.sqlite")
    (out,) = llm.chat([QUESTION], GREEDY, "t/1")
    assert "Paris" in out.text and out.finish_reason == "stop"
    assert llm.identity["model"]["files"]["model.safetensors"]  # from the base manifest
    assert llm.count_tokens(["Paris is the capital of France."]) == [7]
