"""Acceptance of the UI on the tiny model: gradio_client drives the chat and arena endpoints of the real
serving app (`serve.app.create_app`) over the in-process HF engine, 4-bit tiny base + two fine-tuned
adapters + the bare base. Streaming works and matches the engine's own reply, Stop cancels the
engine, votes land in SQLite exactly once with the right winner when positions were shuffled, the
leaderboard reflects them, and limits give messages, not crashes.

Generation is slow here (a few tokens/s on a busy 2-core CPU), so replies are kept short."""

import time

import pytest

from chatbuild import storage
from chatbuild.engines import GenerationParams

pytest.importorskip("gradio")
pytest.importorskip("gradio_client")

from test_ui_helpers import gradio_client, messages_of, serving, text_of, ui_app  # noqa: E402

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def tiny(tiny_run, tiny_run_b, tmp_path_factory):
    """(url, engine, db_path): the app over tiny-a, tiny-b and the tiny base."""
    from chatbuild.engines.hf import HFEngine

    engine = HFEngine.from_runs([tiny_run, tiny_run_b])
    db = tmp_path_factory.mktemp("ui-tiny") / "chatbuild.sqlite"
    with serving(ui_app(engine, db, max_running=2, max_prompt_tokens=64, max_new_tokens=900)) as url:
        yield url, engine, db
    engine.close()


def chat_args(text, model, max_new_tokens, temperature=1.0, seed=None, history=()):
    return (text, list(history), model, "", temperature, 1.0, max_new_tokens, 0, 1.0, seed)


def engine_reply(engine, model, text, params) -> str:
    return "".join(c.text for c in engine.stream([{"role": "user", "content": text}], params, model))


def wait(job, timeout=180):
    deadline = time.monotonic() + timeout
    while not job.done():
        assert time.monotonic() < deadline, "the job did not finish"
        time.sleep(0.05)
    return job.outputs()


def test_chat_streams_the_engines_reply(tiny):
    url, engine, _ = tiny
    model = engine.models()[0]
    with gradio_client(url) as client:
        outputs = wait(client.submit(*chat_args("Hello! How are you?", model, 10, seed=7), api_name="/chat"))
    texts = [text_of(h[-1]) for h, _, _ in outputs if h and h[-1]["role"] == "assistant"]
    assert len(set(texts)) >= 3, f"expected the reply in several pieces, got {texts}"
    assert all(b.startswith(a) for a, b in zip(texts, texts[1:]))
    history, _, readout = outputs[-1]
    record = engine.recent[-1]
    assert record.model == model and record.finish_reason in ("length", "stop")
    assert f"**{record.completion_tokens}** tokens" in readout and f"prompt {record.prompt_tokens} tokens" in readout
    # the UI shows exactly what the engine says for the same request (seeded sampling)
    assert text_of(history[-1]) == engine_reply(engine, model, "Hello! How are you?",
                                                GenerationParams(temperature=1.0, max_new_tokens=10, seed=7))


def test_stop_cancels_the_engine_mid_reply(tiny):
    url, engine, _ = tiny
    model = engine.models()[1]
    # A seed whose reply runs at least 300 tokens without ending by itself: the engine decodes ahead
    # of its reader, so a reply that may end early could be complete before Stop reaches it.
    prompt = [{"role": "user", "content": "Tell me a long story."}]
    seed = next(s for s in range(50) if engine_reply(engine, model, prompt[0]["content"],
                                                     GenerationParams(temperature=1.0, max_new_tokens=300, seed=s))
                and engine.recent[-1].finish_reason == "length")
    with gradio_client(url) as client:
        job = client.submit(*chat_args("Tell me a long story.", model, 900, seed=seed), api_name="/chat")
        while not any(h and text_of(h[-1]) for h, _, _ in job.outputs() if h[-1]["role"] == "assistant"):
            assert not job.done(), "the reply ended before it could be stopped"
            time.sleep(0.05)
        client.predict(api_name="/stop")
        stopped = time.monotonic()
        history, _, readout = wait(job, timeout=30)[-1]
    assert time.monotonic() - stopped < 15
    record = engine.recent[-1]
    assert record.finish_reason == "cancelled" and record.completion_tokens < 900
    assert "stopped" in readout and text_of(history[-1])


def test_overlong_prompt_is_a_message(tiny):
    url, engine, _ = tiny
    with gradio_client(url) as client:
        history, box, readout = client.predict(*chat_args("word " * 200, engine.models()[0], 4), api_name="/chat")
        assert history == [] and box == ("word " * 200).strip()
        assert "at most 64 prompt tokens" in readout
        history, _, _ = client.predict(*chat_args("Hi", engine.models()[0], 2), api_name="/chat")
        assert len(history) == 2  # the server is fine


def test_anonymous_battle_stores_the_vote_for_the_model_shown(tiny):
    """Greedy replies identify the models: each model's reply alone is computed first, then the
    arena's two replies tell which model sat where, independently of what the UI reveals."""
    url, engine, db = tiny
    prompt, greedy = "What is a llama?", GenerationParams(temperature=0.0, max_new_tokens=6)
    alone = {m: engine_reply(engine, m, prompt, greedy) for m in engine.models()}
    assert len(set(alone.values())) == 3, f"the models' greedy replies should differ: {alone}"
    who = {text: model for model, text in alone.items()}
    before = len(storage.list_battles(db))
    with gradio_client(url) as client:
        chat_a, chat_b, status, _ = client.predict(prompt, "Anonymous battle", None, None, 0.0, 1.0, 6,
                                                   api_name="/arena_send")
        left, right = who[text_of(messages_of(chat_a)[-1])], who[text_of(messages_of(chat_b)[-1])]
        assert left != right and left not in status and right not in status
        revealed = client.predict(api_name="/vote_a")[2]
        assert f"Model A was **{left}**, model B was **{right}**" in revealed
        assert "over" in client.predict(api_name="/vote_b")[2]  # once only

        battles = storage.list_battles(db)[before:]
        assert [(b["model_a"], b["model_b"], b["winner"], b["anony"]) for b in battles] == [
            (left, right, "model_a", True)]
        assert battles[0]["conversation_a"][-1]["content"] == alone[left]
        assert battles[0]["conversation_b"][-1]["content"] == alone[right]
        assert battles[0]["generation"]["temperature"] == 0.0

        summary, table, *_ = client.predict(["human"], True, api_name="/leaderboard")
        rows = {row[1]: row for row in table["data"]}
        assert {left, right} <= set(rows) and rows[left][2] > rows[right][2]  # the winner rates higher
        n = len(storage.list_battles(db, source="human", anony=True))
        assert f"**{n}** battles (sources: human; anonymous only)" in summary
