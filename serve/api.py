"""The OpenAI-compatible HTTP API over a `ChatEngine`.

    GET  /v1/models              the models the engine serves (run names, the base)
    POST /v1/chat/completions    a reply, whole or streamed as server-sent events ending in `data: [DONE]`
    GET  /healthz                200 once the models are loaded, 503 before (no key needed)

Any OpenAI client works unmodified (`OpenAI(base_url="http://host:port/v1", api_key=...)`). Errors
have OpenAI's shape, `{"error": {"message", "type", "param", "code"}}`, with the status saying what
went wrong: 400 bad request (the field in `param`), 401 missing or wrong key, 404 unknown model (the
message lists the served ones), 413 body too large, 429 queue full (with Retry-After), 500 the engine
failed on this request (`generation_failed`; the server goes on), 503 loading.

Flow of a completion request:

    read body (size limit) → validate (pydantic) → model known? → limits (messages, max_tokens,
    stop) → `serve.generation.generate`: prompt tokens, admission (a slot, or a place in the
    bounded queue, or 429), the engine in a thread → answer (JSON, or SSE as chunks arrive)

The UI's replies take the same path (`serve.generation`), so both share one queue and one cancel
registry. Each request's cancel switch, a `threading.Event`, is thrown when the client disconnects
(a task waits for the ASGI disconnect message), when the stream's consumer stops, and at shutdown;
the engine then stops at its next token, and its slot is freed when its thread actually ends.
"""

import asyncio
import hmac
import json
import logging
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Annotated, Literal

from fastapi import FastAPI, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from chatbuild.engines import (
    CHOICE_MAX_CHARS,
    CHOICES_MAX,
    REPETITION_PENALTY_MAX,
    REPETITION_PENALTY_MIN,
    SEED_MAX,
    STOP_MAX_CHARS,
    TEMPERATURE_MAX,
    TOP_K_MAX,
    BadParams,
    ChatEngine,
    Chunk,
    GenerationParams,
    PromptTooLong,
    RemoteError,
    UnknownModel,
    check_params,
)
from chatbuild.errors import UserError
from serve.generation import Admission, Busy, PromptOverLimit, generate
from serve.settings import Settings

log = logging.getLogger("chatbuild.serve")


# ── request schema (pydantic validates; anything not listed is ignored, like OpenAI's optional knobs)
class TextPart(BaseModel):
    type: Literal["text"]
    text: str


class Message(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart]

    def as_engine_message(self) -> dict:
        text = self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)
        return {"role": "system" if self.role == "developer" else self.role, "content": text}


class StreamOptions(BaseModel):
    include_usage: bool = False


class ChatCompletionRequest(BaseModel):
    """The fields of OpenAI's chat completion request this server honours (plus vLLM's top_k and
    repetition_penalty). Omitted sampling fields take `GenerationParams`' defaults. Every number is
    bounded (the engines' bounds, `chatbuild.engines`; docs/serve.md has the table); NaN and
    infinities, which Python's JSON parser accepts, are refused."""

    model_config = ConfigDict(extra="ignore", allow_inf_nan=False)
    model: str = Field(min_length=1)
    messages: list[Message] = Field(min_length=1)
    temperature: float | None = Field(None, ge=0, le=TEMPERATURE_MAX)
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = Field(None, ge=0, le=TOP_K_MAX)
    repetition_penalty: float | None = Field(None, ge=REPETITION_PENALTY_MIN, le=REPETITION_PENALTY_MAX)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    seed: int | None = Field(None, ge=0, le=SEED_MAX)
    stop: str | list[str] | None = None  # how many and how long: check_limits
    guided_choice: list[Annotated[str, Field(max_length=CHOICE_MAX_CHARS)]] | None = Field(
        None, min_length=1, max_length=CHOICES_MAX)  # vLLM's extension
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int = Field(1, ge=1, le=1)  # one choice per request
    logprobs: bool | None = None
    tools: list | None = None


# ── errors ───────────────────────────────────────────────────────────────────────────────────
class APIError(Exception):
    """An error answer in OpenAI's shape."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers or {}

    def response(self) -> JSONResponse:
        body = {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}
        return JSONResponse(body, status_code=self.status, headers=self.headers)


def engine_error(e: Exception) -> APIError:
    """The HTTP answer for an error an engine raised before its first chunk."""
    if isinstance(e, UnknownModel):
        return APIError(404, str(e), param="model", code="model_not_found")
    if isinstance(e, PromptTooLong):
        return APIError(400, str(e), param="messages", code="context_length_exceeded")
    if isinstance(e, RemoteError):
        if 400 <= e.status < 500:
            headers = {"Retry-After": e.retry_after} if e.retry_after else None
            return APIError(e.status, str(e), code="remote_error", headers=headers)
        return APIError(502, str(e), type="server_error", code="remote_error")
    if isinstance(e, UserError):
        return APIError(400, str(e), param="messages")
    # Anything else is the engine failing on this request: a 500 that says so, for this request only.
    log.error("generation failed", exc_info=e)
    return APIError(500, f"generation failed: {type(e).__name__}: {e}", type="server_error", code="generation_failed")


def require_key(api_key: str | None, request: Request) -> None:
    """401 unless the request carries `Authorization: Bearer <api_key>` (nothing to check when
    `api_key` is None). The comparison is `hmac.compare_digest` on bytes: constant time in the key."""
    if api_key is None:
        return
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not token:
        raise APIError(401, "missing API key: send the header 'Authorization: Bearer <key>'",
                       code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})
    if not hmac.compare_digest(token.strip().encode(), api_key.encode()):
        raise APIError(401, "incorrect API key", code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})


# ── state shared by the routes ──────────────────────────────────────────────────────────────
@dataclass
class ServeState:
    """What the routes share. `engine` is None until one is attached (models still loading)."""

    settings: Settings
    engine: ChatEngine | None = None
    load_error: str | None = None  # why the models could not be loaded, if that happened
    started: int = field(default_factory=lambda: int(time.time()))
    ready: threading.Event = field(default_factory=threading.Event)
    cancels: set = field(default_factory=set)  # cancel events of the generations in progress (API and UI)
    admission: Admission | None = None  # the one generation gate (serve.generation.admission_of)
    on_shutdown: list = field(default_factory=list)  # callables run when the app stops (the Builder's queue)
    builder: object = None  # the Build tab's `serve.builder.Builder`, when it is on

    def attach(self, engine: ChatEngine) -> None:
        self.engine = engine
        self.ready.set()

    def cancel_all(self) -> None:
        for event in list(self.cancels):
            event.set()
        for stop in self.on_shutdown:
            stop()


# ── routes ──────────────────────────────────────────────────────────────────────────────────
def add_api(app: FastAPI, state: ServeState) -> None:
    """Register /v1/*, /healthz and the OpenAI-shaped error handlers on `app`."""
    settings = state.settings

    @app.exception_handler(APIError)
    async def _api_error(request: Request, e: APIError):
        return e.response()

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, e: StarletteHTTPException):
        return APIError(e.status_code, str(e.detail), code=None, headers=e.headers).response()

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, e: RequestValidationError):
        return validation_error(e.errors()).response()

    @app.exception_handler(Exception)
    async def _internal_error(request: Request, e: Exception):
        log.error("internal error in %s %s", request.method, request.url.path, exc_info=e)
        return APIError(500, f"internal error: {type(e).__name__}", type="server_error").response()

    def engine_or_503() -> ChatEngine:
        if state.engine is None:
            message = (f"the models failed to load: {state.load_error}" if state.load_error
                       else "the models are still loading; retry shortly")
            raise APIError(503, message, type="server_error", code="not_ready", headers={"Retry-After": "5"})
        return state.engine

    def check_key(request: Request) -> None:
        require_key(settings.api_key, request)

    @app.get("/healthz", tags=["health"])
    async def healthz():
        if state.engine is None:
            status = {"status": "failed", "error": state.load_error} if state.load_error else {"status": "loading"}
            return JSONResponse(status, status_code=503)
        return {"status": "ok", "models": await run_in_threadpool(state.engine.models)}

    @app.get("/v1/models", tags=["openai"])
    async def list_models(request: Request):
        check_key(request)
        names = await run_in_threadpool(engine_or_503().models)
        return {"object": "list", "data": [model_card(n, state.started) for n in names]}

    @app.get("/v1/models/{model:path}", tags=["openai"])
    async def get_model(model: str, request: Request):
        check_key(request)
        names = await run_in_threadpool(engine_or_503().models)
        if model not in names:
            raise engine_error(UnknownModel(model, names))
        return model_card(model, state.started)

    @app.post("/v1/chat/completions", tags=["openai"],
              openapi_extra={"requestBody": {"required": True, "content": {
                  "application/json": {"schema": inline_schema(ChatCompletionRequest)}}}})
    async def chat_completions(request: Request):
        check_key(request)
        engine = engine_or_503()
        req = parse_request(await read_body(request, settings.max_body_bytes))
        names = await run_in_threadpool(engine.models)
        if req.model not in names:
            raise engine_error(UnknownModel(req.model, names))
        messages, params = check_limits(req, settings)
        return await answer(request, engine, req, messages, params, state)


def inline_schema(model: type[BaseModel]) -> dict:
    """The model's JSON schema with its `$defs` inlined (the body is parsed by hand, so FastAPI does
    not register the schema for /docs; this keeps the docs complete)."""
    schema = model.model_json_schema()
    defs = schema.pop("$defs", {})

    def resolve(node):
        if isinstance(node, dict):
            if "$ref" in node:
                return resolve(defs[node["$ref"].rsplit("/", 1)[-1]])
            return {k: resolve(v) for k, v in node.items()}
        return [resolve(v) for v in node] if isinstance(node, list) else node

    return resolve(schema)


def validation_error(errors: list[dict]) -> APIError:
    first = errors[0] if errors else {}
    if first.get("type") == "json_invalid":
        return APIError(400, f"the request body is not valid JSON ({first.get('ctx', {}).get('error', '')})".replace(" ()", ""))
    loc = [str(p) for p in first.get("loc", ()) if p != "body"]
    param = ".".join(loc) or None
    return APIError(400, f"{param or 'body'}: {first.get('msg', 'invalid value')}", param=param)


async def read_body(request: Request, limit: int) -> bytes:
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise APIError(413, f"the request body is {declared} bytes; this server accepts at most {limit} (max_body_bytes)")
    body = bytearray()
    async for piece in request.stream():
        body += piece
        if len(body) > limit:
            raise APIError(413, f"the request body exceeds {limit} bytes (max_body_bytes)")
    return bytes(body)


def parse_request(body: bytes) -> ChatCompletionRequest:
    try:
        req = ChatCompletionRequest.model_validate_json(body)
    except ValidationError as e:
        raise validation_error(e.errors()) from None
    if req.tools:
        raise APIError(400, "tools are not supported by this server", param="tools")
    if req.logprobs:
        raise APIError(400, "logprobs are not supported by this server", param="logprobs")
    return req


def check_limits(req: ChatCompletionRequest, settings: Settings) -> tuple[list[dict], GenerationParams]:
    """Apply the server's limits; returns the engine's messages and sampling parameters."""
    if len(req.messages) > settings.max_messages:
        raise APIError(400, f"{len(req.messages)} messages; this server accepts at most {settings.max_messages} "
                       "(max_messages)", param="messages")
    max_tokens = req.max_completion_tokens or req.max_tokens
    if max_tokens is not None and max_tokens > settings.max_new_tokens:
        param = "max_completion_tokens" if req.max_completion_tokens else "max_tokens"
        raise APIError(400, f"{param} is {max_tokens}; this server generates at most {settings.max_new_tokens} "
                       "tokens (max_new_tokens)", param=param)
    stop = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
    if len(stop) > settings.max_stop or not all(0 < len(s) <= STOP_MAX_CHARS for s in stop):
        raise APIError(400, f"stop: up to {settings.max_stop} non-empty strings of at most {STOP_MAX_CHARS} "
                       f"characters (max_stop), got {len(stop)} of up to {max(map(len, stop), default=0):,}", param="stop")
    defaults = GenerationParams()
    params = GenerationParams(
        temperature=defaults.temperature if req.temperature is None else req.temperature,
        top_p=defaults.top_p if req.top_p is None else req.top_p,
        top_k=defaults.top_k if req.top_k is None else req.top_k,
        max_new_tokens=max_tokens or min(settings.default_max_tokens, settings.max_new_tokens),
        repetition_penalty=defaults.repetition_penalty if req.repetition_penalty is None else req.repetition_penalty,
        seed=req.seed, stop=stop, choices=req.guided_choice)
    try:  # the schema holds the same bounds; this keeps the two from drifting apart unnoticed
        check_params(params)
    except BadParams as e:
        raise APIError(400, str(e), param=API_FIELDS.get(e.field, e.field)) from None
    return [m.as_engine_message() for m in req.messages], params


API_FIELDS = {"max_new_tokens": "max_tokens", "choices": "guided_choice"}  # GenerationParams' names -> the API's


def model_card(name: str, created: int) -> dict:
    return {"id": name, "object": "model", "created": created, "owned_by": "chatbuild"}


# ── answering ───────────────────────────────────────────────────────────────────────────────
async def watch_disconnect(request: Request, cancel: threading.Event) -> None:
    """Throw the cancel switch when the client goes away. The request body has been read, so the
    next ASGI message is the disconnect (sent also once the response is complete: harmless then)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            cancel.set()
            return


async def answer(request: Request, engine: ChatEngine, req: ChatCompletionRequest, messages: list[dict],
                 params: GenerationParams, state: ServeState):
    """Generate through the server's one path (prompt check, a slot, the engine in a thread) and
    answer as JSON or as a server-sent event stream. A client that leaves before the first chunk
    (while queued, say) gives its place back and gets no answer."""
    cancel = threading.Event()
    watcher = asyncio.create_task(watch_disconnect(request, cancel))
    chunks = generate(state, engine, messages, params, req.model, cancel)
    first_chunk = asyncio.create_task(_first(chunks))
    try:
        await asyncio.wait([first_chunk, watcher], return_when=asyncio.FIRST_COMPLETED)
    finally:
        if not first_chunk.done():  # the client left first (or this handler was cancelled)
            first_chunk.cancel()
            await asyncio.wait([first_chunk])  # let the cancellation land: the queue place is given back
    if first_chunk.cancelled():
        return Response(status_code=499)  # nobody to answer; 499 as nginx logs it
    try:  # errors before the first chunk are still proper HTTP answers
        first = first_chunk.result()
    except Busy as e:
        watcher.cancel()
        raise APIError(429, f"{e}; retry later", type="rate_limit_error", code="queue_full",
                       headers={"Retry-After": str(e.retry_after)}) from None
    except PromptOverLimit as e:
        watcher.cancel()
        raise APIError(400, str(e), param="messages", code="context_length_exceeded") from None
    except Exception as e:
        watcher.cancel()
        raise engine_error(e) from None
    reply_id, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
    if req.stream:
        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        events = sse_events(first, chunks, reply_id, created, req.model, include_usage, watcher)
        return StreamingResponse(events, media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
    try:
        text, last = [first.text], first
        async for chunk in chunks:
            text.append(chunk.text)
            last = chunk
    except Exception as e:
        log.exception("generation failed")
        raise APIError(500, f"generation failed: {e}", type="server_error") from None
    finally:
        watcher.cancel()
    return {
        "id": reply_id, "object": "chat.completion", "created": created, "model": req.model,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": "".join(text)}, "logprobs": None,
                     "finish_reason": last.finish_reason or "stop"}],
        "usage": usage(last),
    }


async def _first(chunks) -> Chunk:
    """The reply's first chunk (an empty "stop" if the engine ended without one)."""
    try:
        return await anext(chunks)
    except StopAsyncIteration:
        return Chunk("", "stop")


async def sse_events(first: Chunk, chunks, reply_id: str, created: int, model: str, include_usage: bool,
                     watcher: asyncio.Task):
    """OpenAI's chat.completion.chunk events: the role, content deltas, the finish reason, the usage
    (if asked for), then `data: [DONE]`."""

    def event(delta: dict | None, finish: str | None = None, use: dict | None = None) -> str:
        body = {"id": reply_id, "object": "chat.completion.chunk", "created": created, "model": model,
                "choices": [] if delta is None else [{"index": 0, "delta": delta, "logprobs": None,
                                                      "finish_reason": finish}]}
        if include_usage:
            body["usage"] = use
        return f"data: {json.dumps(body, ensure_ascii=False)}\n\n"

    try:
        yield event({"role": "assistant", "content": ""})
        last = first
        if first.text:
            yield event({"content": first.text})
        if first.finish_reason is None:
            async for chunk in chunks:
                last = chunk
                if chunk.text:
                    yield event({"content": chunk.text})
        yield event({}, last.finish_reason or "stop")
        if include_usage:
            yield event(None, use=usage(last))
        yield "data: [DONE]\n\n"
    except Exception as e:  # after the 200 went out, an error can only be reported in the stream
        log.exception("generation failed mid-stream")
        yield f"data: {json.dumps({'error': {'message': f'generation failed: {e}', 'type': 'server_error', 'param': None, 'code': None}})}\n\n"
    finally:
        watcher.cancel()
        await chunks.aclose()


def usage(chunk: Chunk) -> dict:
    return {"prompt_tokens": chunk.prompt_tokens, "completion_tokens": chunk.completion_tokens,
            "total_tokens": chunk.prompt_tokens + chunk.completion_tokens}
