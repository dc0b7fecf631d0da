"""`chatbuild eval elo`: a leaderboard from battles JSONL files (judge verdicts, arena votes, or both).

    chatbuild eval elo battles.jsonl                       # the QLoRA paper's Elo, as a table
    chatbuild eval elo battles.jsonl --method bt --json    # Bradley–Terry with bootstrap intervals
    chatbuild eval elo judge.jsonl arena.jsonl --plot lb.png --markdown lb.md

Methods (the registry and the math: `chatbuild.ratings.METHODS`; the pictures: `chatbuild.leaderboard`):
- paper (default): start 1000, K=32, ties 0.5, mean over --permutations random orderings (10,000);
  interval: the paper's ±, a 95% interval of that mean (only the ordering noise), or with
  --bootstrap N percentile intervals over resampled battles;
- elo: online Elo in file order (K=--k); intervals only with --bootstrap;
- bt: Bradley–Terry maximum likelihood on the Elo scale (mean 1000, 400 points = 10:1 odds), ties
  as half a win, with --bootstrap rounds (default 100) for 95% intervals.

`--style-control`: Bradley–Terry with the two answers' style differences (length in characters,
markdown headers, list items, bold spans) as covariates, as LMSYS rates its arena (FastChat PR 3495):
style-adjusted ratings and the style coefficients, both with bootstrap intervals (--bootstrap, default
100). The battles must carry the answers or their style counts (`chatbuild.style`); older judge files
do not, and the command says so in one line.

`--by-category`: one leaderboard per question category (the battles' `category`, written by
`chatbuild eval judge` from the questions file; battles without one are "uncategorized").

`--json` prints exactly {"method": ..., "ratings": [{"model", "rating", "ci_low", "ci_high",
"battles"}, ...]}, best first, intervals null where there are none; with --style-control also
"style_control": true and "style": [{"feature", "coefficient", "ci_low", "ci_high", "elo", "sd"}, ...];
with --by-category {"method": ..., "categories": [{"category", "battles", "ratings", ...}, ...]}.
The table and --markdown also show "rank (UB)": 1 + the number of models whose interval lies
entirely above this model's.
"""

import argparse
import json
import math
import sys
from pathlib import Path

from chatbuild.errors import UserError
from chatbuild.leaderboard import interval_text, style_rows
from chatbuild.ratings import DEFAULT_METHOD, METHODS, PERMUTATIONS, K, method_choices


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("battles", nargs="+", metavar="BATTLES.jsonl", help="battles JSONL file(s); several are pooled")
    p.add_argument("--method", choices=tuple(METHODS), default=None,
                   help=f"rating method: {method_choices()} (default: {DEFAULT_METHOD}; bt with --style-control)")
    p.add_argument("--style-control", action="store_true",
                   help="Bradley-Terry with the answers' style (length, headers, lists, bold) as covariates: "
                        "style-adjusted ratings and the style coefficients (FastChat's style control)")
    p.add_argument("--by-category", action="store_true", help="one leaderboard per question category")
    p.add_argument("--permutations", type=int, default=PERMUTATIONS,
                   help=f"orderings averaged by --method paper (default: {PERMUTATIONS})")
    rounds = ", ".join(f"{m.bootstrap_rounds} for {name}" for name, m in METHODS.items())
    p.add_argument("--bootstrap", type=int, default=None, metavar="N",
                   help=f"bootstrap rounds for 95%% intervals (default: {rounds})")
    p.add_argument("--seed", type=int, default=0, help="random seed for orderings and resampling (default: 0)")
    p.add_argument("--k", type=float, default=K, help=f"Elo K factor for paper and elo (default: {K:g}, the paper's)")
    p.add_argument("--json", action="store_true", help="print the ratings as JSON instead of a table")
    p.add_argument("--plot", metavar="PNG", default=None, help="draw ratings with intervals and the win-rate heat map")
    p.add_argument("--markdown", metavar="MD", default=None, help="write the leaderboard as a Markdown table")
    p.add_argument("--skip-invalid", action="store_true", help="skip bad lines (counted) instead of stopping")


def load(paths: list[str], skip_invalid: bool = False) -> list[dict]:
    from chatbuild.battles import describe_skipped, read_battles

    battles = []
    for path in paths:
        got, skipped = read_battles(path, skip_invalid=skip_invalid)
        if skipped:
            print(f"{path}: {describe_skipped(skipped)}", file=sys.stderr)
        battles += got
    return battles


def as_json(method: str, rows) -> dict:
    """The --json shape."""
    return {"method": method, "ratings": [{"model": r.model, "rating": r.rating, "ci_low": _finite(r.ci_low),
                                           "ci_high": _finite(r.ci_high), "battles": r.battles} for r in rows]}


def _finite(x):
    return None if x is None or not math.isfinite(x) else x


def table(rows) -> str:
    """A plain-text leaderboard."""
    width = max(5, *(len(r.model) for r in rows))
    lines = [f"{'rank':>4}  {'model':<{width}}  {'rating':>7}  {'95% interval':>17}  {'battles':>7}"]
    for r in rows:
        lines.append(f"{r.rank:>4}  {r.model:<{width}}  {r.rating:>7.1f}  {interval_text(r):>17}  {r.battles:>7}")
    return "\n".join(lines)


def markdown(rows, title: str) -> str:
    lines = [f"{title}\n", "| Rank (UB) | Model | Rating | 95% interval | Battles |", "|---:|---|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r.rank} | {r.model} | {r.rating:.1f} | {interval_text(r)} | {r.battles} |")
    return "\n".join(lines) + "\n"


def leaderboard_files(battles: list[dict], method: str, permutations: int, bootstrap: int | None, seed: int,
                      k: float, plot_path=None, markdown_path=None, json_path=None):
    """Compute the leaderboard and write whichever files are asked for. Returns (rows, title)."""
    from chatbuild.leaderboard import caption, leaderboard_plot
    from chatbuild.ratings import leaderboard

    if permutations < 1 or (bootstrap is not None and bootstrap < 0) or k <= 0:
        raise UserError("--permutations must be >= 1, --bootstrap >= 0 and --k > 0")
    rows = leaderboard(battles, method, k=k, permutations=permutations, bootstrap_rounds=bootstrap, seed=seed)
    title = caption(method, len(battles), k, permutations, bootstrap)
    if json_path:
        Path(json_path).write_text(json.dumps(as_json(method, rows), indent=2) + "\n")
    if markdown_path:
        Path(markdown_path).parent.mkdir(parents=True, exist_ok=True)
        Path(markdown_path).write_text(markdown(rows, title))
    if plot_path:
        Path(plot_path).parent.mkdir(parents=True, exist_ok=True)
        leaderboard_plot(rows, battles, title).savefig(plot_path, bbox_inches="tight")
    return rows, title


UNCATEGORIZED = "uncategorized"


def by_category(battles: list[dict]) -> dict[str, list[dict]]:
    """Battles grouped by their `category` (sorted; those without one last, as UNCATEGORIZED)."""
    groups: dict[str, list[dict]] = {}
    for b in battles:
        category = b.get("category")
        groups.setdefault(category if isinstance(category, str) and category else UNCATEGORIZED, []).append(b)
    return dict(sorted(groups.items(), key=lambda kv: (kv[0] == UNCATEGORIZED, kv[0])))


def style_json(coefficients) -> list[dict]:
    return [{"feature": c.feature, "coefficient": c.value, "ci_low": c.ci_low, "ci_high": c.ci_high, "elo": c.elo,
             "sd": c.sd} for c in coefficients]


def style_table(coefficients) -> str:
    """The style coefficients as plain text."""
    lines = ["style coefficients (log-odds of winning per sd of the normalized difference; in Elo points)",
             f"{'feature':<10}  {'coef':>7}  {'95% interval':>17}  {'Elo':>7}"]
    for c in coefficients:
        if c.value is None:
            lines.append(f"{c.feature:<10}  {'–':>7}  {'(never varied)':>17}  {'–':>7}")
            continue
        interval = "–" if c.ci_low is None else f"{c.ci_low:.3f} – {c.ci_high:.3f}"
        lines.append(f"{c.feature:<10}  {c.value:>7.3f}  {interval:>17}  {c.elo:>+7.1f}")
    return "\n".join(lines)


def style_markdown(coefficients) -> str:
    lines = ["| Style feature | Coefficient (log-odds per sd) | 95% interval | Elo points |", "|---|---:|---:|---:|"]
    lines += style_rows(coefficients, digits=3, elo_digits=1)
    return "\n".join(lines) + "\n"


def rate(battles: list[dict], args: argparse.Namespace):
    """(rows, title, style coefficients or None) for these battles, as the flags ask."""
    from chatbuild.leaderboard import style_caption
    from chatbuild.ratings import style_leaderboard

    if args.style_control:
        rounds = 100 if args.bootstrap is None else args.bootstrap
        if rounds < 0:
            raise UserError("--bootstrap must be >= 0")
        rows, coefficients = style_leaderboard(battles, bootstrap_rounds=rounds, seed=args.seed)
        return rows, style_caption(len(battles), rounds), coefficients
    rows, title = leaderboard_files(battles, args.method, args.permutations, args.bootstrap, args.seed, args.k)
    return rows, title, None


def leaderboards(battles: list[dict], args: argparse.Namespace) -> tuple[dict, dict, dict]:
    """(groups, results, JSON) for the battles as the flags ask (`rate`): one leaderboard, or with
    `by_category` one per category; `results` maps a category (None for all) to (rows, title, style
    coefficients or None), the JSON is what --json prints."""
    groups = by_category(battles) if args.by_category else {None: battles}
    results = {category: rate(group, args) for category, group in groups.items()}
    if args.by_category:
        out = {"method": args.method, "categories": []}
        for category, (rows, _, coefficients) in results.items():
            entry = {"category": category, "battles": len(groups[category]), **as_json(args.method, rows)}
            del entry["method"]
            if coefficients is not None:
                entry["style"] = style_json(coefficients)
            out["categories"].append(entry)
    else:
        rows, title, coefficients = results[None]
        out = as_json(args.method, rows)
        if coefficients is not None:
            out.update(style_control=True, style=style_json(coefficients))
    return groups, results, out


def describe_leaderboards(groups: dict, results: dict) -> str:
    """`leaderboards`' results as plain-text tables (a heading per category)."""
    lines = []
    for category, (rows, title, coefficients) in results.items():
        if category is not None:
            lines.append(f"\n== category: {category} ({len(groups[category])} battles)")
        lines += [title, table(rows)]
        if coefficients is not None:
            lines.append(style_table(coefficients))
    return "\n".join(lines)


def write_markdown(path, results: dict) -> None:
    """Every leaderboard of `results` (and its style coefficients) as Markdown sections."""
    sections = []
    for category, (rows, title, coefficients) in results.items():
        text = markdown(rows, title if category is None else f"### {category}\n\n{title}")
        sections.append(text + ("\n" + style_markdown(coefficients) if coefficients is not None else ""))
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text("\n".join(sections))


def run(args: argparse.Namespace) -> int:
    if args.style_control and args.method not in (None, "bt"):
        raise UserError(f"--style-control is Bradley-Terry with style covariates; it does not combine with "
                        f"--method {args.method}")
    if args.by_category and args.plot:
        raise UserError("--plot draws one leaderboard; leave it out with --by-category (--markdown has every category)")
    args.method = args.method or ("bt" if args.style_control else DEFAULT_METHOD)
    battles = load(args.battles, args.skip_invalid)
    groups, results, out = leaderboards(battles, args)
    if args.markdown:
        write_markdown(args.markdown, results)
    if args.plot:
        from chatbuild.leaderboard import leaderboard_plot

        rows, title, _ = results[None]
        Path(args.plot).parent.mkdir(parents=True, exist_ok=True)
        leaderboard_plot(rows, battles, title).savefig(args.plot, bbox_inches="tight")
    if args.json:
        print(json.dumps(out))
    else:
        print(describe_leaderboards(groups, results))
    for what, path in (("plot", args.plot), ("markdown", args.markdown)):
        if path:
            print(f"{what}: {path}", file=sys.stderr if args.json else sys.stdout)
    return 0
