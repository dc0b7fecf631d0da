"""The Arena tab and the leaderboard through gradio_client on a real server, the vote bookkeeping of
`chatbuild.arena`, and `chatbuild arena export/import`.

The scripted engine's replies start with the model's name ("beta says: ..."), so a test can see
which model sat in which position while the UI still hides the names, and check that a vote for a
position is stored as a win for the model that was really there."""

import json
import threading
import time

import pytest

from chatbuild import arena, storage
from chatbuild.errors import UserError

pytest.importorskip("gradio")
pytest.importorskip("gradio_client")

from test_ui_helpers import ScriptedEngine, gradio_client, messages_of, serving, text_of, ui_app  # noqa: E402

ANONYMOUS, NAMED = "Anonymous battle", "Named models"


@pytest.fixture(scope="module")
def scripted(tmp_path_factory):
    """(url, engine, db_path) of the app over a ScriptedEngine serving alpha, beta and gamma."""
    engine = ScriptedEngine(delay=0.005)
    db = tmp_path_factory.mktemp("arena") / "chatbuild.sqlite"
    # No vote rate limit here: these tests cast many votes from one session on purpose (the limit has
    # its own tests in tests/reliability/test_attacks_arena.py).
    with serving(ui_app(engine, db, max_running=4, max_votes_per_minute=0)) as url:
        yield url, engine, db


# gradio_client returns the value outputs of an arena event: (chat A, chat B, status, input box);
# the server-side state and the buttons' interactivity are not part of the API.
def send(client, text, mode=ANONYMOUS, a="alpha", b="beta", max_new_tokens=4):
    """One arena turn; returns (chat A, chat B, status) after both answers."""
    chat_a, chat_b, status, _ = client.predict(text, mode, a, b, 0.7, 1.0, max_new_tokens, api_name="/arena_send")
    return messages_of(chat_a), messages_of(chat_b), status


def vote(client, which) -> str:
    """Cast a vote ("a", "b", "tie", "bothbad"); returns the status line."""
    return client.predict(api_name=f"/vote_{which}")[2]


def speaker(chat) -> str:
    """Which model wrote the last reply of a scripted conversation."""
    return text_of(chat[-1]).split(" says:")[0]


def test_anonymous_battle_vote_is_stored_once_with_the_shown_positions(scripted):
    url, _, db = scripted
    before = len(storage.list_battles(db))
    with gradio_client(url) as client:
        chat_a, chat_b, status = send(client, "Which is better?")
        left, right = speaker(chat_a), speaker(chat_b)
        assert left != right and {left, right} <= {"alpha", "beta", "gamma"}
        assert left not in status and right not in status, "names stay hidden until the vote"
        status = vote(client, "b")
        assert f"Model A was **{left}**, model B was **{right}**" in status
        second = vote(client, "a")  # one vote per battle
        assert "over" in second
        tie = vote(client, "tie")
        assert "over" in tie
    battles = storage.list_battles(db)[before:]
    assert len(battles) == 1
    b = battles[0]
    assert (b["model_a"], b["model_b"], b["winner"]) == (left, right, "model_b")
    assert b["source"] == "human" and b["judge"] == "human" and b["anony"] is True and b["turn"] == 1
    assert b["conversation_a"][-1]["content"].startswith(f"{left} says:")
    assert b["conversation_b"][-1]["content"].startswith(f"{right} says:")
    assert b["generation"]["max_new_tokens"] == 4 and b["tstamp"] > 0


def test_positions_are_shuffled_and_every_vote_maps_to_the_right_model(scripted):
    url, _, db = scripted
    before = len(storage.list_battles(db))
    seen, expected = set(), []
    with gradio_client(url) as client:
        for i in range(12):
            client.predict(api_name="/arena_new_round")
            chat_a, chat_b, _ = send(client, f"round {i}", max_new_tokens=2)
            left, right = speaker(chat_a), speaker(chat_b)
            seen.add((left, right))
            choice = ("a", "b", "tie", "bothbad")[i % 4]
            vote(client, choice)
            winner = {"a": "model_a", "b": "model_b", "tie": "tie", "bothbad": "tie (bothbad)"}[choice]
            expected.append((left, right, winner))
    stored = [(b["model_a"], b["model_b"], b["winner"]) for b in storage.list_battles(db)[before:]]
    assert stored == expected
    # Random pairs in random positions: some model sat on both sides (by chance alone this fails
    # with probability ~6·3^-12 ≈ 1e-5), and all three models took part.
    left_side, right_side = {a for a, _ in seen}, {b for _, b in seen}
    assert left_side & right_side, f"no model was shown on both sides in 12 rounds: {seen}"
    assert left_side | right_side == {"alpha", "beta", "gamma"}


def test_no_vote_before_both_answers_are_complete(scripted):
    url, _, db = scripted
    before = len(storage.list_battles(db))
    with gradio_client(url) as client:
        job = client.submit("long answers please", ANONYMOUS, "alpha", "beta", 0.7, 1.0, 150, api_name="/arena_send")
        while len(job.outputs()) < 3:
            time.sleep(0.01)
        early = vote(client, "a")
        assert "Wait until both answers are complete" in early
        while not job.done():
            time.sleep(0.02)
        assert len(storage.list_battles(db)) == before
        assert "revealed" not in early
        status = vote(client, "a")
        assert "Model A was" in status
    assert len(storage.list_battles(db)) == before + 1


def test_stopped_answers_cannot_be_voted_on_until_regenerated(scripted):
    url, engine, db = scripted
    before, cancelled = len(storage.list_battles(db)), engine.cancelled
    with gradio_client(url) as client:
        job = client.submit("stop me", ANONYMOUS, "alpha", "beta", 0.7, 1.0, 500, api_name="/arena_send")
        while len(job.outputs()) < 4:
            time.sleep(0.01)
        client.predict(api_name="/arena_stop")
        while not job.done():
            time.sleep(0.02)
        assert engine.cancelled == cancelled + 2  # both streams stopped
        assert "Stopped" in job.outputs()[-1][2]
        assert "Wait until both answers" in vote(client, "a")
        chat_a, chat_b, status, _ = client.predict(0.7, 1.0, 3, api_name="/arena_regenerate")
        chat_a = messages_of(chat_a)
        assert "Vote below" in status
        assert text_of(chat_a[-1]).endswith("w1 w2") and len(chat_a) == 2  # the same turn, answered anew
        assert "Model A was" in vote(client, "tie")
    assert len(storage.list_battles(db)) == before + 1


def test_named_mode_votes_once_per_turn(scripted):
    url, _, db = scripted
    before = len(storage.list_battles(db))
    with gradio_client(url) as client:
        chat_a, chat_b, _ = send(client, "turn one", mode=NAMED, a="gamma", b="alpha")
        assert (speaker(chat_a), speaker(chat_b)) == ("gamma", "alpha")
        assert "Model A was **gamma**" in vote(client, "a")
        assert "already voted" in vote(client, "b")
        chat_a, chat_b, _ = send(client, "turn two", mode=NAMED, a="gamma", b="alpha")
        assert [m["role"] for m in chat_a] == ["user", "assistant"] * 2
        vote(client, "bothbad")
    battles = storage.list_battles(db)[before:]
    assert [(b["model_a"], b["model_b"], b["winner"], b["turn"], b["anony"]) for b in battles] == [
        ("gamma", "alpha", "model_a", 1, False), ("gamma", "alpha", "tie (bothbad)", 2, False)]
    assert len(battles[1]["conversation_a"]) == 4


def test_named_mode_needs_two_different_models(scripted):
    url, _, db = scripted
    with gradio_client(url) as client:
        chat_a, chat_b, status = send(client, "hi", mode=NAMED, a="beta", b="beta")
    assert chat_a == [] and "two different models" in status


def test_leaderboard_reflects_the_votes(scripted):
    url, _, db = scripted
    with gradio_client(url) as client:
        client.predict(api_name="/arena_new_round")
        send(client, "one more", max_new_tokens=2)
        vote(client, "a")
        summary, table, intervals, heat_map, *_ = client.predict(["human"], False, api_name="/leaderboard")
        battles = storage.list_battles(db, source="human")
        assert f"**{len(battles)}** battles (sources: human)" in summary
        rows = {row[1]: row for row in table["data"]}
        assert set(rows) == {"alpha", "beta", "gamma"}
        for model, row in rows.items():
            assert row[4] == sum(model in (b["model_a"], b["model_b"]) for b in battles)
            assert " – " in row[3]  # a 95% interval
        assert intervals is not None and heat_map is not None  # the two pictures
        assert "Too few battles to trust yet for" in summary  # a handful of votes: flagged
        assert all(m in summary.split("Too few battles")[1] for m in rows)

        anonymous, table, *_ = client.predict(["human"], True, api_name="/leaderboard")
        assert f"**{sum(b['anony'] for b in battles)}** battles (sources: human; anonymous only)" in anonymous
        nothing, table, *_ = client.predict(["judge"], False, api_name="/leaderboard")
        assert "No battles stored yet (sources: judge)" in nothing and not table["data"]

        # judge verdicts land in the same table and show with the judge filter
        with storage.transaction(db) as conn:
            storage.add_battle(conn, {"model_a": "alpha", "model_b": "judge-only", "winner": "model_a",
                                      "judge": "gpt-x"}, source="judge")
        judged, table, *_ = client.predict(["judge"], False, api_name="/leaderboard")
        assert "**1** battles (sources: judge)" in judged and {r[1] for r in table["data"]} == {"alpha", "judge-only"}


# ── the bookkeeping itself ─────────────────────────────────────────────────────────────────────
CONV = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]


def test_votes_are_bound_to_the_session_and_turn(tmp_path):
    db = tmp_path / "chatbuild.sqlite"
    rid = arena.open_round(db, session="s1", model_a="x", model_b="y", anonymous=True)
    cast = dict(turn=1, vote="a", conversation_a=CONV, conversation_b=CONV, generation=None)
    with pytest.raises(UserError, match="not for a battle shown in this session"):
        arena.record_vote(db, "no-such-round", session="s1", **cast)
    with pytest.raises(UserError, match="not for a battle shown in this session"):
        arena.record_vote(db, rid, session="s2", **cast)
    with pytest.raises(UserError, match="both answers are complete"):
        arena.record_vote(db, rid, session="s1", **cast)
    arena.mark_answered(db, rid, 1)
    with pytest.raises(UserError, match="unknown vote"):
        arena.record_vote(db, rid, session="s1", **{**cast, "vote": "c"})
    battle = arena.record_vote(db, rid, session="s1", **cast)
    assert (battle["model_a"], battle["winner"]) == ("x", "model_a")
    with pytest.raises(UserError, match="over"):
        arena.record_vote(db, rid, session="s1", **cast)
    assert len(storage.list_battles(db)) == 1


def test_concurrent_votes_on_one_turn_store_exactly_one_battle(tmp_path):
    db = tmp_path / "chatbuild.sqlite"
    rid = arena.open_round(db, session="s", model_a="x", model_b="y", anonymous=False)
    arena.mark_answered(db, rid, 1)
    outcomes = []

    def cast(choice):
        try:
            arena.record_vote(db, rid, session="s", turn=1, vote=choice, conversation_a=CONV, conversation_b=CONV,
                              generation={"temperature": 0.7})
            outcomes.append("stored")
        except UserError as e:
            outcomes.append(str(e))

    threads = [threading.Thread(target=cast, args=(c,)) for c in ("a", "b", "tie", "bothbad") * 3]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert outcomes.count("stored") == 1 and len(outcomes) == 12
    assert len(storage.list_battles(db)) == 1


def test_closed_rounds_take_no_votes(tmp_path):
    db = tmp_path / "chatbuild.sqlite"
    rid = arena.open_round(db, session="s", model_a="x", model_b="y", anonymous=False)
    arena.mark_answered(db, rid, 1)
    arena.close_round(db, rid)
    with pytest.raises(UserError, match="over"):
        arena.record_vote(db, rid, session="s", turn=1, vote="a", conversation_a=CONV, conversation_b=CONV,
                          generation=None)


def test_cli_exports_and_imports_battles(tmp_path, capsys):
    from chatbuild.cli import main

    db, other = tmp_path / "a.sqlite", tmp_path / "b.sqlite"
    rid = arena.open_round(db, session="s", model_a="x", model_b="y", anonymous=True)
    arena.mark_answered(db, rid, 1)
    arena.record_vote(db, rid, session="s", turn=1, vote="b", conversation_a=CONV, conversation_b=CONV,
                      generation={"temperature": 0.7})
    with storage.transaction(db) as conn:
        storage.add_battle(conn, {"model_a": "x", "model_b": "z", "winner": "tie", "judge": "gpt-x"}, source="judge")
    out = tmp_path / "battles.jsonl"
    assert main(["arena", "export", "--db", str(db), "--out", str(out)]) == 0
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert [(b["model_a"], b["model_b"], b["winner"], b["source"]) for b in lines] == [
        ("x", "y", "model_b", "human"), ("x", "z", "tie", "judge")]
    assert lines[0]["conversation_b"] == CONV and lines[0]["anony"] is True
    assert main(["arena", "import", str(out), "--db", str(other)]) == 0
    assert main(["arena", "import", str(out), "--db", str(other)]) == 0  # twice: nothing new
    assert "imported 0 new battles" in capsys.readouterr().out
    assert storage.list_battles(other) == storage.list_battles(db)
    human = tmp_path / "human.jsonl"
    assert main(["arena", "export", "--db", str(db), "--out", str(human), "--source", "human",
                 "--anonymous-only"]) == 0
    assert len(human.read_text().splitlines()) == 1
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"model_a": "x", "model_b": "x", "winner": "tie"}\n')
    assert main(["arena", "import", str(bad), "--db", str(other)]) == 2  # a self-battle: a clear error
    assert "cannot battle itself" in capsys.readouterr().err


def test_the_leaderboard_flags_models_with_too_few_battles_only():
    from serve.ui_leaderboard import FEW_BATTLES, render

    many = [{"model_a": "x", "model_b": "y", "winner": w, "source": "human"}
            for w in ["model_a", "model_b", "tie"] * FEW_BATTLES]
    summary, *_ = render(many, ["human"], False)
    assert "Too few battles" not in summary
    few = many + [{"model_a": "x", "model_b": "z", "winner": "model_a", "source": "human"}]
    summary, *_ = render(few, ["human"], False)
    assert "Too few battles to trust yet for z (under" in summary
