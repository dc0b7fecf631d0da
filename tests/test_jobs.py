"""Fine-tune jobs as separate processes tracked in SQLite: run, queue, cancel, resume, survive a
restart of whoever tracks them, and never let two jobs write one run folder."""

import os
import signal
import time

import pytest

from chatbuild.errors import UserError
from chatbuild.runs import is_run
from serve.jobs import JobManager

pytestmark = pytest.mark.integration


def overrides(tiny_base, steps=4, **extra):
    out = [f"model.base={tiny_base}", f"train.steps={steps}", "train.eval_every=0", "train.save_every=1"]
    return out + [f"{k}={v}" for k, v in extra.items()]


@pytest.fixture
def manager(tmp_path):
    m = JobManager(tmp_path / "chatbuild.sqlite", tmp_path / "logs")
    yield m
    for job in m.jobs():
        if job.status == "running" and job.pid:
            try:
                os.killpg(job.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


def test_a_job_runs_to_completion_in_its_own_process(manager, tiny_base, tmp_path):
    job = manager.submit("j1", tmp_path / "runs" / "j1", "tiny-cpu", overrides(tiny_base, steps=2))
    assert job.status == "queued"
    manager.tick()
    running = manager.get(job.id)
    assert running.status == "running" and running.pid and running.pid != os.getpid()
    done = manager.wait(job.id)
    assert done.status == "done", done.log_tail()
    assert is_run(done.run_dir)
    p = done.progress()
    assert p["step"] == 2 and p["steps"] == 2 and p["loss"] is not None
    assert "-m chatbuild.cli finetune" in done.log_tail(200)  # the installed entry, not a source tree


def test_one_job_per_device_the_rest_queue(manager, tiny_base, tmp_path):
    a = manager.submit("a", tmp_path / "a", "tiny-cpu", overrides(tiny_base, steps=2))
    b = manager.submit("b", tmp_path / "b", "tiny-cpu", overrides(tiny_base, steps=2))
    manager.tick()
    assert (manager.get(a.id).status, manager.get(b.id).status) == ("running", "queued")
    assert manager.wait(a.id).status == "done"
    assert manager.wait(b.id).status == "done"
    assert manager.get(b.id).started >= manager.get(a.id).finished


def test_two_jobs_never_write_one_run_folder(manager, tiny_base, tmp_path):
    manager.submit("x", tmp_path / "x", "tiny-cpu", overrides(tiny_base))
    with pytest.raises(UserError, match="already writing"):
        manager.submit("x", tmp_path / "x", "tiny-cpu", overrides(tiny_base))


def test_cancel_checkpoints_and_resume_finishes(manager, tiny_base, tmp_path):
    job = manager.submit("c", tmp_path / "c", "tiny-cpu", overrides(tiny_base, steps=40))
    manager.tick()
    deadline = time.monotonic() + 300
    while not list((tmp_path / "c" / "checkpoints").glob("step-*/state.json")):
        assert time.monotonic() < deadline and manager.get(job.id).status == "running", manager.get(job.id).log_tail()
        time.sleep(0.1)
    manager.cancel(job.id)
    cancelled = manager.wait(job.id)
    assert cancelled.status == "cancelled", cancelled.log_tail()
    assert "continue with --resume" in cancelled.log_tail()
    assert not is_run(cancelled.run_dir)
    resumed = manager.resume(job.id)
    assert resumed.status == "queued" and resumed.resume
    finished = manager.wait(job.id)
    assert finished.status == "done", finished.log_tail()
    assert "resume: continuing from" in finished.log_tail(400)


def test_a_failing_job_shows_its_error(manager, tmp_path):
    job = manager.submit("bad", tmp_path / "bad", "tiny-cpu", [f"model.base={tmp_path / 'missing-model'}"])
    failed = manager.wait(job.id)
    assert failed.status == "failed"
    assert "could not be read" in failed.error


def test_a_failed_tick_does_not_stop_the_queue(manager, tmp_path, caplog):
    """One tick that raises (here the first spawn fails, as a full process table or a locked
    database would make it) is logged, and the background queue goes on to start the job."""
    real_start, calls = manager._start, []

    def start_once_failing(db, job):
        calls.append(job.id)
        if len(calls) == 1:
            raise OSError("cannot fork")
        real_start(db, job)

    manager._start = start_once_failing
    job = manager.submit("bad", tmp_path / "bad", "tiny-cpu", [f"model.base={tmp_path / 'missing-model'}"])
    with caplog.at_level("ERROR", logger="serve.jobs"):
        manager.start(interval=0.05)
        deadline = time.monotonic() + 120
        while manager.get(job.id).status not in ("done", "failed") and time.monotonic() < deadline:
            time.sleep(0.05)
        manager.stop()
    assert len(calls) >= 2
    assert "tick failed" in caplog.text and "cannot fork" in caplog.text
    assert manager.get(job.id).status == "failed"  # it ran: the missing model is the child's error
    assert "could not be read" in manager.get(job.id).error


def test_restart_recovery_marks_dead_jobs_failed(tiny_base, tmp_path):
    first = JobManager(tmp_path / "db.sqlite", tmp_path / "logs")
    job = first.submit("r", tmp_path / "r", "tiny-cpu", overrides(tiny_base, steps=200))
    first.tick()
    pid = first.get(job.id).pid
    os.killpg(pid, signal.SIGKILL)  # the process dies while nobody watches
    while first._children[job.id].poll() is None:
        time.sleep(0.05)
    # A new manager (a restarted server) on the same database finds it and settles it.
    second = JobManager(tmp_path / "db.sqlite", tmp_path / "logs")
    settled = second.get(job.id)
    assert settled.status == "failed" and "ended while the server was away" in settled.error
    assert settled.log_tail() != ""


def test_cancel_a_queued_job_and_bad_transitions(manager, tiny_base, tmp_path):
    a = manager.submit("q1", tmp_path / "q1", "tiny-cpu", overrides(tiny_base))
    assert manager.cancel(a.id).status == "cancelled"
    with pytest.raises(UserError, match="nothing to cancel"):
        manager.cancel(a.id)
    with pytest.raises(UserError, match="no job 999"):
        manager.get(999)
    b = manager.submit("q2", tmp_path / "q2", "tiny-cpu", overrides(tiny_base))
    with pytest.raises(UserError, match="only cancelled or failed"):
        manager.resume(b.id)


def test_every_kind_starts_through_the_installed_command_line(tmp_path):
    """The kinds table: a fine-tune's output folder travels as output_dir=, a resumed one continues
    instead of overwriting; every kind runs `python -m chatbuild.cli <program>`, never a source tree."""
    from serve.jobs import JOB_KINDS, Job, job_kind

    assert set(JOB_KINDS) == {"finetune", "eval"}
    finetune = job_kind("finetune")
    args = finetune.arguments("n", "/out/n", ["train.steps=2"], True)
    assert args == ["train.steps=2", "output_dir=/out/n", "name=n", "--overwrite"]
    job = Job(id=1, name="n", preset="tiny-cpu", overrides=args, run_dir="/out/n", device="default", status="queued",
              pid=None, resume=False, cancel=False, log_path="", error=None, created=0.0, started=None, finished=None)
    assert finetune.command(job) == ["finetune", "tiny-cpu", *args, "--no-progress"]
    job.resume = True
    assert finetune.command(job) == ["finetune", "tiny-cpu", *args[:-1], "--no-progress", "--resume"]
    assert finetune.makes_run and finetune.finished(tmp_path) is False
    evaluation = job_kind("eval")
    job.kind, job.overrides = "eval", evaluation.arguments("e", str(tmp_path), ["/e/eval.yaml"], False)
    assert evaluation.command(job) == ["eval", "run", "/e/eval.yaml"] and not evaluation.makes_run
    assert not evaluation.finished(tmp_path)
    (tmp_path / "leaderboard.json").write_text("{}")
    assert evaluation.finished(tmp_path) and job.progress()["steps"] is None
    with pytest.raises(UserError, match='job kind "dpo" is not one of finetune, eval'):
        job_kind("dpo")
