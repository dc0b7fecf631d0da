"""The SQLite store: battles from votes and judges in one table, raw judge replies, export/import."""

import json
import sqlite3
import threading

import pytest

from chatbuild import storage
from chatbuild.battles import read_battles
from chatbuild.errors import UserError
from chatbuild.storage import Judgment

VOTE = {"question_id": None, "model_a": "tiny-a", "model_b": "tiny-b", "winner": "model_b", "judge": "arena-user",
        "anony": True, "tstamp": 1732000000, "conversation_a": [{"role": "user", "content": "hi"}],
        "conversation_b": [{"role": "user", "content": "hi"}], "params": {"temperature": 0.7}}
VERDICT = {"question_id": 7, "model_a": "tiny-a", "model_b": "base", "winner": "tie", "judge": "gpt-x",
           "tstamp": 1732000001.5, "order_verdicts": ["model_a", "model_b"]}


def add(path, records, source=None) -> int:
    with storage.transaction(path) as conn:
        return storage.add_battles(conn, records, source)


def test_database_is_wal_and_has_both_tables(tmp_path):
    path = tmp_path / "db" / "chatbuild.sqlite"
    storage.connect(path).close()
    db = sqlite3.connect(path)
    assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    tables = {r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    assert {"battles", "judgments"} <= tables
    storage.connect(path).close()  # opening again is fine


def test_votes_and_verdicts_share_the_battles_table(tmp_path):
    path = tmp_path / "s.sqlite"
    with storage.transaction(path) as conn:
        assert storage.add_battle(conn, VOTE, source="human")
        assert storage.add_battle(conn, VERDICT, source="judge")
    with storage.transaction(path) as conn:
        assert not storage.add_battle(conn, VOTE, source="human")  # the same battle twice is stored once
    everything = storage.list_battles(path)
    assert [b["source"] for b in everything] == ["human", "judge"]
    vote = storage.list_battles(path, source="human")[0]
    assert vote["anony"] is True and vote["conversation_a"] == VOTE["conversation_a"]
    assert vote["params"] == {"temperature": 0.7} and "question_id" not in vote  # None fields are dropped
    verdict = storage.list_battles(path, source="judge")[0]
    assert verdict["question_id"] == 7 and isinstance(verdict["question_id"], int)
    assert verdict["order_verdicts"] == ["model_a", "model_b"]
    assert storage.list_battles(path, anony=True) == [vote]
    assert len(storage.list_battles(path, source=["human", "judge"])) == 2


def test_a_failed_transaction_stores_nothing(tmp_path):
    path = tmp_path / "s.sqlite"
    with pytest.raises(RuntimeError), storage.transaction(path) as conn:
        storage.add_battle(conn, VOTE, source="human")
        raise RuntimeError("the caller's own check failed")
    assert storage.list_battles(path) == []


def test_invalid_battles_are_refused(tmp_path):
    path = tmp_path / "s.sqlite"
    with pytest.raises(ValueError, match="cannot battle itself"):
        add(path, [{**VERDICT, "model_b": "tiny-a"}])
    with pytest.raises(ValueError, match="winner"):
        add(path, [VOTE, {**VERDICT, "winner": "model_c"}])
    assert storage.list_battles(path) == []


def test_export_import_round_trip_is_idempotent(tmp_path):
    a, b = tmp_path / "a.sqlite", tmp_path / "b.sqlite"
    add(a, [VOTE], source="human")
    add(a, [VERDICT, {**VERDICT, "question_id": "q8", "winner": "model_a"}], source="judge")
    out = tmp_path / "battles.jsonl"
    assert storage.export_battles(a, out) == 3
    records, skipped = read_battles(out)
    assert len(records) == 3 and not skipped
    assert storage.import_battles(a, out)[:2] == (0, 3)  # exporting and importing back adds nothing

    assert storage.import_battles(b, out)[:2] == (3, 0)
    assert storage.list_battles(b) == storage.list_battles(a)
    storage.export_battles(b, tmp_path / "again.jsonl")
    assert (tmp_path / "again.jsonl").read_text() == out.read_text()


def test_import_without_source_field_gets_the_given_source(tmp_path):
    path = tmp_path / "fastchat.jsonl"
    path.write_text(json.dumps({"model_a": "x", "model_b": "y", "winner": "tie (bothbad)", "tstamp": 1.0}) + "\n"
                    + json.dumps({"model_a": "x", "model_b": "x", "winner": "tie"}) + "\n")
    db = tmp_path / "s.sqlite"
    with pytest.raises(UserError, match=r"fastchat.jsonl:2"):
        storage.import_battles(db, path, source="human")
    added, dup, skipped = storage.import_battles(db, path, source="human", skip_invalid=True)
    assert (added, dup, dict(skipped)) == (1, 0, {"self-battle": 1})
    assert storage.list_battles(db)[0]["source"] == "human"


def test_judgments_store_raw_text_and_replace(tmp_path):
    db = tmp_path / "s.sqlite"
    j = Judgment("k1", "gpt-x", 3, "a", "b", "invalid", "I cannot decide.", 1.0, {"prompt": "v1"})
    with storage.transaction(db) as conn:
        storage.add_judgment(conn, j)
    assert storage.get_judgments(db, ["k1", "nope"]) == {"k1": j}
    with storage.transaction(db) as conn:
        storage.add_judgment(conn, Judgment("k1", "gpt-x", 3, "a", "b", "A", "A is better. [[A]]", 2.0))
    assert storage.get_judgments(db)["k1"].verdict == "A"
    assert storage.get_judgments(db, (f"k{i}" for i in range(2000))).keys() == {"k1"}  # > SQLite's bind limit


def test_concurrent_writers(tmp_path):
    db = tmp_path / "s.sqlite"
    storage.connect(db).close()

    def write(t):
        for i in range(20):
            with storage.transaction(db) as conn:
                storage.add_judgment(conn, Judgment(f"{t}-{i}", "j", i, "a", "b", "tie", "[[TIE]]", float(i)))
                storage.add_battle(conn, {"model_a": "a", "model_b": "b", "winner": "tie", "question_id": f"{t}-{i}"})

    threads = [threading.Thread(target=write, args=(t,)) for t in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(storage.get_judgments(db)) == 80 and len(storage.list_battles(db)) == 80


def test_a_file_that_is_not_a_database_is_a_user_error(tmp_path):
    bad = tmp_path / "bad.sqlite"
    bad.write_text("this is not sqlite" * 100)
    with pytest.raises(UserError, match="bad.sqlite"):
        storage.connect(bad)


def test_replace_battles_supersedes_the_same_judge_question_and_pair_only(tmp_path):
    db = tmp_path / "db.sqlite"
    old = {"question_id": 1, "model_a": "x", "model_b": "y", "winner": "tie", "judge": "j"}  # no turns: older format
    other_set = {**old, "winner": "model_a", "question": ["Another set's question 1"]}
    other_judge = {**old, "judge": "k"}
    other_pair = {**old, "model_b": "z"}
    with storage.transaction(db) as conn:
        storage.add_battles(conn, [old, other_set, other_judge, other_pair], source="judge")
    new = {**old, "winner": "model_b", "question": ["Question 1"], "style_a": {"chars": 3}}
    with storage.transaction(db) as conn:
        assert storage.replace_battles(conn, [new], source="judge") == 1
    stored = storage.list_battles(db, source="judge")
    assert len(stored) == 4
    assert {(b["judge"], b["model_b"], b["winner"]) for b in stored} == {
        ("j", "y", "model_a"), ("k", "y", "tie"), ("j", "z", "tie"), ("j", "y", "model_b")}
    with storage.transaction(db) as conn:  # the same battle again: nothing new, nothing lost
        assert storage.replace_battles(conn, [new], source="judge") == 1
    assert len(storage.list_battles(db, source="judge")) == 4
