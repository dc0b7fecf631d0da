"""An engine for any OpenAI-compatible server: ours (`chatbuild serve`), `vllm serve`, or a hosted API.

    engine = RemoteEngine("http://127.0.0.1:8000/v1", api_key="...")
    engine.models()                       # what the server lists (or the names given as `models`)

Requests go to `POST {url}/chat/completions` with `stream: true` and `stream_options.include_usage`,
so replies stream and the final chunk carries exact token counts (0 until then: the server counts,
not us). `top_k` and `repetition_penalty` are sent only when set, as the extensions vLLM and our
server accept. Cancelling closes the connection, which makes a well-behaved server stop generating.
"""

import dataclasses
import json
import threading
from collections.abc import Iterator
from urllib.parse import urlsplit

from chatbuild.availability import require
from chatbuild.engines import Chunk, GenerationParams, RemoteError, UnknownModel, check_params


class RemoteEngine:
    """A `ChatEngine` that forwards to an OpenAI-compatible HTTP server.

    `url` is the API root the way OpenAI clients take it (".../v1"); a bare "http://host:port" gets
    "/v1" added. `models` restricts (and fixes, without asking the server) the names served."""

    def __init__(self, url: str, api_key: str | None = None, models: list[str] | None = None,
                 timeout: float = 600.0):
        require("httpx", "the remote engine")
        import httpx

        self.url = url.rstrip("/") + ("/v1" if urlsplit(url).path in ("", "/") else "")
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        # The read timeout bounds the gap between two streamed chunks, not the whole reply.
        self._client = httpx.Client(base_url=self.url, headers=headers,
                                    timeout=httpx.Timeout(timeout, connect=10.0))
        self._models = list(models) if models else None

    def models(self) -> list[str]:
        if self._models is None:
            data = self._request("GET", "/models").json()
            self._models = [m["id"] for m in data.get("data", [])]
        return list(self._models)

    def stream(self, messages: list[dict], params: GenerationParams, model: str,
               cancel: threading.Event | None = None) -> Iterator[Chunk]:
        """Stream a reply (ChatEngine contract). The model name is checked now; the request is sent
        when the returned iterator is first read."""
        if model not in self.models():
            raise UnknownModel(model, self.models())
        check_params(params)
        body = {"model": model, "messages": messages, "stream": True, "stream_options": {"include_usage": True},
                "temperature": params.temperature, "top_p": params.top_p, "max_tokens": params.max_new_tokens}
        if params.top_k:
            body["top_k"] = params.top_k
        if params.repetition_penalty != 1.0:
            body["repetition_penalty"] = params.repetition_penalty
        if params.seed is not None:
            body["seed"] = params.seed
        if params.stop:
            body["stop"] = list(params.stop)
        return self._stream(body, cancel)

    def _stream(self, body: dict, cancel: threading.Event | None) -> Iterator[Chunk]:
        import httpx

        finish, prompt_tokens, completion_tokens = None, 0, 0
        try:
            with self._client.stream("POST", "/chat/completions", json=body) as response:
                if response.status_code != 200:
                    response.read()
                    raise _error(response, self.url)
                for line in response.iter_lines():
                    if cancel is not None and cancel.is_set():
                        finish = "cancelled"
                        break  # leaving the block closes the connection: the server stops generating
                    if not line.startswith("data:"):
                        continue
                    data = line[len("data:"):].strip()
                    if data == "[DONE]":
                        break
                    event = json.loads(data)
                    if "error" in event:
                        raise RemoteError(f"{self.url}: {_message(event)}", 502)
                    if event.get("usage"):
                        prompt_tokens = event["usage"].get("prompt_tokens", 0)
                        completion_tokens = event["usage"].get("completion_tokens", 0)
                    for choice in event.get("choices") or []:
                        finish = choice.get("finish_reason") or finish
                        text = (choice.get("delta") or {}).get("content") or ""
                        if text:
                            yield Chunk(text, None, prompt_tokens, completion_tokens)
        except httpx.HTTPError as e:
            raise RemoteError(f"{self.url}: {type(e).__name__}: {e}") from None
        yield Chunk("", finish or "stop", prompt_tokens, completion_tokens)

    def _request(self, method: str, path: str):
        import httpx

        try:
            response = self._client.request(method, path)
        except httpx.HTTPError as e:
            raise RemoteError(f"{self.url}: {type(e).__name__}: {e}") from None
        if response.status_code != 200:
            raise _error(response, self.url)
        return response

    def close(self) -> None:
        self._client.close()


class FormattedEngine:
    """A remote engine serving run folders: what a run's `chat_format.json` adds on top of the chat
    template — its stop strings, its default system prompt — is added to each request here, as the
    in-process engine does (the remote server only applies the tokenizer's template). Models without
    a format pass through unchanged. `close()` closes the remote engine."""

    def __init__(self, remote: "RemoteEngine", chat_formats: dict):
        self.remote, self.chat_formats = remote, chat_formats

    def models(self) -> list[str]:
        return self.remote.models()

    def stream(self, messages: list[dict], params: GenerationParams, model: str,
               cancel: threading.Event | None = None) -> Iterator[Chunk]:
        fmt = self.chat_formats.get(model)
        if fmt is not None:
            params = dataclasses.replace(params, stop=[*params.stop, *(s for s in fmt.stop if s not in params.stop)])
            if fmt.system_prompt and (not messages or messages[0]["role"] != "system"):
                messages = [{"role": "system", "content": fmt.system_prompt}, *messages]
        return self.remote.stream(messages, params, model, cancel)

    def close(self) -> None:
        self.remote.close()


def _message(body) -> str:
    """The message of an OpenAI-style error body, else the body itself."""
    if isinstance(body, dict) and isinstance(body.get("error"), dict):
        return str(body["error"].get("message", body["error"]))
    return str(body)[:500]


def _error(response, url: str) -> RemoteError:
    try:
        body = response.json()
    except ValueError:
        body = response.text
    return RemoteError(f"{url} answered {response.status_code}: {_message(body)}", response.status_code,
                       response.headers.get("retry-after"))
