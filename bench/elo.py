"""Benchmark: the QLoRA paper's Elo (mean over 10,000 random orderings) on a 4,500-battle file, CPU.

    .venv/bin/python bench/elo.py                      # writes bench/results/elo-cpu-<date>.json
    .venv/bin/python bench/elo.py --permutations 2000 --baseline-orderings 10

What is timed:
- `chatbuild.ratings.paper_elo_runs`: all orderings advance in lockstep as numpy arrays, in chunks,
  on 1 thread and on as many threads as the process may use;
- the baseline: the straightforward way, one Python loop per ordering over shuffled battle dicts
  with a dict of ratings and `10 ** (diff / 400)` (the shape of FastChat's `compute_elo`, run once
  per ordering). It is timed on `--baseline-orderings` orderings and extrapolated linearly to
  `--permutations` (each ordering costs the same, so the extrapolation is fair; the report says so);
- `compute_elo` per ordering (our scalar loop over arrays converted to lists), extrapolated the same way.

The battles are synthetic: 8 models with the ratings of the QLoRA paper's Table 1 (GPT-4 1348 ...
Guanaco-7B 879), pairs drawn uniformly, outcomes from the Bradley–Terry model on the Elo scale,
20% ties. A correctness check runs the baseline's orderings through the lockstep code and compares.

Both wall and CPU time are recorded, with the load average: on a shared machine wall time depends
on what else runs, CPU time much less.
"""

import argparse
import datetime
import json
import os
import platform
import random
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import chatbuild  # noqa: E402
from chatbuild import ratings  # noqa: E402

PAPER_TABLE1 = {"gpt-4": 1348, "guanaco-65b": 1022, "guanaco-33b": 992, "vicuna-13b": 974, "chatgpt": 966,
                "guanaco-13b": 916, "bard": 902, "guanaco-7b": 879}


def synthetic_battles(n: int, seed: int = 0, ties: float = 0.2) -> list[dict]:
    rng = np.random.default_rng(seed)
    names = list(PAPER_TABLE1)
    out = []
    for i in range(n):
        a, b = rng.choice(len(names), 2, replace=False)
        p_a = 1 / (1 + 10 ** ((PAPER_TABLE1[names[b]] - PAPER_TABLE1[names[a]]) / 400))
        u = rng.random()
        winner = "tie" if u < ties else ("model_a" if rng.random() < p_a else "model_b")
        out.append({"question_id": i % 80 + 1, "model_a": names[a], "model_b": names[b], "winner": winner,
                    "judge": "synthetic", "tstamp": float(i)})
    return out


def naive_elo(battles: list[dict], k: float = 32, base: float = 1000) -> dict[str, float]:
    """The straightforward scalar loop (one ordering)."""
    rating = {}
    for b in battles:
        ra, rb = rating.get(b["model_a"], base), rating.get(b["model_b"], base)
        ea = 1 / (1 + 10 ** ((rb - ra) / 400))
        sa = {"model_a": 1.0, "model_b": 0.0}.get(b["winner"], 0.5)
        rating[b["model_a"]] = ra + k * (sa - ea)
        rating[b["model_b"]] = rb - k * (sa - ea)
    return rating


def timed(fn, repeats: int) -> dict:
    walls, cpus = [], []
    for _ in range(repeats):
        w, c = time.perf_counter(), time.process_time()
        fn()
        walls.append(time.perf_counter() - w)
        cpus.append(time.process_time() - c)
    return {"wall_s": [round(x, 3) for x in walls], "cpu_s": [round(x, 3) for x in cpus],
            "best_wall_s": round(min(walls), 3), "best_cpu_s": round(min(cpus), 3)}


def machine() -> dict:
    cpu = platform.processor()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"cpu": cpu, "cpus_usable": len(os.sched_getaffinity(0)), "cpus_total": os.cpu_count(),
            "platform": platform.platform(), "load_average_before": [round(x, 2) for x in os.getloadavg()]}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--battles", type=int, default=4500)
    p.add_argument("--permutations", type=int, default=10_000)
    p.add_argument("--baseline-orderings", type=int, default=100, help="orderings of the baseline actually run")
    p.add_argument("--repeats", type=int, default=3, help="timed runs of the vectorized method per setting")
    p.add_argument("--out", default=None, help="result file (default: bench/results/elo-cpu-<date>.json)")
    args = p.parse_args()

    battles = synthetic_battles(args.battles)
    table = ratings.battle_table(battles)
    info = {"machine": machine(),
            "versions": {"python": platform.python_version(), "numpy": np.__version__, "chatbuild": chatbuild.__version__},
            "command": " ".join([Path(sys.executable).name, *sys.argv]),
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "battles": args.battles, "models": len(table.models), "permutations": args.permutations,
            "chunk": ratings.ORDERING_CHUNK}
    try:
        info["git_commit"] = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True,
                                            text=True).stdout.strip() or None
    except OSError:
        info["git_commit"] = None

    # ── the vectorized method ──
    results = {}
    for workers in sorted({1, len(os.sched_getaffinity(0))}):
        label = f"paper_lockstep_{workers}_thread{'s' if workers > 1 else ''}"
        results[label] = timed(lambda w=workers: ratings.paper_elo_runs(table, permutations=args.permutations,
                                                                         seed=0, workers=w), args.repeats)
        print(f"{label}: {results[label]['best_wall_s']} s wall, {results[label]['best_cpu_s']} s CPU", flush=True)
    final = ratings.paper_elo_runs(table, permutations=args.permutations, seed=0)
    info["ratings"] = {m: round(float(v), 1) for m, v in zip(table.models, final.mean(axis=0))}

    # ── the baselines, on a few orderings, extrapolated ──
    rng = random.Random(0)
    orders = []
    for _ in range(args.baseline_orderings):
        o = list(range(len(battles)))
        rng.shuffle(o)
        orders.append(o)
    scale = args.permutations / args.baseline_orderings
    naive_out = []

    def naive():
        naive_out.clear()
        for o in orders:
            shuffled = [battles[i] for i in o]
            naive_out.append(naive_elo(shuffled))

    def scalar():
        for o in orders:
            ratings.compute_elo(table.take(np.array(o)))

    for label, fn in (("baseline_naive_python_loop", naive), ("baseline_compute_elo_per_ordering", scalar)):
        t = timed(fn, 1)
        results[label] = {"orderings_run": args.baseline_orderings, "measured_wall_s": t["best_wall_s"],
                          "measured_cpu_s": t["best_cpu_s"],
                          "extrapolated_wall_s": round(t["best_wall_s"] * scale, 2),
                          "extrapolated_cpu_s": round(t["best_cpu_s"] * scale, 2),
                          "note": f"timed on {args.baseline_orderings} orderings, extrapolated x{scale:g} "
                                  f"to {args.permutations} (linear: every ordering costs the same)"}
        print(f"{label}: {results[label]['extrapolated_wall_s']} s wall, {results[label]['extrapolated_cpu_s']} s CPU "
              f"(extrapolated from {args.baseline_orderings} orderings)", flush=True)

    # ── the same orderings through the lockstep code give the same ratings ──
    lockstep = ratings.elo_over_orderings(table, np.array(orders))
    diff = max(abs(row[j] - naive_out[i][m]) for i, row in enumerate(lockstep) for j, m in enumerate(table.models))
    info["check_max_abs_difference_vs_naive"] = float(diff)
    assert diff < 1e-6, diff

    best = min(v["best_wall_s"] for k, v in results.items() if k.startswith("paper_"))
    best_cpu = min(v["best_cpu_s"] for k, v in results.items() if k.startswith("paper_"))
    info["speedup_wall_vs_naive"] = round(results["baseline_naive_python_loop"]["extrapolated_wall_s"] / best, 1)
    info["speedup_cpu_vs_naive"] = round(results["baseline_naive_python_loop"]["extrapolated_cpu_s"] / best_cpu, 1)
    info["results"] = results
    info["machine"]["load_average_after"] = [round(x, 2) for x in os.getloadavg()]

    out = Path(args.out) if args.out else REPO / "bench" / "results" / f"elo-cpu-{datetime.date.today().isoformat()}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(info, indent=2) + "\n")
    print(f"speedup vs the naive loop: {info['speedup_wall_vs_naive']}x wall, {info['speedup_cpu_vs_naive']}x CPU")
    print(f"results: {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
