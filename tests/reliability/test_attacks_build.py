"""Attacks on the Build tab (issue 17, item 7), performed through gradio_client against the served tab:
out-of-range settings, a flood of jobs, a login without the build permission, one login cancelling
another's job, and a job reading the server's secrets from its environment.

The server is the real serving app (tests/test_ui_helpers.py: ui_app, serving) over a ScriptedEngine,
with the real Builder, job queue and SQLite database. What stands in for the real thing is the jobs'
python: a small script that prints the environment it was given and exits, or, for jobs named
hold-*, waits until it is cancelled. A real fine-tune is minutes of CPU here and its environment is
the same one (`JobManager._start` builds it before choosing the command); what these tests check is
the permission, the bounds, the queue and the environment, never the training."""

import json
import os
import sqlite3
import subprocess
import sys
from contextlib import contextmanager

import pytest

pytest.importorskip("gradio")
pytest.importorskip("gradio_client")

from gradio_client import handle_file  # noqa: E402
from gradio_client.exceptions import AppError, ValidationError  # noqa: E402
from reliability_helpers import record, wait_until  # noqa: E402
from test_ui_helpers import ScriptedEngine, gradio_client, serving, ui_app  # noqa: E402

from serve.builder import FIELDS  # noqa: E402
from serve.jobs import _alive  # noqa: E402

pytestmark = pytest.mark.reliability

KEY = "sk-build-3f9a61"  # the server's /v1 key
USERS = [("alice", "pw-alice-5c1"), ("bob", "pw-bob-80e"), ("carol", "pw-carol-d47")]
ALICE, BOB, CAROL = USERS
SECRETS = {  # in the server's environment while it runs jobs
    "CHATBUILD_API_KEY": KEY,
    "CHATBUILD_UI_AUTH": ",".join(f"{u}:{p}" for u, p in USERS),
    "OPENAI_API_KEY": "sk-remote-7e20b4",  # the key of an upstream server (--engine openai)
    "CHATBUILD_JUDGE_API_KEY": "sk-judge-19c3d2",
    "AWS_SECRET_ACCESS_KEY": "aws-secret-6b0f",
    "DATABASE_URL": "postgres://app:db-pass-41aa@db.internal/app",
    "HF_TOKEN": "hf_token_for_gated_bases",
}
FAKE_PYTHON = '''#!{python}
"""Stands in for python in the Build jobs: prints its environment; jobs named hold-* then wait."""
import json, os, sys, time
print("ENV " + json.dumps(dict(os.environ)), flush=True)
if any(arg.startswith("name=hold") for arg in sys.argv):
    time.sleep(120)
'''


@contextmanager
def build_server(tmp_path, **settings):
    """(url, builder) of the app with the Build tab, its jobs run by FAKE_PYTHON."""
    fake = tmp_path / "python"
    fake.write_text(FAKE_PYTHON.format(python=sys.executable))
    fake.chmod(0o755)
    engine = ScriptedEngine(delay=0.001)
    app = ui_app(engine, tmp_path / "chatbuild.sqlite", builder=True, builder_dir=str(tmp_path / "builder"),
                 **settings)
    builder = app.state.serve.builder
    builder.jobs.python = str(fake)
    with serving(app) as url:
        builder.self_url = url + "v1"
        try:
            yield url, builder
        finally:
            for job in builder.jobs.jobs():
                if job.status in ("queued", "running"):
                    builder.jobs.cancel(job.id)


def form(name, **changes):
    """The Start event's inputs: name, data (bundled sample), preset, fields (tiny-cpu's values)."""
    values = {"model.base": "tiny", "model.quant": "nf4", "model.double_quant": True, "lora.r": 8,
              "lora.alpha": 16, "lora.dropout": 0.0, "train.steps": 2, "train.lr": 2e-3, "data.max_length": 128,
              "train.batch_size": 4, "train.micro_batch_size": 4, "train.objective": "sft", "train.beta": 0.1,
              **changes}
    return [name, "Bundled sample", None, "", "auto", "top1", "", "tiny-cpu", *(values[k] for k in FIELDS)]


def start(client, name, **changes) -> int:
    started, job, _ = client.predict(*form(name, **changes), api_name="/build_start")
    assert "queued" in started
    return job["value"] if isinstance(job, dict) else job


def job_rows(db) -> list[tuple]:
    with sqlite3.connect(db) as conn:
        return conn.execute("SELECT id, name, status, owner FROM jobs ORDER BY id").fetchall()


def settled(builder, job_id):
    wait_until(lambda: builder.jobs.get(job_id).status in ("done", "failed", "cancelled"), f"job {job_id} ends")
    return builder.jobs.get(job_id)


def page_load(url, login) -> list:
    """What the Build tab's page-load event returns to `login`, asked as the browser asks it (raw HTTP
    with the login's session cookie): [notice, upload, preview, start, cancel, resume, evaluate]."""
    import httpx

    with httpx.Client(timeout=30) as http:
        assert http.post(url + "login", data={"username": login[0], "password": login[1]}).status_code == 200
        config = http.get(url + "config").json()
        elem_ids = {c["id"]: c.get("props", {}).get("elem_id") for c in config["components"]}
        dep = next(d for d in config["dependencies"] if any(elem_ids.get(o) == "build-access" for o in d["outputs"]))
        r = http.post(url + "gradio_api/run/predict", json={"fn_index": dep["id"], "data": [], "session_hash": "pl"})
        r.raise_for_status()
        return r.json()["data"]


def refused(call, *args, api_name: str, error=(AppError, ValidationError)) -> str:
    with pytest.raises(error) as e:
        call(*args, api_name=api_name)
    message = str(e.value)
    if isinstance(e.value, AppError):  # (gradio_client lists validation failures one a line)
        assert "\n" not in message.strip(), message
    return message


# ── bounds ─────────────────────────────────────────────────────────────────────────────────────
def test_out_of_range_settings_are_refused_by_field_and_nothing_starts(tmp_path):
    """The issue's values (steps 1e9, max length 1e7, rank 4096) and the other fields' edges, each
    refused with its field's message before any job exists; a base's context window bounds max length."""
    base = tmp_path / "small-context-base"
    base.mkdir()
    (base / "config.json").write_text(json.dumps({"model_type": "llama", "max_position_embeddings": 512}))
    attacks = [
        ({"train.steps": 1_000_000_000}, "Steps: must be in [1, 100000], got 1000000000"),
        ({"data.max_length": 10_000_000}, "Max length (tokens): must be in [16, 32768], got 10000000"),
        ({"lora.r": 4096}, "LoRA rank: must be in [1, 512], got 4096"),
        ({"lora.alpha": 100_000}, "LoRA alpha: must be in [1, 4096], got 100000"),
        ({"train.batch_size": 4096}, "Batch size: must be in [1, 1024], got 4096"),
        ({"train.batch_size": 4, "train.micro_batch_size": 8}, "must be a multiple of train.micro_batch_size (8)"),
        ({"train.lr": 5.0}, "Learning rate: must be in (0, 1], got 5"),
        ({"data.max_length": 8}, "Max length (tokens): must be in [16, 32768], got 8"),
        ({"model.base": "x" * 5000}, "Base model: 5000 characters; at most 512"),
        ({"model.base": str(base), "data.max_length": 1024},
         f"Max length (tokens): must be at most 512, the context window of {base}, got 1024"),
    ]
    with build_server(tmp_path) as (url, builder), gradio_client(url) as client:
        for n, (changes, expected) in enumerate(attacks):
            message = refused(client.predict, *form(f"big-{n}", **changes), api_name="/build_start",
                              error=ValidationError)
            assert expected in message, (changes, message)
        # the same checks guard the Builder itself, whoever calls it, and name the field
        from chatbuild.errors import UserError
        from serve.builder import DataChoice

        values = dict(zip(FIELDS, form("direct", **{"train.steps": 10**9})[8:]))
        with pytest.raises(UserError, match=r"Steps: must be in \[1, 100000\]"):
            builder.submit_finetune("tiny-cpu", values, "direct", DataChoice("sample"))
        assert builder.jobs.jobs() == [] and list(builder.runs_dir.iterdir()) == []
        # in bounds, it starts
        job_id = start(client, "fits", **{"model.base": str(base), "data.max_length": 512})
        assert settled(builder, job_id).status == "done"
    record("build: out-of-range settings", refused=len(attacks) + 1, jobs_created=0)


def test_an_operator_can_raise_the_steps_bound(tmp_path):
    with build_server(tmp_path, builder_max_steps=200_000) as (url, builder), gradio_client(url) as client:
        message = refused(client.predict, *form("huge", **{"train.steps": 300_000}), api_name="/build_start",
                          error=ValidationError)
        assert "must be in [1, 200000], got 300000" in message
        job_id = start(client, "long", **{"train.steps": 150_000})
        assert settled(builder, job_id).status == "done"


# ── the queue ──────────────────────────────────────────────────────────────────────────────────
def test_the_queue_is_capped_in_all_and_per_login(tmp_path):
    db = tmp_path / "chatbuild.sqlite"
    with build_server(tmp_path, ui_auth=USERS, builder_users=["alice", "bob"], builder_max_queued=3,
                      builder_max_queued_per_user=2) as (url, builder), \
            gradio_client(url, auth=ALICE) as alice, gradio_client(url, auth=BOB) as bob:
        a1, a2 = start(alice, "hold-a1"), start(alice, "hold-a2")
        per_login = refused(alice.predict, *form("hold-a3"), api_name="/build_start")
        b1 = start(bob, "hold-b1")
        full = refused(bob.predict, *form("hold-b2"), api_name="/build_start")
        assert [r[0] for r in job_rows(db)] == [a1, a2, b1]
        # a resume takes a place too
        assert "cancelled" in alice.predict(a2, api_name="/build_cancel")
        a3 = start(alice, "hold-a3")
        full_on_resume = refused(alice.predict, a2, api_name="/build_resume")
        assert builder.jobs.get(a2).status == "cancelled" and builder.jobs.get(a3).status in ("queued", "running")
        # so does an evaluation
        full_on_eval = refused(bob.predict, "alpha", "beta", "demo", 4, api_name="/build_evaluate")
    assert "the limit per login is 2" in per_login and "alice has 2 jobs" in per_login
    assert "the job queue is full" in full and "limit is 3" in full
    assert "the job queue is full" in full_on_resume and "the job queue is full" in full_on_eval
    assert len(job_rows(db)) == 4 and list((builder.evals_dir).iterdir()) == []
    record("build: queue cap", submitted=7, accepted=4, refused_per_login=1, refused_full=3,
           limits="3 in all, 2 per login")


# ── who may build ──────────────────────────────────────────────────────────────────────────────
def test_a_login_without_the_build_permission_is_refused_everywhere(tmp_path):
    db = tmp_path / "chatbuild.sqlite"
    data = tmp_path / "mine.jsonl"
    data.write_text(json.dumps({"messages": [{"role": "user", "content": "hi"},
                                             {"role": "assistant", "content": "hello"}]}) + "\n")
    with build_server(tmp_path, ui_auth=USERS, builder_users=["alice", "bob"]) as (url, builder), \
            gradio_client(url, auth=ALICE) as alice, gradio_client(url, auth=CAROL) as carol:
        job_id = start(alice, "hold-alice")
        wait_until(lambda: builder.jobs.get(job_id).status == "running", "alice's job runs")
        messages = [
            refused(carol.predict, *form("carol-run"), api_name="/build_start"),
            refused(carol.predict, job_id, api_name="/build_cancel"),
            refused(carol.predict, job_id, api_name="/build_resume"),
            refused(carol.predict, "alpha", "beta", "demo", 4, api_name="/build_evaluate"),
            refused(carol.predict, handle_file(str(data)), api_name="/build_upload"),
        ]
        preview = carol.predict("Bundled sample", None, "", "auto", "top1", "", api_name="/build_preview")
        assert builder.jobs.get(job_id).status == "running"
        # the page: Carol sees why, with the buttons off; Alice sees them on
        notice, *buttons = page_load(url, CAROL)
        assert "carol may not build" in notice and all(b.get("interactive") is False for b in buttons)
        notice, *buttons = page_load(url, ALICE)
        assert notice == "" and not any("interactive" in b for b in buttons)
    for message in messages:
        assert "carol may not build on this server" in message, message
    assert preview.startswith("⚠️") and "carol may not build" in preview
    assert [(r[1], r[3]) for r in job_rows(db)] == [("hold-alice", "alice")]
    assert list(builder.data_dir.iterdir()) == [] and list(builder.evals_dir.iterdir()) == []
    record("build: non-builder login", endpoints_refused=6, jobs_created=0, files_kept=0)


def test_with_logins_and_no_builder_list_nobody_builds(tmp_path):
    """The safe default of the library (the CLI refuses to start so, see below): a login is not a
    permission to build."""
    with build_server(tmp_path, ui_auth=USERS) as (url, builder), gradio_client(url, auth=ALICE) as alice:
        message = refused(alice.predict, *form("alice-run"), api_name="/build_start")
    assert "alice may not build" in message and builder.jobs.jobs() == []


def test_the_cli_wants_the_builders_named(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("CHATBUILD_")}
    serve = [sys.executable, "-m", "chatbuild.cli", "serve", "--base", str(tmp_path / "never-loaded"), "--builder",
             "--db", str(tmp_path / "db.sqlite")]
    cases = [
        (["--ui-auth", "alice:pw"], "needs --builder-users"),
        (["--ui-auth", "alice:pw", "--builder-users", "mallory"], '"mallory" is not one of the --ui-auth logins'),
        (["--builder-users", "alice"], "names --ui-auth logins"),
        (["--builder-max-queued", "0"], "--builder-max-queued must be >= 1"),
    ]
    for extra, expected in cases:
        out = subprocess.run([*serve, *extra], capture_output=True, text=True, env=env, timeout=120)
        assert out.returncode == 2 and expected in out.stderr, (extra, out.stderr)
        assert len(out.stderr.strip().splitlines()) == 1, out.stderr


def test_a_login_cannot_cancel_or_resume_anothers_job(tmp_path):
    with build_server(tmp_path, ui_auth=USERS, builder_users=["alice", "bob"]) as (url, builder), \
            gradio_client(url, auth=ALICE) as alice, gradio_client(url, auth=BOB) as bob:
        job_id = start(alice, "hold-alice")
        wait_until(lambda: builder.jobs.get(job_id).status == "running", "alice's job runs")
        pid = builder.jobs.get(job_id).pid
        cancel = refused(bob.predict, job_id, api_name="/build_cancel")
        # the cancel flag is set before the SIGTERM is sent: neither happened
        assert builder.jobs.get(job_id).status == "running" and not builder.jobs.get(job_id).cancel
        assert _alive(pid)
        assert "stopping" in alice.predict(job_id, api_name="/build_cancel")
        assert settled(builder, job_id).status == "cancelled"
        resume = refused(bob.predict, job_id, api_name="/build_resume")
        assert builder.jobs.get(job_id).status == "cancelled"
        assert "queued again" in alice.predict(job_id, api_name="/build_resume")
    for message in (cancel, resume):
        assert f"job {job_id} is not yours" in message, message
    record("build: another login's job", cancel_refused=True, resume_refused=True, job_kept_running=True)


# ── the jobs' environment ──────────────────────────────────────────────────────────────────────
def test_jobs_get_none_of_the_servers_secrets(tmp_path, monkeypatch):
    for name, value in SECRETS.items():
        monkeypatch.setenv(name, value)
    with build_server(tmp_path, api_key=KEY, ui_auth=USERS, builder_users=["alice"]) as (url, builder), \
            gradio_client(url, auth=ALICE) as alice:
        finetune = settled(builder, start(alice, "env-dump"))
        _, job = alice.predict("alpha", "beta", "demo", 4, api_name="/build_evaluate")
        evaluation = settled(builder, job["value"] if isinstance(job, dict) else job)
    envs = {}
    for job in (finetune, evaluation):
        log = open(job.log_path).read()
        envs[job.kind] = json.loads(next(line for line in log.splitlines() if line.startswith("ENV "))[4:])
        for name in ("CHATBUILD_API_KEY", "CHATBUILD_UI_AUTH", "AWS_SECRET_ACCESS_KEY", "DATABASE_URL"):
            assert name not in envs[job.kind], (job.kind, name)
    # a fine-tune gets the hub's token (gated bases) and no key at all
    ft = envs["finetune"]
    assert ft["HF_TOKEN"] == SECRETS["HF_TOKEN"]
    assert "OPENAI_API_KEY" not in ft and "CHATBUILD_JUDGE_API_KEY" not in ft
    leaked = [v for k, v in SECRETS.items() if k != "HF_TOKEN" and v in json.dumps(ft)]
    assert leaked == [] and "pw-alice" not in json.dumps(ft) and KEY not in json.dumps(ft)
    # an evaluation gets the keys it calls with: this server's /v1 key (answers, and the self-judge)
    ev = envs["eval"]
    assert ev["OPENAI_API_KEY"] == KEY and ev["CHATBUILD_JUDGE_API_KEY"] == KEY
    assert "HF_TOKEN" not in ev and SECRETS["OPENAI_API_KEY"] not in json.dumps(ev)
    assert "pw-alice" not in json.dumps(ev)
    for name in ("PATH", "TOKENIZERS_PARALLELISM"):  # what is not secret stays
        assert ft[name] == os.environ[name] and ev[name] == os.environ[name]
    record("build: job environment", server_secrets=sorted(SECRETS), finetune_got=sorted(k for k in SECRETS if k in ft),
           eval_got=sorted(k for k in ("OPENAI_API_KEY", "CHATBUILD_JUDGE_API_KEY") if k in ev))


def test_a_login_reads_only_its_own_jobs_log_and_messages(tmp_path):
    """A job's log and error name the owner's files and data: another builder sees the queue's row and
    progress, never the log, the error or the note."""
    with build_server(tmp_path, ui_auth=USERS, builder_users=["alice", "bob"]) as (url, builder), \
            gradio_client(url, auth=ALICE) as alice, gradio_client(url, auth=BOB) as bob:
        job_id = start(alice, "env-alice")
        settled(builder, job_id)
        _, mine, _, my_log, my_table, *_ = alice.predict(job_id, [], api_name="/build_job")
        _, theirs, _, their_log, their_table, *_ = bob.predict(job_id, [], api_name="/build_job")
    assert "ENV {" in my_log and "shown only to" not in mine, my_log[:300]
    assert their_log == "" and "shown only to alice" in theirs
    assert "ENV" not in json.dumps(their_table) and SECRETS["HF_TOKEN"] not in theirs + json.dumps(their_table)
    my_row = next(r for r in my_table["data"] if r[0] == job_id)
    their_row = next(r for r in their_table["data"] if r[0] == job_id)
    assert their_row[:6] == my_row[:6] and their_row[6] == ""
    record("build: another login's job log", log_hidden=True, error_hidden=True)
