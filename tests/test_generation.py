"""The one serving path (`serve.generation`): the API's requests and the UI's replies share one
admission gate, one cancel registry and one prompt check. A scripted engine (no model); the API is
called in-process (httpx's ASGI transport) in the same event loop as the UI's `stream_reply`, so
both hold slots of the one gate at the same time."""

import asyncio
import re
import threading
import time

import httpx
import pytest

pytest.importorskip("gradio")

from test_ui_helpers import ScriptedEngine  # noqa: E402

from chatbuild.engines import GenerationParams, PromptTooLong  # noqa: E402
from chatbuild.errors import UserError  # noqa: E402
from serve.settings import Settings  # noqa: E402

HELLO = [{"role": "user", "content": "hi"}]
LONG = GenerationParams(max_new_tokens=2000)  # 20 s of scripted words: stopped as soon as the point is made


def served(engine, tmp_path, **settings):
    """(API client, UI context, shared state) of one app over `engine`."""
    from serve.app import create_app
    from serve.ui_common import UIContext

    app = create_app(engine, Settings(max_new_tokens=2000, **settings), ui=False)
    state = app.state.serve
    client = httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test", timeout=30)
    return client, UIContext(state, tmp_path / "chatbuild.sqlite"), state


def api_request(max_tokens: int = 2000) -> dict:
    return {"model": "alpha", "messages": HELLO, "max_tokens": max_tokens}


async def until(condition, what: str, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting until {what}"
        await asyncio.sleep(0.01)


def test_the_api_and_the_ui_share_one_gate_and_one_cancel_registry(tmp_path):
    """One slot, no queue: a UI reply holds it and the API answers 429; an API request holds it and
    the UI says busy. Each running reply's cancel event is in the registry shutdown sets, and
    `cancel_all` stops either; the slot is free once the engine's thread has ended."""
    from serve.ui_common import stream_reply

    engine = ScriptedEngine(delay=0.01)
    client, ctx, state = served(engine, tmp_path, max_running=1, queue_size=0)

    def idle():
        return state.admission.running == 0 and not state.cancels and engine.active == 0

    async def scenario():
        async with client:
            stop = threading.Event()  # what the UI's Stop button sets
            replies = stream_reply(ctx, HELLO, LONG, "alpha", stop)
            assert (await anext(replies)).text == "alpha says:"
            assert state.cancels == {stop} and state.admission.running == 1
            refused = await client.post("/v1/chat/completions", json=api_request())
            assert refused.status_code == 429 and refused.json()["error"]["code"] == "queue_full"
            assert int(refused.headers["retry-after"]) >= 1
            assert "1 replies in progress, 0 waiting" in refused.json()["error"]["message"]
            state.cancel_all()  # shutdown: the UI's reply stops too
            assert [p async for p in replies][-1].finish_reason == "cancelled" and stop.is_set()
            await until(idle, "the UI's slot is free")

            api = asyncio.create_task(client.post("/v1/chat/completions", json=api_request()))
            await until(lambda: engine.active == 1, "the API's reply is under way")
            assert len(state.cancels) == 1 and state.admission.running == 1
            with pytest.raises(UserError, match=r"The server is busy \(1 replies in progress, 0 waiting\)"):
                await anext(stream_reply(ctx, HELLO, LONG, "alpha", threading.Event()))
            state.cancel_all()
            answer = await api
            assert answer.status_code == 200 and answer.json()["choices"][0]["finish_reason"] == "cancelled"
            await until(idle, "the API's slot is free")

            done = await client.post("/v1/chat/completions", json=api_request(max_tokens=3))
            assert done.json()["choices"][0]["message"]["content"] == "alpha says: w1 w2"
            assert [p async for p in stream_reply(ctx, HELLO, GenerationParams(max_new_tokens=3), "alpha",
                                                  threading.Event())][-1].text == "alpha says: w1 w2"

    asyncio.run(scenario())
    assert engine.cancelled == 2


class CountingEngine(ScriptedEngine):
    """A scripted engine that tokenizes (`CountsTokens`): one token per character, and a prompt of
    more characters than `limit * 4` refused on its characters, as the hf engine does."""

    def count_tokens(self, messages, model, limit=None):
        chars = sum(len(m["content"]) for m in messages)
        if limit is not None and chars > limit * 4:
            raise PromptTooLong(-(-chars // 4), limit, model, chars=chars)
        return chars


def test_the_prompt_limit_is_checked_once_for_both_before_queueing(tmp_path):
    """`max_prompt_tokens`, counted by an engine that counts: the API's 400 and the UI's one-line
    refusal come from the same check, before any slot is taken or the engine is asked; an engine
    that does not count is not asked to."""
    from serve.ui_common import stream_reply

    engine = CountingEngine()
    client, ctx, state = served(engine, tmp_path, max_prompt_tokens=10)
    over, hopeless = [{"role": "user", "content": "x" * 11}], [{"role": "user", "content": "x" * 1000}]

    async def scenario():
        async with client:
            for messages, size in ((over, "11 tokens"), (hopeless, "1,000 characters (at least 250 tokens)")):
                r = await client.post("/v1/chat/completions", json={**api_request(), "messages": messages})
                error = r.json()["error"]
                assert r.status_code == 400 and error["code"] == "context_length_exceeded" and error["param"] == "messages"
                assert error["message"] == (f"the prompt is {size} long; this server accepts at most 10 prompt tokens "
                                            "(max_prompt_tokens)")
                with pytest.raises(UserError, match=re.escape(f"This conversation is {size} long for alpha; this "
                                                              "server accepts at most 10 prompt tokens (max_prompt_tokens)")):
                    await anext(stream_reply(ctx, messages, LONG, "alpha", threading.Event()))
            assert engine.requests == [] and (state.admission is None or state.admission.running == 0)
            fits = await client.post("/v1/chat/completions", json={**api_request(max_tokens=2), "messages": HELLO})
            assert fits.status_code == 200

    asyncio.run(scenario())

    plain = ScriptedEngine()  # counts nothing: a long prompt is the engine's to refuse, not the server's
    client, ctx, _ = served(plain, tmp_path, max_prompt_tokens=10)

    async def uncounted():
        async with client:
            r = await client.post("/v1/chat/completions", json={**api_request(max_tokens=2), "messages": over})
            assert r.status_code == 200

    asyncio.run(uncounted())
