"""The web app `chatbuild serve` runs: the API under /v1, health at /healthz, the UI at /.

    app = create_app(engine, Settings(api_key="..."), ui=True)
    uvicorn.run(app)

    app = create_app(None, Settings(), ui=False)   # answer at once (/healthz and /v1: 503) ...
    attach_engine(app, engine)                      # ... and serve once the models are loaded

The UI (serve/ui.py, the UI issue) is mounted at "/" by `mount_ui(app, state)`: it shares this
app's `ServeState` (engine, settings, the admission queue of the API). Gradio starts its
queue in the app's startup, so the UI is mounted when the app is created, which needs the engine
then. Without Gradio, or with `ui=False`, "/" is a short page pointing at the API.
"""

import importlib.util
from contextlib import asynccontextmanager

from fastapi import FastAPI
from fastapi.responses import HTMLResponse

import chatbuild
from chatbuild.engines import ChatEngine
from serve.api import ServeState, add_api
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

    app = FastAPI(title="chatbuild", version=chatbuild.__version__, lifespan=lifespan,
                  description="OpenAI-compatible chat API over QLoRA runs: one 4-bit base, many adapters.")
    app.state.serve = state
    add_api(app, state)
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
