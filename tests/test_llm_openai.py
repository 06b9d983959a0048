"""The OpenAI-compatible client against scripted HTTP servers on localhost (test doubles that
fail, stall, hang up and count): retries, timeouts, replicas, seeds and the key. The real
server, `transformers serve`, is in test_llm_serve.py."""

import json
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from llm_data import complete, user

from longctx.errors import LongctxError
from longctx.llm import LLM, CallCache, Sampling
from longctx.llm.openai import OpenAIBackend, Replicas

SECRET = "sk-test-9f8e7d6c5b4a"
SAMPLED = Sampling(max_new_tokens=9, temperature=0.7, top_p=0.8)


class Script:
    """What a fake server does: fail the first requests, stall one, hang up on some, answer
    a bad shape, and record everything."""

    def __init__(self, fail_first=0, status=503, stall_first=0, stall_s=0.0, delay_s=0.0,
                 hang_up=False, slow_s=0.0, shape=None):
        self.fail_first, self.status = fail_first, status
        self.stall_first, self.stall_s, self.delay_s = stall_first, stall_s, delay_s
        self.hang_up = hang_up  # close the connection without a reply (a process that died)
        self.slow_s = slow_s  # extra delay for messages starting with "slow"
        self.shape = shape  # a reply body to send instead of a completion
        self.lock = threading.Lock()
        self.requests, self.auth, self.bodies = 0, [], []
        self.in_flight = self.max_in_flight = 0


def fake_handler(script):
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def do_POST(self):  # noqa: N802
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            n = self._count(body)
            if script.hang_up:
                self.close_connection = True
                self.connection.shutdown(socket.SHUT_RDWR)
                return
            text = body["messages"][-1]["content"]
            try:
                if n <= script.stall_first:
                    time.sleep(script.stall_s)  # longer than the client waits
                time.sleep(script.delay_s + (script.slow_s if text.startswith("slow") else 0))
            finally:  # done before the reply leaves: the client's next request may come at once
                with script.lock:
                    script.in_flight -= 1
            if n <= script.fail_first + script.stall_first:
                self._send(script.status, {"error": {"message": "overloaded"}})
            elif script.shape is not None:
                self._send(200, script.shape)
            else:
                self._send(200, {"choices": [{"index": 0, "finish_reason": "length",
                                              "message": {"role": "assistant",
                                                          "content": text[::-1]}}],
                                 "usage": {"prompt_tokens": 3, "completion_tokens": 2}})

        def _count(self, body):
            with script.lock:
                script.requests += 1
                script.auth.append(self.headers.get("Authorization"))
                script.bodies.append(body)
                script.in_flight += 1
                script.max_in_flight = max(script.max_in_flight, script.in_flight)
                return script.requests

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


@pytest.fixture
def fake():
    servers = []

    def run(script):
        server = ThreadingHTTPServer(("127.0.0.1", 0), fake_handler(script))
        server.daemon_threads = True
        servers.append(server)
        threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05},
                         daemon=True).start()
        return f"http://127.0.0.1:{server.server_port}/v1"

    yield run
    for server in servers:
        server.shutdown()
        server.server_close()


def closed_port_url():
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}/v1"


def client(url, **kwargs):
    kwargs = {"max_retries": 3, "backoff_s": 0.01, "timeout_s": 5.0, **kwargs}
    return OpenAIBackend(url, "m", **kwargs)


# --------------------------------------------------------------------------- one server


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
    with pytest.raises(LongctxError, match=rf"^llm.base_url {url}: unreachable after 2 retries "
                                           r"\(last error: HTTP 502"):
        complete(client(url, max_retries=2), [user("a")], Sampling())
    assert script.requests == 3


def test_an_unreachable_endpoint_gives_a_clear_error_after_the_retries():
    """The only server is retried even when refused: it may be restarting."""
    url = closed_port_url()
    with pytest.raises(LongctxError, match=rf"^llm.base_url {url}: unreachable after 2 retries "
                                           r"\(last error: ConnectionRefusedError"):
        complete(client(url, max_retries=2), [user("a")], Sampling())


def test_client_errors_are_not_retried(fake):
    script = Script(fail_first=100, status=401)
    with pytest.raises(LongctxError, match=r"HTTP 401 .*check llm.api_key_env"):
        complete(client(fake(script)), [user("a")], Sampling())
    assert script.requests == 1


def test_an_unexpected_shape_is_a_clear_error(fake):
    url = fake(Script(shape={"choices": []}))
    with pytest.raises(LongctxError, match=rf"^llm.base_url {url}: unexpected response shape "
                                           r"\(IndexError"):
        complete(client(url), [user("a")], Sampling())


def test_requests_in_flight_are_bounded(fake):
    script = Script(delay_s=0.05)
    chats = [user(f"q{i}") for i in range(24)]
    outs = complete(client(fake(script), max_concurrency=3), chats, Sampling())
    assert [o.text for o in outs] == [f"q{i}"[::-1] for i in range(24)]
    assert 2 <= script.max_in_flight <= 3


def test_completions_are_yielded_as_they_finish(fake):
    """A straggler holds nothing back: LLM can store the others first."""
    script = Script(slow_s=0.6)
    chats = [user("slow one"), user("quick"), user("quick too")]
    order = [i for i, _ in client(fake(script)).generate(chats, Sampling(), [0, 0, 0])]
    assert sorted(order) == [0, 1, 2] and order[-1] == 0


def test_each_request_carries_its_own_seed_when_sampling(fake):
    script = Script()
    complete(client(fake(script)), [user("a"), user("b")], SAMPLED, seeds=[11, 2**31 - 1])
    bodies = sorted(script.bodies, key=lambda b: b["messages"][0]["content"])
    for body in bodies:
        assert (body["model"], body["max_tokens"], body["temperature"], body["top_p"]) == \
               ("m", 9, 0.7, 0.8)
    assert [b["seed"] for b in bodies] == [11, 2**31 - 1]
    complete(client(fake(script)), [user("c")], Sampling(), seeds=[5])  # greedy: no seed
    assert "seed" not in script.bodies[-1] and script.bodies[-1]["temperature"] == 0.0


def test_seeds_must_match_the_chats(fake):
    with pytest.raises(ValueError, match="1 seeds for 2 chats"):
        list(client(fake(Script())).generate([user("a"), user("b")], Sampling(), [0]))


def test_the_identity_names_the_model_not_the_servers(fake):
    a = OpenAIBackend("http://10.0.0.1:8000/v1", "m")
    b = OpenAIBackend(["http://10.0.0.2:9000/v1/", "http://10.0.0.3:8000/v1"], "m")
    assert a.identity == b.identity == {"backend": "openai", "model": "m"}
    known = OpenAIBackend("http://h/v1", "models/base", model_identity={"files": {"x": "ab"}})
    assert known.identity == {"backend": "openai", "model": {"files": {"x": "ab"}}}


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


# --------------------------------------------------------------------------- replicas


def test_calls_are_spread_over_the_replicas(fake):
    a, b = Script(delay_s=0.02), Script(delay_s=0.02)
    backend = client([fake(a), fake(b)], max_concurrency=4)
    outs = complete(backend, [user(f"q{i}") for i in range(16)], Sampling())
    assert [o.text for o in outs] == [f"q{i}"[::-1] for i in range(16)]
    assert a.requests + b.requests == 16 and min(a.requests, b.requests) >= 6
    assert backend.replicas.served == [a.requests, b.requests]


def test_one_request_at_a_time_still_reaches_every_replica(fake):
    a, b = Script(), Script()
    backend = client([fake(a), fake(b)], max_concurrency=1)
    complete(backend, [user(f"q{i}") for i in range(6)], Sampling())
    assert (a.requests, b.requests) == (3, 3)  # ties go round in turn


def test_the_least_busy_replica_takes_the_next_request(fake):
    slow, quick = Script(delay_s=0.3), Script(delay_s=0.01)
    backend = client([fake(slow), fake(quick)], max_concurrency=2)
    complete(backend, [user(f"q{i}") for i in range(12)], Sampling())
    assert quick.requests >= 8 > slow.requests


def test_a_refused_replica_hands_its_calls_to_the_others_at_once(fake):
    live = Script()
    dead = closed_port_url()
    backend = client([dead, fake(live)], max_retries=5, backoff_s=10.0)  # a retry would show
    t0 = time.perf_counter()
    outs = complete(backend, [user(f"q{i}") for i in range(8)], Sampling())
    assert [o.text for o in outs] == [f"q{i}"[::-1] for i in range(8)]
    assert time.perf_counter() - t0 < 3 and live.requests == 8
    assert backend.replicas.served == [0, 8]
    assert list(backend.replicas.down()) == [dead]


def test_a_replica_that_hangs_up_mid_request_hands_its_calls_on(fake):
    """A process killed while generating: the connection drops without a reply."""
    gone, live = Script(hang_up=True), Script()
    backend = client([fake(gone), fake(live)], backoff_s=10.0)
    outs = complete(backend, [user(f"q{i}") for i in range(6)], Sampling())
    assert [o.text for o in outs] == [f"q{i}"[::-1] for i in range(6)]
    assert 1 <= gone.requests <= 6 and backend.replicas.served == [0, 6]


def test_a_replica_failing_with_5xx_is_retried_then_left(fake):
    broken, live = Script(fail_first=100, status=500), Script()
    backend = client([fake(broken), fake(live)], max_retries=2, max_concurrency=1)
    complete(backend, [user(f"q{i}") for i in range(6)], Sampling())
    assert broken.requests == 3  # one request's own retries, then the replica is left alone
    assert live.requests == 6


def test_every_replica_down_is_one_error_naming_them_all(fake):
    broken = fake(Script(fail_first=100, status=503))
    dead = closed_port_url()
    backend = client([broken, dead], max_retries=1)
    with pytest.raises(LongctxError) as info:
        complete(backend, [user(f"q{i}") for i in range(4)], Sampling())
    message = str(info.value)
    assert message.startswith("llm.base_url: every replica is down: ")
    assert f"{broken} (unreachable after 1 retries (last error: HTTP 503: " in message
    assert f"{dead} (" in message and "ConnectionRefusedError" in message


def test_a_down_replica_is_tried_again_after_a_while():
    replicas = Replicas(["http://a/v1", "http://b/v1"], dead_s=0.2)
    replicas.mark_down(0, "HTTP 503")
    assert {replicas.acquire() for _ in range(3)} == {1}
    time.sleep(0.25)
    picked = [replicas.acquire() for _ in range(2)]
    assert 0 in picked  # a real request probes it
    replicas.mark_down(1, "refused")
    replicas.release(1, answered=True)  # a request it was already serving came back: alive
    assert replicas.others_live(0)
