"""A scripted OpenAI-compatible server for the benchmarks: the synthesis steps' LLM calls
answered at once, so a bench measures our code, not a model.

It answers `POST /v1/chat/completions` -- the one endpoint `longctx.llm.openai` calls -- with
the shape that client reads: `choices[0].message.content`, `choices[0].finish_reason`
("stop") and `usage` (prompt and completion tokens, estimated from words). Every reply is
a function of the request's messages alone (a SHA-256 of them seeds the words), so a rerun,
a retry or another shard count gets the same text.

The prompt kind is recognised from the templates of `longctx.synth.prompts` themselves: each
template is rendered once with sentinel arguments and cut at them into its fixed pieces, so
a request matches a kind when its text is those pieces in order with anything between. A
prompt of no known kind is answered HTTP 400 (the step then fails loudly: the prompts
changed and this script must follow). The replies are built to pass each step's filters:

- instructions: a numbered list of exactly the n asked for, each 8-14 random vocabulary
  words (inside instructions.min_words..max_words, and unrelated enough to survive exact and
  near-duplicate removal);
- qfs (level-0 summary) and merge (summary of summaries): a few sentences of random words;
- respond: an answer of a few sentences (no refusal opening, no loop, well above min_words);
- backtranslate: one sentence "Write a <kind> about <words> of about <n> words."

The vocabulary is the caller's (bench/scale.py passes the Lee corpus' words), with the
words some filter looks for left out (text, passage, instruction, sorry, ...), so a random
draw can never trip a filter by chance.

    python bench/scripted_llm.py --port 8000     # by hand: base_url http://127.0.0.1:8000/v1
"""

from __future__ import annotations

import hashlib
import json
import random
import re
import threading
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

# Words the synthesis filters react to (prompt references, refusals, loops' openers).
BLOCKED = {"text", "texts", "piece", "passage", "excerpt", "paragraph", "instruction",
           "instructions", "sorry", "apologise", "apologize", "unfortunately", "cannot",
           "can't", "unable", "assistant", "ai", "nothing", "relevant", "task", "question"}
KINDS = ("instructions", "qfs", "merge", "respond", "backtranslate")
TEXT_KINDS = ("report", "story", "review", "profile", "feature", "column")
_SENTINEL = "\x00{}\x00"


def clean_vocabulary(words: list[str]) -> list[str]:
    """Distinct lowercase alphabetic words of 3+ letters, the BLOCKED ones left out."""
    out = {w.lower() for w in words if w.isalpha() and len(w) >= 3}
    return sorted(out - BLOCKED)


def _templates() -> dict[str, tuple[re.Pattern, list[int]]]:
    """Each prompt kind as a regex (its template's fixed pieces, anything between them) and
    which argument each of its groups is."""
    from longctx.synth import prompts

    s = [_SENTINEL.format(i) for i in range(3)]
    rendered = {
        "instructions": prompts.instructions_prompt(s[0], s[1], s[2]),
        "qfs": prompts.qfs_prompt(s[0], s[1]),
        "merge": prompts.merge_prompt(s[0], [s[1]]),
        "respond": prompts.respond_prompt(s[0], [s[1]]),
        "backtranslate": prompts.backtranslate_prompt(s[0], s[1]),
    }
    out = {}
    for kind, chat in rendered.items():
        (message,) = chat
        pieces = re.split(r"\x00(\d)\x00", message["content"])  # text, arg, text, ...
        regex = "".join(re.escape(p) if i % 2 == 0 else "(.*?)" for i, p in enumerate(pieces))
        out[kind] = re.compile(regex, re.DOTALL), [int(a) for a in pieces[1::2]]
    return out


class Script:
    """The replies: the prompt kind of a chat, and its deterministic answer."""

    def __init__(self, vocabulary: list[str]) -> None:
        self.words = clean_vocabulary(vocabulary)
        if len(self.words) < 1000:
            raise ValueError(f"a vocabulary of {len(self.words)} usable words is too small")
        self.templates = _templates()
        self.served: Counter[str] = Counter()
        self._lock = threading.Lock()

    def kind(self, content: str) -> tuple[str, dict[int, str]] | None:
        """The prompt kind of `content` and its arguments by position, or None."""
        for kind, (pattern, args) in self.templates.items():
            match = pattern.fullmatch(content)
            if match:
                return kind, dict(zip(args, match.groups()))
        return None

    def reply(self, messages: list[dict]) -> tuple[str, str]:
        """(kind, content) for a chat's messages; KeyError for a prompt of no known kind."""
        content = "\n".join(str(m.get("content", "")) for m in messages)
        found = self.kind(content)
        if found is None:
            raise KeyError(content[:200])
        kind, args = found
        digest = hashlib.sha256(json.dumps(messages, sort_keys=True).encode()).digest()
        rng = random.Random(digest)
        with self._lock:
            self.served[kind] += 1
        if kind == "instructions":
            n = int(args[2])  # instructions_prompt(chunk, task_type, n)
            return kind, "\n".join(f"{i}. {self._phrase(rng, 8, 14)}?"
                                   for i in range(1, n + 1))
        if kind in ("qfs", "merge"):
            return kind, self._sentences(rng, 3 if kind == "qfs" else 2)  # merges shorten
        if kind == "respond":
            return kind, self._sentences(rng, 5)
        words = int(args[1])  # backtranslate_prompt(excerpt, words)
        return kind, (f"Write a {rng.choice(TEXT_KINDS)} about {self._phrase(rng, 4, 7).lower()}"
                      f" of about {words} words.")

    def _phrase(self, rng: random.Random, low: int, high: int) -> str:
        text = " ".join(rng.choices(self.words, k=rng.randint(low, high)))
        return text[0].upper() + text[1:]

    def _sentences(self, rng: random.Random, n: int) -> str:
        return " ".join(self._phrase(rng, 8, 14) + "." for _ in range(n))


def _handler(script: Script) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_POST(self) -> None:  # noqa: N802 (http.server's name)
            if self.path.rstrip("/") != "/v1/chat/completions":
                return self._send(404, {"error": {"message": f"no endpoint {self.path}"}})
            try:
                body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))))
                messages = body["messages"]
                kind, content = script.reply(messages)
            except KeyError as exc:
                return self._send(400, {"error": {"message": f"scripted_llm: a prompt of "
                                                             f"no known kind: {exc}"}})
            except (ValueError, TypeError) as exc:
                return self._send(400, {"error": {"message": f"bad request: {exc}"}})
            prompt = sum(len(str(m.get("content", "")).split()) for m in messages)
            self._send(200, {
                "id": "scripted", "object": "chat.completion", "model": body.get("model"),
                "choices": [{"index": 0, "finish_reason": "stop",
                             "message": {"role": "assistant", "content": content}}],
                "usage": {"prompt_tokens": prompt, "completion_tokens": len(content.split()),
                          "total_tokens": prompt + len(content.split())}})

        def _send(self, code: int, payload: dict) -> None:
            raw = json.dumps(payload).encode()
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(raw)))
            self.end_headers()
            self.wfile.write(raw)

        def log_message(self, *args) -> None:  # quiet: thousands of requests
            pass

    return Handler


class _Server(ThreadingHTTPServer):
    request_queue_size = 64  # the client keeps llm.max_concurrency connections in flight
    daemon_threads = True


class ScriptedServer:
    """The server on 127.0.0.1 (a free port unless given), serving in a daemon thread.

        with ScriptedServer(words) as server:
            params["llm"] = {"backend": "openai", "base_url": server.base_url, ...}
    """

    def __init__(self, vocabulary: list[str], port: int = 0) -> None:
        self.script = Script(vocabulary)
        self.httpd = _Server(("127.0.0.1", port), _handler(self.script))
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True,
                                       name="scripted-llm")

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"

    @property
    def served(self) -> dict[str, int]:
        return {kind: self.script.served[kind] for kind in KINDS}

    def __enter__(self) -> ScriptedServer:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def main() -> None:
    import argparse

    from longctx.assets import demo_corpus_files

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--port", type=int, default=8000)
    args = ap.parse_args()
    words = demo_corpus_files()["lee"].read_text(errors="replace").split()
    server = ScriptedServer(words, args.port)
    print(f"scripted LLM at {server.base_url}", flush=True)
    server.httpd.serve_forever()


if __name__ == "__main__":
    main()
