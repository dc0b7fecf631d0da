"""The one serving path: how every reply the server makes is generated, for the API and the UI alike.

    async for chunk in generate(state, engine, messages, params, model, cancel):
        ...                                   # chunks of `engine.stream`, in the event loop

An API request, a Chat tab turn and each side of an Arena turn all come through here, in this order:

1. the prompt: the server's `max_prompt_tokens`, counted by an engine that tokenizes in this process
   (`CountsTokens`), before the request queues. A conversation with more characters than the limit
   can spell is refused on its characters, untokenized. Over the limit: `PromptOverLimit`;
2. admission: one of `max_running` generation slots, or a place among `queue_size` waiting, or
   `Busy` at once (the API answers 429 with Retry-After, the UI says "busy");
3. the cancel registry: once admitted, the reply's `cancel` event joins `state.cancels`, which
   shutdown sets (`ServeState.cancel_all`). The caller owns the event and sets it too: the API when
   its client disconnects, the UI's Stop button;
4. `engine.stream` runs in a thread of its own (it is a blocking iterator); its chunks are handed to
   the event loop as they come;
5. the slot is freed, and the event leaves the registry, when that thread has really ended, not when
   the reader stops reading: a cancelled reply's last forward pass still counts against `max_running`.

Leaving the iteration early (closing it, an exception, a cancelled task) sets `cancel`, so the engine
stops at its next token: no work continues for a reply nobody reads. The API and the UI word the
errors their own way (HTTP bodies, one-line messages); what they check and when is decided here.
"""

import asyncio
import math
import threading
import time
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING

import anyio.to_thread

from chatbuild.engines import ChatEngine, Chunk, CountsTokens, GenerationParams, PromptTooLong
from chatbuild.errors import UserError

if TYPE_CHECKING:  # serve.api imports this module; the state's class is only named here
    from serve.api import ServeState


class Busy(Exception):
    """Every slot is taken and the queue is full. The numbers are those at the refusal."""

    def __init__(self, running: int, waiting: int, retry_after: int):
        self.running, self.waiting, self.retry_after = running, waiting, retry_after
        super().__init__(f"the server is busy ({running} replies in progress, {waiting} waiting)")


class PromptOverLimit(UserError):
    """The prompt has more tokens than the server's `max_prompt_tokens`. `chars` is set when it was
    refused on its characters alone, untokenized; `tokens` is then the fewest tokens they can make."""

    def __init__(self, tokens: int, limit: int, chars: int | None = None):
        self.tokens, self.limit, self.chars = tokens, limit, chars
        size = f"{tokens} tokens" if chars is None else f"{chars:,} characters (at least {tokens} tokens)"
        super().__init__(f"the prompt is {size} long; this server accepts at most {limit} prompt tokens "
                         "(max_prompt_tokens)")


class Admission:
    """At most `max_running` generations at once and `queue_size` requests waiting for one; a
    request beyond that is turned away at once (`Busy`) instead of stalling."""

    def __init__(self, max_running: int, queue_size: int):
        self.max_running, self.queue_size = max_running, queue_size
        self.running = self.waiting = 0
        self._slots = asyncio.Semaphore(max_running)
        self._seconds = 1.0  # moving average of a generation's duration, for Retry-After

    async def acquire(self) -> None:
        if self.running + self.waiting >= self.max_running + self.queue_size:
            raise Busy(self.running, self.waiting, self.retry_after())
        self.waiting += 1
        try:
            await self._slots.acquire()
        finally:
            self.waiting -= 1
        self.running += 1

    def release(self, seconds: float) -> None:
        self.running -= 1
        self._slots.release()
        self._seconds = 0.8 * self._seconds + 0.2 * seconds

    def retry_after(self) -> int:
        """Seconds until a place is likely free: the queue ahead, drained `max_running` at a time."""
        return max(1, math.ceil(self._seconds * (self.waiting + 1) / self.max_running))


def admission_of(state: "ServeState") -> Admission:
    """The server's one admission gate, shared by the API and the UI. Made on first use, inside the
    server's event loop, where its semaphore then waits."""
    if state.admission is None:
        state.admission = Admission(state.settings.max_running, state.settings.queue_size)
    return state.admission


async def check_prompt(engine: ChatEngine, messages: list[dict], model: str, limit: int) -> None:
    """Refuse (PromptOverLimit) a prompt over `limit` tokens, counted by the engine when it tokenizes
    in this process (others check their own context window when they generate). A malformed
    conversation is the engine's UserError."""
    if not isinstance(engine, CountsTokens):
        return
    # Tokenizing is CPU work: off the event loop, in AnyIO's worker pool (the one FastAPI and Gradio
    # use), which lets idle workers go; asyncio's default executor would keep its threads for the life of
    # the server. A hopeless conversation is refused untokenized.
    try:
        tokens, chars = await anyio.to_thread.run_sync(engine.count_tokens, messages, model, limit), None
    except PromptTooLong as e:
        tokens, chars = e.tokens, e.chars
    if tokens > limit:
        raise PromptOverLimit(tokens, limit, chars)


async def generate(state: "ServeState", engine: ChatEngine, messages: list[dict], params: GenerationParams,
                   model: str, cancel: threading.Event) -> AsyncIterator[Chunk]:
    """Check the prompt, wait for a slot, and yield the reply's chunks (the module docstring has the
    steps). Raises, before the first chunk: PromptOverLimit, Busy, or whatever the engine refused the
    request with (UnknownModel, PromptTooLong for its own context window, UserError, ...)."""
    await check_prompt(engine, messages, model, state.settings.max_prompt_tokens)
    admission = admission_of(state)
    await admission.acquire()
    # From here to the thread's start there is no await: an admitted reply always reaches `finally`
    # below once iterated, and its thread frees the slot.
    started = time.perf_counter()
    state.cancels.add(cancel)

    def on_thread_end():  # the generation really stopped: free its slot
        state.cancels.discard(cancel)
        admission.release(time.perf_counter() - started)

    loop = asyncio.get_running_loop()
    items: asyncio.Queue = asyncio.Queue()

    def hand_over(item):
        try:
            loop.call_soon_threadsafe(items.put_nowait, item)
        except RuntimeError:  # the event loop is gone (server shut down); nobody is listening
            pass

    def work():
        outcome = _END
        try:
            for chunk in engine.stream(messages, params, model, cancel=cancel):
                hand_over(chunk)
        except BaseException as e:  # handed to the loop, where the reader raises it
            outcome = e
        finally:
            # The slot is freed before the reader hears the end (the loop runs these in order): a
            # client that has its whole reply and asks again at once finds the slot free.
            try:
                loop.call_soon_threadsafe(on_thread_end)
            except RuntimeError:
                pass
            hand_over(outcome)

    threading.Thread(target=work, name=f"chatbuild-generate-{model}", daemon=True).start()
    try:
        while True:
            item = await items.get()
            if item is _END:
                return
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        cancel.set()  # a no-op when the reply is complete; otherwise nobody reads the rest


_END = object()
