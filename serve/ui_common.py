"""What the UI tabs share: their context, message normalisation, sampling controls, and one
streaming loop over the server's `ChatEngine` that honours Stop and the server's limits.

Every reply the UI asks for takes the server's one serving path, `serve.generation.generate`, as the
API's requests do: the same prompt limit, the same admission (`max_running` generations at once,
`queue_size` waiting, then "busy"), the same cancel registry (shutdown stops UI replies too), the
engine in a thread of its own. A Stop (or a closed browser tab) stops the engine at its next token.

The UI never tokenizes (the engine does): token counts and tokens/s come from the engine's chunks.
"""

import threading
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import gradio as gr

from chatbuild.engines import ChatEngine, GenerationParams, check_params
from chatbuild.errors import UserError
from serve.api import ServeState
from serve.generation import Busy, PromptOverLimit, generate

ENGINE_GROUP = "engine"  # Gradio concurrency group of every event that generates text


@dataclass
class UIContext:
    """Everything the tabs need, handed to each tab builder."""

    state: ServeState  # the server's shared state: engine (None while loading), settings, admission
    db_path: Path  # the SQLite database (chatbuild.storage): battles, arena rounds and votes, chat feedback
    max_input_chars: int = 20_000  # longest single message typed into the UI
    cancels: "Cancels" = field(default_factory=lambda: Cancels())

    @property
    def engine(self) -> ChatEngine:
        if self.state.engine is None:
            error = self.state.load_error
            raise UserError(f"The models failed to load: {error}" if error else
                            "The models are still loading; try again in a moment.")
        return self.state.engine

    def models(self) -> list[str]:
        """The served models, or [] while they load."""
        return list(self.state.engine.models()) if self.state.engine is not None else []

    @property
    def max_new_tokens(self) -> int:
        return self.state.settings.max_new_tokens

    @property
    def concurrency(self) -> int:
        """Engine-bound UI events at once; more wait in Gradio's queue, which shows their position."""
        return self.state.settings.max_running


class Cancels:
    """One cancel event per (session, tab): Stop sets it, the running generation watches it. Also
    the latest readout of that generation, for Stop to show when Gradio cuts the stream short.

    A Gradio `gr.State` can't hold a `threading.Event` (states are deep-copied), so the events live
    here, keyed by the session hash Gradio gives every page load and every gradio_client.
    """

    def __init__(self):
        self._lock = threading.Lock()
        self._events: dict[tuple[str, str], threading.Event] = {}
        self._readouts: dict[tuple[str, str], str] = {}

    def start(self, session: str, tab: str) -> threading.Event:
        """A fresh event for a new generation (replacing the previous one of this session and tab)."""
        event = threading.Event()
        with self._lock:
            self._events[(session, tab)] = event
            self._readouts.pop((session, tab), None)
        return event

    def progress(self, session: str, tab: str, readout: str) -> None:
        with self._lock:
            self._readouts[(session, tab)] = readout

    def stop(self, session: str, tab: str) -> str | None:
        """Stop the running generation of this session and tab. Returns its latest readout, or None
        if nothing was running."""
        with self._lock:
            event = self._events.pop((session, tab), None)
            readout = self._readouts.pop((session, tab), "")
        if event is None or event.is_set():
            return None
        event.set()
        return readout

    def finish(self, session: str, tab: str, event: threading.Event) -> None:
        """Forget `event` once its generation is over (unless a newer one replaced it)."""
        with self._lock:
            if self._events.get((session, tab)) is event:
                del self._events[(session, tab)]
                self._readouts.pop((session, tab), None)


def session_of(request: gr.Request | None) -> str:
    return (request.session_hash if request is not None else None) or "anonymous"


# ── messages ───────────────────────────────────────────────────────────────────────────────────
def text_of(content) -> str:
    """Plain text of a Gradio message content: a string, a list of parts like
    [{"type": "text", "text": ...}], or a component/file (which has no text)."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, dict):
        return content.get("text", "") if content.get("type", "text") == "text" else ""
    if isinstance(content, (list, tuple)):
        return "".join(text_of(part) for part in content)
    return str(getattr(content, "text", ""))


def normalize(history) -> list[dict]:
    """Gradio chat history → `[{"role": ..., "content": str}]`, the shape engines and files use.
    Messages with metadata titles (Gradio "thoughts") and other roles are dropped."""
    out = []
    for m in history or []:
        if not isinstance(m, dict):
            m = {"role": getattr(m, "role", ""), "content": getattr(m, "content", ""),
                 "metadata": getattr(m, "metadata", None)}
        role = m.get("role")
        if role not in ("system", "user", "assistant") or (m.get("metadata") or {}).get("title"):
            continue
        out.append({"role": role, "content": text_of(m.get("content"))})
    return out


def with_system(system: str | None, messages: list[dict]) -> list[dict]:
    system = (system or "").strip()
    return ([{"role": "system", "content": system}] if system else []) + messages


def check_input(ctx: UIContext, message: str, messages: list[dict]) -> None:
    """The serving input limits the UI can check itself (UserError says which). The prompt's token
    count is the engine's to check; it raises `PromptTooLong`, shown the same way."""
    if ctx.max_input_chars and len(message) > ctx.max_input_chars:
        raise UserError(f"Your message is {len(message):,} characters long; this server accepts at most "
                        f"{ctx.max_input_chars:,}.")
    limit = ctx.state.settings.max_messages
    if len(messages) > limit:
        raise UserError(f"This conversation has {len(messages)} messages; this server accepts at most "
                        f"{limit} (max_messages). Clear it or start a new round.")


def check_model(ctx: UIContext, model) -> str:
    served = ctx.engine.models()
    if model not in served:
        raise UserError(f'"{model}" is not served here; pick one of: {", ".join(served)}')
    return model


# ── sampling controls ──────────────────────────────────────────────────────────────────────────
def sampling_controls(ctx: UIContext, prefix: str, full: bool = True) -> list[gr.components.Component]:
    """Sliders for GenerationParams (defaults from the dataclass; elem_ids `{prefix}-temperature`, ...).
    `full=False`: the arena's subset. Returns them in the order `params_from` reads them."""
    d = GenerationParams()
    controls = [
        gr.Slider(0.0, 2.0, value=d.temperature, step=0.05, label="Temperature", info="0 = greedy",
                  elem_id=f"{prefix}-temperature"),
        gr.Slider(0.05, 1.0, value=d.top_p, step=0.05, label="Top-p", elem_id=f"{prefix}-top-p"),
        gr.Slider(1, ctx.max_new_tokens, value=min(d.max_new_tokens, ctx.max_new_tokens), step=1,
                  label="Max new tokens", elem_id=f"{prefix}-max-new-tokens"),
    ]
    if full:
        controls += [
            gr.Slider(0, 200, value=d.top_k, step=1, label="Top-k", info="0 = off", elem_id=f"{prefix}-top-k"),
            gr.Slider(1.0, 2.0, value=d.repetition_penalty, step=0.01, label="Repetition penalty",
                      elem_id=f"{prefix}-repetition-penalty"),
            gr.Number(value=-1, precision=0, minimum=-1, label="Seed", info="-1 = random", elem_id=f"{prefix}-seed"),
        ]
    return controls


def params_from(ctx: UIContext, temperature, top_p, max_new_tokens, top_k=0, repetition_penalty=1.0,
                seed=None) -> GenerationParams:
    """GenerationParams from the controls' values, within the serving limits. The values come from
    the browser or any gradio_client caller, so anything goes: a value that is not a number, or one
    outside the engines' bounds, is a one-line UserError naming the control's field."""

    def number(name, value, kind):
        try:
            return kind(value)
        except (TypeError, ValueError, OverflowError):
            raise UserError(f"{name} must be a number, got {str(value)[:40]!r}") from None

    seed = None if seed is None or seed == "" else number("seed", seed, int)
    params = GenerationParams(
        temperature=number("temperature", temperature, float), top_p=number("top_p", top_p, float),
        top_k=number("top_k", top_k or 0, int),
        max_new_tokens=max(1, min(number("max_new_tokens", max_new_tokens, int), ctx.max_new_tokens)),
        repetition_penalty=number("repetition_penalty", repetition_penalty or 1.0, float),
        seed=None if seed is None or seed < 0 else seed,  # the Seed box's -1 = random
    )
    check_params(params)
    return params


# ── streaming ──────────────────────────────────────────────────────────────────────────────────
@dataclass
class Progress:
    """A reply as it streams: its text so far and the numbers the readout shows."""

    text: str = ""
    prompt_tokens: int = 0
    completion_tokens: int = 0
    finish_reason: str | None = None
    first_token: float | None = None
    last_token: float | None = None

    @property
    def tokens_per_s(self) -> float:
        # Rate over the decoding phase (first token → latest), so queueing and prefill don't dilute it.
        if self.first_token is None or self.completion_tokens < 2:
            return 0.0
        span = self.last_token - self.first_token
        return (self.completion_tokens - 1) / span if span > 0 else 0.0

    def readout(self) -> str:
        n = self.completion_tokens
        parts = [f"**{n}** token{'' if n == 1 else 's'}", f"**{self.tokens_per_s:.1f}** tokens/s"]
        if self.prompt_tokens:
            parts.append(f"prompt {self.prompt_tokens} tokens")
        if self.finish_reason:
            parts.append({"stop": "finished", "length": "hit max new tokens",
                          "cancelled": "stopped"}.get(self.finish_reason, self.finish_reason))
        return " · ".join(parts)


async def stream_reply(ctx: UIContext, messages: list[dict], params: GenerationParams, model: str,
                       cancel: threading.Event) -> AsyncIterator[Progress]:
    """Yield the growing reply after each chunk, through the server's one serving path (prompt
    limit, a generation slot shared with the API, the engine in a thread). The engine stops when
    `cancel` is set, and also when this generator is abandoned (Gradio closes it when an event is
    cancelled or a browser goes away): `serve.generation.generate` sets `cancel` on its way out, so
    generation never runs on for nobody. UserError: the server is busy, or the prompt is over the
    server's limit, or the engine refused the request (prompt too long for the model, ...)."""
    engine = ctx.engine
    chunks = generate(ctx.state, engine, messages, params, model, cancel)
    progress = Progress()
    try:
        async for chunk in chunks:
            if chunk.text:
                progress.text += chunk.text
                progress.last_token = time.perf_counter()
                progress.first_token = progress.first_token or progress.last_token
            progress.completion_tokens = max(progress.completion_tokens, chunk.completion_tokens)
            progress.prompt_tokens = chunk.prompt_tokens or progress.prompt_tokens
            progress.finish_reason = chunk.finish_reason or progress.finish_reason
            yield progress
        if progress.finish_reason is None:  # an engine that ended without saying why
            progress.finish_reason = "cancelled" if cancel.is_set() else "stop"
            yield progress
    except Busy as e:  # both raised before the first chunk, so nothing was shown yet
        raise UserError(f"The server is busy ({e.running} replies in progress, {e.waiting} waiting); "
                        f"try again in {e.retry_after} s.") from None
    except PromptOverLimit as e:
        size = f"{e.chars:,} characters (at least {e.tokens:,} tokens)" if e.chars else f"{e.tokens:,} tokens"
        raise UserError(f"This conversation is {size} long for {model}; this server accepts at most "
                        f"{e.limit:,} prompt tokens (max_prompt_tokens). Shorten it or clear the chat.") from None
    finally:
        # Closing `generate` reaches its `finally` (cancel set) once it has started; its thread then
        # frees the slot. Unstarted, it holds nothing yet.
        await chunks.aclose()
