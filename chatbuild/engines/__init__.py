"""Chat engines: what the API, the UI and the eval programs talk to.

A `ChatEngine` turns a conversation into a streamed reply from one of the models it serves:

    engine = open_engine(["runs/a", "runs/b"])           # one 4-bit base + two adapters, in process
    engine.models()                                       # ["a", "b", "tiny-base"]
    for chunk in engine.stream(messages, GenerationParams(temperature=0), "a"):
        print(chunk.text, end="")                         # the last chunk has finish_reason set
    engine.close()

Implementations (imported lazily; this module stays light):
- `chatbuild.engines.hf.HFEngine`: transformers + bitsandbytes + PEFT in this process. One quantized
  base, any number of run adapters chosen per request, and the bare base as a model of its own.
- `chatbuild.engines.remote.RemoteEngine`: any OpenAI-compatible server (ours, `vllm serve`, ...).

Contract of `stream(messages, params, model, cancel)`:
- `messages` are `{"role": "system|user|assistant", "content": str}` dicts ending with a user turn;
- a request the engine cannot serve (unknown model, malformed conversation, prompt too long, bad
  parameters) raises `UserError` (or a subclass below) from `stream()` itself or, at the latest,
  from the first `next()`, before any chunk;
- chunks carry reply text in order; exactly the last one has `finish_reason` set ("stop": EOS or a
  stop string, which is not part of the text; "length": max_new_tokens or the context window;
  "cancelled": the `cancel` event was set). Token counts are running totals;
- setting `cancel` or closing the iterator stops the generation at the next token: no work
  continues for a reply nobody reads.
Engines never see the UI; the UI never tokenizes.
"""

import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol, runtime_checkable

from chatbuild.errors import UserError

BASE_ADAPTER = "__base__"  # PEFT's name for "no adapter" in a per-request adapter list


@dataclass
class GenerationParams:
    """Sampling settings for one reply. temperature 0 = greedy; top_k 0 = off."""

    temperature: float = 0.7
    top_p: float = 1.0
    top_k: int = 0
    max_new_tokens: int = 256
    repetition_penalty: float = 1.0  # > 1 discourages tokens already in the prompt or reply (CTRL paper)
    seed: int | None = None  # same seed, same request -> same reply; None = fresh randomness
    stop: list[str] = field(default_factory=list)  # added to the model's own stop strings
    # The reply must be exactly one of these strings (vLLM's `guided_choice`): decoding is restricted
    # token by token to continuations of the choices. How a small model can still answer a judge.
    choices: list[str] | None = None


@dataclass
class Chunk:
    """One piece of a streamed reply."""

    text: str
    finish_reason: str | None = None  # "stop" | "length" | "cancelled", on the last chunk only
    prompt_tokens: int = 0
    completion_tokens: int = 0  # running count of generated tokens


@runtime_checkable
class ChatEngine(Protocol):
    def models(self) -> list[str]:
        """Names of the models this engine serves (run names, the base)."""
        ...

    def stream(self, messages: list[dict], params: GenerationParams, model: str,
               cancel: threading.Event | None = None) -> Iterator[Chunk]:
        """Stream a reply to `messages` from `model` (see the module docstring for the contract)."""
        ...

    def close(self) -> None:
        """Free the models (memory, connections). The engine is unusable afterwards."""
        ...


# ── errors a caller can map to answers (the API maps them to HTTP statuses) ─────────────────────
class UnknownModel(UserError):
    """The request names a model the engine does not serve."""

    def __init__(self, model: str, known: list[str]):
        self.model, self.known = model, list(known)
        super().__init__(f'model "{model}" is not served here; available: {", ".join(self.known) or "none"}')


class PromptTooLong(UserError):
    """The prompt has more tokens than the engine (or its model's context window) accepts."""

    def __init__(self, tokens: int, limit: int, model: str):
        self.tokens, self.limit, self.model = tokens, limit, model
        super().__init__(f"the prompt is {tokens} tokens long; {model} accepts at most {limit} prompt tokens")


class RemoteError(UserError):
    """A remote server refused a request or could not be reached. `status` is its HTTP status
    (0 when there was no answer)."""

    def __init__(self, message: str, status: int = 0, retry_after: str | None = None):
        self.status, self.retry_after = status, retry_after
        super().__init__(message)


def check_params(params: GenerationParams) -> None:
    """Raise UserError naming the first out-of-range sampling setting."""
    problems = [
        ("temperature", params.temperature >= 0, "must be >= 0"),
        ("top_p", 0 < params.top_p <= 1, "must be in (0, 1]"),
        ("top_k", params.top_k >= 0, "must be >= 0"),
        ("max_new_tokens", params.max_new_tokens >= 1, "must be >= 1"),
        ("repetition_penalty", params.repetition_penalty > 0, "must be > 0"),
        ("stop", all(isinstance(s, str) and s for s in params.stop), "must be non-empty strings"),
        ("choices", params.choices is None or (0 < len(params.choices) <= 64 and all(isinstance(c, str) and c for c in params.choices)),
         "must be 1 to 64 non-empty strings"),
    ]
    for name, ok, rule in problems:
        if not ok:
            raise UserError(f"{name} {rule}, got {getattr(params, name)!r}")


def open_engine(runs: Sequence[str | Path] = (), *, base: str | None = None, base_name: str | None = None,
                kind: str = "hf", url: str | None = None, api_key: str | None = None,
                device: str | None = None, max_prompt_tokens: int | None = None, max_batch: int = 16,
                chat_format: str | None = None) -> ChatEngine:
    """The engine for a command line: `kind` "hf" serves run folders (and/or a bare `base`) in this
    process; "openai" talks to the OpenAI-compatible server at `url`, where `runs` (if any) are the
    models to expose instead of everything the server lists: model names, or run folders (served
    there under the run's name; their stop strings and system prompt are added to each request).
    `max_batch`: the most replies the hf engine decodes in one forward pass; `chat_format`: how the hf
    engine prompts the bare base (a `chatbuild.templates` name or .jinja file; default its own template)."""
    if kind == "hf":
        if url:
            raise UserError("a remote URL needs the openai engine (--engine openai)")
        from chatbuild.engines.hf import HFEngine

        return HFEngine.from_runs(runs, base=base, base_name=base_name, chat_format=chat_format, device=device,
                                  max_prompt_tokens=max_prompt_tokens, max_batch=max_batch)
    if kind == "openai":
        if not url:
            raise UserError("the openai engine needs the server's URL (--remote-url)")
        if base:
            raise UserError("--base applies to the hf engine; a remote server loads its own models")
        from chatbuild.engines.remote import FormattedEngine, RemoteEngine
        from chatbuild.runs import is_run, load_run

        # A run folder names its model (the run's name, as the hf engine and vLLM serve it) and
        # brings its chat format; anything else is a model name on the server.
        names, formats = [], {}
        for r in runs:
            if is_run(r):
                run = load_run(r)
                names.append(run.name)
                formats[run.name] = run.chat_format
            else:
                names.append(str(r))
        remote = RemoteEngine(url, api_key=api_key, models=names or None)
        return FormattedEngine(remote, formats) if formats else remote
    raise UserError(f'engine "{kind}" is unknown; use hf or openai')
