"""The SQLite store: battles (arena votes and judge verdicts alike) and the judge's raw replies.

One database file (WAL mode, so the web server, a judge run and readers can share it) holds:

    battles     one row per battle, in the battles JSONL shape (`chatbuild.battles`): the FastChat
                clean-battle fields as columns, everything else (arena conversations, generation
                params, a judge's per-order verdicts) as a JSON object in `extra`. `source` says
                where it came from: "human" (an arena vote), "judge" (an LLM judge), or "import".
    judgments   one row per judge request (one question, two answers in one order): the verdict in
                displayed positions ("A" = the answer shown first) and the judge's whole reply.
    grades      one row per single-answer grading request (`eval judge --mode single`): the 1-10
                grade (NULL when the reply had no valid grade) and the judge's whole reply.

Other owners keep their own tables in the same file (`chatbuild.arena`: rounds and chat feedback),
each created with `CREATE TABLE IF NOT EXISTS` when it connects.

A battle's `key` is the SHA-256 of its normalized record (`battle_record`), so storing the same
battle twice, or importing an exported file back, adds nothing.

Writers take a connection, so a caller can put its own checks and the insert in one transaction
(`with transaction(path) as conn: ...`); readers take the database path.
"""

import contextlib
import hashlib
import json
import os
import sqlite3
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from chatbuild.battles import WINNERS, battle_problem, read_battles, write_battles
from chatbuild.errors import UserError

SCHEMA = f"""
CREATE TABLE IF NOT EXISTS battles (
    id          INTEGER PRIMARY KEY AUTOINCREMENT,
    key         TEXT NOT NULL UNIQUE,   -- sha256 of the normalized record
    source      TEXT NOT NULL,          -- human | judge | import
    question_id,                        -- no declared type: ints stay ints, strings stay strings
    model_a     TEXT NOT NULL,
    model_b     TEXT NOT NULL,
    winner      TEXT NOT NULL CHECK (winner IN ({", ".join(f"'{w}'" for w in WINNERS)})),
    judge       TEXT,                   -- the judge model, or "human"
    anony       INTEGER,                -- arena: 1 if the names were hidden until the vote
    tstamp      REAL,                   -- unix time of the vote or verdict
    extra       TEXT NOT NULL           -- JSON object: all other fields of the record
);
CREATE INDEX IF NOT EXISTS battles_by_source ON battles (source);
CREATE TABLE IF NOT EXISTS judgments (
    key         TEXT PRIMARY KEY,       -- one request: judge, both models in order, the exact prompt
    judge       TEXT NOT NULL,
    question_id,
    model_1     TEXT NOT NULL,          -- the answer shown first ("Assistant A")
    model_2     TEXT NOT NULL,          -- the answer shown second ("Assistant B")
    verdict     TEXT NOT NULL CHECK (verdict IN ('A', 'B', 'tie', 'invalid')),
    raw         TEXT NOT NULL,          -- the judge's whole reply
    tstamp      REAL NOT NULL,
    extra       TEXT NOT NULL           -- JSON object: prompt version, latency, token usage
);
CREATE TABLE IF NOT EXISTS grades (
    key         TEXT PRIMARY KEY,       -- one request: judge, model, the exact prompt
    judge       TEXT NOT NULL,
    question_id,
    model       TEXT NOT NULL,          -- whose answer was graded
    grade       INTEGER CHECK (grade IS NULL OR grade BETWEEN 1 AND 10),  -- NULL: no valid grade
    raw         TEXT NOT NULL,          -- the judge's whole reply
    tstamp      REAL NOT NULL,
    extra       TEXT NOT NULL           -- JSON object: prompt version, latency, token usage
);
"""
COLUMNS = ("question_id", "model_a", "model_b", "winner", "judge", "anony", "tstamp")


def default_path() -> Path:
    """$CHATBUILD_HOME/chatbuild.sqlite ($CHATBUILD_HOME defaults to ~/.cache/chatbuild)."""
    return Path(os.environ.get("CHATBUILD_HOME", Path.home() / ".cache" / "chatbuild")) / "chatbuild.sqlite"


# ── connections ────────────────────────────────────────────────────────────────────────────────
def connect(path: str | Path) -> sqlite3.Connection:
    """Open (creating if needed) the database with its battles and judgments tables. Python's
    default transaction handling: the caller commits (or rolls back) and closes."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:  # a file where the folder should be, a path under /proc, no permission
        raise UserError(f"{path}: cannot create the database's folder ({e.strerror or e})") from None
    try:
        conn = sqlite3.connect(path, timeout=30)
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=NORMAL")  # with WAL: safe across crashes, fsync only at checkpoints
        conn.executescript(SCHEMA)
    except sqlite3.DatabaseError as e:
        raise UserError(f"{path}: cannot open the database ({e})") from None
    return conn


def check_writable(path: str | Path, room: int = 1 << 20) -> None:
    """Raise UserError unless the database at `path` can be created and written, with `room` bytes
    free beside it. A server calls this at start, so that a full disk or a read-only folder is
    reported in one line before any model loads, not as a failure at the first vote. The room is
    probed by writing (and fsyncing, then deleting) a file of that size: free-space figures lie on
    quota'd and copy-on-write file systems, a write does not."""
    path = Path(path)
    if path.parent.exists() and not path.parent.is_dir():
        raise UserError(f"{path}: {path.parent} is a file, not a folder; give --db a file in a writable folder")
    probe = path.parent / f".{path.name}.write-probe"
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(probe, "wb") as f:
            f.write(bytes(room))
            f.flush()
            os.fsync(f.fileno())
    except OSError as e:
        raise UserError(f"{path}: the database cannot be written there ({e.strerror or e}); free some space, "
                        "or give a writable file with --db") from None
    finally:
        with contextlib.suppress(OSError):
            probe.unlink(missing_ok=True)
    connect(path).close()


@contextlib.contextmanager
def transaction(path: str | Path) -> Iterator[sqlite3.Connection]:
    """A connection whose work is committed on exit (rolled back on an exception), then closed."""
    conn = connect(path)
    try:
        yield conn
        conn.commit()
    except BaseException:
        conn.rollback()
        raise
    finally:
        conn.close()


# ── battles ────────────────────────────────────────────────────────────────────────────────────
def battle_record(record: dict, source: str | None = None) -> dict:
    """The normalized form of a battle, as stored and exported: top-level None values dropped,
    `anony` a bool, an integer `tstamp` a float, and `source` set (the record's own `source` wins
    over the argument; "import" if neither)."""
    out = {k: v for k, v in record.items() if v is not None}
    out["source"] = out.get("source") or source or "import"
    if "anony" in out:
        out["anony"] = bool(out["anony"])
    if isinstance(out.get("tstamp"), int) and not isinstance(out["tstamp"], bool):
        out["tstamp"] = float(out["tstamp"])  # stored as REAL; keeps the key stable across export/import
    return out


def battle_key(record: dict) -> str:
    return hashlib.sha256(json.dumps(record, sort_keys=True, ensure_ascii=False).encode()).hexdigest()


def add_battles(conn: sqlite3.Connection, records: Iterable[dict], source: str | None = None) -> int:
    """Insert battles (validated like a battles file; ValueError if one is not) in the caller's
    transaction. Returns how many were new; already stored ones are left alone."""
    rows = []
    for i, rec in enumerate(records):
        problem = battle_problem(rec)
        if problem:
            raise ValueError(f"battle {i}: {problem[1]}")
        rec = battle_record(rec, source)
        extra = {k: v for k, v in rec.items() if k not in COLUMNS and k != "source"}
        rows.append((battle_key(rec), rec["source"], *(_column(rec.get(c)) for c in COLUMNS),
                     json.dumps(extra, ensure_ascii=False)))
    before = conn.total_changes
    conn.executemany(f"INSERT OR IGNORE INTO battles (key, source, {', '.join(COLUMNS)}, extra) "
                     f"VALUES ({', '.join('?' * (len(COLUMNS) + 3))})", rows)
    return conn.total_changes - before


def replace_battles(conn: sqlite3.Connection, records: list[dict], source: str) -> int:
    """Insert battles like `add_battles`, first removing stored battles of `source` with the same
    judge, question and models (model_a, model_b): a judge run's battle for a pair supersedes the one
    an earlier run stored, when the verdict or the fields a newer version writes (style counts,
    category) differ, instead of counting twice. "Same question" is the same `question_id` and, where
    both carry the user turns (`question`), the same turns: another question set that reuses the ids
    is left alone. Returns how many rows were inserted (a battle identical to the stored one counts:
    it is removed and inserted again)."""
    stale = []
    for rec in records:
        rows = conn.execute("SELECT id, extra FROM battles WHERE source = ? AND judge IS ? AND question_id IS ? "
                            "AND model_a = ? AND model_b = ?",
                            (source, rec.get("judge"), _column(rec.get("question_id")), rec["model_a"], rec["model_b"]))
        for row_id, extra in rows:
            turns = json.loads(extra).get("question")
            if turns is None or rec.get("question") is None or turns == rec["question"]:
                stale.append((row_id,))
    conn.executemany("DELETE FROM battles WHERE id = ?", stale)
    return add_battles(conn, records, source)


def add_battle(conn: sqlite3.Connection, record: dict, source: str | None = None) -> bool:
    """Insert one battle; False if it was already stored."""
    return add_battles(conn, [record], source) == 1


def list_battles(path: str | Path, source: str | Sequence[str] | None = None, anony: bool | None = None,
                 named: bool = True) -> list[dict]:
    """Stored battles as normalized records, oldest first; optionally only from `source`(s), or
    only anonymous (anony=True) / named (anony=False) arena battles. `named=False` leaves out the
    battles marked named (anony false: votes cast after the voter picked both models by name) and
    keeps those without the mark (judge verdicts, most imports): what a leaderboard should rate."""
    where, args = [], []
    if source is not None:
        sources = [source] if isinstance(source, str) else list(source)
        where.append(f"source IN ({', '.join('?' * len(sources))})")
        args += sources
    if anony is not None:
        where.append("anony = ?")
        args.append(int(anony))
    if not named:
        where.append("(anony IS NULL OR anony != 0)")
    sql = (f"SELECT source, {', '.join(COLUMNS)}, extra FROM battles"
           + (f" WHERE {' AND '.join(where)}" if where else "") + " ORDER BY id")
    with contextlib.closing(connect(path)) as conn:
        return [_record(row) for row in conn.execute(sql, args)]


def export_battles(path: str | Path, out: str | Path, source=None, anony: bool | None = None) -> int:
    """Write stored battles to a battles JSONL file `out`; returns the count."""
    return write_battles(out, list_battles(path, source, anony))


def import_battles(path: str | Path, file: str | Path, source: str = "import",
                   skip_invalid: bool = False) -> tuple[int, int, Counter]:
    """Read a battles JSONL `file` into the database. Returns (added, already stored, skipped lines
    by reason). Records without their own `source` field get `source`."""
    records, skipped = read_battles(file, skip_invalid=skip_invalid)
    with transaction(path) as conn:
        added = add_battles(conn, records, source)
    return added, len(records) - added, skipped


# ── judgments ──────────────────────────────────────────────────────────────────────────────────
@dataclass
class Judgment:
    """One judge request and its reply. `verdict` is in displayed positions: "A" means the answer
    shown first (model_1) is better, "B" the second, "tie", or "invalid" (no verdict marker found)."""

    key: str
    judge: str
    question_id: object
    model_1: str
    model_2: str
    verdict: str
    raw: str
    tstamp: float
    extra: dict = field(default_factory=dict)


def add_judgment(conn: sqlite3.Connection, j: Judgment) -> None:
    """Insert (or replace) a judgment in the caller's transaction."""
    conn.execute("INSERT OR REPLACE INTO judgments VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                 (j.key, j.judge, _column(j.question_id), j.model_1, j.model_2, j.verdict, j.raw, j.tstamp,
                  json.dumps(j.extra, ensure_ascii=False)))


def get_judgments(path: str | Path, keys: Iterable[str] | None = None) -> dict[str, Judgment]:
    """Stored judgments by key: all of them, or those among `keys` that exist."""
    sql = "SELECT key, judge, question_id, model_1, model_2, verdict, raw, tstamp, extra FROM judgments"
    with contextlib.closing(connect(path)) as conn:
        if keys is None:
            rows = conn.execute(sql).fetchall()
        else:
            keys, rows = list(keys), []
            for start in range(0, len(keys), 500):  # stay below SQLite's limit on bound parameters
                part = keys[start:start + 500]
                rows += conn.execute(f"{sql} WHERE key IN ({', '.join('?' * len(part))})", part).fetchall()
    return {r[0]: Judgment(*r[:8], extra=json.loads(r[8])) for r in rows}


# ── grades ─────────────────────────────────────────────────────────────────────────────────────
@dataclass
class Grade:
    """One single-answer grading request and its reply: `grade` 1-10, or None when the reply held no
    valid grade marker (`eval.judge.parse_grade`)."""

    key: str
    judge: str
    question_id: object
    model: str
    grade: int | None
    raw: str
    tstamp: float
    extra: dict = field(default_factory=dict)


def add_grade(conn: sqlite3.Connection, g: Grade) -> None:
    """Insert (or replace) a grade in the caller's transaction."""
    conn.execute("INSERT OR REPLACE INTO grades VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                 (g.key, g.judge, _column(g.question_id), g.model, g.grade, g.raw, g.tstamp,
                  json.dumps(g.extra, ensure_ascii=False)))


def get_grades(path: str | Path, keys: Iterable[str] | None = None) -> dict[str, Grade]:
    """Stored grades by key: all of them, or those among `keys` that exist."""
    sql = "SELECT key, judge, question_id, model, grade, raw, tstamp, extra FROM grades"
    with contextlib.closing(connect(path)) as conn:
        if keys is None:
            rows = conn.execute(sql).fetchall()
        else:
            keys, rows = list(keys), []
            for start in range(0, len(keys), 500):
                part = keys[start:start + 500]
                rows += conn.execute(f"{sql} WHERE key IN ({', '.join('?' * len(part))})", part).fetchall()
    return {r[0]: Grade(*r[:7], extra=json.loads(r[7])) for r in rows}


# ── helpers ────────────────────────────────────────────────────────────────────────────────────
def _column(value):
    """Python value → SQLite value: bools become 0/1, lists and dicts JSON text."""
    if isinstance(value, bool):
        return int(value)
    if value is None or isinstance(value, (int, float, str)):
        return value
    return json.dumps(value, ensure_ascii=False)


def _record(row: tuple) -> dict:
    source, *values, extra = row
    rec = {c: v for c, v in zip(COLUMNS, values) if v is not None}
    if "anony" in rec:
        rec["anony"] = bool(rec["anony"])
    rec["source"] = source
    rec.update(json.loads(extra))
    return rec
