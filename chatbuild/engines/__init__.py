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

Optional capabilities are small protocols of their own, checked with `isinstance` (never by probing
for a method): `CountsTokens` (the server checks its prompt limit before queueing) and
`LoadsAdapters` (the Build tab serves a run it just trained). The hf engine has both; the remote and
vLLM engines have neither (their server counts and loads).
"""

import math
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


@runtime_checkable
class CountsTokens(Protocol):
    """An engine that tokenizes in this process, so a caller can measure a prompt before queueing it."""

    def count_tokens(self, messages: list[dict], model: str, limit: int | None = None) -> int:
        """Prompt tokens `messages` make for `model` (UserError if the conversation is malformed).
        With `limit`, a conversation with more characters than `limit` tokens can spell is refused
        with PromptTooLong without being tokenized (a count over `limit` is the caller's to refuse)."""
        ...


@runtime_checkable
class LoadsAdapters(Protocol):
    """An engine that serves more runs while it runs: each one's adapter on the base already loaded."""

    base_key: tuple  # what a run must be trained on to be loaded here: its `chatbuild.runs.Run.base_key()`

    def load_adapter(self, name: str, run_path: str | Path) -> str:
        """Serve the run folder at `run_path` under `name`; returns the name. UserError if the run
        was trained on another base (`base_key`) or the name is taken."""
        ...


# ── errors a caller can map to answers (the API maps them to HTTP statuses) ─────────────────────
class UnknownModel(UserError):
    """The request names a model the engine does not serve."""

    def __init__(self, model: str, known: list[str]):
        self.model, self.known = model, list(known)
        super().__init__(f'model "{model}" is not served here; available: {", ".join(self.known) or "none"}')


class PromptTooLong(UserError):
    """The prompt has more tokens than the engine (or its model's context window) accepts."""

    def __init__(self, tokens: int, limit: int, model: str, chars: int | None = None):
        """With `chars`, the prompt was refused on its characters alone, untokenized, and `tokens` is
        the fewest tokens that many characters can make."""
        self.tokens, self.limit, self.model, self.chars = tokens, limit, model, chars
        size = f"{tokens} tokens" if chars is None else f"{chars:,} characters (at least {tokens} tokens)"
        super().__init__(f"the prompt is {size} long; {model} accepts at most {limit} prompt tokens")


class BadParams(UserError):
    """A sampling setting outside its bounds; `field` names it (a `GenerationParams` field)."""

    def __init__(self, field: str, message: str):
        self.field = field
        super().__init__(message)


class RemoteError(UserError):
    """A remote server refused a request or could not be reached. `status` is its HTTP status
    (0 when there was no answer)."""

    def __init__(self, message: str, status: int = 0, retry_after: str | None = None):
        self.status, self.retry_after = status, retry_after
        super().__init__(message)


# ── bounds of a request's sampling settings (docs/serve.md has the table) ──────────────────────
# Each keeps the sampler's arithmetic finite: logits divided by a temperature or a penalty stay far from
# float32's range, and a seed fits torch's generator. A request outside them is refused (UserError).
TEMPERATURE_MAX = 2.0
# 0 < temperature < GREEDY_BELOW decodes greedily: such temperatures put (nearly) all probability on
# the top token anyway, and dividing logits by 1e-45 overflows. Clients send tiny values to mean greedy.
GREEDY_BELOW = 1e-2
REPETITION_PENALTY_MIN, REPETITION_PENALTY_MAX = 0.5, 2.0  # 1 = off; the CTRL paper uses 1.2
SEED_MAX = 2**63 - 1  # seeds are 0 .. 2**63-1 (torch.Generator.manual_seed takes 64 bits)
TOP_K_MAX = 1_000_000  # above any vocabulary: top_k over the vocabulary size means every token
STOP_MAX, STOP_MAX_CHARS = 16, 256  # stop strings per request (the server allows fewer), characters each
CHOICES_MAX, CHOICE_MAX_CHARS = 64, 256  # guided choices per request, characters each


def _finite(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _strings(values, most: int, chars: int) -> bool:
    return len(values) <= most and all(isinstance(v, str) and 0 < len(v) <= chars for v in values)


def check_params(params: GenerationParams) -> None:
    """Raise BadParams (a UserError) naming the first sampling setting outside its bounds (the
    constants above)."""
    p = params
    problems = [
        ("temperature", _finite(p.temperature) and 0 <= p.temperature <= TEMPERATURE_MAX,
         f"must be 0 (greedy) to {TEMPERATURE_MAX}"),
        ("top_p", _finite(p.top_p) and 0 < p.top_p <= 1, "must be in (0, 1]"),
        ("top_k", isinstance(p.top_k, int) and 0 <= p.top_k <= TOP_K_MAX, f"must be 0 (off) to {TOP_K_MAX:,}"),
        ("max_new_tokens", isinstance(p.max_new_tokens, int) and p.max_new_tokens >= 1, "must be >= 1"),
        ("repetition_penalty", _finite(p.repetition_penalty)
         and REPETITION_PENALTY_MIN <= p.repetition_penalty <= REPETITION_PENALTY_MAX,
         f"must be {REPETITION_PENALTY_MIN} to {REPETITION_PENALTY_MAX} (1 = off)"),
        ("seed", p.seed is None or (isinstance(p.seed, int) and 0 <= p.seed <= SEED_MAX),
         "must be 0 to 2**63-1 (or none)"),
        ("stop", _strings(p.stop, STOP_MAX, STOP_MAX_CHARS),
         f"must be at most {STOP_MAX} non-empty strings of at most {STOP_MAX_CHARS} characters"),
        ("choices", p.choices is None or (len(p.choices) > 0 and _strings(p.choices, CHOICES_MAX, CHOICE_MAX_CHARS)),
         f"must be 1 to {CHOICES_MAX} non-empty strings of at most {CHOICE_MAX_CHARS} characters"),
    ]
    for name, ok, rule in problems:
        if not ok:
            raise BadParams(name, f"{name} {rule}, got {_short(getattr(params, name))}")


def _short(value) -> str:
    """A value for a one-line message: long strings and lists are cut."""
    text = repr(value)
    return text if len(text) <= 80 else f"{text[:60]}... ({len(text):,} characters)"


def open_engine(runs: Sequence[str | Path] = (), *, base: str | None = None, base_name: str | None = None,
                kind: str = "hf", url: str | None = None, api_key: str | None = None,
                device: str | None = None, max_prompt_tokens: int | None = None, max_batch: int = 16,
                chat_format: str | None = None, precision: str | None = None, decoder: str = "auto") -> ChatEngine:
    """The engine for a command line: `kind` "hf" serves run folders (and/or a bare `base`) in this
    process; "openai" talks to the OpenAI-compatible server at `url`, where `runs` (if any) are the
    models to expose instead of everything the server lists: model names, or run folders (served
    there under the run's name; their stop strings and system prompt are added to each request).
    `max_batch`: the most replies the hf engine decodes in one forward pass; `chat_format`: how the hf
    engine prompts the bare base (a `chatbuild.templates` name or .jinja file; default its own template);
    `precision`: how the hf engine holds the base (`chatbuild.engines.hf.PRECISIONS` or "auto"; None: as
    the runs were trained); `decoder`: which forward pass the hf engine decodes with
    (`chatbuild.engines.hf.DECODERS`)."""
    if kind == "hf":
        if url:
            raise UserError("a remote URL needs the openai engine (--engine openai)")
        from chatbuild.engines.hf import HFEngine

        return HFEngine.from_runs(runs, base=base, base_name=base_name, chat_format=chat_format, device=device,
                                  max_prompt_tokens=max_prompt_tokens, max_batch=max_batch, precision=precision,
                                  decoder=decoder)
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
