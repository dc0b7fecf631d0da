"""Faults: clients that hang up mid-stream, an engine that fails on one request, a server killed with
SIGKILL during a vote storm, a judge endpoint that fails and times out (and a judge run killed
midway), and a data folder that is full or read-only at start."""

import os
import random
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import httpx
import pytest
from reliability_helpers import REPO, ServerProcess, record, wait_until

from chatbuild import storage
from serve.settings import Settings

pytestmark = pytest.mark.reliability

BOOM, BOOM_LATER = "please fail now", "please fail after a word"


class FailingEngine:
    """The real hf engine, except that it raises for two specific prompts: before its first token
    (BOOM) or after it (BOOM_LATER). A stand-in because no real prompt makes the tiny model's forward
    pass fail on demand; what is tested is what the server does with an engine exception. It also
    counts the streams running now and how each one ended."""

    def __init__(self, engine):
        self.engine = engine
        self.active = 0
        self.finished = Counter()
        self._lock = threading.Lock()

    def models(self):
        return self.engine.models()

    def count_tokens(self, messages, model, limit=None):
        return self.engine.count_tokens(messages, model, limit)

    def stream(self, messages, params, model, cancel=None):
        prompt = messages[-1]["content"]
        if prompt == BOOM:
            raise RuntimeError("injected engine fault")
        with self._lock:
            self.active += 1
        finish = None
        try:
            for chunk in self.engine.stream(messages, params, model, cancel=cancel):
                finish = chunk.finish_reason or finish
                yield chunk
                if prompt == BOOM_LATER:
                    raise RuntimeError("injected engine fault mid-reply")
        finally:
            with self._lock:
                self.active -= 1
                self.finished[finish or "error"] += 1

    def close(self):
        pass


@pytest.fixture(scope="module")
def served(fast_run):
    """(url, app state, FailingEngine) of an in-process server (uvicorn in a thread, real HTTP):
    2 generation slots, 8 queue places."""
    from test_ui_helpers import serving

    from chatbuild.engines.hf import HFEngine
    from serve.app import create_app

    engine = HFEngine.from_runs([fast_run])
    failing = FailingEngine(engine)
    app = create_app(failing, Settings(max_running=2, queue_size=8), ui=False)
    with serving(app) as url:
        yield url.rstrip("/"), app.state.serve, failing
    engine.close()


def generation_threads() -> list[str]:
    return [t.name for t in threading.enumerate() if t.name.startswith("chatbuild-generate-")]


def chat(url: str, text: str, model: str = "fast", **extra) -> httpx.Response:
    body = {"model": model, "messages": [{"role": "user", "content": text}], "temperature": 0, "max_tokens": 8,
            **extra}
    return httpx.post(f"{url}/v1/chat/completions", json=body, timeout=60)


def test_100_disconnects_mid_stream_leave_nothing_running(served):
    url, state, engine = served
    base = [m for m in engine.models() if m != "fast"][0]  # the bare base runs to max_tokens (no early EOS)
    body = {"model": base, "messages": [{"role": "user", "content": "Tell me a long story."}], "temperature": 0,
            "max_tokens": 2000, "stream": True}
    before = Counter(engine.finished)
    started = []

    def hang_up_after_first_words():
        with httpx.Client(timeout=120) as http, http.stream("POST", f"{url}/v1/chat/completions", json=body) as r:
            assert r.status_code == 200
            for line in r.iter_lines():
                if line.startswith("data: ") and '"content": "' in line and '"content": ""' not in line:
                    started.append(1)
                    return  # leaving the block closes the connection mid-stream

    for _ in range(10):  # 10 waves of 10 clients: 2 generate, 8 wait in the queue, all hang up
        threads = [threading.Thread(target=hang_up_after_first_words) for _ in range(10)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=120)
        # A hung-up reply frees its slot when its generation has really stopped (at its next token); the
        # next wave, exactly the server's capacity (2 + 8), starts once that has happened, or its last
        # client would get a correct 429 instead of testing a disconnect.
        wait_until(lambda: state.admission.running == 0 and state.admission.waiting == 0,
                   "the wave's generations stopped", timeout=30)
    assert len(started) == 100
    idle_after = wait_until(lambda: engine.active == 0 and state.admission.running == 0 and
                            state.admission.waiting == 0 and not state.cancels and not generation_threads(),
                            "no generation runs and the admission is empty", timeout=20)
    cancelled = engine.finished["cancelled"] - before["cancelled"]
    t0 = time.monotonic()
    r = chat(url, "Are you still there?")
    next_s = time.monotonic() - t0
    record("disconnects", disconnects=100, cancelled_generations=cancelled, idle_after_s=round(idle_after, 2),
           next_request_s=round(next_s, 2))
    assert cancelled == 100, "every hung-up stream stopped its generation"
    assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"]
    assert next_s < 10


def test_an_engine_error_fails_that_request_only(served):
    url, state, engine = served
    good = chat(url, "Hello")
    assert good.status_code == 200
    expected = good.json()["choices"][0]["message"]["content"]
    results = {}

    def call(name, text, **extra):
        results[name] = chat(url, text, **extra)

    threads = [threading.Thread(target=call, args=(f"ok{i}", "Hello")) for i in range(4)]
    threads += [threading.Thread(target=call, args=("boom", BOOM)),
                threading.Thread(target=call, args=("boom-stream", BOOM), kwargs={"stream": True}),
                threading.Thread(target=call, args=("later", BOOM_LATER), kwargs={"stream": True}),
                threading.Thread(target=call, args=("later-json", BOOM_LATER))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    for name in ("boom", "boom-stream", "later-json"):
        r = results[name]
        assert r.status_code == 500, (name, r.text)
        error = r.json()["error"]
        assert error["type"] == "server_error" and "generation failed" in error["message"]
        assert "injected engine fault" in error["message"]
    later = results["later"]  # the 200 went out before the fault: the stream reports it and ends
    assert later.status_code == 200 and "injected engine fault mid-reply" in later.text
    assert "[DONE]" not in later.text
    for i in range(4):
        assert results[f"ok{i}"].json()["choices"][0]["message"]["content"] == expected
    wait_until(lambda: engine.active == 0 and state.admission.running == 0, "the slots are free")
    assert chat(url, "Hello").json()["choices"][0]["message"]["content"] == expected
    assert httpx.get(f"{url}/healthz").status_code == 200


# ── SIGKILL during a vote storm ────────────────────────────────────────────────────────────────
def test_sigkill_during_a_vote_storm_loses_no_acknowledged_vote(fast_run, tmp_path):
    """`chatbuild serve` (a child process, the UI on, SQLite in WAL mode) is killed with SIGKILL while
    six gradio_client sessions play anonymous battles and vote; a vote counts as acknowledged when the
    UI answered with "saved". After a restart on the same file: integrity_check is "ok" and every
    acknowledged vote is there, once."""
    from test_ui_helpers import gradio_client

    db = tmp_path / "chatbuild.sqlite"
    server = ServerProcess([str(fast_run), "--db", str(db), "--max-running", "4"], tmp_path / "serve.log").wait_ready()
    acknowledged, lock, stop = [], threading.Lock(), threading.Event()

    def player(n: int):
        try:
            with gradio_client(server.url + "/") as client:
                for i in range(1000):
                    if stop.is_set():
                        return
                    text = f"player {n} battle {i}"
                    client.predict(api_name="/arena_new_round")
                    client.predict(text, "Anonymous battle", "fast", "fast", 0.7, 1.0, 2, api_name="/arena_send")
                    status = client.predict(api_name=f"/vote_{random.choice('ab')}")[2]
                    if "saved" in status:
                        with lock:
                            acknowledged.append(text)
        except Exception:  # the server died under it: expected once it is killed
            return

    players = [threading.Thread(target=player, args=(n,), daemon=True) for n in range(6)]
    for t in players:
        t.start()
    wait_until(lambda: len(acknowledged) >= 24, "24 votes are acknowledged", timeout=120, every=0.01)
    server.kill()
    with lock:
        before_kill = list(acknowledged)
    stop.set()
    for t in players:
        t.join(timeout=30)

    restarted = ServerProcess([str(fast_run), "--db", str(db)], tmp_path / "serve2.log").wait_ready()
    try:
        with sqlite3.connect(db) as conn:
            integrity = conn.execute("PRAGMA integrity_check").fetchone()[0]
        stored = Counter(b["conversation_a"][0]["content"] for b in storage.list_battles(db))
    finally:
        restarted.stop()
    record("sigkill_vote_storm", acknowledged_before_kill=len(before_kill), battles_after_restart=sum(stored.values()),
           integrity=integrity)
    assert integrity == "ok"
    assert all(stored[text] == 1 for text in before_kill), [t for t in before_kill if stored[t] != 1]
    assert all(n == 1 for n in stored.values()), "no vote is stored twice"


# ── a flaky judge ──────────────────────────────────────────────────────────────────────────────
def test_a_flaky_judge_completes_every_pair_and_a_killed_run_resumes_exactly(tmp_path):
    """The judge endpoint (a stand-in OpenAI-compatible server of our own on loopback: the fault rates
    must be scripted) answers 30% of requests with a 5xx and holds 10% past the client's timeout. A
    first `chatbuild eval judge` is killed with SIGKILL midway; the rerun must ask only for the
    judgments not stored before the kill, and end with every pair judged."""
    from test_eval_judge import MODELS, honest, judge_args, shown, write_inputs
    from test_eval_server import Reply, ScriptedServer

    from chatbuild.battles import read_battles
    from chatbuild.cli import main

    qfile, files = write_inputs(tmp_path, n_questions=6)
    out = tmp_path / "battles.jsonl"
    db = out.with_suffix(".sqlite")
    rng, lock = random.Random(12), threading.Lock()
    seen = {"faults": 0, "timeouts": 0, "after_kill": set()}
    phase = ["first"]

    def respond(body):
        key = shown(body)
        with lock:
            roll = rng.random()
            if phase[0] == "rerun":
                seen["after_kill"].add(key)
            if roll < 0.3:
                seen["faults"] += 1
                return Reply(status=rng.choice((500, 502, 503)))
            if roll < 0.4:
                seen["timeouts"] += 1
                return Reply("too late", delay=3.0)
        return Reply(honest(key[1], key[2]))

    flaky = ["--timeout", "1", "--retries", "12", "--concurrency", "4"]
    with ScriptedServer(respond) as server:
        env = {**os.environ, "PYTHONPATH": str(REPO)}
        cmd = [sys.executable, "-m", "chatbuild.cli", *judge_args(server, qfile, files, out, *flaky)]
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            wait_until(lambda: db.exists() and len(storage.get_judgments(db)) >= 12, "12 judgments are stored",
                       timeout=120, every=0.05)
        finally:
            proc.send_signal(signal.SIGKILL)
            proc.wait(timeout=30)
        stored_before = {(j.question_id, j.model_1, j.model_2) for j in storage.get_judgments(db).values()}
        phase[0] = "rerun"
        assert main(judge_args(server, qfile, files, out, *flaky)) == 0

    everything = {(q, x, y) for q in range(1, 7) for x in MODELS for y in MODELS if x != y}
    judgments = storage.get_judgments(db)
    stored = Counter((j.question_id, j.model_1, j.model_2) for j in judgments.values())
    battles = read_battles(out)[0]
    record("flaky_judge", judgments=len(judgments), injected_5xx=seen["faults"], injected_timeouts=seen["timeouts"],
           stored_before_kill=len(stored_before), asked_again_after_kill=len(seen["after_kill"] & stored_before),
           battles=len(battles))
    assert seen["faults"] > 0 and seen["timeouts"] > 0
    assert set(stored) == everything and all(n == 1 for n in stored.values()), "none lost, none twice"
    assert all(j.verdict != "invalid" for j in judgments.values())
    assert not seen["after_kill"] & stored_before, "the rerun asked again for judgments stored before the kill"
    assert len(battles) == 18 and len({(b["question_id"], b["model_a"], b["model_b"]) for b in battles}) == 18


# ── a data folder that cannot take the database ────────────────────────────────────────────────
def serve_fails_at_start(fast_run, db: str, tmp_path: Path) -> str:
    """Run `chatbuild serve` with `--db db`; it must exit 2 with one line, before loading any model."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    t0 = time.monotonic()
    out = subprocess.run([sys.executable, "-m", "serve.cli", str(fast_run), "--db", db, "--port", "9"],
                         cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 2, out.stderr[-2000:]
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in out.stderr, out.stderr
    assert lines[0].startswith("chatbuild serve: error: ") and db in lines[0]
    assert "Loading weights" not in out.stderr + out.stdout, "it stopped before loading the models"
    return f"{lines[0]} ({time.monotonic() - t0:.1f} s)"


def test_an_unwritable_data_folder_is_a_one_line_error_at_start(fast_run, tmp_path):
    """Three ways that really fail here, as root: a path under /proc (no file can be made there), a
    file where the folder should be, and, where `mount` is allowed, a full tmpfs and a read-only bind
    mount (root ignores chmod, so a read-only folder needs a read-only mount)."""
    (tmp_path / "a-file").write_text("not a folder\n")
    messages = {"proc": serve_fails_at_start(fast_run, "/proc/chatbuild-test/chatbuild.sqlite", tmp_path),
                "file_as_folder": serve_fails_at_start(fast_run, str(tmp_path / "a-file" / "chatbuild.sqlite"),
                                                       tmp_path)}
    full, readonly = tmp_path / "full", tmp_path / "readonly"
    full.mkdir()
    readonly.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(full)], capture_output=True).returncode:
        record("unwritable_data_folder", **messages, mounts="not allowed here: skipped the tmpfs and read-only cases")
        return
    try:
        with open(full / "filler", "wb") as f:  # fill it up
            with pytest.raises(OSError):
                while True:
                    f.write(bytes(16384))
                    f.flush()
        messages["disk_full"] = serve_fails_at_start(fast_run, str(full / "chatbuild.sqlite"), tmp_path)
        assert "No space left" in messages["disk_full"]
        subprocess.run(["mount", "--bind", "-o", "ro", str(readonly), str(readonly)], check=True)
        messages["read_only"] = serve_fails_at_start(fast_run, str(readonly / "chatbuild.sqlite"), tmp_path)
        assert "Read-only" in messages["read_only"]
    finally:
        subprocess.run(["umount", str(readonly)], capture_output=True)
        subprocess.run(["umount", str(full)], capture_output=True)
    record("unwritable_data_folder", **messages)
