"""A scripted OpenAI-compatible server for the evaluation tests, and checks that it is one.

`ScriptedServer(respond)` serves `POST /v1/chat/completions` and `GET /v1/models` on 127.0.0.1 over
real HTTP (stdlib `ThreadingHTTPServer`, one thread per request). `respond(body)` returns a `Reply`:
the assistant text, or an HTTP error status, a delay (to provoke client timeouts), or `hang=True`
(block until `release()`). Every request is logged with what was replied. The judge tests import it
from here (`from test_eval_server import ...`).
"""

import json
import threading
import time
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest


@dataclass
class Reply:
    text: str | None = None  # the assistant's reply (status 200)
    status: int = 200
    delay: float = 0.0  # seconds to wait before replying
    hang: bool = False  # wait until the server is released, then reply


class ScriptedServer:
    def __init__(self, respond, models=("judge",)):
        self.respond = respond
        self.models = list(models)
        self.log: list[tuple[dict, Reply]] = []  # (request body, reply), in arrival order
        self.lock = threading.Lock()
        self.released = threading.Event()
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"  # keep-alive, as real servers do

            def log_message(self, *args):
                pass

            def do_GET(self):
                if self.path.rstrip("/") == "/v1/models":
                    self._send(200, {"object": "list", "data": [{"id": m, "object": "model", "created": 0,
                                                                  "owned_by": "test"} for m in server.models]})
                else:
                    self._send(404, {"error": {"message": f"no route {self.path}"}})

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers.get("content-length", 0))) or b"{}")
                if self.path.rstrip("/") != "/v1/chat/completions":
                    return self._send(404, {"error": {"message": f"no route {self.path}"}})
                reply = server.respond(body)
                with server.lock:
                    server.log.append((body, reply))
                if reply.hang:
                    server.released.wait(60)
                time.sleep(reply.delay)
                if reply.status != 200:
                    return self._send(reply.status, {"error": {"message": f"scripted failure {reply.status}",
                                                               "type": "server_error"}})
                self._send(200, {
                    "id": f"chatcmpl-{len(server.log)}", "object": "chat.completion", "created": int(time.time()),
                    "model": body.get("model"),
                    "choices": [{"index": 0, "message": {"role": "assistant", "content": reply.text},
                                 "finish_reason": "stop"}],
                    "usage": {"prompt_tokens": 10, "completion_tokens": 5, "total_tokens": 15},
                })

            def _send(self, status, payload):
                data = json.dumps(payload).encode()
                try:
                    self.send_response(status)
                    self.send_header("content-type", "application/json")
                    self.send_header("content-length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)
                except (BrokenPipeError, ConnectionResetError):  # the client gave up (timeout, kill)
                    pass

        class Server(ThreadingHTTPServer):
            daemon_threads = True

            def handle_error(self, request, client_address):
                pass  # a client that hangs up mid-request (kill, timeout, close) is part of the tests

        self.httpd = Server(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.released.set()
        self.httpd.shutdown()
        self.httpd.server_close()

    def release(self):
        self.released.set()


def echo(body) -> Reply:
    return Reply(f"{body['model']} says: {body['messages'][-1]['content']}")


def test_the_official_openai_client_talks_to_it():
    openai = pytest.importorskip("openai")
    with ScriptedServer(echo, models=["alpha", "beta"]) as server:
        client = openai.OpenAI(base_url=server.url, api_key="unused", max_retries=0)
        assert [m.id for m in client.models.list()] == ["alpha", "beta"]
        out = client.chat.completions.create(model="alpha", messages=[{"role": "user", "content": "hi"}])
        assert out.choices[0].message.content == "alpha says: hi"


def test_client_retries_scripted_failures_and_timeouts():
    from eval.client import ChatClient, RequestFailed

    script = iter([Reply(status=503), Reply(status=500), Reply("slow", delay=1.0), Reply(status=429), Reply("ok")])
    with ScriptedServer(lambda body: next(script)) as server:
        client = ChatClient(server.url, timeout=0.3, retries=4, backoff=0.01)
        got = client.complete("judge", [{"role": "user", "content": "x"}])
        assert (got.text, got.attempts, client.retried) == ("ok", 5, 4)
        assert [r.status for _, r in server.log] == [503, 500, 200, 429, 200]

    with ScriptedServer(lambda body: Reply(status=502)) as server:
        client = ChatClient(server.url, retries=2, backoff=0.01)
        with pytest.raises(RequestFailed, match="HTTP 502.*3 attempts"):
            client.complete("judge", [{"role": "user", "content": "x"}])


def test_client_stops_at_once_on_a_wrong_key_or_model():
    from chatbuild.errors import UserError
    from eval.client import ChatClient

    with ScriptedServer(lambda body: Reply(status=401)) as server:
        client = ChatClient(server.url, retries=5, backoff=0.01)
        with pytest.raises(UserError, match="401"):
            client.complete("judge", [{"role": "user", "content": "x"}])
        assert len(server.log) == 1


def test_api_base_adds_v1_only_to_a_bare_host():
    from chatbuild.errors import UserError
    from eval.client import api_base

    assert api_base("http://127.0.0.1:8000") == "http://127.0.0.1:8000/v1"
    assert api_base("http://127.0.0.1:8000/v1/") == "http://127.0.0.1:8000/v1"
    assert api_base("https://example.org/openai/v1") == "https://example.org/openai/v1"
    with pytest.raises(UserError):
        api_base("localhost:8000")
