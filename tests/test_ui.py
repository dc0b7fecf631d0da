"""The Chat tab and the leaderboard through gradio_client, on a real server: streaming, Stop, retry/undo/
clear, export/import, input limits, concurrency; first on a scripted engine (exact expectations, fast),
then on the tiny model with the in-process HF engine (the acceptance run)."""

import json
import threading
import time

import pytest

pytest.importorskip("gradio")
pytest.importorskip("gradio_client")

from test_ui_helpers import ScriptedEngine, gradio_client, serving, text_of, ui_app  # noqa: E402

CHAT_DEFAULTS = dict(model="alpha", system="", temperature=0.7, top_p=1.0, max_new_tokens=12, top_k=0,
                     repetition_penalty=1.0, seed=None)


def chat_args(text, history=(), **overrides):
    a = {**CHAT_DEFAULTS, **overrides}
    return (text, list(history), a["model"], a["system"], a["temperature"], a["top_p"], a["max_new_tokens"],
            a["top_k"], a["repetition_penalty"], a["seed"])


@pytest.fixture(scope="module")
def scripted(tmp_path_factory):
    """(url, engine, db_path) of a UI served over a ScriptedEngine, with small input limits."""
    engine = ScriptedEngine(delay=0.01)
    db = tmp_path_factory.mktemp("ui") / "chatbuild.sqlite"
    with serving(ui_app(engine, db, max_messages=9, max_new_tokens=600, max_running=1)) as url:
        yield url, engine, db


@pytest.fixture(scope="module")
def client(scripted):
    """One gradio_client session for the module (each test passes its own history)."""
    with gradio_client(scripted[0], download_files=False) as c:
        yield c


def finish(job, timeout: float = 30):
    deadline = time.monotonic() + timeout
    while not job.done():
        assert time.monotonic() < deadline, "the job did not finish"
        time.sleep(0.02)
    return job.outputs()


def test_chat_streams_the_reply_with_a_live_readout(scripted, client):
    _, engine, _ = scripted
    outputs = finish(client.submit(*chat_args("Hello there", system="Be brief.", max_new_tokens=12, top_k=5,
                                              seed=3, repetition_penalty=1.1), api_name="/chat"))
    replies = [text_of(h[-1]) for h, _, _ in outputs if h and h[-1]["role"] == "assistant"]
    assert len(replies) > 5, "the reply should arrive in many updates"
    assert all(b.startswith(a) for a, b in zip(replies, replies[1:])), "streamed text only grows"
    history, box, readout = outputs[-1]
    assert [m["role"] for m in history] == ["user", "assistant"] and text_of(history[0]) == "Hello there"
    assert text_of(history[1]) == "alpha says: " + " ".join(f"w{i}" for i in range(1, 12))
    assert "**12** tokens" in readout and "tokens/s" in readout and "prompt 7 tokens" in readout
    assert "max new tokens" in readout
    messages, params, model = engine.requests[-1]
    assert model == "alpha"
    assert messages == [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello there"}]
    assert (params.max_new_tokens, params.top_k, params.seed, params.repetition_penalty) == (12, 5, 3, 1.1)


def test_history_in_parts_format_is_normalized(scripted, client):
    _, engine, _ = scripted
    history = [{"role": "user", "content": [{"type": "text", "text": "first"}]},
               {"role": "assistant", "content": [{"type": "text", "text": "one"}, {"type": "text", "text": "two"}]}]
    client.predict(*chat_args("second", history, model="beta", max_new_tokens=3), api_name="/chat")
    messages, _, model = engine.requests[-1]
    assert model == "beta"
    assert messages == [{"role": "user", "content": "first"}, {"role": "assistant", "content": "onetwo"},
                        {"role": "user", "content": "second"}]


def test_stop_really_stops_the_engine(scripted, client):
    _, engine, _ = scripted
    cancelled = engine.cancelled
    job = client.submit(*chat_args("Tell me everything", max_new_tokens=600), api_name="/chat")  # ~6 s
    while len(job.outputs()) < 5:
        time.sleep(0.02)
    client.predict(api_name="/stop")
    started = time.monotonic()
    history, _, readout = finish(job, timeout=5)[-1]
    assert time.monotonic() - started < 2
    assert engine.cancelled == cancelled + 1
    assert "stopped" in readout
    words = text_of(history[-1]).split()
    assert 3 < len(words) < 300, "the partial reply stays"
    # the engine is free again: a following reply is served at once
    history, _, readout = client.predict(*chat_args("again", max_new_tokens=4), api_name="/chat")
    assert text_of(history[-1]) == "alpha says: w1 w2 w3"


def test_retry_undo_clear(scripted, client):
    history, _, _ = client.predict(*chat_args("one", max_new_tokens=2), api_name="/chat")
    history, _, _ = client.predict(*chat_args("two", history, max_new_tokens=2), api_name="/chat")
    assert [text_of(m) for m in history] == ["one", "alpha says: w1", "two", "alpha says: w1"]

    args = chat_args(None, history, model="gamma", max_new_tokens=3)[1:]
    retried, _, _ = client.predict(*args, api_name="/retry")
    assert [text_of(m) for m in retried] == ["one", "alpha says: w1", "two", "gamma says: w1 w2"]

    undone, box, readout = client.predict(retried, api_name="/undo")
    assert [text_of(m) for m in undone] == ["one", "alpha says: w1"] and box == "two" and readout == ""

    cleared, box, readout = client.predict(api_name="/clear")
    assert cleared == [] and box == "" and readout == ""


def test_export_then_import_restores_the_conversation(scripted, tmp_path):
    from gradio_client import handle_file

    with gradio_client(scripted[0], download_files=str(tmp_path / "downloads")) as client:
        export_then_import(client, tmp_path, handle_file)


def export_then_import(client, tmp_path, handle_file):
    history, _, _ = client.predict(*chat_args("hi", max_new_tokens=3, model="beta", system="Sys."), api_name="/chat")
    args = chat_args(None, history, model="beta", system="Sys.", max_new_tokens=3)[1:]
    exported = client.predict(*args, api_name="/export_chat")
    record = json.loads(open(exported).read())
    assert record["messages"] == [{"role": "system", "content": "Sys."}, {"role": "user", "content": "hi"},
                                  {"role": "assistant", "content": "beta says: w1 w2"}]
    assert record["model"] == "beta" and record["generation"]["max_new_tokens"] == 3

    other = tmp_path / "conversation.json"
    other.write_text(json.dumps({"messages": record["messages"], "model": "gamma"}))
    restored, system, model = client.predict(handle_file(str(other)), api_name="/import_chat")
    assert [text_of(m) for m in restored] == ["hi", "beta says: w1 w2"]
    assert system == "Sys." and model == "gamma"


def test_a_broken_import_is_a_message_not_a_crash(scripted, client, tmp_path):
    from gradio_client import handle_file

    bad = tmp_path / "bad.json"
    bad.write_text('{"messages": [{"role": "robot", "content": "x"}]}')
    result = client.predict(handle_file(str(bad)), api_name="/import_chat")
    assert result[0] is None or result[0] == [] or isinstance(result[0], dict)  # nothing imported
    history, _, _ = client.predict(*chat_args("still alive?", max_new_tokens=2), api_name="/chat")
    assert text_of(history[-1]) == "alpha says: w1"


def test_overlong_input_gets_a_visible_message(scripted, client):
    _, engine, _ = scripted
    before = len(engine.requests)
    history, box, readout = client.predict(*chat_args("x" * 20_001), api_name="/chat")
    assert history == [] and box == "x" * 20_001  # nothing sent; the text stays in the box
    assert "20,001 characters" in readout and "at most 20,000" in readout
    long_history = [{"role": r, "content": [{"type": "text", "text": "hi"}]} for r in ("user", "assistant") * 5]
    history, _, readout = client.predict(*chat_args("one more", long_history), api_name="/chat")
    assert "at most 9" in readout and len(history) == 10
    _, _, readout = client.predict(*chat_args("hi", model="nope"), api_name="/chat")
    assert "not served here" in readout and "alpha, beta, gamma" in readout
    assert len(engine.requests) == before


def test_the_ui_never_runs_more_generations_than_its_limit(scripted):
    url, engine, _ = scripted
    engine.peak = 0
    with gradio_client(url) as c1, gradio_client(url) as c2, gradio_client(url) as c3:
        jobs = [c.submit(*chat_args(f"user {i}", max_new_tokens=30), api_name="/chat")
                for i, c in enumerate((c1, c2, c3))]
        results = [finish(j, timeout=60)[-1] for j in jobs]
    assert all(text_of(h[-1]).startswith("alpha says: w1") for h, _, _ in results)
    assert engine.peak == 1  # the in-process limit: one generating event at a time, the rest queue


def test_likes_and_dislikes_are_stored(scripted):
    """The like event carries Gradio event data, which gradio_client can't send; the handler's
    storage is tested here and the click itself in the browser test."""
    from chatbuild import arena

    _, _, db = scripted
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    arena.add_feedback(db, session="s1", model="alpha", messages=messages, index=1, liked=True)
    arena.add_feedback(db, session="s1", model="alpha", messages=messages, index=1, liked=False)
    stored = arena.feedback(db)[-2:]
    assert [f["liked"] for f in stored] == [True, False]
    assert stored[0]["messages"] == messages and stored[0]["model"] == "alpha" and stored[0]["index"] == 1


def test_concurrent_feedback_writes_do_not_collide(scripted):
    from chatbuild import arena

    _, _, db = scripted
    before = len(arena.feedback(db))
    msgs = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]
    threads = [threading.Thread(target=arena.add_feedback, args=(db, f"s{i}", "beta", msgs, 1, i % 2 == 0))
               for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(arena.feedback(db)) == before + 8


def test_the_ui_and_the_api_share_one_queue(tmp_path):
    """One generation slot and no waiting room: whoever holds it, UI or API, the other is told 'busy'."""
    import httpx

    engine = ScriptedEngine(delay=0.01)
    # long replies (20 s each), stopped as soon as the point is made: timing can't make this pass
    request = {"model": "alpha", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2000}
    app = ui_app(engine, tmp_path / "chatbuild.sqlite", max_running=1, queue_size=0)
    with serving(app) as url, gradio_client(url) as client:
        job = client.submit(*chat_args("a long one", max_new_tokens=2000), api_name="/chat")
        while len(job.outputs()) < 3:
            time.sleep(0.01)
        answer = httpx.post(url + "v1/chat/completions", json=request, timeout=30)
        assert answer.status_code == 429 and answer.json()["error"]["code"] == "queue_full"
        client.predict(api_name="/stop")
        finish(job)
        wait_for_free_slot(app)

        with httpx.stream("POST", url + "v1/chat/completions", json={**request, "stream": True}, timeout=30) as r:
            assert r.status_code == 200
            lines = r.iter_lines()  # kept: a dropped iterator closes the stream, which cancels the reply
            next(lines)  # the API's reply is under way
            history, box, readout = client.predict(*chat_args("me too"), api_name="/chat")
            assert "busy" in readout and history == [] and box == "me too"
        wait_for_free_slot(app)  # leaving the stream cancelled the API's reply
        history, _, _ = client.predict(*chat_args("now?", max_new_tokens=2), api_name="/chat")
        assert text_of(history[-1]) == "alpha says: w1"


def wait_for_free_slot(app, timeout: float = 10) -> None:
    """A stopped generation frees its slot once the engine's thread has ended."""
    deadline = time.monotonic() + timeout
    while app.state.serve.admission.running:
        assert time.monotonic() < deadline, "the generation slot was not freed"
        time.sleep(0.01)


def test_a_ui_mounted_before_the_models_load_says_so_then_serves_them(tmp_path):
    from fastapi import FastAPI

    from serve.api import ServeState
    from serve.settings import Settings
    from serve.ui import mount_ui

    state = ServeState(Settings(db_path=str(tmp_path / "chatbuild.sqlite")))
    with serving(mount_ui(FastAPI(), state)) as url, gradio_client(url) as client:
        history, box, readout = client.predict(*chat_args("anyone?"), api_name="/chat")
        assert "still loading" in readout and history == [] and box == "anyone?"
        state.attach(ScriptedEngine())
        history, _, _ = client.predict(*chat_args("anyone?", max_new_tokens=2), api_name="/chat")
        assert text_of(history[-1]) == "alpha says: w1"
