"""The judge pipeline end to end over real HTTP, against a scripted OpenAI-compatible judge.

The scripted judge reads the prompt (which question, which model's answer is shown as A and as B;
answers start with "[model]") and replies per question: honestly (the stronger model wins, with
decoy markers earlier in the text), with position bias (always A), without a marker, with a tie,
after injected 5xx failures, or after a delay past the client's timeout."""

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import pytest
from test_eval_server import Reply, ScriptedServer

from chatbuild import storage
from chatbuild.battles import read_battles
from chatbuild.cli import main
from eval.judge import combine, parse_verdict

REPO = Path(__file__).resolve().parent.parent
MODELS = {"alpha": 3, "beta": 2, "gamma": 1}  # strength: the honest judge prefers the larger
LENGTH = {"alpha": 120, "beta": 60, "gamma": 20}  # answer padding: stronger answers are longer here


def write_inputs(tmp: Path, n_questions: int = 6, embed_question: bool = False) -> tuple[Path, list[Path]]:
    qfile = tmp / "questions.jsonl"
    qfile.write_text("".join(json.dumps({"question_id": i, "category": "test", "text": f"Question {i}: why?"}) + "\n"
                             for i in range(1, n_questions + 1)))
    files = []
    for model in MODELS:
        f = tmp / "answers" / f"{model}.jsonl"
        f.parent.mkdir(exist_ok=True)
        recs = [{"question_id": i, "model": model, "answer": f"[{model}] answer {i} " + "x" * LENGTH[model],
                 "generation": {"temperature": 0.7, "top_p": 0.9}} for i in range(1, n_questions + 1)]
        if embed_question:
            for r in recs:
                r["question"] = [f"Question {r['question_id']}: why?"]
        f.write_text("".join(json.dumps(r) + "\n" for r in recs))
        files.append(f)
    return qfile, files


def shown(body) -> tuple[int, str, str]:
    """(question id, model shown as A, model shown as B) from a judge request."""
    user = body["messages"][-1]["content"]
    qid = int(re.search(r"Question (\d+):", user).group(1))
    a = re.search(r"Assistant A's answer\]\n\[(\w+)\]", user).group(1)
    b = re.search(r"Assistant B's answer\]\n\[(\w+)\]", user).group(1)
    return qid, a, b


def honest(a: str, b: str) -> str:
    better = "A" if MODELS[a] > MODELS[b] else "B"
    worse = "B" if better == "A" else "A"
    # decoy markers first: only the last one may count
    return f"One might answer [[{worse}]] or [[TIE]] at a glance, but looking closer...\n[[{better}]]"


class ScriptedJudge:
    """Per question: 1 honest, 2 position-biased, 3 no marker, 4 tie, 5 two 5xx then honest,
    6 first attempt too slow then honest; any other question honest."""

    def __init__(self):
        self.attempts = Counter()
        self.answered = Counter()  # (qid, A, B) → honest/scripted replies actually sent
        self.lock = threading.Lock()
        self.hang_after = None  # answer this many requests, then hang the rest
        self.served = 0

    def __call__(self, body) -> Reply:
        key = shown(body)
        qid, a, b = key
        with self.lock:
            self.attempts[key] += 1
            n = self.attempts[key]
            if self.hang_after is not None and self.served >= self.hang_after:
                return Reply("too late", hang=True)
            if qid == 5 and n <= 2:
                return Reply(status=503 if n == 1 else 500)
            if qid == 6 and n == 1:
                return Reply("too slow", delay=1.5)
            self.served += 1
            self.answered[key] += 1
        if qid == 2:
            return Reply("The first answer is clearly better. [[A]]")
        if qid == 3:
            return Reply("Both answers have merit; I would rather not choose.")
        if qid == 4:
            return Reply("They are equally good.\n[[TIE]]")
        return Reply(honest(a, b))


def judge_args(server, qfile, files, out, *extra):
    return ["eval", "judge", "--answers", *map(str, files), "--questions", str(qfile), "--judge-url", server.url,
            "--judge-model", "judge", "--out", str(out), "--backoff", "0.01", *extra]


# ── parsing and combining ──
@pytest.mark.parametrize("text, verdict", [
    ("Assistant A is better.\n[[A]]", "A"),
    ("I first thought [[A]], but no: [[B]]", "B"),  # the last marker wins
    ("[[B]] ... on reflection they are equal [[tie]]", "tie"),
    ("Final verdict: [[TIE]]", "tie"),
    ("Assistant A is better.", "invalid"),  # a mention is not a verdict
    ("[[C]]", "invalid"),
    ("[A] or [[ A ]]", "invalid"),
    ("", "invalid"),
])
def test_parse_verdict_takes_the_last_marker_strictly(text, verdict):
    assert parse_verdict(text) == verdict


def test_combine_both_orders():
    # first: model_a shown as A; second: model_b shown as A
    assert combine("A", "B") == "model_a"  # both orders prefer model_a
    assert combine("B", "A") == "model_b"
    assert combine("tie", "tie") == "tie"
    assert combine("A", "A") == "tie"  # position bias: each order prefers the answer shown first
    assert combine("A", "tie") == "tie"
    assert combine("invalid", "B") is None and combine("A", "invalid") is None


# ── end to end ──
def test_judge_end_to_end(tmp_path, capsys):
    qfile, files = write_inputs(tmp_path)
    out = tmp_path / "battles.jsonl"
    script = ScriptedJudge()
    with ScriptedServer(script) as server:
        rc = main(judge_args(server, qfile, files, out, "--concurrency", "4", "--timeout", "0.5"))
    assert rc == 0, capsys.readouterr().err

    battles, _ = read_battles(out)
    by_q = {}
    for b in battles:
        by_q.setdefault(b["question_id"], []).append(b)
    assert sorted(by_q) == [1, 2, 4, 5, 6]  # question 3's verdicts were unparseable
    assert all(len(v) == 3 for v in by_q.values())  # alpha-beta, alpha-gamma, beta-gamma
    for q in (1, 5, 6):
        for b in by_q[q]:
            stronger = "model_a" if MODELS[b["model_a"]] > MODELS[b["model_b"]] else "model_b"
            assert b["winner"] == stronger and b["order_verdicts"] == [stronger, stronger]
    assert all(b["winner"] == "tie" for b in by_q[2] + by_q[4])
    assert all(b["order_verdicts"] == ["model_a", "model_b"] for b in by_q[2])  # each order chose "A"
    assert all(b["judge"] == "judge" and b["source"] == "judge" for b in battles)

    # both orders were asked for every pair, exactly once each where nothing failed
    assert set(script.answered) == {(q, x, y) for q in range(1, 7) for x in MODELS for y in MODELS if x != y}
    assert all(n == 1 for n in script.answered.values())
    # retries: two 5xx for each question-5 prompt, one timeout for each question-6 prompt
    assert all(script.attempts[k] == 3 for k in script.attempts if k[0] == 5)
    assert all(script.attempts[k] == 2 for k in script.attempts if k[0] == 6)

    report = json.loads(out.with_name("battles.report.json").read_text())
    assert report["pairs"] == 18 and report["battles"] == 15
    assert report["invalid_pairs"] == 3 and report["invalid_judgments"] == 6
    assert report["inconsistent"] == 3 and report["order_consistency"] == 0.8
    assert report["position_bias"] == {"first": 0.5, "second": 0.3, "tie": 0.2}
    assert report["length_bias"] == {"longer_won": 1.0, "decisive_battles": 9}
    assert report["retries"] == 6 * 2 + 6 and report["failed_requests"] == 0
    printed = capsys.readouterr().out
    assert "3 pairs had an unparseable verdict" in printed and "position bias" in printed

    # raw judge texts are in SQLite, invalid ones included; battles too
    db = out.with_suffix(".sqlite")
    stored = storage.get_judgments(db)
    assert len(stored) == 36
    invalid = [j for j in stored.values() if j.verdict == "invalid"]
    assert len(invalid) == 6 and all("rather not choose" in j.raw for j in invalid)
    assert len(storage.list_battles(db, source="judge")) == 15

    # a rerun asks nothing and writes the same battles
    with ScriptedServer(script) as server:
        before = sum(script.attempts.values())
        assert main(judge_args(server, qfile, files, out)) == 0
        assert sum(script.attempts.values()) == before
    assert read_battles(out)[0] == battles


def test_questions_can_come_from_the_answers_and_missing_answers_are_counted(tmp_path, capsys):
    qfile, files = write_inputs(tmp_path, n_questions=3, embed_question=True)
    lines = files[2].read_text().splitlines()
    files[2].write_text("\n".join(lines[:2]) + "\n")  # gamma did not answer question 3
    out = tmp_path / "b.jsonl"
    with ScriptedServer(lambda body: Reply(honest(*shown(body)[1:]))) as server:
        assert main(["eval", "judge", "--answers", str(tmp_path / "answers"), "--judge-url", server.url,
                     "--judge-model", "judge", "--out", str(out)]) == 0
    battles, _ = read_battles(out)
    assert len(battles) == 3 * 3 - 2  # question 3 has only the alpha-beta pair
    report = json.loads(out.with_name("b.report.json").read_text())
    assert report["missing_answers"] == {"gamma": 1}
    assert "gamma has no answer for 1 question" in capsys.readouterr().out


def test_failed_requests_are_reported_and_retried_on_the_next_run(tmp_path, capsys):
    qfile, files = write_inputs(tmp_path, n_questions=2)
    out = tmp_path / "b.jsonl"
    broken = {"on": True}

    def respond(body):
        qid, a, b = shown(body)
        if broken["on"] and qid == 2:
            return Reply(status=500)
        return Reply(honest(a, b))

    with ScriptedServer(respond) as server:
        assert main(judge_args(server, qfile, files, out, "--retries", "1")) == 1
        err = capsys.readouterr().err
        assert "6 judge requests failed" in err and "HTTP 500" in err
        assert len(read_battles(out)[0]) == 3
        broken["on"] = False
        assert main(judge_args(server, qfile, files, out)) == 0
        assert len(read_battles(out)[0]) == 6


def test_a_wrong_model_name_stops_with_a_clear_error(tmp_path, capsys):
    qfile, files = write_inputs(tmp_path, n_questions=1)
    with ScriptedServer(lambda body: Reply(status=404)) as server:
        assert main(judge_args(server, qfile, files, tmp_path / "b.jsonl")) == 2
    err = capsys.readouterr().err
    assert "HTTP 404" in err and "model name" in err and "Traceback" not in err


def test_bad_answers_are_user_errors(tmp_path, capsys):
    qfile, files = write_inputs(tmp_path, n_questions=2)
    args = ["eval", "judge", "--questions", str(qfile), "--judge-url", "http://127.0.0.1:9/v1", "--judge-model", "j",
            "--out", str(tmp_path / "b.jsonl"), "--answers"]
    assert main([*args, str(files[0])]) == 2
    assert "at least two models" in capsys.readouterr().err
    files[1].write_text(files[1].read_text() + files[1].read_text().splitlines()[0] + "\n")
    assert main([*args, *map(str, files)]) == 2
    assert 'second answer of "beta" to question 1' in capsys.readouterr().err
    files[1].write_text('{"question_id": 1, "model": "beta"}\n{"x": 1}\n')
    assert main([*args, *map(str, files)]) == 2
    assert "beta.jsonl:1" in capsys.readouterr().err
    _, files = write_inputs(tmp_path, n_questions=2)
    assert main([a for a in args if a not in ("--questions", str(qfile))] + list(map(str, files))) == 2
    assert "pass the questions file with --questions" in capsys.readouterr().err


# ── resume after an interrupt and after a kill ──
def _wait_for(predicate, timeout=60.0):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if predicate():
            return
        time.sleep(0.05)
    raise AssertionError("timed out waiting")


def _stored(db: Path) -> int:
    """Judgments stored so far, read through a read-only connection: `storage.connect` runs the schema
    script (a write), and polling with it every 50 ms competed with the judge child for SQLite's write
    lock, which can hold the child in SQLite's busy wait (C code: Ctrl-C waits for it; CI saw 30 s)."""
    import sqlite3

    if not db.exists():
        return 0
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=30)
    try:
        return conn.execute("SELECT COUNT(*) FROM judgments").fetchone()[0]
    except sqlite3.OperationalError:  # the table is not created yet
        return 0
    finally:
        conn.close()


def test_interrupted_and_killed_runs_resume_without_asking_twice(tmp_path):
    qfile, files = write_inputs(tmp_path, n_questions=6)
    out = tmp_path / "battles.jsonl"
    db = out.with_suffix(".sqlite")
    honest_only = lambda body: Reply(honest(*shown(body)[1:]))  # noqa: E731
    answered = Counter()
    lock = threading.Lock()
    state = {"hang_after": 7, "served": 0}

    def respond(body):
        key = shown(body)
        with lock:
            if state["hang_after"] is not None and state["served"] >= state["hang_after"]:
                return Reply("never sent", hang=True)
            state["served"] += 1
            answered[key] += 1
        return honest_only(body)

    env = {**os.environ, "PYTHONPATH": str(REPO)}
    with ScriptedServer(respond) as server:
        cmd = [sys.executable, "-m", "chatbuild.cli", *judge_args(server, qfile, files, out, "--concurrency", "3")]
        # 1. Ctrl-C once 7 replies are stored (3 more requests are hanging): exits promptly, keeps them
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        _wait_for(lambda: _stored(db) == 7)
        _wait_for(lambda: sum(r.hang for _, r in server.log) == 3)
        start = time.monotonic()
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=30)
        assert proc.returncode == 130 and "interrupted" in err and "Traceback" not in err, err
        assert time.monotonic() - start < 10
        assert _stored(db) == 7

        # 2. kill -9 after 7 more
        state["hang_after"] = 14
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        _wait_for(lambda: _stored(db) == 14)
        proc.kill()
        proc.communicate(timeout=30)
        assert _stored(db) == 14

        # 3. run to the end
        state["hang_after"] = None
        assert main(judge_args(server, qfile, files, out)) == 0

    everything = {(q, x, y) for q in range(1, 7) for x in MODELS for y in MODELS if x != y}
    assert set(answered) == everything  # none lost
    assert all(n == 1 for n in answered.values())  # none judged twice
    assert len(read_battles(out)[0]) == 18


def test_battles_carry_style_question_and_category_and_replace_older_ones_in_the_database(tmp_path):
    qfile, files = write_inputs(tmp_path, n_questions=2)
    out = tmp_path / "b.jsonl"
    db = out.with_suffix(".sqlite")
    # what an older version stored for one pair: the same battle without style, question or category
    with storage.transaction(db) as conn:
        storage.add_battles(conn, [{"question_id": 1, "model_a": "alpha", "model_b": "beta", "winner": "tie",
                                    "judge": "judge", "tstamp": 1.0, "source": "judge"}])
    with ScriptedServer(lambda body: Reply(honest(*shown(body)[1:]))) as server:
        assert main(judge_args(server, qfile, files, out)) == 0
    battles, _ = read_battles(out)
    assert len(battles) == 6
    for b in battles:
        assert b["category"] == "test" and b["question"] == [f"Question {b['question_id']}: why?"]
        for side in ("a", "b"):
            model = b[f"model_{side}"]
            assert b[f"style_{side}"] == {"chars": len(f"[{model}] answer {b['question_id']} ") + LENGTH[model],
                                          "headers": 0, "list_items": 0, "bold": 0}
    stored = storage.list_battles(db, source="judge")
    assert len(stored) == 6  # the old alpha-beta battle on question 1 was replaced, not kept beside
    assert all("style_a" in b for b in stored)
