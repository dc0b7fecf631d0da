"""The OpenAI-compatible API over real HTTP: the official `openai` client, unmodified, against a
uvicorn server on 127.0.0.1 serving two adapters and the base from one 4-bit base; concurrency,
disconnects, auth, validation, limits and the bounded queue; the remote engine against our own
server; the `chatbuild serve` command."""

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest

from chatbuild.engines import GenerationParams, RemoteError, UnknownModel
from serve.settings import Settings

KEY = "sk-test-0123456789"
HELLO = [{"role": "user", "content": "What should I cook tonight?"}]
MAX_TOKENS = 8
REPO = Path(__file__).resolve().parent.parent


# ── fixtures: runs, one engine, servers in threads ──────────────────────────────────────────
@pytest.fixture(scope="module")
def solo(engine) -> dict[str, str]:
    """Each model's greedy reply to HELLO straight from the engine, alone."""
    params = GenerationParams(temperature=0, max_new_tokens=MAX_TOKENS)
    return {m: "".join(c.text for c in engine.stream(HELLO, params, m)) for m in engine.models()}


@contextmanager
def serving(app):
    """Run `app` with uvicorn in a thread on a free port of 127.0.0.1; yields the root URL."""
    import uvicorn

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=2))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    while not server.started:
        assert thread.is_alive(), "the server did not start"
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)
        sock.close()


def app_for(engine, **settings):
    from serve.app import create_app

    return create_app(engine, Settings(**settings), ui=False)


@pytest.fixture(scope="module")
def server(engine):
    """The main server: key required, a small prompt limit."""
    app = app_for(engine, api_key=KEY, max_prompt_tokens=200, max_new_tokens=512)
    with serving(app) as url:
        yield url


@pytest.fixture
def client(server):
    from openai import OpenAI

    with OpenAI(base_url=f"{server}/v1", api_key=KEY, max_retries=0, timeout=120) as client:
        yield client


def completion_body(model="run-a", **extra) -> dict:
    return {"model": model, "messages": HELLO, "temperature": 0, "max_tokens": MAX_TOKENS, **extra}


def wait_until(condition, what: str, timeout: float = 60.0) -> None:
    """Poll `condition` (state of the engine or the server, never a duration) until it holds."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting until {what}"
        time.sleep(0.02)


@contextmanager
def streaming(url: str, body: dict, key: str | None = KEY):
    """An SSE request held open: yields (response, iterator over its data lines)."""
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    with httpx.Client(timeout=120) as http, http.stream("POST", f"{url}/v1/chat/completions", json=body,
                                                        headers=headers) as response:
        lines = (line[len("data: "):] for line in response.iter_lines() if line.startswith("data: "))
        yield response, lines


# ── the openai client against the server ────────────────────────────────────────────────────
@pytest.mark.integration
def test_the_openai_client_lists_the_runs_and_the_base(client, tiny_base):
    assert [m.id for m in client.models.list()] == ["run-a", "run-b", tiny_base.name]
    assert client.models.retrieve("run-b").id == "run-b"


@pytest.mark.integration
def test_non_streamed_completions_from_both_adapters_and_the_base(client, engine, solo):
    for model in engine.models():
        reply = client.chat.completions.create(model=model, messages=HELLO, temperature=0, max_tokens=MAX_TOKENS)
        assert reply.model == model and reply.object == "chat.completion"
        assert reply.choices[0].message.role == "assistant"
        assert reply.choices[0].message.content == solo[model]
        assert reply.choices[0].finish_reason in ("stop", "length")
        assert reply.usage.prompt_tokens == engine.count_tokens(HELLO, model)
        assert 1 <= reply.usage.completion_tokens <= MAX_TOKENS
        assert reply.usage.total_tokens == reply.usage.prompt_tokens + reply.usage.completion_tokens


@pytest.mark.integration
def test_streamed_completions_from_both_adapters_and_the_base(client, engine, solo):
    for model in engine.models():
        events = list(client.chat.completions.create(model=model, messages=HELLO, temperature=0, max_tokens=MAX_TOKENS,
                                                     stream=True, stream_options={"include_usage": True}))
        assert events[0].choices[0].delta.role == "assistant"
        text = "".join(e.choices[0].delta.content or "" for e in events if e.choices)
        assert text == solo[model]
        finishes = [e.choices[0].finish_reason for e in events if e.choices and e.choices[0].finish_reason]
        assert finishes in (["stop"], ["length"])
        assert events[-1].choices == [] and events[-1].usage.completion_tokens >= 1
        assert events[-1].usage.prompt_tokens == engine.count_tokens(HELLO, model)


@pytest.mark.integration
def test_a_stream_ends_with_done(server):
    with streaming(server, completion_body(stream=True)) as (response, lines):
        assert response.status_code == 200 and response.headers["content-type"].startswith("text/event-stream")
        data = list(lines)
    assert data[-1] == "[DONE]"
    assert all("usage" not in json.loads(d) for d in data[:-1])  # usage only when asked for


@pytest.mark.integration
def test_concurrent_requests_for_different_models_each_get_their_own_reply(client, engine, solo):
    """Greedy replies compared token for token (as text) with the same request served alone."""
    models = engine.models() * 2
    results, errors = {}, []

    def ask(i, model):
        try:
            stream = client.chat.completions.create(model=model, messages=HELLO, temperature=0, max_tokens=MAX_TOKENS,
                                                    stream=i % 2 == 0)
            results[i] = ("".join(e.choices[0].delta.content or "" for e in stream if e.choices) if i % 2 == 0
                          else stream.choices[0].message.content)
        except Exception as e:  # reported by the main thread
            errors.append(e)

    threads = [threading.Thread(target=ask, args=(i, m)) for i, m in enumerate(models)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert [results[i] for i in range(len(models))] == [solo[m] for m in models]
    wait_until(lambda: engine.active == 0, "all generations ended")


# ── cancel on disconnect, the queue ─────────────────────────────────────────────────────────
@pytest.mark.integration
def test_a_client_disconnect_cancels_its_generation_and_frees_the_slot(engine):
    app = app_for(engine, max_running=1, queue_size=0)  # one slot: the next request needs it back
    with serving(app) as url:
        with streaming(url, completion_body(stream=True, max_tokens=400), key=None) as (response, lines):
            assert response.status_code == 200
            next(lines), next(lines)  # the role, then the first piece of text: generation is under way
            assert engine.active == 1
        # the client hung up after a few of its 400 tokens
        wait_until(lambda: engine.active == 0 and app.state.serve.admission.running == 0, "the generation stopped")
        record = engine.recent[-1]
        assert record.model == "run-a" and record.finish_reason == "cancelled" and record.completion_tokens < 400
        reply = httpx.post(f"{url}/v1/chat/completions", json=completion_body(), timeout=120)
        assert reply.status_code == 200, reply.text


@pytest.mark.integration
def test_a_full_queue_answers_429_with_retry_after(engine, solo):
    app = app_for(engine, max_running=1, queue_size=1)
    admission = lambda: app.state.serve.admission  # noqa: E731
    with serving(app) as url:
        with streaming(url, completion_body(stream=True, max_tokens=400), key=None) as (response, lines):
            next(lines)  # running: holds the only slot
            queued = {}
            waiter = threading.Thread(target=lambda: queued.update(
                reply=httpx.post(f"{url}/v1/chat/completions", json=completion_body("run-b"), timeout=120)))
            waiter.start()
            wait_until(lambda: admission().waiting == 1, "the second request is queued")
            refused = httpx.post(f"{url}/v1/chat/completions", json=completion_body(), timeout=30)
            assert refused.status_code == 429
            assert int(refused.headers["retry-after"]) >= 1
            assert refused.json()["error"]["code"] == "queue_full"
        waiter.join()  # the stream above hung up: the queued request gets the slot
        assert queued["reply"].status_code == 200
        assert queued["reply"].json()["choices"][0]["message"]["content"] == solo["run-b"]


@pytest.mark.integration
def test_a_client_that_leaves_the_queue_frees_its_place(engine):
    app = app_for(engine, max_running=1, queue_size=1)
    admission = lambda: app.state.serve.admission  # noqa: E731
    with serving(app) as url:
        with streaming(url, completion_body(stream=True, max_tokens=400), key=None) as (_, lines):
            next(lines)  # running: holds the only slot
            body = json.dumps(completion_body("run-b")).encode()
            with socket.create_connection(("127.0.0.1", int(url.rsplit(":", 1)[1]))) as raw:
                raw.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: test\r\nContent-Type: application/json\r\n"
                            b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
                wait_until(lambda: admission().waiting == 1, "the request is queued")
            # hung up while queued
            wait_until(lambda: admission().waiting == 0, "its place in the queue is free")
            assert engine.active == 1 and admission().running == 1  # the running reply goes on undisturbed


@pytest.mark.integration
def test_the_openai_client_sees_429_as_a_rate_limit(engine):
    from openai import OpenAI, RateLimitError

    app = app_for(engine, max_running=1, queue_size=0)
    with serving(app) as url, OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0) as client:
        with streaming(url, completion_body(stream=True, max_tokens=400), key=None) as (_, lines):
            next(lines)
            with pytest.raises(RateLimitError):
                client.chat.completions.create(**completion_body())


# ── bad requests, over HTTP ─────────────────────────────────────────────────────────────────
@pytest.mark.integration
def test_a_missing_or_wrong_key_is_401_and_health_needs_none(server):
    from openai import AuthenticationError, OpenAI

    assert httpx.post(f"{server}/v1/chat/completions", json=completion_body()).status_code == 401
    assert httpx.get(f"{server}/v1/models").status_code == 401
    with OpenAI(base_url=f"{server}/v1", api_key="sk-wrong", max_retries=0) as wrong:
        with pytest.raises(AuthenticationError) as e:
            wrong.models.list()
    assert e.value.status_code == 401 and e.value.body["code"] == "invalid_api_key"
    health = httpx.get(f"{server}/healthz")
    assert health.status_code == 200 and health.json()["status"] == "ok"


@pytest.mark.integration
def test_invalid_requests_are_400_naming_the_field(client, server):
    from openai import BadRequestError

    cases = [({"temperature": 5}, "temperature"), ({"top_p": 0}, "top_p"), ({"max_tokens": 0}, "max_tokens"),
             ({"n": 2}, "n"), ({"max_tokens": 10_000}, "max_tokens"), ({"stop": ["a", "b", "c", "d", "e"]}, "stop")]
    for extra, field in cases:
        with pytest.raises(BadRequestError) as e:
            client.chat.completions.create(**{**completion_body(), **extra})
        assert e.value.status_code == 400 and e.value.body["param"] == field, (extra, e.value.body)
    with pytest.raises(BadRequestError) as e:
        client.chat.completions.create(model="run-a", messages=[{"role": "robot", "content": "hi"}])
    assert e.value.body["param"] == "messages.0.role"
    with pytest.raises(BadRequestError, match="must end with a user message"):
        client.chat.completions.create(model="run-a", messages=[*HELLO, {"role": "assistant", "content": "Soup."}])

    headers = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}
    broken = httpx.post(f"{server}/v1/chat/completions", content=b'{"model": "run-a", "messages": [', headers=headers)
    assert broken.status_code == 400 and "not valid JSON" in broken.json()["error"]["message"]
    missing = httpx.post(f"{server}/v1/chat/completions", json={"model": "run-a"}, headers=headers)
    assert missing.status_code == 400 and missing.json()["error"]["param"] == "messages"
    huge = httpx.post(f"{server}/v1/chat/completions", content=b" " * 1_100_000, headers=headers)
    assert huge.status_code == 413


@pytest.mark.integration
def test_an_unknown_model_is_404_listing_the_models(client, tiny_base):
    from openai import NotFoundError

    with pytest.raises(NotFoundError) as e:
        client.chat.completions.create(**completion_body("gpt-5"))
    assert e.value.body["code"] == "model_not_found"
    assert f"run-a, run-b, {tiny_base.name}" in e.value.body["message"]


@pytest.mark.integration
def test_a_prompt_over_the_limit_is_400_saying_the_limit(client, engine):
    from openai import BadRequestError

    with pytest.raises(BadRequestError) as e:
        client.chat.completions.create(model="run-a", messages=[{"role": "user", "content": "word " * 300}])
    assert e.value.body["code"] == "context_length_exceeded" and "at most 200" in e.value.body["message"]
    assert engine.active == 0


# ── the app without an engine yet, and its root ─────────────────────────────────────────────
def test_health_is_503_until_an_engine_is_attached():
    from fastapi.testclient import TestClient

    from serve.app import attach_engine, create_app

    class Echo:
        def models(self):
            return ["echo"]

    app = create_app(None, Settings(), ui=False)
    with TestClient(app) as http:
        assert http.get("/healthz").status_code == 503
        assert http.get("/v1/models").status_code == 503
        attach_engine(app, Echo())
        assert http.get("/healthz").json() == {"status": "ok", "models": ["echo"]}
        assert http.get("/v1/models").json()["data"][0]["id"] == "echo"
        root = http.get("/")
        assert root.status_code == 200 and "/v1" in root.text


# ── the remote engine, talking to our own server ────────────────────────────────────────────
@pytest.mark.integration
def test_the_remote_engine_gets_what_the_local_one_gets(server, engine, solo):
    from chatbuild.engines.remote import RemoteEngine

    remote = RemoteEngine(server, api_key=KEY)  # the root URL: /v1 is added
    try:
        assert remote.models() == engine.models()
        chunks = list(remote.stream(HELLO, GenerationParams(temperature=0, max_new_tokens=MAX_TOKENS), "run-b"))
        assert "".join(c.text for c in chunks) == solo["run-b"]
        assert chunks[-1].finish_reason in ("stop", "length")
        assert chunks[-1].prompt_tokens == engine.count_tokens(HELLO, "run-b") and chunks[-1].completion_tokens >= 1
        with pytest.raises(UnknownModel):
            remote.stream(HELLO, GenerationParams(), "gpt-5")
        with pytest.raises(RemoteError, match="at most 200") as e:
            list(remote.stream([{"role": "user", "content": "word " * 300}], GenerationParams(), "run-a"))
        assert e.value.status == 400
    finally:
        remote.close()


@pytest.mark.integration
def test_cancelling_a_remote_stream_stops_the_server_generating(server, engine):
    import threading as th

    from chatbuild.engines.remote import RemoteEngine

    remote, cancel = RemoteEngine(f"{server}/v1", api_key=KEY), th.Event()
    try:
        stream = remote.stream(HELLO, GenerationParams(temperature=0, max_new_tokens=400), "run-a", cancel=cancel)
        next(stream)
        cancel.set()
        assert list(stream)[-1].finish_reason == "cancelled"
        wait_until(lambda: engine.active == 0, "the server's generation stopped")
        assert engine.recent[-1].finish_reason == "cancelled" and engine.recent[-1].completion_tokens < 400
    finally:
        remote.close()
    with pytest.raises(RemoteError, match="401"):
        RemoteEngine(server, api_key="sk-wrong").models()


# ── the command ─────────────────────────────────────────────────────────────────────────────
def test_serve_without_anything_to_serve_is_a_usage_error():
    out = subprocess.run([sys.executable, "-m", "chatbuild.cli", "serve"], capture_output=True, text=True, cwd=REPO)
    assert out.returncode == 2 and "nothing to serve" in out.stderr


@contextmanager
def serve_process(*args: str, env: dict[str, str]):
    """`chatbuild serve ARGS --no-ui` as a child process on a free port, healthy; yields its base URL
    and stops it with SIGINT afterwards (it must exit 0)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "chatbuild.cli", "serve", *args, "--port", str(port),
                             "--no-ui", "--log-level", "warning"], cwd=REPO, env={**os.environ, **env},
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        def healthy():
            assert proc.poll() is None, proc.stdout.read()
            try:
                return httpx.get(f"http://127.0.0.1:{port}/healthz").status_code == 200
            except httpx.TransportError:
                return False

        wait_until(healthy, "the server answers", timeout=180)
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=60) == 0


@pytest.mark.integration
def test_chatbuild_serve_serves_a_run(runs):
    with serve_process(str(runs["run-a"]), env={"CHATBUILD_API_KEY": KEY}) as url:
        models = httpx.get(f"{url}/v1/models", headers={"Authorization": f"Bearer {KEY}"})
        assert [m["id"] for m in models.json()["data"]][0] == "run-a"


@pytest.mark.integration
def test_serve_base_tiny_serves_the_embedded_base(tiny_base, tmp_path):
    """`--base tiny` means the embedded base in $CHATBUILD_HOME/tiny-base (here a copy of the test one,
    so nothing is rebuilt), like `model.base: tiny` in a run config."""
    import shutil

    shutil.copytree(tiny_base, tmp_path / "tiny-base")
    with serve_process("--base", "tiny", env={"CHATBUILD_HOME": str(tmp_path)}) as url:
        models = httpx.get(f"{url}/v1/models").json()
        assert [m["id"] for m in models["data"]] == ["tiny-base"]
