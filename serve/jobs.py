"""Fine-tune and evaluation jobs: queued, run as separate processes, tracked in SQLite, surviving
server restarts.

The Builder tab submits jobs here; it never trains inside the web server's process. A job is one
child process with its own log file, started in its own session so it outlives a server restart.
Every kind runs through the installed `chatbuild` command line (so a wheel install works without
the source tree); `JOB_KINDS` is the one table of kinds:

    kind "finetune"   python -m chatbuild.cli finetune PRESET key=value ...   (writes a run folder)
    kind "eval"       python -m chatbuild.cli eval run CONFIG.yaml            (writes an eval folder)

States: queued → running → done | failed | cancelled. A cancelled or failed job can be resumed (it
goes back to queued and continues from its last checkpoint). One job runs at a time per device by
default; the rest wait in submission order. Two jobs never write one run folder: a submission whose
output folder belongs to another unfinished job, or already holds a run, is refused.

Cancel sends SIGTERM: the recipe finishes its current step, saves a checkpoint and exits with 143.
On start, the manager reconciles what it finds: a "running" job whose process is gone is marked
failed (or done, if its run folder is complete), with its log kept.

Bounds: at most `max_active` jobs queued or running at once, and `max_active_per_owner` of them
per owner (the login that submitted it); a submission or resume past either is refused. A child's
environment is the server's without anything secret-looking (`job_environment`), plus what its kind
needs (`env`): the server's API keys and logins never reach a fine-tune.
"""

import json
import logging
import os
import re
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from chatbuild import runs
from chatbuild.errors import UserError

log = logging.getLogger(__name__)

STATES = ("queued", "running", "done", "failed", "cancelled")
FINISHED = ("done", "failed", "cancelled")

SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    id          INTEGER PRIMARY KEY AUTOINCREMENT,
    name        TEXT NOT NULL,
    preset      TEXT,
    overrides   TEXT NOT NULL,          -- JSON list of key=value strings
    run_dir     TEXT NOT NULL,
    device      TEXT NOT NULL,
    status      TEXT NOT NULL,
    pid         INTEGER,
    resume      INTEGER NOT NULL DEFAULT 0,
    cancel      INTEGER NOT NULL DEFAULT 0,
    log_path    TEXT NOT NULL,
    error       TEXT,
    created     REAL NOT NULL,
    started     REAL,
    finished    REAL,
    kind        TEXT NOT NULL DEFAULT 'finetune',
    note        TEXT,                   -- what happened after it finished (served as ..., not served: ...)
    owner       TEXT                    -- the login that submitted it; NULL on a server without logins
);
"""
# columns added after the first release of the table, for databases made before them
LATER_COLUMNS = {"kind": "TEXT NOT NULL DEFAULT 'finetune'", "note": "TEXT", "owner": "TEXT"}
# Environment variables no job inherits from the server: API keys, UI logins, tokens, passwords (a
# word of the name, so TOKENIZERS_PARALLELISM stays), and URLs with a password in them. What a job's
# kind does need comes back through `JobManager(env=...)`.
SECRET_NAME = re.compile(r"(^|_)(API_?KEY|KEYS?|TOKENS?|SECRETS?|PASSW(OR)?DS?|PASS|PASSPHRASE|AUTH|AUTHORIZATION|"
                         r"CREDENTIALS?|COOKIES?|SESSION|PRIVATE)(_|$)", re.IGNORECASE)
SECRET_VALUE = re.compile(r"://[^/@\s:]+:[^/@\s]+@")  # scheme://user:password@host


@dataclass
class Job:
    id: int
    name: str
    preset: str | None
    overrides: list[str]
    run_dir: str
    device: str
    status: str
    pid: int | None
    resume: bool
    cancel: bool
    log_path: str
    error: str | None
    created: float
    started: float | None
    finished: float | None
    kind: str = "finetune"
    note: str | None = None
    owner: str | None = None

    def log_tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(Path(self.log_path).read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def progress(self) -> dict:
        """What its kind reports while it runs: step, total steps (None: unknown), loss, tokens/s,
        memory, and the train and eval loss curves as (step, loss) pairs."""
        return job_kind(self.kind).progress(Path(self.run_dir))


# ── job kinds ───────────────────────────────────────────────────────────────────────────────────
@dataclass(frozen=True)
class JobKind:
    """Everything the manager (and the Builder, through `job_kind`) knows about one kind of job.

    arguments(name, out, args, overwrite): the arguments stored with a submitted job, `args` the
        caller's; this is where the kind puts its output folder `out` (for a fine-tune, output_dir=)
    command(job): its `chatbuild` command line after the program name, e.g. ["finetune", ...]; a
        job put back in the queue (job.resume) continues rather than starting again
    makes_run: its output folder is a run folder (chatbuild.runs) once finished, so it can be served
    fresh_output: a submission refuses an output folder that already holds something (unless overwrite)
    finished(out): whether its output folder holds a finished result (a job that died unwatched)
    progress(out): what it reports while it runs (`Job.progress`)
    """

    name: str
    arguments: Callable[[str, str, list[str], bool], list[str]]
    command: Callable[[Job], list[str]]
    makes_run: bool
    fresh_output: bool
    finished: Callable[[Path], bool]
    progress: Callable[[Path], dict]


def _finetune_command(job: Job) -> list[str]:
    args = [a for a in job.overrides if not (job.resume and a == "--overwrite")]
    return ["finetune", *([job.preset] if job.preset else []), *args, "--no-progress", *(["--resume"] if job.resume else [])]


def _training_progress(run_dir: Path) -> dict:
    """A run folder's latest metrics (runs.read_metrics) and its total steps (config.yaml)."""
    rows = runs.read_metrics(run_dir)
    train = [r for r in rows if "loss" in r]
    cfg = runs.read_run_config(run_dir)
    last = train[-1] if train else {}
    return {"step": last.get("step", 0), "steps": cfg.train.steps if cfg else None, "loss": last.get("loss"),
            "tokens_per_s": last.get("tokens_per_s"), "memory_gb": last.get("memory_gb"),
            "train": [(r["step"], r["loss"]) for r in train],
            "eval": [(r["step"], r["eval_loss"]) for r in rows if "eval_loss" in r]}


def _no_progress(out: Path) -> dict:
    """An evaluation reports no steps; its log says how far it is."""
    return {"step": 0, "steps": None, "loss": None, "tokens_per_s": None, "memory_gb": None, "train": [], "eval": []}


JOB_KINDS: dict[str, JobKind] = {k.name: k for k in (
    JobKind("finetune",
            arguments=lambda name, out, args, overwrite: [*args, f"output_dir={out}", f"name={name}",
                                                          *(["--overwrite"] if overwrite else [])],
            command=_finetune_command, makes_run=True, fresh_output=True, finished=runs.is_run,
            progress=_training_progress),
    # Rerunning an evaluation resumes it (answers and judgments are kept); its config names its folder.
    JobKind("eval",
            arguments=lambda name, out, args, overwrite: list(args),
            command=lambda job: ["eval", "run", *job.overrides], makes_run=False, fresh_output=False,
            finished=lambda out: (out / "leaderboard.json").is_file(), progress=_no_progress),
)}
KINDS = tuple(JOB_KINDS)


def job_kind(name: str) -> JobKind:
    """The kind called `name`; UserError for one that does not exist."""
    if name not in JOB_KINDS:
        raise UserError(f'job kind "{name}" is not one of {", ".join(JOB_KINDS)}')
    return JOB_KINDS[name]


def _alive(pid: int | None) -> bool:
    if not pid:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie child of ours counts as gone
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except (OSError, IndexError):
        return True


def job_environment(environ: dict[str, str]) -> dict[str, str]:
    """`environ` without the variables that look secret (SECRET_NAME, SECRET_VALUE)."""
    return {k: v for k, v in environ.items() if not SECRET_NAME.search(k) and not SECRET_VALUE.search(v)}


class JobManager:
    """The job queue over one SQLite file. `tick()` advances it; `start()` runs tick in a thread."""

    def __init__(self, db_path: str | Path, logs_dir: str | Path, max_running_per_device: int = 1,
                 python: str = sys.executable, env: dict[str, dict[str, str]] | None = None,
                 on_finish: Callable[[Job], str | None] | None = None, max_active: int | None = None,
                 max_active_per_owner: int | None = None):
        """`env`: extra environment by job kind ({"eval": {"OPENAI_API_KEY": ...}}); secrets such as
        API keys go here, never into the database or the command line, and only to the kind that
        needs them. `on_finish(job)` runs in the scheduler after a job settles (done, failed or
        cancelled); what it returns is stored as the job's note. `max_active`: jobs queued or running
        at once (None: no limit); `max_active_per_owner`: the same per owner (jobs without an owner
        count only towards `max_active`)."""
        self.db_path, self.logs_dir = Path(db_path), Path(logs_dir)
        self.logs_dir.mkdir(parents=True, exist_ok=True)
        self.max_running = max_running_per_device
        self.max_active, self.max_active_per_owner = max_active, max_active_per_owner
        self.python = python
        self.env = {kind: dict(values) for kind, values in (env or {}).items()}
        self.on_finish = on_finish
        self._children: dict[int, subprocess.Popen] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        with self._db() as db:
            db.executescript(SCHEMA)
            have = {r["name"] for r in db.execute("PRAGMA table_info(jobs)")}
            for column, decl in LATER_COLUMNS.items():
                if column not in have:
                    db.execute(f"ALTER TABLE jobs ADD COLUMN {column} {decl}")
        self.reconcile()

    def _db(self) -> sqlite3.Connection:
        db = sqlite3.connect(self.db_path, timeout=30, isolation_level=None)
        db.execute("PRAGMA journal_mode=WAL")
        db.row_factory = sqlite3.Row
        return db

    # ── queries ──
    def get(self, job_id: int) -> Job:
        with self._db() as db:
            row = db.execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone()
        if row is None:
            raise UserError(f"no job {job_id}")
        return _job(row)

    def jobs(self) -> list[Job]:
        with self._db() as db:
            return [_job(r) for r in db.execute("SELECT * FROM jobs ORDER BY id DESC")]

    # ── changes ──
    def submit(self, name: str, run_dir: str | Path, preset: str | None = None, overrides: list[str] = (),
               device: str = "default", overwrite: bool = False, kind: str = "finetune",
               owner: str | None = None) -> Job:
        """Queue a job for `owner` (a login, or None). The settings must already be validated by the
        caller (the Builder shows errors next to the fields); here only the queue's bounds and the
        output folder's ownership are checked.

        finetune: `preset` and `overrides` are the recipe's arguments; `run_dir` its output folder.
        eval: `overrides` is [CONFIG.yaml]; `run_dir` the evaluation's output folder (its `out`)."""
        spec = job_kind(kind)
        run_dir = str(Path(run_dir).resolve())
        with self._lock, self._db() as db:
            self._check_room(db, owner)
            busy = db.execute("SELECT id FROM jobs WHERE run_dir = ? AND status IN ('queued', 'running')", (run_dir,)).fetchone()
            if busy:
                raise UserError(f"job {busy['id']} is already writing {run_dir}")
            if spec.fresh_output and Path(run_dir).is_dir() and any(Path(run_dir).iterdir()) and not overwrite:
                raise UserError(f"{run_dir} already holds a run; choose another name, or overwrite it")
            args = spec.arguments(name, run_dir, list(overrides), overwrite)
            cur = db.execute(
                "INSERT INTO jobs (name, preset, overrides, run_dir, device, status, log_path, created, resume, kind, owner) "
                "VALUES (?, ?, ?, ?, ?, 'queued', '', ?, 0, ?, ?)",
                (name, preset, json.dumps(args), run_dir, device, time.time(), kind, owner))
            job_id = cur.lastrowid
            db.execute("UPDATE jobs SET log_path = ? WHERE id = ?", (str(self.logs_dir / f"job-{job_id}.log"), job_id))
        return self.get(job_id)

    def cancel(self, job_id: int) -> Job:
        """Queued: cancelled at once. Running: SIGTERM, the recipe checkpoints and stops."""
        job = self.get(job_id)
        with self._lock, self._db() as db:
            if job.status == "queued":
                db.execute("UPDATE jobs SET status = 'cancelled', finished = ? WHERE id = ?", (time.time(), job_id))
            elif job.status == "running":
                db.execute("UPDATE jobs SET cancel = 1 WHERE id = ?", (job_id,))
                if _alive(job.pid):
                    os.killpg(job.pid, signal.SIGTERM)
            else:
                raise UserError(f"job {job_id} is {job.status}; nothing to cancel")
        return self.get(job_id)

    def resume(self, job_id: int) -> Job:
        """Put a cancelled or failed job back in the queue; it continues from its last checkpoint."""
        job = self.get(job_id)
        if job.status not in ("cancelled", "failed"):
            raise UserError(f"job {job_id} is {job.status}; only cancelled or failed jobs can be resumed")
        has_ckpt = runs.latest_checkpoint(Path(job.run_dir)) is not None
        with self._lock, self._db() as db:
            self._check_room(db, job.owner)
            db.execute("UPDATE jobs SET status = 'queued', resume = ?, cancel = 0, error = NULL, finished = NULL, pid = NULL "
                       "WHERE id = ?", (int(has_ckpt), job_id))
        return self.get(job_id)

    def _check_room(self, db, owner: str | None) -> None:
        """Refuse one more queued job when the queue, or the owner's share of it, is full. Called
        under the lock, so two submissions cannot both take the last place."""
        active = "status IN ('queued', 'running')"
        if self.max_active is not None:
            n = db.execute(f"SELECT COUNT(*) FROM jobs WHERE {active}").fetchone()[0]
            if n >= self.max_active:
                raise UserError(f"the job queue is full ({n} jobs queued or running, this server's limit is "
                                f"{self.max_active}); wait for one to finish, or cancel one of yours")
        if self.max_active_per_owner is not None and owner is not None:
            n = db.execute(f"SELECT COUNT(*) FROM jobs WHERE {active} AND owner = ?", (owner,)).fetchone()[0]
            if n >= self.max_active_per_owner:
                raise UserError(f"{owner} has {n} jobs queued or running, the limit per login is "
                                f"{self.max_active_per_owner}; wait for one to finish, or cancel one")

    # ── the scheduler ──
    def reconcile(self) -> list[int]:
        """Jobs marked running whose process is gone (e.g. the server restarted) are settled.
        Returns their ids."""
        settled = []
        with self._lock, self._db() as db:
            for row in db.execute("SELECT * FROM jobs WHERE status = 'running'").fetchall():
                job = _job(row)
                if job.id in self._children or _alive(job.pid):
                    continue
                done = job_kind(job.kind).finished(Path(job.run_dir))
                db.execute("UPDATE jobs SET status = ?, finished = ?, error = ? WHERE id = ?",
                           ("done" if done else "failed", time.time(),
                            None if done else "the job's process ended while the server was away; see the log",
                            job.id))
                settled.append(job.id)
        return settled

    def tick(self) -> None:
        """Collect finished children, then start queued jobs where a device is free; then run
        `on_finish` for the jobs that settled."""
        settled = []
        with self._lock, self._db() as db:
            for job_id, proc in list(self._children.items()):
                code = proc.poll()
                if code is None:
                    continue
                del self._children[job_id]
                job = _job(db.execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone())
                if code == 0:
                    status, error = "done", None
                elif job.cancel:
                    status, error = "cancelled", None
                else:
                    status, error = "failed", _last_error(job.log_tail(80)) or f"exit code {code}"
                db.execute("UPDATE jobs SET status = ?, error = ?, finished = ? WHERE id = ?", (status, error, time.time(), job_id))
                settled.append(job_id)
            running = {}
            for r in db.execute("SELECT device, COUNT(*) AS n FROM jobs WHERE status = 'running' GROUP BY device"):
                running[r["device"]] = r["n"]
            for row in db.execute("SELECT * FROM jobs WHERE status = 'queued' ORDER BY id").fetchall():
                job = _job(row)
                if running.get(job.device, 0) >= self.max_running:
                    continue
                self._start(db, job)
                running[job.device] = running.get(job.device, 0) + 1
        settled += self.reconcile()
        for job_id in settled:
            self._finished(job_id)

    def _finished(self, job_id: int) -> None:
        if self.on_finish is None:
            return
        try:
            note = self.on_finish(self.get(job_id))
        except Exception as e:  # noqa: BLE001 — the hook must not stop the scheduler; its failure is the note
            note = f"after-job step failed: {type(e).__name__}: {e}"
        if note:
            with self._db() as db:
                db.execute("UPDATE jobs SET note = ? WHERE id = ?", (note, job_id))

    def _start(self, db, job: Job) -> None:
        # The installed console entry, not a source tree on PYTHONPATH: what `chatbuild` runs here, the
        # job runs too (a wheel install included).
        cmd = [self.python, "-m", "chatbuild.cli", *job_kind(job.kind).command(job)]
        env = {**job_environment(dict(os.environ)), **self.env.get(job.kind, {}), "PYTHONUNBUFFERED": "1"}
        log = open(job.log_path, "a")
        log.write(f"$ {' '.join(cmd)}\n")
        log.flush()
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
                                start_new_session=True)
        log.close()
        self._children[job.id] = proc
        db.execute("UPDATE jobs SET status = 'running', pid = ?, started = ? WHERE id = ?", (proc.pid, time.time(), job.id))

    def start(self, interval: float = 1.0) -> None:
        """Advance the queue in a background thread until `stop()`."""
        def tick():
            try:
                self.tick()
            except Exception:  # noqa: BLE001 — one bad tick (a locked database, a failed spawn) must not stop the queue for good
                log.exception("job queue: tick failed; trying again in %.1fs", interval)

        def loop():
            while not self._stop.wait(interval):
                tick()

        tick()
        self._thread = threading.Thread(target=loop, name="chatbuild-jobs", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread:
            self._thread.join(timeout=5)

    def wait(self, job_id: int, timeout: float = 600, poll: float = 0.2) -> Job:
        """Tick until the job has finished (for tests and scripts)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self.tick()
            job = self.get(job_id)
            if job.status in FINISHED:
                return job
            time.sleep(poll)
        raise TimeoutError(f"job {job_id} still {self.get(job_id).status} after {timeout}s")


def _job(row) -> Job:
    d = dict(row)
    d["overrides"] = json.loads(d["overrides"])
    d["resume"], d["cancel"] = bool(d["resume"]), bool(d["cancel"])
    return Job(**d)


def _last_error(log: str) -> str | None:
    """The line of a log that says why a run failed (our one-line errors, or a traceback's last line)."""
    for line in reversed(log.splitlines()):
        s = line.strip()
        if (s.startswith("chatbuild ") and ": error:" in s) or (": " in s and s.split(":")[0].endswith(("Error", "Exception", "Diverged"))):
            return s
    return None
