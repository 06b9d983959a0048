"""The evaluation engines without a server or a GPU: what vLLM's engine is built with, the
windows refused before it loads, the batch each backend is handed, the serve command line.
(The openai engine against `transformers serve`: test_eval_serve.py.)"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
from llm_data import build_tiny_chat_model

from longctx.config import EvalConfig
from longctx.errors import LongctxError
from longctx.eval.engines import batch_size, vllm_engine_args
from longctx.eval.lmeval_models import make_lm
from longctx.eval.run import answer
from longctx.eval.samples import EvalSample

NO_VLLM = pytest.mark.skipif(importlib.util.find_spec("vllm") is not None,
                             reason="vllm is installed: the engine would load")
SHORT = (r"^eval\.max_model_len: 1024 is below the longest sample \(2048 tokens, prompt and "
         r"answer\): raise it or leave it unset$")
EXTRA = r"^eval\.backend 'vllm' needs the vllm extra: pip install 'longctx\[vllm\]'$"


def test_vllm_engine_args_are_the_eval_sections_with_the_longest_sample_as_window():
    cfg = EvalConfig(backend="vllm", tensor_parallel_size=8, kv_cache_dtype="fp8",
                     enable_chunked_prefill=True)
    assert vllm_engine_args(cfg, 131072) == {
        "tensor_parallel_size": 8, "max_model_len": 131072, "enable_chunked_prefill": True,
        "kv_cache_dtype": "fp8"}
    wider = EvalConfig(backend="vllm", max_model_len=262144, enable_chunked_prefill=False)
    assert vllm_engine_args(wider, 131072) == {
        "tensor_parallel_size": 1, "max_model_len": 262144, "enable_chunked_prefill": False,
        "kv_cache_dtype": "auto"}
    assert vllm_engine_args(wider, None)["max_model_len"] == 262144  # lm-eval without RULER
    assert vllm_engine_args(EvalConfig(backend="vllm"), None)["max_model_len"] is None
    with pytest.raises(LongctxError, match=SHORT):
        vllm_engine_args(EvalConfig(backend="vllm", max_model_len=1024), 2048)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return build_tiny_chat_model(tmp_path_factory.mktemp("tiny") / "model", max_positions=4096)


@NO_VLLM
def test_the_vllm_engine_refuses_a_short_window_first_then_asks_for_its_extra(tiny, tmp_path):
    """Both in one line, before any engine loads: the answering engine and lm-eval's."""
    samples = [EvalSample("vt", 2048, 0, "prompt", "Answer:", ("x",), "all", 30, 40)]
    short = EvalConfig(backend="vllm", max_model_len=1024)
    with pytest.raises(LongctxError, match=SHORT):
        answer(tiny, samples, short, tmp_path / "calls.sqlite")
    with pytest.raises(LongctxError, match=EXTRA):
        answer(tiny, samples, EvalConfig(backend="vllm"), tmp_path / "calls.sqlite")
    run = dict(batch_size=4, max_length=2048, seed=0, device="cuda", dtype="bfloat16",
               loglikelihood=[])
    with pytest.raises(LongctxError, match=SHORT):
        make_lm(short, tiny, **run)
    with pytest.raises(LongctxError, match=EXTRA):
        make_lm(EvalConfig(backend="vllm"), tiny, **run)


def test_each_backend_is_handed_its_own_batch():
    assert batch_size(EvalConfig(batch_size=16)) == 16
    assert batch_size(EvalConfig(backend="vllm", batch_size=64)) == 64
    # openai: every connection kept busy a while, as in synthesis
    served = EvalConfig(backend="openai", base_url="http://h/v1", max_concurrency=3)
    assert batch_size(served) == 12


def test_longctx_serve_eval_serves_every_model_unpinned_in_the_eval_sections_dtype():
    from longctx.cli import build_parser, serve_argv

    argv = serve_argv(None, "127.0.0.1", 8001, "cpu", "auto", [])
    assert argv[argv.index("serve"):] == [
        "serve", "--device", "cpu", "--dtype", "float32", "--host", "127.0.0.1",
        "--port", "8001"]  # no model: a request names it, by its path
    args = build_parser().parse_args(["serve", "--eval", "--port", "8002"])
    assert args.eval and args.port == 8002
