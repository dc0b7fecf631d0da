"""Arena bookkeeping: the server-side rounds behind arena votes, and per-message chat feedback.

These tables live in the one SQLite database (`chatbuild.storage`, WAL mode) beside the `battles`
table that arena votes and judge verdicts share:

    arena_rounds    one row per round a UI session started: its id (the only handle the session
                    holds), the session, both models in display order (A = left), the anonymity
                    flag, and the last turn whose two answers are complete
    arena_votes     one row per vote; (round, turn) is the primary key, so a turn is voted at most once;
                    `voter` (the login, or the UI session without logins) for the vote rate limit
    chat_feedback   one row per like/dislike on a chat reply: the conversation up to that reply,
                    the model, the verdict

A vote (`record_vote`) is accepted only when its round belongs to the voting session, the turn's two
answers are complete, the turn has no vote yet, (anonymous rounds) the round had no vote at all, and
the voter cast fewer than `max_per_minute` votes in the last minute. The checks, the `arena_votes`
row and the battle are one transaction: a vote lands exactly once, and a burst of votes sent at
once cannot slip past the rate limit between a check and a write. The limit is counted in this
table rather than in memory for that reason, and so that it holds across restarts and across
servers sharing the database.

Vote → battle winner, with model_a the model shown on the left (position A), as FastChat does:
"a" → "model_a", "b" → "model_b", "tie" → "tie", "bothbad" → "tie (bothbad)". Battles carry
`judge: "human"`, `anony`, `tstamp`, `turn`, both conversations and the generation params, and
are stored with source "human".

Also the `chatbuild arena` command: `export --out battles.jsonl` and `import FILE`.
"""

import argparse
import contextlib
import json
import math
import sqlite3
import time
import uuid
from pathlib import Path

from chatbuild import storage
from chatbuild.errors import UserError

WINNER_OF_VOTE = {"a": "model_a", "b": "model_b", "tie": "tie", "bothbad": "tie (bothbad)"}

SCHEMA = """
CREATE TABLE IF NOT EXISTS arena_rounds (
    id        TEXT PRIMARY KEY,             -- random; held only in the session's server-side state
    session   TEXT NOT NULL,                -- the UI session (Gradio session hash) that started it
    model_a   TEXT NOT NULL,                -- shown on the left
    model_b   TEXT NOT NULL,                -- shown on the right
    anonymous INTEGER NOT NULL,
    created   REAL NOT NULL,
    answered  INTEGER NOT NULL DEFAULT 0,   -- the last turn whose two answers are complete
    closed    INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS arena_votes (
    round     TEXT NOT NULL REFERENCES arena_rounds (id),
    turn      INTEGER NOT NULL,
    vote      TEXT NOT NULL,                -- a | b | tie | bothbad
    tstamp    REAL NOT NULL,
    voter     TEXT,                         -- "login:NAME", or "session:HASH" without logins
    PRIMARY KEY (round, turn)
);
CREATE TABLE IF NOT EXISTS chat_feedback (
    id        INTEGER PRIMARY KEY AUTOINCREMENT,
    tstamp    REAL NOT NULL,
    session   TEXT NOT NULL,
    model     TEXT,
    idx       INTEGER NOT NULL,             -- index of the reply in the conversation (system message excluded)
    liked     INTEGER NOT NULL,             -- 1 like, 0 dislike
    messages  TEXT NOT NULL                 -- JSON: the conversation up to and including the reply
);
"""


@contextlib.contextmanager
def _transaction(db: str | Path):
    """`storage.transaction` with the arena tables in place, begun IMMEDIATE: the transaction holds
    the write lock from its first read, so checks and writes see no other writer in between."""
    with storage.transaction(db) as conn:
        conn.executescript(SCHEMA)  # commits nothing of ours: no transaction is open yet
        _add_voter_column(conn)
        conn.row_factory = _row_dict
        conn.execute("BEGIN IMMEDIATE")
        yield conn


def _add_voter_column(conn) -> None:
    """Databases made before votes had a voter get the column (and its index); old votes have none."""
    if "voter" not in [col[1] for col in conn.execute("PRAGMA table_info(arena_votes)")]:
        try:
            conn.execute("ALTER TABLE arena_votes ADD COLUMN voter TEXT")
        except sqlite3.OperationalError as e:  # another connection added it in between
            if "duplicate column" not in str(e):
                raise
    conn.execute("CREATE INDEX IF NOT EXISTS arena_votes_by_voter ON arena_votes (voter, tstamp)")


def _row_dict(cursor, row) -> dict:
    return {col[0]: value for col, value in zip(cursor.description, row)}


# ── rounds and votes ───────────────────────────────────────────────────────────────────────────
def open_round(db: str | Path, session: str, model_a: str, model_b: str, anonymous: bool) -> str:
    """Register a new round for `session` (model_a shown on the left); returns its id."""
    round_id = uuid.uuid4().hex
    with _transaction(db) as conn:
        conn.execute("INSERT INTO arena_rounds (id, session, model_a, model_b, anonymous, created) "
                     "VALUES (?, ?, ?, ?, ?, ?)", (round_id, session, model_a, model_b, int(anonymous), time.time()))
    return round_id


def mark_answered(db: str | Path, round_id: str, turn: int) -> None:
    """Turns up to `turn` have their two answers complete (and only those: a regenerated turn is
    marked `turn - 1` while its new answers stream)."""
    with _transaction(db) as conn:
        conn.execute("UPDATE arena_rounds SET answered = ? WHERE id = ? AND NOT closed", (turn, round_id))


def close_round(db: str | Path, round_id: str) -> None:
    with _transaction(db) as conn:
        conn.execute("UPDATE arena_rounds SET closed = 1 WHERE id = ?", (round_id,))


def record_vote(db: str | Path, round_id: str, session: str, turn: int, vote: str, conversation_a: list[dict],
                conversation_b: list[dict], generation: dict | None, voter: str | None = None,
                max_per_minute: int = 0) -> dict:
    """Store `vote` ("a", "b", "tie", "bothbad") on `turn` of a round as a battle, exactly once.
    Returns the battle record (it names both models). Raises UserError, storing nothing, when the
    round is not this session's, is closed, the turn's answers are not complete, the turn (an
    anonymous round: any turn) already has a vote, or `voter` (default: the session) already cast
    `max_per_minute` votes in the last 60 s (0: no limit)."""
    voter = voter or f"session:{session}"
    if vote not in WINNER_OF_VOTE:
        raise UserError(f'unknown vote "{vote}"; expected one of {", ".join(WINNER_OF_VOTE)}')
    with _transaction(db) as conn:
        row = conn.execute("SELECT * FROM arena_rounds WHERE id = ?", (round_id,)).fetchone()
        if row is None or row["session"] != session:
            raise UserError("This vote is not for a battle shown in this session.")
        voted = [v["turn"] for v in conn.execute("SELECT turn FROM arena_votes WHERE round = ?", (round_id,))]
        if row["closed"] or (row["anonymous"] and voted):
            raise UserError("This battle is over; start a new round.")
        if turn in voted or any(t > turn for t in voted):
            raise UserError("You already voted on this turn.")
        if row["answered"] < turn:
            raise UserError("Wait until both answers are complete before voting.")
        now = time.time()
        if max_per_minute > 0:
            recent, oldest = conn.execute("SELECT COUNT(*) AS n, MIN(tstamp) AS t FROM arena_votes "
                                          "WHERE voter = ? AND tstamp > ?", (voter, now - 60)).fetchone().values()
            if recent >= max_per_minute:
                wait = max(1, math.ceil(oldest + 60 - now))
                raise UserError(f"Too many votes: at most {max_per_minute} votes a minute per person; "
                                f"try again in {wait} s.")
        battle = {
            "question_id": f"arena-{round_id}-{turn}",
            "model_a": row["model_a"],
            "model_b": row["model_b"],
            "winner": WINNER_OF_VOTE[vote],
            "judge": "human",
            "anony": bool(row["anonymous"]),
            "tstamp": now,
            "turn": turn,
            "conversation_a": conversation_a,
            "conversation_b": conversation_b,
            "generation": generation,
        }
        conn.execute("INSERT INTO arena_votes (round, turn, vote, tstamp, voter) VALUES (?, ?, ?, ?, ?)",
                     (round_id, turn, vote, now, voter))
        storage.add_battle(conn, battle, source="human")
    return battle


# ── chat feedback ──────────────────────────────────────────────────────────────────────────────
def add_feedback(db: str | Path, session: str, model: str | None, messages: list[dict], index: int,
                 liked: bool) -> None:
    """Record a like (`liked=True`) or dislike of the reply at `index` of `messages`."""
    with _transaction(db) as conn:
        conn.execute("INSERT INTO chat_feedback (tstamp, session, model, idx, liked, messages) VALUES (?, ?, ?, ?, ?, ?)",
                     (time.time(), session, model, index, int(liked), json.dumps(messages, ensure_ascii=False)))


def feedback(db: str | Path) -> list[dict]:
    """All stored likes and dislikes, oldest first."""
    with _transaction(db) as conn:
        rows = conn.execute("SELECT * FROM chat_feedback ORDER BY id").fetchall()
    return [{"tstamp": r["tstamp"], "session": r["session"], "model": r["model"], "index": r["idx"],
             "liked": bool(r["liked"]), "messages": json.loads(r["messages"])} for r in rows]


# ── the `chatbuild arena` command ──────────────────────────────────────────────────────────────
def add_arguments(p: argparse.ArgumentParser) -> None:
    db = argparse.ArgumentParser(add_help=False)
    db.add_argument("--db", default=None, help="the SQLite database (default: $CHATBUILD_HOME/chatbuild.sqlite, "
                                               "$CHATBUILD_HOME defaulting to ~/.cache/chatbuild)")
    sub = p.add_subparsers(dest="action", metavar="ACTION", required=True)
    ex = sub.add_parser("export", parents=[db], help="write stored battles to a battles JSONL file")
    ex.add_argument("--out", required=True, help="the JSONL file to write")
    ex.add_argument("--source", action="append", choices=("human", "judge", "import"),
                    help="only battles from this source (repeatable; default: all)")
    ex.add_argument("--anonymous-only", action="store_true", help="only anonymous arena battles")
    im = sub.add_parser("import", parents=[db], help="add the battles of a battles JSONL file to the database")
    im.add_argument("file", help="a battles JSONL file (FastChat clean-battle shape)")
    im.add_argument("--source", default="import", choices=("human", "judge", "import"),
                    help='source for records that carry none (default: "import")')
    im.add_argument("--skip-invalid", action="store_true", help="skip bad lines instead of failing")


def run(args: argparse.Namespace) -> int:
    from chatbuild.battles import describe_skipped

    db = Path(args.db) if args.db else storage.default_path()
    if args.action == "export":
        n = storage.export_battles(db, args.out, source=args.source, anony=True if args.anonymous_only else None)
        print(f"wrote {n} battle{'' if n == 1 else 's'} from {db} to {args.out}")
        return 0
    added, known, skipped = storage.import_battles(db, args.file, source=args.source, skip_invalid=args.skip_invalid)
    note = f"; {describe_skipped(skipped)}" if skipped else ""
    print(f"imported {added} new battle{'' if added == 1 else 's'} from {args.file} into {db} "
          f"({known} already stored{note})")
    return 0
