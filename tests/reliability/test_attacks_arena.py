"""Attacks on the arena, the logins and the resumable checkpoints, performed for real (issue 17,
item 8 and the Low items):

- named-mode votes (the voter chose both models by name) stuffed into the leaderboard;
- a burst of votes from one login (or one session when there are no logins);
- 50 wrong passwords in a row on the UI login;
- /docs, /redoc and /openapi.json read without the API key;
- a checkpoint whose optimizer.pt is a malicious pickle, resumed.

The UI tests run over a ScriptedEngine (tests/test_ui_helpers.py): what they check is the web layer
(votes, rate limits, logins), for which the model's replies don't matter."""

import json
import os
import pickle
import subprocess
import sys
import time

import httpx
import pytest
from reliability_helpers import record
from test_ui_helpers import ScriptedEngine, gradio_client, serving, ui_app

from chatbuild import storage
from chatbuild.errors import UserError

pytestmark = pytest.mark.reliability

KEY = "sk-arena-attacks-5be1"
USERS = [("alice", "pw-alice-7f3"), ("bob", "pw-bob-21a")]


def named_turn(client, text: str = "Which is better?") -> str:
    """One turn of a named-mode battle, alpha (left) against beta (right); returns the status line."""
    return client.predict(text, "Named models", "alpha", "beta", 0.7, 1.0, 3, api_name="/arena_send")[2]


def anonymous_battle(client) -> str:
    """One anonymous battle, voted "A is better"; returns the vote's status line."""
    client.predict(api_name="/arena_new_round")
    client.predict("Which is better?", "Anonymous battle", "alpha", "beta", 0.7, 1.0, 3, api_name="/arena_send")
    return client.predict(api_name="/vote_a")[2]


def table_of(output) -> dict[str, list]:
    """The leaderboard Dataframe as gradio_client returns it: {model: row}."""
    rows = output["data"] if isinstance(output, dict) else output
    return {row[1]: row for row in rows}


# ── named-mode votes don't move the served leaderboard ─────────────────────────────────────────
def test_named_mode_votes_are_stored_flagged_and_left_out_of_the_leaderboard(tmp_path):
    db = tmp_path / "chatbuild.sqlite"
    judged = [{"question_id": q, "model_a": "alpha", "model_b": "gamma", "winner": "tie", "judge": "gpt-judge",
               "tstamp": 1.0 + q} for q in range(3)]
    with storage.transaction(db) as conn:  # judge verdicts carry no anony mark: they must keep counting
        storage.add_battles(conn, judged, source="judge")
    with serving(ui_app(ScriptedEngine(delay=0.001), db)) as url, gradio_client(url) as mallory:
        # The attack: pick beta by name and vote for it, turn after turn (issue 17: 6 votes, 1139.8).
        for turn in range(6):
            assert "Vote below" in named_turn(mallory, f"turn {turn}")
            assert "saved" in mallory.predict(api_name="/vote_b")[2]
        summary, table, *_ = mallory.predict(api_name="/leaderboard")  # the tab's defaults
        asked, named_table, *_ = mallory.predict(["human", "judge", "import"], False, api_name="/leaderboard")

    human = storage.list_battles(db, source="human")
    assert len(human) == 6 and all(b["anony"] is False for b in human), "named votes are stored, flagged anony=0"
    board = table_of(table)
    assert set(board) == {"alpha", "gamma"}, f"only the judge's battles count by default: {summary}"
    assert board["alpha"][4] == 3 and "**3** battles" in summary
    assert "named" in summary.lower(), "the tab says which battles it counts"
    # asked for explicitly, the named votes are still there to see
    with_named = table_of(named_table)
    assert with_named["beta"][4] == 6 and "**9** battles" in asked
    record("arena named-mode votes", named_votes=6, beta_rating_if_counted=with_named["beta"][2],
           counted_by_default=3)


def test_anonymous_votes_count_by_default(tmp_path):
    db = tmp_path / "chatbuild.sqlite"
    with serving(ui_app(ScriptedEngine(delay=0.001), db)) as url, gradio_client(url) as voter:
        assert "saved" in anonymous_battle(voter)
        summary, table, *_ = voter.predict(api_name="/leaderboard")
    battles = storage.list_battles(db)
    assert len(battles) == 1 and battles[0]["anony"] is True
    assert "**1** battles" in summary and sum(row[4] for row in table_of(table).values()) == 2


def test_list_battles_can_leave_named_votes_out(tmp_path):
    """`storage.list_battles(named=False)` is what the leaderboard uses: named arena votes out,
    anonymous ones, judge verdicts and unmarked imports in."""
    db = tmp_path / "chatbuild.sqlite"
    base = {"model_a": "alpha", "model_b": "beta", "winner": "model_a"}
    with storage.transaction(db) as conn:
        storage.add_battles(conn, [{**base, "question_id": 1, "judge": "human", "anony": False, "source": "human"},
                                   {**base, "question_id": 2, "judge": "human", "anony": True, "source": "human"},
                                   {**base, "question_id": 3, "judge": "gpt-judge", "source": "judge"},
                                   {**base, "question_id": 4, "source": "import"}])
    assert [b["question_id"] for b in storage.list_battles(db, named=False)] == [2, 3, 4]
    assert [b["question_id"] for b in storage.list_battles(db)] == [1, 2, 3, 4]


# ── votes per minute per login (per session without logins) ────────────────────────────────────
def test_a_vote_burst_from_one_session_is_refused_beyond_the_limit(tmp_path):
    db = tmp_path / "chatbuild.sqlite"
    with serving(ui_app(ScriptedEngine(delay=0.001), db, max_votes_per_minute=3)) as url:
        with gradio_client(url) as mallory, gradio_client(url) as other:
            statuses = []
            for turn in range(6):
                named_turn(mallory, f"turn {turn}")
                statuses.append(mallory.predict(api_name="/vote_a")[2])
            # another session is not affected by Mallory's burst
            assert "saved" in anonymous_battle(other)
    saved = [s for s in statuses if "saved" in s]
    refused = [s for s in statuses if "saved" not in s]
    assert len(saved) == 3, statuses
    assert len(refused) == 3 and all("3 votes a minute" in s and "\n" not in s for s in refused), refused
    human = storage.list_battles(db, source="human")
    assert len(human) == 4, "Mallory's 3 votes and the other session's 1: the refused ones stored nothing"
    record("arena vote burst", limit_per_minute=3, attempted=6, stored=3, other_session_vote_stored=True)


def test_the_vote_limit_follows_the_login_across_sessions(tmp_path):
    db = tmp_path / "chatbuild.sqlite"
    with serving(ui_app(ScriptedEngine(delay=0.001), db, ui_auth=USERS, max_votes_per_minute=2)) as url:
        with gradio_client(url, auth=USERS[0]) as first, gradio_client(url, auth=USERS[0]) as second, \
                gradio_client(url, auth=USERS[1]) as bob:
            assert "saved" in anonymous_battle(first)
            assert "saved" in anonymous_battle(second)
            # a third session of the same login: over the limit, refused in one line
            third = anonymous_battle(first)
            assert "2 votes a minute" in third and "saved" not in third
            assert "saved" in anonymous_battle(bob)
    assert len(storage.list_battles(db)) == 3


def test_a_database_from_before_the_limit_gets_its_voter_column(tmp_path):
    """A database whose arena_votes table has no voter column (made before the limit existed) is
    upgraded on first use; its old votes count against no one."""
    import sqlite3

    from chatbuild import arena

    db = tmp_path / "old.sqlite"
    with sqlite3.connect(db) as conn:
        conn.execute("CREATE TABLE arena_votes (round TEXT NOT NULL, turn INTEGER NOT NULL, vote TEXT NOT NULL, "
                     "tstamp REAL NOT NULL, PRIMARY KEY (round, turn))")
        conn.execute("INSERT INTO arena_votes VALUES ('old', 1, 'a', ?)", (time.time(),))
    conv = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]
    for _ in range(2):
        rid = arena.open_round(db, session="s1", model_a="x", model_b="y", anonymous=True)
        arena.mark_answered(db, rid, 1)
        arena.record_vote(db, rid, session="s1", turn=1, vote="a", conversation_a=conv, conversation_b=conv,
                          generation=None, voter="login:alice", max_per_minute=2)
    rid = arena.open_round(db, session="s1", model_a="x", model_b="y", anonymous=True)
    arena.mark_answered(db, rid, 1)
    with pytest.raises(UserError, match="at most 2 votes a minute"):
        arena.record_vote(db, rid, session="s1", turn=1, vote="a", conversation_a=conv, conversation_b=conv,
                          generation=None, voter="login:alice", max_per_minute=2)
    with sqlite3.connect(db) as conn:
        assert conn.execute("SELECT voter FROM arena_votes ORDER BY tstamp").fetchall() == [
            (None,), ("login:alice",), ("login:alice",)]


# ── the UI login ───────────────────────────────────────────────────────────────────────────────
class Clock:
    """A clock the test moves forward, so that a 30 s lockout passes without waiting 30 s."""

    def __init__(self):
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def login_guard_of(app):
    """The `auth` callable Gradio calls on POST /login (the mounted Gradio app keeps it)."""
    from starlette.routing import Mount

    return next(route.app.auth for route in app.routes if isinstance(route, Mount) and hasattr(route.app, "auth"))


def test_fifty_wrong_passwords_lock_the_login_for_a_while(tmp_path):
    db = tmp_path / "chatbuild.sqlite"
    app = ui_app(ScriptedEngine(delay=0.001), db, ui_auth=USERS, login_max_failures=5, login_window_s=60,
                 login_lockout_s=30)
    clock = login_guard_of(app).clock = Clock()
    with serving(app) as url, httpx.Client(timeout=30) as http:
        codes = [http.post(f"{url}login", data={"username": "alice", "password": f"guess-{i}"}).status_code
                 for i in range(50)]
        assert codes[:5] == [400] * 5, codes
        assert codes[5:] == [429] * 45, codes
        clock.now += 29
        refused = http.post(f"{url}login", data={"username": "alice", "password": USERS[0][1]})
        assert refused.status_code == 429, "even the right password is refused while the login is locked"
        detail = refused.json()["detail"]
        assert "too many failed logins" in detail and "\n" not in detail
        assert refused.headers["retry-after"] == "1"
        assert http.get(f"{url}config").status_code == 401, "no session came from the refused login"
        with httpx.Client(timeout=30) as other:  # another user is not locked out
            assert other.post(f"{url}login", data={"username": "bob", "password": USERS[1][1]}).status_code == 200
            assert other.get(f"{url}config").status_code == 200
        # once the lockout has passed, the right password works again (and the 45 refused attempts
        # did not extend it)
        clock.now += 1
        assert http.post(f"{url}login", data={"username": "alice", "password": USERS[0][1]}).status_code == 200
        assert http.get(f"{url}config").status_code == 200
    record("ui login throttle", wrong_attempts=50, passwords_checked=codes.count(400),
           refused_429=codes.count(429), lockout_s=30, right_password_during_lockout=refused.status_code)


def test_unknown_usernames_cannot_lock_out_real_users(tmp_path):
    db = tmp_path / "chatbuild.sqlite"
    app = ui_app(ScriptedEngine(delay=0.001), db, ui_auth=USERS, login_max_failures=3, login_lockout_s=60)
    with serving(app) as url, httpx.Client(timeout=30) as http:
        codes = [http.post(f"{url}login", data={"username": f"user{i}", "password": "x"}).status_code
                 for i in range(20)]
        assert codes[:3] == [400] * 3 and set(codes[3:]) == {429}
        assert http.post(f"{url}login", data={"username": "alice", "password": USERS[0][1]}).status_code == 200


# ── the API docs ───────────────────────────────────────────────────────────────────────────────
DOCS = ("/docs", "/redoc", "/openapi.json")


def test_the_api_docs_need_the_key_when_one_is_set(tmp_path):
    wrong = [None, "Bearer", f"Bearer {KEY}x", f"Basic {KEY}"]
    with serving(ui_app(ScriptedEngine(delay=0.001), tmp_path / "db.sqlite", api_key=KEY)) as url, \
            httpx.Client(timeout=30) as http:
        for path in DOCS:
            for auth in wrong:
                r = http.get(url.rstrip("/") + path, headers={} if auth is None else {"Authorization": auth})
                assert r.status_code == 401, (path, auth, r.status_code, r.text[:200])
                assert r.json()["error"]["code"] == "invalid_api_key"
            r = http.get(url.rstrip("/") + path, headers={"Authorization": f"Bearer {KEY}"})
            assert r.status_code == 200, (path, r.text[:200])
        schema = http.get(f"{url}openapi.json", headers={"Authorization": f"Bearer {KEY}"}).json()
    assert {"/v1/models", "/v1/models/{model}", "/v1/chat/completions", "/healthz"} <= set(schema["paths"])
    body = schema["paths"]["/v1/chat/completions"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    assert "messages" in body["properties"]
    assert not set(DOCS) & set(schema["paths"]), "the docs routes are not part of the API they document"


def test_the_api_docs_are_open_without_a_key(tmp_path):
    with serving(ui_app(ScriptedEngine(delay=0.001), tmp_path / "db.sqlite")) as url, \
            httpx.Client(timeout=30) as http:
        for path in DOCS:
            assert http.get(url.rstrip("/") + path).status_code == 200, path
        assert "/v1/chat/completions" in http.get(f"{url}openapi.json").json()["paths"]


# ── resuming from a tampered checkpoint ────────────────────────────────────────────────────────
class Payload:
    """Unpickling this runs code: it writes `marker` (what a hostile optimizer.pt would do)."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return exec, (f"open({self.marker!r}, 'w').write('pwned')",)


def test_a_malicious_optimizer_file_is_refused_on_resume(tiny_base, tmp_path):
    import torch

    from tests.conftest import REPO, finetune_tiny

    run = finetune_tiny(tiny_base, tmp_path / "run", "train.steps=4", "train.save_every=2", "train.eval_every=0")
    marker = tmp_path / "pwned"
    ckpt = run / "checkpoints" / "step-4"
    state = torch.load(ckpt / "optimizer.pt", weights_only=True)
    state["param_groups"][0]["evil"] = Payload(str(marker))
    torch.save(state, ckpt / "optimizer.pt")  # a real torch file, with the payload inside
    resume = [sys.executable, "-m", "pipelines.finetune", "tiny-cpu", f"model.base={tiny_base}", f"output_dir={run}",
              "train.steps=6", "train.save_every=2", "train.eval_every=0", "--no-progress", "--resume"]
    got = subprocess.run(resume, cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)}, capture_output=True,
                         text=True, timeout=600)
    assert not marker.exists(), "the payload ran: optimizer.pt was unpickled"
    assert got.returncode == 2, got.stderr[-3000:]
    error = [line for line in got.stderr.splitlines() if line.startswith("chatbuild finetune: error:")]
    assert len(error) == 1 and "optimizer.pt: refused" in error[0] and "Traceback" not in got.stderr, \
        got.stderr[-3000:]

    # a plain pickle (not a torch zip file) is refused the same way
    with open(ckpt / "optimizer.pt", "wb") as f:
        pickle.dump(Payload(str(marker)), f)
    got = subprocess.run(resume, cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)}, capture_output=True,
                         text=True, timeout=600)
    assert not marker.exists() and got.returncode == 2 and "optimizer.pt" in got.stderr, got.stderr[-3000:]
    record("malicious optimizer.pt", refused=True, payload_ran=False, message=json.dumps(error[0])[:200])


@pytest.mark.parametrize("name", ["optimizer.pt", "scheduler.pt", "rng.pt"])
def test_every_checkpoint_state_file_is_loaded_without_running_code(tmp_path, name):
    """The loader resume uses for each of the three files (`chatbuild.runs.load_state`), on a
    payload in a real torch file and in a bare pickle."""
    import torch

    from chatbuild.runs import load_state

    marker = tmp_path / "pwned"
    torch.save({"state": {}, "param_groups": [Payload(str(marker))]}, tmp_path / name)
    with pytest.raises(UserError, match=f"{name}: refused: .* it asks for exec") as refused:
        load_state(tmp_path / name)
    assert "\n" not in str(refused.value)
    with open(tmp_path / name, "wb") as f:
        pickle.dump(Payload(str(marker)), f)
    with pytest.raises(UserError, match=f"{name}: refused"):
        load_state(tmp_path / name)
    (tmp_path / name).write_bytes(b"")
    with pytest.raises(UserError, match=f"{name}: cannot read this checkpoint file"):
        load_state(tmp_path / name)
    assert not marker.exists()
