"""Helpers for the UI tests (gradio_client in tests/test_ui*.py and tests/test_arena*.py, Playwright in
tests/browser/): a scripted engine, a real server on a free loopback port, Chromium's launch flags.
No tests here."""

import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

CHROMIUM = Path("/usr/bin/chromium")
# Debian's Chromium, driven by Playwright (`playwright install` can't download browsers here).
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]


class ScriptedEngine:
    """A ChatEngine whose replies are predictable: "<model> says: w1 w2 ..." one word per chunk,
    `delay` seconds apart, up to max_new_tokens words. It honours `cancel` (and records that it
    saw it) and tracks how many streams run at once."""

    def __init__(self, names=("alpha", "beta", "gamma"), delay: float = 0.01):
        from chatbuild.engines import Chunk

        self.Chunk = Chunk
        self.names, self.delay = list(names), delay
        self.requests: list[tuple[list[dict], object, str]] = []
        self.cancelled = 0
        self.active = self.peak = 0
        self._lock = threading.Lock()

    def models(self) -> list[str]:
        return list(self.names)

    def stream(self, messages, params, model, cancel=None):
        if model not in self.names:
            raise KeyError(model)
        self.requests.append((messages, params, model))
        with self._lock:
            self.active += 1
            self.peak = max(self.peak, self.active)
        try:
            words = [f"{model} says:"] + [f"w{i}" for i in range(1, params.max_new_tokens)]
            for n, word in enumerate(words[: params.max_new_tokens], start=1):
                if cancel is not None and cancel.is_set():
                    self.cancelled += 1
                    yield self.Chunk("", "cancelled", prompt_tokens=7, completion_tokens=n - 1)
                    return
                time.sleep(self.delay)
                yield self.Chunk(("" if n == 1 else " ") + word, None, prompt_tokens=7, completion_tokens=n)
            yield self.Chunk("", "length", prompt_tokens=7, completion_tokens=params.max_new_tokens)
        finally:
            with self._lock:
                self.active -= 1

    def close(self) -> None:
        pass


@contextmanager
def serving(app) -> Iterator[str]:
    """Run an ASGI app with uvicorn in a thread on a free loopback port; yields its base URL."""
    import uvicorn

    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    # Open streams (gradio_client keeps some) would hold a graceful shutdown for long: cut it short.
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on", timeout_graceful_shutdown=1))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("the test server did not start")
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}/"
    finally:
        server.should_exit = True
        server.force_exit = True  # don't wait on streams clients left open (gradio_client's heartbeat)
        thread.join(timeout=15)
        sock.close()


@contextmanager
def gradio_client(url: str, **kwargs):
    """A gradio_client.Client for `url`, closed (its heartbeat stream ended) afterwards."""
    from gradio_client import Client

    client = Client(url, verbose=False, **kwargs)
    try:
        yield client
    finally:
        client.close()


def messages_of(chat) -> list[dict]:
    """A Chatbot output as gradio_client returns it: a list of messages, or an update
    {"value": [...], "label": ..., "__type__": "update"} when the event changed the label too."""
    return chat["value"] if isinstance(chat, dict) else chat


def text_of(message: dict) -> str:
    """Text of a chat message as gradio_client returns it (content: a string or a list of parts)."""
    content = message["content"]
    if isinstance(content, str):
        return content
    return "".join(part.get("text", "") for part in content)


def battles_in(db_path: Path) -> list[dict]:
    from chatbuild import storage

    return storage.list_battles(db_path)


def ui_app(engine, db_path: Path, **settings):
    """The serving app (`serve.app.create_app`: API under /v1, UI at /) over `engine`, with its
    SQLite database at `db_path`; `settings` are other `serve.settings.Settings` fields."""
    from serve.app import create_app
    from serve.settings import Settings

    return create_app(engine, Settings(db_path=str(db_path), **settings), ui=True)
