"""Battles JSONL: the one table every leaderboard is computed from.

One JSON object per line, in FastChat's clean-battle shape (README, "Evaluation files"):

    {"question_id": 12, "model_a": "guanaco-7b", "model_b": "vicuna-13b",
     "winner": "model_a", "judge": "gpt-4", "tstamp": 1732000000.0, ...}

Required: `model_a`, `model_b` (two different non-empty strings) and `winner`, one of
`model_a`, `model_b`, `tie`, `tie (bothbad)`. Everything else is optional and carried along
(`question_id`, `judge`, `tstamp`, arena fields like `anony` and `conversation_a`, judge fields like
`order_verdicts`). Blank lines are ignored.

Bad lines are errors that name the file and line. With `skip_invalid=True` they are skipped
instead and counted by reason, so a caller can report "skipped 3 lines: 2 self-battle, 1 unknown
winner". A file with no battles left is always an error.
"""

import json
import os
import tempfile
from collections import Counter
from pathlib import Path

from chatbuild.data.sources import read_jsonl
from chatbuild.errors import UserError, where

WINNERS = ("model_a", "model_b", "tie", "tie (bothbad)")


def battle_problem(obj) -> tuple[str, str] | None:
    """(reason, message) if `obj` is not a valid battle, else None. Reasons are short, countable
    labels ("not an object", "missing field", "bad model name", "unknown winner", "self-battle")."""
    if not isinstance(obj, dict):
        return "not an object", f"a battle must be a JSON object, got {type(obj).__name__}"
    for field in ("model_a", "model_b", "winner"):
        if field not in obj:
            return "missing field", f'missing field "{field}"'
    for field in ("model_a", "model_b"):
        if not isinstance(obj[field], str) or not obj[field].strip():
            return "bad model name", f'field "{field}" must be a non-empty string, got {obj[field]!r}'
    if obj["winner"] not in WINNERS:
        return "unknown winner", f'field "winner" is {obj["winner"]!r}; expected one of {", ".join(WINNERS)}'
    if obj["model_a"] == obj["model_b"]:
        return "self-battle", f'model_a and model_b are both "{obj["model_a"]}" (a model cannot battle itself)'
    return None


def read_battles(path: str | Path, skip_invalid: bool = False) -> tuple[list[dict], Counter]:
    """Read a battles JSONL file. Returns (battles, skipped) where `skipped` counts skipped lines by
    reason (always empty unless `skip_invalid`). Raises UserError naming file:line otherwise."""
    path = Path(path)
    battles, skipped = [], Counter()

    def refuse(n: int, reason: str, message: str) -> None:
        if not skip_invalid:
            raise UserError(f"{where(path, n)}: {message} (use --skip-invalid to skip such lines)")
        skipped[reason] += 1

    def not_json(n: int, detail: str, last: bool) -> None:
        refuse(n, "not JSON", f"not valid JSON ({detail})")

    for n, obj in read_jsonl(path, "battles file", not_json):
        problem = battle_problem(obj)
        if problem:
            refuse(n, *problem)
        else:
            battles.append(obj)
    if not battles:
        detail = f" ({describe_skipped(skipped)})" if skipped else ""
        raise UserError(f"{path}: no battles in this file{detail}")
    return battles, skipped


def describe_skipped(skipped: Counter) -> str:
    """'skipped 3 lines: 2 self-battle, 1 unknown winner' (or '' when nothing was skipped)."""
    total = sum(skipped.values())
    if not total:
        return ""
    parts = ", ".join(f"{n} {reason}" for reason, n in skipped.most_common())
    return f"skipped {total} line{'s' if total != 1 else ''}: {parts}"


def write_battles(path: str | Path, battles) -> int:
    """Write battles as JSONL (atomically: a reader never sees half a file). Returns the count."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    n = 0
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            for b in battles:
                f.write(json.dumps(b, ensure_ascii=False) + "\n")
                n += 1
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return n
