"""A small client for OpenAI-compatible chat completions, with retries and backoff.

Used by the judge and by answer generation for `NAME@URL` models. It speaks plain
`POST {base_url}/chat/completions` (non-streaming) over httpx, so it works against any
OpenAI-compatible server: OpenAI-style APIs, `chatbuild serve`, `vllm serve`.

Retries: timeouts, connection errors, HTTP 408/409/425/429 and 5xx, and 200 replies without a
message are retried up to `retries` times, waiting `backoff`·2^attempt seconds (halved at random, to
spread concurrent retries; at most `max_backoff`), or the server's Retry-After when it sends one.
401/403/404 mean the URL, key or model name is wrong for every request: they raise `ServerRefused`
(a `UserError`) at once. Other failures raise `RequestFailed` after the last attempt; callers record
and report them.

`EngineClient` has the same `complete`/`close` shape over an in-process engine (`chatbuild.engines`),
for a judge that chatbuild runs itself (`chatbuild eval judge --judge-model RUN`): no server, no
network.
"""

import queue
import random
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from urllib.parse import urlsplit

from chatbuild.availability import require
from chatbuild.errors import UserError

RETRY_STATUS = {408, 409, 425, 429}
FATAL_STATUS = {401: "the API key was refused", 403: "access denied", 404: "not found (check the URL and model name)"}


class RequestFailed(Exception):
    """A request that failed for good (after retries, or with a status that retrying cannot fix)."""


class ServerRefused(UserError):
    """401/403/404: the URL, key or model name is wrong, so every other request would fail too."""


@dataclass
class Completion:
    text: str
    finish_reason: str | None
    usage: dict = field(default_factory=dict)
    latency: float = 0.0  # seconds, the successful attempt only
    attempts: int = 1


def api_base(url: str) -> str:
    """'http://host:8000' → 'http://host:8000/v1'; URLs with a path are taken as given."""
    url = url.rstrip("/")
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise UserError(f'"{url}" is not an http(s) URL of an OpenAI-compatible API (e.g. http://127.0.0.1:8000/v1)')
    return url if parts.path else url + "/v1"


class ChatClient:
    """Thread-safe: one client serves all worker threads (httpx pools the connections)."""

    def __init__(self, base_url: str, api_key: str | None = None, timeout: float = 120.0, retries: int = 4,
                 backoff: float = 1.0, max_backoff: float = 30.0):
        require("httpx", "talking to an OpenAI-compatible server")
        import httpx

        self.url = api_base(base_url) + "/chat/completions"
        self.retries, self.backoff, self.max_backoff = retries, backoff, max_backoff
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._http = httpx.Client(timeout=timeout, headers=headers,
                                  limits=httpx.Limits(max_connections=64, max_keepalive_connections=64))
        self._httpx = httpx
        self._lock = threading.Lock()
        self._closed = threading.Event()
        self.retried = 0  # retries made so far, over all requests

    def close(self) -> None:
        """Stop: requests in flight fail (RequestFailed) instead of retrying. Used on an interrupt so
        worker threads end at once rather than after their timeouts."""
        self._closed.set()
        self._http.close()

    def complete(self, model: str, messages: list[dict], **params) -> Completion:
        """One chat completion: the assistant's text. `params` go into the request body as they are
        (temperature, top_p, max_tokens, seed, ...)."""
        body = {"model": model, "messages": messages, "stream": False, **params}
        for attempt in range(self.retries + 1):
            start = time.perf_counter()
            wait = None
            try:
                if self._closed.is_set():
                    raise RuntimeError
                response = self._http.post(self.url, json=body)
            except RuntimeError:  # httpx raises it for a closed client
                raise RequestFailed("stopped (the client was closed)") from None
            except self._httpx.TimeoutException:
                problem = "timed out"
            except self._httpx.TransportError as e:
                problem = f"connection failed ({type(e).__name__}: {e})"
            else:
                status = response.status_code
                if status == 200:
                    got = _completion(response)
                    if got is not None:
                        got.latency, got.attempts = time.perf_counter() - start, attempt + 1
                        return got
                    problem = "the reply has no message"
                elif status in FATAL_STATUS:
                    raise ServerRefused(f"{self.url} (model {model}): HTTP {status}, {FATAL_STATUS[status]}: "
                                    f"{_error_text(response)}")
                elif status in RETRY_STATUS or status >= 500:
                    problem = f"HTTP {status}: {_error_text(response)}"
                    wait = _retry_after(response)
                else:
                    raise RequestFailed(f"HTTP {status}: {_error_text(response)}")
            if attempt == self.retries:
                raise RequestFailed(f"{problem} (gave up after {attempt + 1} attempts)")
            with self._lock:
                self.retried += 1
            delay = self.backoff * 2**attempt * random.uniform(0.5, 1.0)
            if self._closed.wait(min(self.max_backoff, wait if wait is not None else delay)):
                raise RequestFailed(f"{problem}; stopped before retrying (the client was closed)")
        raise AssertionError("unreachable")


class EngineClient:
    """`ChatClient.complete` over a `chatbuild.engines.ChatEngine` in this process. Request fields the
    judge sends map onto `GenerationParams`: temperature, max_tokens, guided_choice (→ choices). A
    prompt the engine refuses (too long, bad settings) fails that request (`RequestFailed`); an
    unknown model stops everything (`UserError`). `close` closes the engine."""

    def __init__(self, engine):
        self.engine = engine
        self._closed = False
        self.retried = 0  # nothing is retried in process; the judge's report reads it

    def complete(self, model: str, messages: list[dict], temperature: float = 0.0, max_tokens: int = 1024,
                 guided_choice: list[str] | None = None, **_ignored) -> Completion:
        from chatbuild.engines import BadParams, GenerationParams, PromptTooLong

        params = GenerationParams(temperature=temperature, top_p=1.0, max_new_tokens=max_tokens, seed=0,
                                  choices=guided_choice)
        start = time.perf_counter()
        text, last = [], None
        try:
            for chunk in self.engine.stream(messages, params, model):
                text.append(chunk.text)
                last = chunk
        except (PromptTooLong, BadParams) as e:
            raise RequestFailed(str(e)) from None
        usage = {"prompt_tokens": last.prompt_tokens, "completion_tokens": last.completion_tokens} if last else {}
        return Completion("".join(text), last.finish_reason if last else None, usage, time.perf_counter() - start)

    def close(self) -> None:
        """Close the engine, once (the judge closes on an interrupt, its caller again when done)."""
        if not self._closed:
            self._closed = True
            self.engine.close()


def _completion(response) -> Completion | None:
    try:
        data = response.json()
        choice = data["choices"][0]
        text = choice["message"]["content"]
    except (ValueError, KeyError, IndexError, TypeError):
        return None
    if not isinstance(text, str):
        return None
    return Completion(text, choice.get("finish_reason"), data.get("usage") or {})


def _error_text(response) -> str:
    try:
        err = response.json().get("error")
        if isinstance(err, dict) and err.get("message"):
            return str(err["message"])[:300]
    except (ValueError, AttributeError):
        pass
    return response.text[:300].strip() or response.reason_phrase


def _retry_after(response) -> float | None:
    try:
        return max(0.0, float(response.headers.get("retry-after", "")))
    except ValueError:
        return None


def run_concurrently(fn: Callable, items: Iterable, concurrency: int) -> Iterator[tuple[object, object, BaseException | None]]:
    """Call `fn(item)` for every item on `concurrency` threads; yield (item, result, error) as each
    finishes (error is None on success).

    The threads are daemons and take a new item only while the consumer keeps iterating: when it
    stops (an interrupt, an error) nothing new starts, and calls still in flight never keep the
    process alive (a ThreadPoolExecutor would join them at exit, i.e. wait out their timeouts)."""
    items = list(items)
    todo, done, stop = queue.SimpleQueue(), queue.SimpleQueue(), threading.Event()
    for item in items:
        todo.put(item)

    def worker():
        while not stop.is_set():
            try:
                item = todo.get_nowait()
            except queue.Empty:
                return
            try:
                done.put((item, fn(item), None))
            except BaseException as e:  # handed to the consumer, which decides
                done.put((item, None, e))

    for _ in range(max(1, min(concurrency, len(items)))):
        threading.Thread(target=worker, daemon=True).start()
    try:
        for _ in items:
            while True:
                try:
                    yield done.get(timeout=0.2)  # short waits keep Ctrl-C responsive
                    break
                except queue.Empty:
                    continue
    finally:
        stop.set()
