"""The OpenAI-compatible client against real HTTP servers on localhost: a scripted one that
fails, stalls and counts, and `longctx serve` itself on a tiny model."""

import json
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from llm_data import build_tiny_chat_model, complete, user

from longctx.errors import LongctxError
from longctx.llm import LLM, CallCache, Sampling
from longctx.llm.hf import HFBackend
from longctx.llm.openai import OpenAIBackend
from longctx.llm.serve import make_server

SECRET = "sk-test-9f8e7d6c5b4a"


class Script:
    """What the fake server does: fail the first requests, stall one, record everything."""

    def __init__(self, fail_first=0, status=503, stall_first=0, stall_s=0.0, delay_s=0.0):
        self.fail_first, self.status = fail_first, status
        self.stall_first, self.stall_s, self.delay_s = stall_first, stall_s, delay_s
        self.lock = threading.Lock()
        self.requests, self.auth, self.bodies = 0, [], []
        self.in_flight = self.max_in_flight = 0


def fake_handler(script):
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def do_POST(self):  # noqa: N802
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            with script.lock:
                script.requests += 1
                n = script.requests
                script.auth.append(self.headers.get("Authorization"))
                script.bodies.append(body)
                script.in_flight += 1
                script.max_in_flight = max(script.max_in_flight, script.in_flight)
            try:
                if n <= script.stall_first:
                    time.sleep(script.stall_s)  # longer than the client waits
                time.sleep(script.delay_s)
            finally:  # done before the reply leaves: the client's next request may come at once
                with script.lock:
                    script.in_flight -= 1
            if n <= script.fail_first + script.stall_first:
                self._send(script.status, {"error": {"message": "overloaded"}})
                return
            text = body["messages"][-1]["content"][::-1]
            self._send(200, {"choices": [{"index": 0, "finish_reason": "length",
                                          "message": {"role": "assistant", "content": text}}],
                             "usage": {"prompt_tokens": 3, "completion_tokens": 2}})

        def _send(self, status, obj):
            data = json.dumps(obj).encode()
            self.send_response(status)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            try:
                self.wfile.write(data)
            except OSError:  # the client gave up on a stalled request
                pass

    return Handler


def start(server):
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05},
                     daemon=True).start()
    return f"http://127.0.0.1:{server.server_port}/v1"


@pytest.fixture
def fake():
    servers = []

    def run(script):
        server = ThreadingHTTPServer(("127.0.0.1", 0), fake_handler(script))
        servers.append(server)
        return start(server)

    yield run
    for server in servers:
        server.shutdown()
        server.server_close()


def client(url, **kwargs):
    kwargs = {"max_retries": 3, "backoff_s": 0.01, "timeout_s": 5.0, **kwargs}
    return OpenAIBackend(url, "m", **kwargs)


def test_5xx_are_retried_until_success(fake):
    script = Script(fail_first=2, status=503)
    (out,) = complete(client(fake(script)), [user("abc")], Sampling(max_new_tokens=4))
    assert out.text == "cba" and out.finish_reason == "length" and out.completion_tokens == 2
    assert script.requests == 3


def test_a_timed_out_request_is_retried(fake):
    script = Script(stall_first=1, stall_s=1.5, fail_first=0)
    t0 = time.perf_counter()
    (out,) = complete(client(fake(script), timeout_s=0.5), [user("xy")], Sampling())
    assert out.text == "yx"
    assert script.requests == 2
    assert time.perf_counter() - t0 < 1.4  # it did not wait for the stalled answer


def test_persistent_5xx_gives_a_clear_error_after_the_retries(fake):
    script = Script(fail_first=100, status=502)
    url = fake(script)
    with pytest.raises(LongctxError, match=rf"llm.base_url {url}: unreachable after 2 retries "
                                           r"\(last error: HTTP 502"):
        complete(client(url, max_retries=2), [user("a")], Sampling())
    assert script.requests == 3


def test_an_unreachable_endpoint_gives_a_clear_error_after_the_retries():
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}/v1"
    with pytest.raises(LongctxError, match=rf"llm.base_url {url}: unreachable after 2 retries "
                                           r"\(last error: ConnectionRefusedError"):
        complete(client(url, max_retries=2), [user("a")], Sampling())


def test_client_errors_are_not_retried(fake):
    script = Script(fail_first=100, status=401)
    with pytest.raises(LongctxError, match=r"HTTP 401 .*check llm.api_key_env"):
        complete(client(fake(script)), [user("a")], Sampling())
    assert script.requests == 1


def test_requests_in_flight_are_bounded(fake):
    script = Script(delay_s=0.05)
    chats = [user(f"q{i}") for i in range(24)]
    outs = complete(client(fake(script), max_concurrency=3), chats, Sampling())
    assert [o.text for o in outs] == [f"q{i}"[::-1] for i in range(24)]  # input order
    assert 2 <= script.max_in_flight <= 3


def test_sampling_is_passed_through_with_per_request_seeds(fake):
    script = Script()
    sampling = Sampling(max_new_tokens=9, temperature=0.7, top_p=0.8, seed=5)
    complete(client(fake(script)), [user("a"), user("b")], sampling)
    bodies = sorted(script.bodies, key=lambda b: b["messages"][0]["content"])
    for body in bodies:
        assert (body["model"], body["max_tokens"], body["temperature"], body["top_p"]) == \
               ("m", 9, 0.7, 0.8)
    assert bodies[0]["seed"] != bodies[1]["seed"]
    complete(client(fake(script)), [user("c")], Sampling())  # greedy: no seed needed
    assert "seed" not in script.bodies[-1] and script.bodies[-1]["temperature"] == 0.0


def test_api_key_comes_from_the_named_variable_and_is_never_stored(fake, tmp_path,
                                                                   monkeypatch):
    script = Script()
    url = fake(script)
    monkeypatch.setenv("MY_LLM_KEY", SECRET)
    backend = client(url, api_key_env="MY_LLM_KEY")
    llm = LLM(backend, CallCache(tmp_path / "calls.sqlite"), batch_size=4)
    llm.chat([user("hello"), user("world")], Sampling(), "t/1")
    assert script.auth == [f"Bearer {SECRET}"] * 2
    assert SECRET not in json.dumps(backend.identity)
    llm.close()
    stored = b"".join(p.read_bytes() for p in tmp_path.iterdir())
    assert b"olleh" in stored  # the completions are there...
    assert SECRET.encode() not in stored  # ...the key is not

    monkeypatch.delenv("MY_LLM_KEY")
    complete(client(url, api_key_env="MY_LLM_KEY"), [user("x")], Sampling())
    assert script.auth[-1] is None  # no variable, no Authorization header


# --------------------------------------------------------------------------- longctx serve


@pytest.fixture(scope="module")
def tiny_server(tmp_path_factory):
    backend = HFBackend(build_tiny_chat_model(tmp_path_factory.mktemp("tiny") / "chat"))
    server = make_server(None, "127.0.0.1", 0, model_name="tiny", api_key=SECRET,
                         backend=backend)
    url = start(server)
    yield url, backend
    server.shutdown()
    server.server_close()


def test_served_completions_equal_the_local_backend(tiny_server, monkeypatch):
    url, local = tiny_server
    monkeypatch.setenv("SERVE_KEY", SECRET)
    remote = OpenAIBackend(url, "tiny", api_key_env="SERVE_KEY", max_retries=0)
    chats = [user("What is the capital of France?"), user("hi")]
    for sampling in (Sampling(max_new_tokens=5),
                     Sampling(max_new_tokens=5, temperature=1.0, seed=3)):
        seeds = [11, 12]  # each request's seed reaches the server's backend
        outs = complete(remote, chats, sampling, seeds)
        for chat, out, seed in zip(chats, outs, seeds):
            assert out == complete(local, [chat], sampling, [seed])[0]


def test_serve_answers_errors_the_openai_way(tiny_server, monkeypatch):
    url, _ = tiny_server
    with pytest.raises(LongctxError, match="HTTP 401"):
        complete(OpenAIBackend(url, "tiny", api_key_env="UNSET_VAR_XYZ"), [user("a")], Sampling())
    monkeypatch.setenv("SERVE_KEY", SECRET)
    with pytest.raises(LongctxError, match="HTTP 404 .*model `other` does not exist"):
        complete(OpenAIBackend(url, "other", api_key_env="SERVE_KEY"), [user("a")], Sampling())
    with pytest.raises(LongctxError, match=r"HTTP 400 .*prompt 0 has \d+ tokens"):
        complete(OpenAIBackend(url, "tiny", api_key_env="SERVE_KEY"),
            [user("x" * 600)], Sampling(max_new_tokens=4))
