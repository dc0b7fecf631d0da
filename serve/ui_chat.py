"""The Chat tab: one conversation with one model, streamed.

Controls: model (each adapter and the base), system prompt, sampling, Send/Stop, Retry/Undo/Clear,
like/dislike on replies (stored in SQLite, `chatbuild.arena.add_feedback`), export/import of the
conversation as JSON, and a live tokens/s and token-count readout.

The conversation lives in the Chatbot component (Gradio's messages format), so every endpoint takes
the history as an input and returns it; gradio_client callers pass it back the same way (content
as a list of parts, [{"type": "text", "text": ...}]). API names: `/chat` (stream a reply to a new
message), `/retry`, `/undo`, `/clear`, `/stop`, `/export_chat`, `/import_chat`.
"""

import json
import tempfile
import time
from pathlib import Path

import gradio as gr

from chatbuild import arena
from chatbuild.errors import UserError
from serve.ui_common import (
    ENGINE_GROUP,
    UIContext,
    check_input,
    check_model,
    normalize,
    params_from,
    sampling_controls,
    session_of,
    stream_reply,
    with_system,
)
from serve.uploads import uploaded_file

TAB = "chat"


def build_chat_tab(ctx: UIContext) -> gr.Dropdown:
    """Lay out the tab and wire its events; returns the model picker (the app refreshes its choices
    on page load, as models may still be loading when the UI is built)."""
    models = ctx.models()
    with gr.Row():
        with gr.Column(scale=3):
            chatbot = gr.Chatbot(label="Chat", height=480, elem_id="chat-box", buttons=["copy"],
                                 placeholder="Pick a model, type a message, press Enter.")
            with gr.Row():
                message = gr.Textbox(show_label=False, placeholder="Type a message and press Enter",
                                     scale=5, elem_id="chat-input", autofocus=True)
                send = gr.Button("Send", variant="primary", scale=1, elem_id="chat-send")
                stop = gr.Button("Stop", variant="stop", scale=1, elem_id="chat-stop")
            with gr.Row():
                retry = gr.Button("Retry", size="sm", elem_id="chat-retry")
                undo = gr.Button("Undo", size="sm", elem_id="chat-undo")
                clear = gr.Button("Clear", size="sm", elem_id="chat-clear")
            readout = gr.Markdown("", elem_id="chat-stats")
        with gr.Column(scale=1, min_width=260):
            # allow_custom_value: the choices may arrive after the UI is built; the handlers check.
            model = gr.Dropdown(models, value=models[0] if models else None, label="Model",
                                allow_custom_value=True, elem_id="chat-model")
            system = gr.Textbox(label="System prompt", lines=3, placeholder="(the model's own default)")
            with gr.Accordion("Sampling", open=False):
                sampling = sampling_controls(ctx, "chat")
            with gr.Accordion("Save / load conversation", open=False):
                export = gr.Button("Export JSON", size="sm")
                conversation_file = gr.File(label="Conversation JSON (drop a file here to import)",
                                            file_types=[".json"], elem_id="chat-file")

    async def chat(text, history, model, system, temperature, top_p, max_new_tokens, top_k, repetition_penalty,
                   seed, request: gr.Request):
        """Append the user's message and stream the model's reply."""
        text = (text or "").strip()
        history = normalize(history)
        if not text:
            yield history, "", gr.skip()
            return
        sampling = (temperature, top_p, max_new_tokens, top_k, repetition_penalty, seed)
        async for frame in _reply(ctx, history + [{"role": "user", "content": text}], model, system, sampling,
                                  session_of(request), typed=text):
            yield frame

    async def retry_last(history, model, system, temperature, top_p, max_new_tokens, top_k, repetition_penalty,
                         seed, request: gr.Request):
        """Drop the last reply and generate a new one for the same user message."""
        history = normalize(history)
        while history and history[-1]["role"] == "assistant":
            history.pop()
        if not history:
            yield [], gr.skip(), gr.skip()
            return
        sampling = (temperature, top_p, max_new_tokens, top_k, repetition_penalty, seed)
        async for frame in _reply(ctx, history, model, system, sampling, session_of(request)):
            yield frame

    def stop_reply(request: gr.Request):
        readout = ctx.cancels.stop(session_of(request), TAB)
        return gr.skip() if readout is None else (f"{readout} · " if readout else "") + "stopped"

    def undo_turn(history):
        """Remove the last exchange and put its message back in the input box."""
        history = normalize(history)
        while history and history[-1]["role"] == "assistant":
            history.pop()
        last = history.pop()["content"] if history and history[-1]["role"] == "user" else ""
        return history, last, ""

    def clear_chat():
        return [], "", ""

    def export_chat(history, model, system, temperature, top_p, max_new_tokens, top_k, repetition_penalty, seed):
        """The conversation as one record of the conversations JSONL format, plus model and params."""
        params = params_from(ctx, temperature, top_p, max_new_tokens, top_k, repetition_penalty, seed)
        record = {"messages": with_system(system, normalize(history)), "model": model,
                  "generation": vars(params), "tstamp": time.time()}
        path = Path(tempfile.mkdtemp(prefix="chatbuild-")) / "conversation.json"
        path.write_text(json.dumps(record, indent=2, ensure_ascii=False) + "\n")
        return str(path)

    def import_chat(path):
        """The conversation in an uploaded file, into the chat (system prompt and model too). A file
        that is not an upload, or is over `max_ui_body_bytes` (the body every later request would
        carry), is refused as an error; one that is no conversation gets a warning."""
        if not path:
            return gr.skip(), gr.skip(), gr.skip()
        try:
            path = uploaded_file(path, ctx.state.settings.max_ui_body_bytes, "max_ui_body_bytes")
        except UserError as e:
            raise gr.Error(str(e)) from None
        try:
            messages, model_name = read_conversation(path)
        except UserError as e:
            gr.Warning(str(e))
            return gr.skip(), gr.skip(), gr.skip()
        system_text = messages[0]["content"] if messages and messages[0]["role"] == "system" else ""
        history = [m for m in messages if m["role"] != "system"]
        return history, system_text, model_name if model_name in ctx.models() else gr.skip()

    def feedback(history, model, system, like: gr.LikeData, request: gr.Request):
        messages = normalize(history)
        index = like.index if isinstance(like.index, int) else like.index[0]
        if not 0 <= index < len(messages) or messages[index]["role"] != "assistant":
            return
        liked = like.liked if isinstance(like.liked, bool) else {"like": True, "dislike": False}.get(str(like.liked).lower())
        if liked is None:  # a retracted or unknown verdict: nothing to store
            return
        arena.add_feedback(ctx.db_path, session=session_of(request), model=model,
                           messages=with_system(system, messages[: index + 1]), index=index, liked=liked)
        gr.Info("Thanks, feedback saved." if liked else "Thanks, noted.")

    settings = [model, system, *sampling]
    outputs = [chatbot, message, readout]
    engine_events = dict(concurrency_id=ENGINE_GROUP, concurrency_limit=ctx.concurrency, show_progress="hidden")
    sent = gr.on([message.submit, send.click], chat, [message, chatbot, *settings], outputs,
                 api_name="chat", **engine_events)
    retried = retry.click(retry_last, [chatbot, *settings], outputs, api_name="retry", **engine_events)
    # Stop sets the engine's cancel event (which is all a gradio_client caller needs); in the browser
    # `cancels` also ends the stream at once and drops a reply still waiting in the queue.
    stop.click(stop_reply, None, readout, api_name="stop", cancels=[sent, retried], queue=False)
    undo.click(undo_turn, chatbot, outputs, api_name="undo", queue=False)
    clear.click(clear_chat, None, outputs, api_name="clear", queue=False)
    chatbot.clear(clear_chat, None, outputs, api_visibility="private", queue=False)  # its own trash icon
    export.click(export_chat, [chatbot, *settings], conversation_file, api_name="export_chat")
    conversation_file.upload(import_chat, conversation_file, [chatbot, system, model], api_name="import_chat")
    chatbot.like(feedback, [chatbot, model, system], None, api_visibility="private")
    return model


async def _reply(ctx: UIContext, history: list[dict], model, system, sampling, session: str,
                 typed: str | None = None):
    """Stream the assistant's reply to `history` (whose last message is the user's).
    Yields (history, input box, readout). A refused request (limits, busy server, prompt too long)
    is a visible message; the typed text goes back into the box."""

    def refused(e: UserError):
        gr.Warning(str(e))
        return (history[:-1] if typed else history), (typed if typed else gr.skip()), f"⚠️ {e}"

    messages = with_system(system, history)
    try:
        check_input(ctx, typed or "", messages)
        check_model(ctx, model)
        params = params_from(ctx, *sampling)
    except UserError as e:
        yield refused(e)
        return
    cancel = ctx.cancels.start(session, TAB)
    shown = history + [{"role": "assistant", "content": ""}]
    yield shown, "", "waiting for the model…"
    try:
        async for progress in stream_reply(ctx, messages, params, model, cancel):
            shown[-1]["content"] = progress.text
            readout = progress.readout()
            ctx.cancels.progress(session, TAB, readout)
            yield shown, gr.skip(), readout
    except UserError as e:  # busy, or the engine's own limits (prompt too long for the model, ...)
        yield refused(e)
    finally:
        ctx.cancels.finish(session, TAB, cancel)


def read_conversation(path) -> tuple[list[dict], str | None]:
    """Messages (and the model name, if recorded) from an exported conversation: an object with
    "messages" (the conversations-JSONL shape, one line of it), or a bare list of messages."""
    name = Path(path).name
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except OSError as e:  # its strerror only: the full message names the server's folders
        raise UserError(f"{name}: cannot read it ({e.strerror})") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserError(f"{name}: not a JSON conversation ({e})") from None
    messages = data.get("messages") if isinstance(data, dict) else data
    if not isinstance(messages, list):
        raise UserError(f'{name}: expected {{"messages": [...]}} or a list of messages')
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ("system", "user", "assistant") \
                or not isinstance(m.get("content"), str):
            raise UserError(f'{name}: message {i} needs a "role" (system, user or assistant) and a string "content"')
        out.append({"role": m["role"], "content": m["content"]})
    model = data.get("model") if isinstance(data, dict) else None
    return out, model if isinstance(model, str) else None
