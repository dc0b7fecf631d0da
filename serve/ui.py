"""The Gradio UI — Chat, Arena and Leaderboard tabs — over the server's `ChatEngine`, mounted at `/`
on the serving app (serve/app.py calls `mount_ui`), beside the OpenAI-compatible API under `/v1`.

    tab           module                   endpoints (gradio_client api_name)
    Chat          serve/ui_chat.py         /chat /retry /undo /clear /stop /export_chat /import_chat
    Arena         serve/ui_arena.py        /arena_send /arena_regenerate /arena_stop /arena_new_round
                                           /vote_a /vote_b /vote_tie /vote_bothbad
    Leaderboard   serve/ui_leaderboard.py  /leaderboard
    Build         serve/ui_build.py        /build_start /build_job /build_cancel /build_resume /build_evaluate
                                           /build_preview /build_upload /build_preset /build_estimate
                  (only with `Settings.builder`, i.e. `chatbuild serve --builder`)

Concurrency: one queue for the API and the UI. Every reply the UI asks for takes a generation slot
from the API's admission (`Settings.max_running` at once, `queue_size` waiting, then "busy"); in
front of that, Gradio's queue lets at most `max_running` generating UI events run and shows the
others their place in line. Stop, votes, undo and the leaderboard don't wait behind generations.
Limits (`max_messages`, `max_new_tokens`, `max_prompt_tokens` via the engine) are the API's.

Storage: one SQLite file, `Settings.db_path` or `$CHATBUILD_HOME/chatbuild.sqlite` (`chatbuild.storage`):
battles from votes, the arena's rounds and votes, chat likes/dislikes (`chatbuild.arena`).

The UI is built when the app is, possibly before the models have loaded: the model pickers get
their choices on each page load, and requests made before the engine is attached get a message.
"""

from pathlib import Path

import gradio as gr
from fastapi import FastAPI

from chatbuild import storage
from serve.api import ServeState
from serve.login import login_guard
from serve.ui_arena import build_arena_tab, intro
from serve.ui_chat import build_chat_tab
from serve.ui_common import UIContext
from serve.ui_leaderboard import build_leaderboard_tab
from serve.uploads import max_file_size

CSS = """
#chat-stats, #arena-status { min-height: 1.6em; }
#chat-stats p { color: var(--body-text-color-subdued); font-size: var(--text-sm); margin: 0; }
"""


def build_ui(ctx: UIContext, builder=None) -> gr.Blocks:
    # delete_cache: exported conversations and leaderboard pictures older than a day go after a day.
    with gr.Blocks(title="chatbuild", delete_cache=(86_400, 86_400)) as blocks:
        header = gr.Markdown(_header(ctx.models()), elem_id="header")
        with gr.Tabs():
            with gr.Tab("Chat", id="chat", elem_id="tab-chat"):
                chat_model = build_chat_tab(ctx)
            with gr.Tab("Arena", id="arena", elem_id="tab-arena"):
                pick_a, pick_b, arena_status = build_arena_tab(ctx)
            with gr.Tab("Leaderboard", id="leaderboard", elem_id="tab-leaderboard") as leaderboard:
                build_leaderboard_tab(ctx, leaderboard)
            if builder is not None:
                from serve.ui_build import build_build_tab

                with gr.Tab("Build", id="build", elem_id="tab-build"):
                    build_build_tab(ctx, builder, [chat_model, pick_a, pick_b])

        def refresh_models():
            """The served models, into the pickers of a freshly loaded page."""
            models = ctx.models()
            first, second = (models + [None, None])[:2]
            return (_header(models), gr.update(choices=models, value=first), gr.update(choices=models, value=first),
                    gr.update(choices=models, value=second), intro(models))

        blocks.load(refresh_models, None, [header, chat_model, pick_a, pick_b, arena_status],
                    api_visibility="private", queue=False)
    # Light events run freely; the generating ones set their own group and limit (ENGINE_GROUP).
    blocks.queue(default_concurrency_limit=None)
    return blocks


def mount_ui(app: FastAPI, state: ServeState) -> FastAPI:
    """Mount the UI at / on the serving app (after its own routes, which keep precedence). The
    database is `state.settings.db_path`, else `chatbuild.storage.default_path()`."""
    db_path = Path(state.settings.db_path) if state.settings.db_path else storage.default_path()
    ctx = UIContext(state=state, db_path=db_path)
    builder = start_builder(state, db_path) if state.settings.builder else None
    # System fonts: they render the same everywhere (the default theme's bundled web font mixed in
    # fallback glyphs in headless Chromium) and there is nothing to download.
    theme = gr.themes.Default(font=["ui-sans-serif", "system-ui", "sans-serif"],
                              font_mono=["ui-monospace", "Consolas", "monospace"])
    blocks = build_ui(ctx, builder)
    gr.mount_gradio_app(app, blocks, path="/", footer_links=["api"], css=CSS, theme=theme, show_error=True,
                        auth=login_guard(state.settings),
                        auth_message="chatbuild: log in to use the chat and the arena.",
                        max_file_size=max_file_size(state.settings))
    # Gradio checks that a file a client names (FileData) lies in its upload folder only in Blocks that
    # have launched, and mount_gradio_app never says so: without this a client could name any server
    # file as its "upload" (issue 17). Gradio's own reloader (`gradio.utils.BaseReloader.swap_blocks`)
    # marks mounted Blocks the same way; the flag does nothing else.
    blocks.has_launched = True
    return app


def start_builder(state: ServeState, db_path: Path):
    """The Build tab's backend (`serve.builder`), its job queue running; stopped with the app."""
    import os

    from serve.builder import Builder

    s = state.settings
    root = Path(s.builder_dir) if s.builder_dir else db_path.parent / "builder"
    # Without UI logins (the loopback demo) everyone may build; with them, only `builder_users`, and
    # nobody when that is unset: building is a permission of its own, never implied by a login.
    if s.ui_auth is None and s.builder_users is None:
        builders = None
    elif "*" in (s.builder_users or []):
        builders = [user for user, _ in s.ui_auth or []]
    else:
        builders = s.builder_users or []
    builder = Builder(root, db_path, engine=lambda: state.engine, self_url=s.self_url, api_key=s.api_key,
                      judge_url=s.judge_url, judge_model=s.judge_model,
                      judge_key=os.environ.get("CHATBUILD_JUDGE_API_KEY"), max_upload_bytes=s.max_upload_bytes,
                      builders=builders, max_steps=s.builder_max_steps, max_active=s.builder_max_queued,
                      max_active_per_login=s.builder_max_queued_per_user)
    builder.start()
    state.on_shutdown.append(builder.stop)
    state.builder = builder
    return builder


def _header(models: list[str]) -> str:
    names = ", ".join(f"`{m}`" for m in models) if models else "loading the models…"
    return f"## chatbuild · {names}"
