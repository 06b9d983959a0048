"""`transformers serve` for real: two replicas of the bundled model on localhost, started by
`longctx serve` (offline, CPU, one thread each), answering the official `openai` client and
the openai backend, which spreads calls over both, finishes when one is killed mid-way and
fails with one clear error when both are gone. Each replica's own access log counts the
requests it answered."""

import sys
from pathlib import Path

import pytest
from llm_data import complete
from serving import Cluster, Replica, serve_workdir

from longctx.config import LLMConfig
from longctx.errors import LongctxError
from longctx.llm import Sampling, make_llm
from longctx.llm.openai import OpenAIBackend

pytest.importorskip("uvicorn", reason="transformers serve needs pip install 'longctx[serve]'")

GREEDY = Sampling(max_new_tokens=8)
QUESTIONS = ["What is the capital of France?", "Name a colour.", "Say hello.",
             "What is 2 + 2?", "Name a fruit.", "Name an animal."]


def user(text):
    return [{"role": "user", "content": text}]


@pytest.fixture(scope="module")
def cluster(bundled_model_dir, tmp_path_factory, root):
    workdir = serve_workdir(tmp_path_factory.mktemp("serve"), root, "llm")
    cluster = Cluster([Replica(bundled_model_dir, workdir, name) for name in ("a", "b")])
    try:
        cluster.ensure_up()
        yield cluster
    finally:
        for r in cluster.replicas:
            r.stop()


def backend(urls, model_dir, **kwargs):
    kwargs = {"max_retries": 1, "backoff_s": 0.05, "timeout_s": 60.0, **kwargs}
    return OpenAIBackend(urls, str(model_dir), **kwargs)


def test_longctx_serve_runs_transformers_serve_as_the_hf_backend_would(tmp_path, capsys):
    from longctx.cli import main, serve_argv

    argv = serve_argv(Path("models/base"), "127.0.0.1", 8001, "cpu", "auto", ["--compile"])
    assert argv[argv.index("serve"):] == [
        "serve", "models/base", "--device", "cpu", "--dtype", "float32",  # not the bf16 weights
        "--host", "127.0.0.1", "--port", "8001", "--compile"]
    assert Path(argv[0]).name == "transformers" or argv[:2] == [sys.executable, "-c"]
    assert main(["serve", "--model", str(tmp_path / "missing")]) == 1
    assert "missing: no model directory (run `snakemake models/base`)" in capsys.readouterr().err


def test_the_official_client_gets_chat_streaming_and_completions_with_usage(cluster,
                                                                          bundled_model_dir):
    openai = pytest.importorskip("openai")
    a, _ = cluster.ensure_up()
    client = openai.OpenAI(base_url=a.url, api_key="unused", max_retries=0)
    model = str(bundled_model_dir)  # a server pinned to a dir answers to its path
    chat = client.chat.completions.create(model=model, messages=user(QUESTIONS[0]),
                                          max_tokens=8, temperature=0)
    assert "Paris" in chat.choices[0].message.content and chat.usage.completion_tokens <= 8
    parts, usage = [], None
    for chunk in client.chat.completions.create(model=model, messages=user(QUESTIONS[0]),
                                                max_tokens=8, temperature=0, stream=True,
                                                stream_options={"include_usage": True}):
        parts += [c.delta.content or "" for c in chunk.choices]
        usage = chunk.usage or usage
    assert "".join(parts) == chat.choices[0].message.content  # greedy: the same text
    assert usage.completion_tokens == chat.usage.completion_tokens
    text = client.completions.create(model=model, prompt="The capital of France is",
                                     max_tokens=4, temperature=0)
    assert "Paris" in text.choices[0].text and text.usage.prompt_tokens > 0


def test_the_calls_are_spread_over_both_replicas(cluster, bundled_model_dir, tmp_path):
    a, b = cluster.ensure_up()
    before = [a.answered(), b.answered()]
    cfg = LLMConfig(backend="openai", base_url=[a.url, b.url], max_concurrency=2,
                    max_retries=1)
    with make_llm(cfg, bundled_model_dir, cache_path=tmp_path / "calls.sqlite") as llm:
        outs = llm.chat([user(q) for q in QUESTIONS[:4]], GREEDY, "t/1")
        assert "Paris" in outs[0].text
        assert all(o.text and 0 < o.completion_tokens <= 8 and o.prompt_tokens for o in outs)
        served = llm.backend.replicas.served  # the client's count, and the servers' logs:
        assert sum(served) == 4 and min(served) >= 1, served
        assert [r.answered_since(n, k) for r, n, k in zip((a, b), before, served)] == served
        again = llm.chat([user(q) for q in QUESTIONS[:4]], GREEDY, "t/1")
        assert again == outs and llm.last.hits == 4  # whichever replica answered
    # the replicas agree (same weights, greedy), so the cache need not know which answered
    alone = [complete(backend(r.url, bundled_model_dir), [user(QUESTIONS[0])], GREEDY)[0]
             for r in (a, b)]
    assert alone[0] == alone[1] == outs[0]


def test_killing_one_replica_mid_way_leaves_the_other_to_finish(cluster, bundled_model_dir):
    a, b = cluster.ensure_up()
    before = a.answered()
    two = backend([a.url, b.url], bundled_model_dir, max_concurrency=2)
    stream = two.generate([user(q) for q in QUESTIONS], GREEDY, [0] * len(QUESTIONS))
    got = dict([next(stream)])  # one done, the next ones in flight on both
    b.kill()
    got.update(stream)
    assert sorted(got) == list(range(len(QUESTIONS)))
    assert all(c.text for c in got.values())
    assert list(two.replicas.down()) == [b.url]
    served = two.replicas.served[0]
    assert a.answered_since(before, served) == served >= len(QUESTIONS) - 2


def test_every_replica_gone_is_one_clear_error(cluster, bundled_model_dir):
    a, b = cluster.replicas  # up or not: none is restarted only to be killed
    for r in (a, b):
        r.kill()
    both = backend([a.url, b.url], bundled_model_dir)
    with pytest.raises(LongctxError) as info:
        complete(both, [user(q) for q in QUESTIONS[:2]], GREEDY)
    message = str(info.value)
    assert message.startswith(f"llm.base_url: every replica is down: {a.url} (")
    assert f"; {b.url} (" in message and "ConnectionRefusedError" in message
