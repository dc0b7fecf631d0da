"""The web app `chatbuild serve` runs: the API under /v1, health at /healthz, the UI at /, the API's
docs at /docs, /redoc and /openapi.json (behind the API key when one is set, like /v1).

    app = create_app(engine, Settings(api_key="..."), ui=True)
    uvicorn.run(app)

    app = create_app(None, Settings(), ui=False)   # answer at once (/healthz and /v1: 503) ...
    attach_engine(app, engine)                      # ... and serve once the models are loaded

The UI (serve/ui.py, the UI issue) is mounted at "/" by `mount_ui(app, state)`: it shares this
app's `ServeState` (engine, settings, the admission queue and cancel registry that API and UI
replies share: `serve.generation`). Gradio starts its
queue in the app's startup, so the UI is mounted when the app is created, which needs the engine
then. Without Gradio, or with `ui=False`, "/" is a short page pointing at the API.

In front of the UI's routes, `UIBodyLimit` refuses bodies over `max_ui_body_bytes` (uploads: over
the upload limit) with 413 before they are read, and FileData naming server files with 400.
"""

import importlib.util
import json
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse

import chatbuild
from chatbuild.engines import ChatEngine
from serve import uploads
from serve.api import ServeState, add_api, require_key
from serve.settings import Settings

MULTIPART_MARGIN = 64 * 1024  # an upload's body: the file plus its multipart headers


def create_app(engine: ChatEngine | None, settings: Settings | None = None, ui: bool = True) -> FastAPI:
    """The app over `engine` (None: not loaded yet, see `attach_engine`; then no UI). The caller owns
    the engine and closes it; at shutdown the app only cancels the generations still running."""
    settings = settings or Settings()
    state = ServeState(settings)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        yield
        state.cancel_all()

    # The docs routes are our own (add_docs): FastAPI's would be open to anyone.
    app = FastAPI(title="chatbuild", version=chatbuild.__version__, lifespan=lifespan,
                  description="OpenAI-compatible chat API over QLoRA runs: one 4-bit base, many adapters.",
                  docs_url=None, redoc_url=None, openapi_url=None)
    app.state.serve = state
    add_api(app, state)
    add_docs(app, settings)
    if engine is not None:
        state.attach(engine)
    if ui and engine is not None and ui_available():
        from serve.ui import mount_ui

        mount_ui(app, state)  # the UI shares `state`: engine, settings (db_path, limits), admission, cancels
        app.add_middleware(UIBodyLimit, limit=settings.max_ui_body_bytes,
                           upload_limit=uploads.max_file_size(settings) + MULTIPART_MARGIN)
    else:
        _add_placeholder_root(app, "The chat UI is turned off." if not ui else
                              "The chat UI is not available (it needs gradio: pip install \"chatbuild[ui]\")."
                              if not ui_available() else "The chat UI appears once the models are loaded.")
    return app


def add_docs(app: FastAPI, settings: Settings) -> None:
    """/openapi.json, /docs (Swagger UI) and /redoc, behind the API key like /v1 when one is set (the
    schema maps the API and its limits for whoever reads it), open when none is. They are not part
    of the schema. A browser sends no key by itself, so with a key set, read the schema with e.g.
    `curl -H "Authorization: Bearer $KEY" http://host:port/openapi.json`."""
    from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html

    def check_key(request: Request) -> None:  # the same check and answers as /v1
        require_key(settings.api_key, request)

    def schema_url(request: Request) -> str:
        return request.scope.get("root_path", "").rstrip("/") + "/openapi.json"

    @app.get("/openapi.json", include_in_schema=False)
    async def openapi(request: Request):
        check_key(request)
        return JSONResponse(app.openapi())

    @app.get("/docs", include_in_schema=False)
    async def swagger(request: Request):
        check_key(request)
        return get_swagger_ui_html(openapi_url=schema_url(request), title=f"{app.title} - Swagger UI")

    @app.get("/redoc", include_in_schema=False)
    async def redoc(request: Request):
        check_key(request)
        return get_redoc_html(openapi_url=schema_url(request), title=f"{app.title} - ReDoc")


def ui_available() -> bool:
    from chatbuild.availability import available

    return available("gradio") and importlib.util.find_spec("serve.ui") is not None


def attach_engine(app: FastAPI, engine: ChatEngine) -> None:
    """Start serving `engine` on an app created without one: /healthz turns 200, /v1 answers."""
    app.state.serve.attach(engine)


def _add_placeholder_root(app: FastAPI, why: str) -> None:
    page = (f"<!doctype html><title>chatbuild</title><h1>chatbuild {chatbuild.__version__}</h1>"
            f"<p>{why}</p><p>The OpenAI-compatible API is at <a href='/v1/models'>/v1</a> "
            "(<a href='/docs'>interactive docs</a>); health at <a href='/healthz'>/healthz</a>.</p>")

    @app.get("/", include_in_schema=False)
    async def root():
        return HTMLResponse(page)


class UIBodyLimit:
    """ASGI middleware in front of the UI (every route outside /v1, whose routes check their own
    bodies against `max_body_bytes`). A request body over `limit` bytes is answered 413 before the
    app reads any of it; uploads (`uploads.UPLOAD_ROUTE`) may be up to `upload_limit`. A JSON
    body holding a FileData that names a server file outside Gradio's upload folder is answered
    400 before Gradio copies that file into its cache (one of two such checks: serve/uploads.py).

    A body that states its length is judged by its Content-Length (the server never delivers more);
    one that does not is judged as it arrives. Bodies other than uploads are read here, up to the
    limit, and handed on whole. An upload is handed on as it comes (it is too large to hold in
    memory) and must state its length (else 411): Gradio writes an upload to disk as it arrives and
    leaves a part-written file behind when the stream breaks off."""

    def __init__(self, app, limit: int, upload_limit: int):
        self.app, self.limit, self.upload_limit = app, limit, upload_limit

    async def __call__(self, scope, receive, send):
        path = scope.get("path", "")
        root = scope.get("root_path", "")
        if root and path.startswith(root):
            path = path[len(root):]
        if scope["type"] != "http" or path == "/v1" or path.startswith("/v1/"):
            return await self.app(scope, receive, send)
        upload = path == uploads.UPLOAD_ROUTE
        limit, setting = (self.upload_limit, "max_upload_bytes") if upload else (self.limit, "max_ui_body_bytes")
        headers = dict(scope["headers"])
        declared = headers.get(b"content-length")
        if declared is not None:
            if not declared.isdigit():
                return await _refuse(scope, receive, send, 400, "Content-Length is not a number")
            if int(declared) > limit:
                return await _refuse(scope, receive, send, 413, f"the request body is {int(declared)} bytes, over "
                                     f"this server's limit of {limit} ({setting})")
        elif b"transfer-encoding" not in headers:  # no body at all
            return await self.app(scope, receive, send)
        elif upload:
            return await _refuse(scope, receive, send, 411, "an upload must state its length (Content-Length)")
        if upload:
            return await self.app(scope, receive, send)
        body = bytearray()
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return None
            body += message.get("body", b"")
            if len(body) > limit:
                return await _refuse(scope, receive, send, 413, f"the request body is over this server's limit "
                                     f"of {limit} bytes ({setting})")
            if not message.get("more_body", False):
                break
        foreign = _foreign_files(bytes(body), headers.get(b"content-type", b""))
        if foreign:
            return await _refuse(scope, receive, send, 400, f"FileData path {foreign[0]!r}: not a file uploaded "
                                 "to this server")
        whole = {"type": "http.request", "body": bytes(body), "more_body": False}

        async def replay():
            nonlocal whole
            if whole is None:
                return await receive()  # after the body: the disconnect, when it comes
            message, whole = whole, None
            return message

        return await self.app(scope, replay, send)


def _foreign_files(body: bytes, content_type: bytes) -> list[str]:
    """FileData paths outside Gradio's upload folder in a JSON body (FastAPI reads a body without a
    content type as JSON too); a body that does not parse is the app's to refuse."""
    if not body or (content_type and b"json" not in content_type.lower()):
        return []
    try:
        data = json.loads(body)
    except (ValueError, RecursionError):
        return []
    return uploads.foreign_files(data)


async def _refuse(scope, receive, send, status: int, message: str) -> None:
    await JSONResponse({"detail": message}, status_code=status)(scope, receive, send)
