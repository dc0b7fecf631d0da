"""`chatbuild eval elo`: a leaderboard from battles JSONL files (judge verdicts, arena votes, or both).

    chatbuild eval elo battles.jsonl                       # the QLoRA paper's Elo, as a table
    chatbuild eval elo battles.jsonl --method bt --json    # Bradley–Terry with bootstrap intervals
    chatbuild eval elo judge.jsonl arena.jsonl --plot lb.png --markdown lb.md

Methods (the math is `chatbuild.ratings`):
- paper (default): start 1000, K=32, ties 0.5, mean over --permutations random orderings (10,000);
  interval: the paper's ±, a 95% interval of that mean (only the ordering noise), or with
  --bootstrap N percentile intervals over resampled battles;
- elo: online Elo in file order (K=--k); intervals only with --bootstrap;
- bt: Bradley–Terry maximum likelihood on the Elo scale (mean 1000, 400 points = 10:1 odds), ties
  as half a win, with --bootstrap rounds (default 100) for 95% intervals.

`--json` prints exactly {"method": ..., "ratings": [{"model", "rating", "ci_low", "ci_high",
"battles"}, ...]}, best first, intervals null where there are none. The table and --markdown also
show "rank (UB)": 1 + the number of models whose interval lies entirely above this model's.
"""

import argparse
import json
import math
import sys
from pathlib import Path

from chatbuild.errors import UserError

DESCRIPTION = {
    "paper": "the QLoRA paper's Elo: mean over {permutations:,} random orderings, K={k:g}, start 1000",
    "elo": "online Elo in file order, K={k:g}, start 1000",
    "bt": "Bradley–Terry maximum likelihood on the Elo scale (mean 1000; 400 points = 10:1 odds)",
}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("battles", nargs="+", metavar="BATTLES.jsonl", help="battles JSONL file(s); several are pooled")
    p.add_argument("--method", choices=("paper", "elo", "bt"), default="paper", help="rating method (default: paper)")
    p.add_argument("--permutations", type=int, default=10_000, help="orderings averaged by --method paper (default: 10000)")
    p.add_argument("--bootstrap", type=int, default=None, metavar="N",
                   help="bootstrap rounds for 95%% intervals (default: 100 for bt, 0 otherwise)")
    p.add_argument("--seed", type=int, default=0, help="random seed for orderings and resampling (default: 0)")
    p.add_argument("--k", type=float, default=32.0, help="Elo K factor for paper and elo (default: 32, the paper's)")
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
        lines.append(f"{r.rank:>4}  {r.model:<{width}}  {r.rating:>7.1f}  {_interval(r):>17}  {r.battles:>7}")
    return "\n".join(lines)


def _interval(r) -> str:
    if _finite(r.ci_low) is None or _finite(r.ci_high) is None:
        return "–"
    return f"{r.ci_low:.1f} – {r.ci_high:.1f}"


def markdown(rows, title: str) -> str:
    lines = [f"{title}\n", "| Rank (UB) | Model | Rating | 95% interval | Battles |", "|---:|---|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r.rank} | {r.model} | {r.rating:.1f} | {_interval(r)} | {r.battles} |")
    return "\n".join(lines) + "\n"


def plot(rows, battles, path: str | Path, title: str) -> None:
    """Two panels: ratings with their intervals, and the observed win-rate heat map."""
    import numpy as np
    from matplotlib.figure import Figure

    from chatbuild.ratings import win_rates

    order = [r.model for r in rows]
    models, rates = win_rates(battles)
    idx = [models.index(m) for m in order]
    rates = rates[np.ix_(idx, idx)]
    n = len(order)
    fig = Figure(figsize=(6 + 0.9 * n, 1.5 + 0.45 * n + 2), dpi=110, layout="constrained")
    left, right = fig.subplots(1, 2, width_ratios=[1, 1.2])
    y = np.arange(n)[::-1]
    ratings = np.array([r.rating for r in rows])
    left.scatter(ratings, y, color="tab:blue", zorder=3)
    has_ci = [_finite(r.ci_low) is not None for r in rows]
    if any(has_ci):
        lo = np.array([r.ci_low if ok else r.rating for r, ok in zip(rows, has_ci)])
        hi = np.array([r.ci_high if ok else r.rating for r, ok in zip(rows, has_ci)])
        left.errorbar(ratings, y, xerr=[ratings - lo, hi - ratings], fmt="none", ecolor="tab:blue", capsize=4)
    left.set_yticks(y, order)
    left.set_xlabel("rating")
    left.grid(axis="x", alpha=0.3)
    left.set_title("ratings (95% intervals)" if any(has_ci) else "ratings")
    im = right.imshow(rates, cmap="RdBu", vmin=0, vmax=1)
    right.set_xticks(range(n), order, rotation=45, ha="right")
    right.set_yticks(range(n), order)
    right.set_xlabel("opponent")
    right.set_title("win rate of row vs column (ties ½)")
    for i in range(n):
        for j in range(n):
            if not np.isnan(rates[i, j]):
                right.text(j, i, f"{rates[i, j]:.2f}", ha="center", va="center", fontsize=8,
                           color="white" if abs(rates[i, j] - 0.5) > 0.3 else "black")
    fig.colorbar(im, ax=right, shrink=0.8)
    fig.suptitle(title, fontsize=10)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, bbox_inches="tight")


def leaderboard_files(battles: list[dict], method: str, permutations: int, bootstrap: int | None, seed: int,
                      k: float, plot_path=None, markdown_path=None, json_path=None):
    """Compute the leaderboard and write whichever files are asked for. Returns (rows, title)."""
    from chatbuild.ratings import leaderboard

    if permutations < 1 or (bootstrap is not None and bootstrap < 0) or k <= 0:
        raise UserError("--permutations must be >= 1, --bootstrap >= 0 and --k > 0")
    rows = leaderboard(battles, method, k=k, permutations=permutations, bootstrap_rounds=bootstrap, seed=seed)
    rounds = bootstrap if bootstrap is not None else (100 if method == "bt" else 0)
    title = DESCRIPTION[method].format(permutations=permutations, k=k) + f"; {len(battles):,} battles"
    if rounds:
        title += f"; 95% intervals from {rounds} bootstrap rounds"
    elif method == "paper":
        title += "; ± is the 95% interval of the mean over orderings"
    if json_path:
        Path(json_path).write_text(json.dumps(as_json(method, rows), indent=2) + "\n")
    if markdown_path:
        Path(markdown_path).parent.mkdir(parents=True, exist_ok=True)
        Path(markdown_path).write_text(markdown(rows, title))
    if plot_path:
        plot(rows, battles, plot_path, title)
    return rows, title


def run(args: argparse.Namespace) -> int:
    battles = load(args.battles, args.skip_invalid)
    rows, title = leaderboard_files(battles, args.method, args.permutations, args.bootstrap, args.seed, args.k,
                                    args.plot, args.markdown)
    if args.json:
        print(json.dumps(as_json(args.method, rows)))
    else:
        print(title)
        print(table(rows))
    for what, path in (("plot", args.plot), ("markdown", args.markdown)):
        if path:
            print(f"{what}: {path}", file=sys.stderr if args.json else sys.stdout)
    return 0
