"""The web app `chatbuild serve` runs: the API under /v1, health at /healthz, the UI at /, the API's
docs at /docs, /redoc and /openapi.json (behind the API key when one is set, like /v1).

    app = create_app(engine, Settings(api_key="..."), ui=True)
    uvicorn.run(app)

    app = create_app(None, Settings(), ui=False)   # answer at once (/healthz and /v1: 503) ...
    attach_engine(app, engine)                      # ... and serve once the models are loaded

The UI (serve/ui.py, the UI issue) is mounted at "/" by `mount_ui(app, state)`: it shares this
app's `ServeState` (engine, settings, the admission queue of the API). Gradio starts its
queue in the app's startup, so the UI is mounted when the app is created, which needs the engine
then. Without Gradio, or with `ui=False`, "/" is a short page pointing at the API.
"""

import hmac
import importlib.util
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse

import chatbuild
from chatbuild.engines import ChatEngine
from serve.api import APIError, ServeState, add_api
from serve.settings import Settings


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

        mount_ui(app, state)  # the UI shares `state`: engine, settings (db_path, limits), admission queue
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

    def check_key(request: Request) -> None:  # the same check and answers as /v1 (serve.api)
        if settings.api_key is None:
            return
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not token:
            raise APIError(401, "missing API key: send the header 'Authorization: Bearer <key>'",
                           code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})
        if not hmac.compare_digest(token.strip().encode(), settings.api_key.encode()):
            raise APIError(401, "incorrect API key", code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})

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
