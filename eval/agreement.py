"""`chatbuild eval agreement`: does the LLM judge agree with people, and is it biased where they are not?

    chatbuild eval agreement ~/.cache/chatbuild/chatbuild.sqlite          # arena votes vs judge verdicts
    chatbuild eval agreement human.jsonl gpt4.jsonl --humans 'expert_*' --judges gpt4_pair --json

Inputs: SQLite databases of `chatbuild serve` / `chatbuild eval judge` (every stored battle) and battles
JSONL files, pooled. A human vote and a judge verdict are compared when they are on the same models
and question: the same user turns, or the same `question_id` (and `turn`). Reported per judge:
agreement and Cohen's κ with ties as a third outcome and without ties; for the humans and each
judge: position bias (share of single judgments won by the answer shown first) and length bias
(share of decisive battles won by the longer answer). The definitions: `chatbuild.agreement`.

`--json` prints {"human_battles", "judge_battles", "agreements": [{"judge", "pairs", "agreement",
"kappa", "pairs_without_ties", "agreement_without_ties", "kappa_without_ties"}, ...], "biases":
[{"rater", "judgments", "first", "second", "tie", "decisive", "longer_won"}, ...]}, null where a
figure has no data.
"""

import argparse
import json
from dataclasses import asdict
from pathlib import Path

from chatbuild.errors import UserError

SQLITE_MAGIC = b"SQLite format 3\x00"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("inputs", nargs="+", metavar="DB_OR_FILE",
                   help="SQLite databases (chatbuild.sqlite, a judge run's .sqlite) and/or battles JSONL files")
    p.add_argument("--humans", action="append", default=None, metavar="PATTERN",
                   help='battles whose "judge" matches this glob are human votes (repeatable; default: '
                        'source or judge "human")')
    p.add_argument("--judges", action="append", default=None, metavar="PATTERN",
                   help='battles whose "judge" matches this glob are judge verdicts (repeatable; default: source "judge")')
    p.add_argument("--json", action="store_true", help="print the figures as JSON")
    p.add_argument("--skip-invalid", action="store_true", help="skip bad lines of JSONL files (counted)")


def load(paths: list[str], skip_invalid: bool = False) -> list[dict]:
    """Battles from databases (all stored ones) and battles JSONL files."""
    import sys

    from chatbuild import storage
    from chatbuild.battles import describe_skipped, read_battles

    battles = []
    for path in map(Path, paths):
        if not path.is_file():
            raise UserError(f"{path}: no such database or battles file")
        with open(path, "rb") as f:
            is_db = f.read(len(SQLITE_MAGIC)) == SQLITE_MAGIC
        if is_db:
            battles += storage.list_battles(path)
        else:
            got, skipped = read_battles(path, skip_invalid=skip_invalid)
            if skipped:
                print(f"{path}: {describe_skipped(skipped)}", file=sys.stderr)
            battles += got
    return battles


def run(args: argparse.Namespace) -> int:
    from chatbuild.agreement import agreement_report, describe

    report = agreement_report(load(args.inputs, args.skip_invalid), humans=args.humans, judges=args.judges)
    if args.json:
        print(json.dumps(asdict(report)))
        return 0
    if not report.human_battles or not report.judge_battles:
        missing = "human votes" if not report.human_battles else "judge verdicts"
        print(f"note: no {missing} among these battles, so there is nothing to compare "
              f"(pick them by their judge field with --humans / --judges)")
    print(describe(report))
    return 0
