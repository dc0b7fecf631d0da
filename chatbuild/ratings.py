"""Ratings from pairwise battles: online Elo, the QLoRA paper's averaged Elo, and Bradley–Terry.

Pure functions over a table of battles (the idea of FastChat's `rating_systems.py`; our own code).
Battles come as dicts in the battles JSONL shape (`chatbuild.battles`) or as a `BattleTable`.

Outcome encoding — every method sees a battle as the score of `model_a`:

    winner "model_a"                  → 1.0
    winner "model_b"                  → 0.0
    winner "tie" or "tie (bothbad)"   → 0.5   (both are ties, as in FastChat and the QLoRA paper)

Scale — all ratings are on the Elo scale, where a gap of 400 points means 10:1 odds:

    P(i beats j) = 1 / (1 + 10 ** ((R_j - R_i) / 400))

Methods:
- `compute_elo`: online Elo, battles in the given order, everyone starts at 1000; each battle moves
  both ratings by K·(score − expected), so the sum of ratings never changes (zero-sum). Order matters.
- `compute_paper_elo`: the QLoRA paper's tournament (Dettmers et al. 2023): start at 1000, K=32,
  ties count 0.5, and the final ratings are averaged over N random orderings of the battles
  (N=10,000 in the paper) to remove the order dependence. Orderings advance in lockstep over the
  battle index as numpy arrays, 1,024 at a time: one pass over the battles per 1,024 orderings
  instead of one Python loop per ordering (`bench/elo.py` measures it).
- `compute_bt`: Bradley–Terry maximum likelihood, P(i beats j) = σ(θ_i − θ_j), ties as half a win for
  each side, fitted by Newton's method. θ is in natural-log odds; on the Elo scale
  R = 1000 + (400 / ln 10)·θ, i.e. "400·θ + 1000" with θ in log10 odds. Ratings are centred so
  their mean is 1000 (or so that an `anchor` model sits at 1000). Order does not matter.
- `bootstrap`: resample battles with replacement and recompute, for 95% percentile intervals;
  `rank_upper_bound`: 1 + the number of models whose interval lies entirely above this one's
  (FastChat's "rank (UB)"): the best rank the data cannot rule out.
- `leaderboard`: one call for the CLI and the UI: ratings, intervals, battle counts, ranks.
- `baseline_win_rates`: each model's share of wins against one baseline model (ties half), with a
  bootstrap interval: Arena-Hard's headline number (Li et al. 2024), from battles that all involve
  the baseline (`chatbuild eval judge --mode baseline`).
- `mean_interval`: a mean with a bootstrap interval, for single-answer grades (MT-bench's 1-10
  scores, Zheng et al. 2023; `chatbuild eval judge --mode single`); `mean_grades`: one per model,
  with the invalid replies counted. `baseline_of` tells baseline-mode battles and their baseline.
  `eval judge`'s report and the UI's Leaderboard tab both call these.

`METHODS` is the registry of rating methods ("paper", "elo", "bt"): each entry's rating function, its
default bootstrap rounds, its own interval (if it has one) and a one-line description. The command
line's --method choices, the eval config check and the Leaderboard tab all read it, so a new method is
one function and one entry here.
"""

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from chatbuild.errors import UserError
from chatbuild.style import FEATURES, battle_style

BASE = 1000.0
SCALE = 400.0  # Elo points per factor of 10 in the odds
SCORE_OF = {"model_a": 1.0, "model_b": 0.0, "tie": 0.5, "tie (bothbad)": 0.5}  # per chatbuild.battles.WINNERS
ORDERING_CHUNK = 1024  # orderings advanced together per pass (bounds memory at ~3 x n x 1024 x 8 bytes)


@dataclass(frozen=True)
class BattleTable:
    """Battles as arrays. `models` are sorted names; `a`, `b` index into them (int64, shape (n,));
    `score` is model_a's score per battle (float64: 1 win, 0.5 tie, 0 loss)."""

    models: tuple[str, ...]
    a: np.ndarray
    b: np.ndarray
    score: np.ndarray

    def __len__(self) -> int:
        return len(self.score)

    def take(self, index: np.ndarray) -> "BattleTable":
        """The battles at `index` (with repeats, in that order), over the same models."""
        return BattleTable(self.models, self.a[index], self.b[index], self.score[index])

    def counts(self) -> np.ndarray:
        """Battles each model took part in, shape (len(models),)."""
        m = len(self.models)
        return np.bincount(self.a, minlength=m) + np.bincount(self.b, minlength=m)


def battle_table(battles: "Sequence[Mapping] | BattleTable") -> BattleTable:
    """Battle dicts (validated, e.g. by `chatbuild.battles.read_battles`) → a `BattleTable`."""
    if isinstance(battles, BattleTable):
        return battles
    models = tuple(sorted({b["model_a"] for b in battles} | {b["model_b"] for b in battles}))
    index = {name: i for i, name in enumerate(models)}
    a = np.fromiter((index[b["model_a"]] for b in battles), dtype=np.int64, count=len(battles))
    b_ = np.fromiter((index[b["model_b"]] for b in battles), dtype=np.int64, count=len(battles))
    score = np.fromiter((SCORE_OF[b["winner"]] for b in battles), dtype=np.float64, count=len(battles))
    return BattleTable(models, a, b_, score)


# ── online Elo ─────────────────────────────────────────────────────────────────────────────────
def compute_elo(battles, k: float = 32.0, base: float = BASE, scale: float = SCALE) -> dict[str, float]:
    """Online Elo in the battles' order: {model: rating}. Every model starts at `base`.

    K=32 is the QLoRA paper's value (FastChat uses K=4 for its arena, which has far more battles)."""
    t = battle_table(battles)
    r = [base] * len(t.models)
    c = math.log(10) / scale
    for a, b, s in zip(t.a.tolist(), t.b.tolist(), t.score.tolist()):
        e = 1.0 / (1.0 + math.exp((r[b] - r[a]) * c))
        d = k * (s - e)
        r[a] += d
        r[b] -= d
    return dict(zip(t.models, r))


# ── the paper's Elo: mean over random orderings ────────────────────────────────────────────────
def paper_orderings(n: int, permutations: int, seed: int = 0) -> list[np.ndarray]:
    """The random orderings `compute_paper_elo` uses for `seed`, in chunks: arrays of shape
    (≤ORDERING_CHUNK, n), each row a permutation of range(n), `permutations` rows in all.

    Chunk i is drawn from its own child of `SeedSequence(seed)`, so chunks can be made and used in
    any order (and by several threads) with the same result."""
    return [_ordering_chunk(n, size, child) for size, child in _chunk_plan(permutations, seed)]


def _chunk_plan(permutations: int, seed: int) -> list[tuple[int, np.random.SeedSequence]]:
    sizes = [min(ORDERING_CHUNK, permutations - start) for start in range(0, permutations, ORDERING_CHUNK)]
    return list(zip(sizes, np.random.SeedSequence(seed).spawn(len(sizes))))


def _ordering_chunk(n: int, size: int, seed: np.random.SeedSequence) -> np.ndarray:
    return np.random.default_rng(seed).permuted(np.tile(np.arange(n), (size, 1)), axis=1)


def elo_over_orderings(battles, orders: np.ndarray, k: float = 32.0, base: float = BASE,
                       scale: float = SCALE) -> np.ndarray:
    """Online Elo run once per ordering, all orderings in lockstep: (p, n) orders → (p, models) ratings.

    Row j of the result equals `compute_elo` over the battles in the order `orders[j]` (up to
    floating-point rounding). The ratings live in one flat array, ordering j's at [j·m, (j+1)·m);
    step t gathers the two ratings of each ordering's t-th battle and scatters the updates back.
    Within a step each ordering touches two distinct slots of its own row, so scatters never collide."""
    t = battle_table(battles)
    orders = np.asarray(orders)
    p, n = orders.shape
    m = len(t.models)
    r = np.full(p * m, float(base))
    # (n, p) layouts: step t's battle indices / flat rating slots / scores, contiguous per step
    by_step = np.ascontiguousarray(orders.T)
    row = np.arange(p) * m
    ia = np.take(t.a, by_step)
    ia += row
    ib = np.take(t.b, by_step)
    ib += row
    s = np.take(t.score, by_step)
    del by_step
    c = math.log(10) / scale
    ra, rb, e = np.empty(p), np.empty(p), np.empty(p)
    for step in range(n):
        np.take(r, ia[step], out=ra)
        np.take(r, ib[step], out=rb)
        # e = k·(s − 1 / (1 + exp((rb − ra)·c))), computed in place
        np.subtract(rb, ra, out=e)
        np.multiply(e, c, out=e)
        np.exp(e, out=e)
        np.add(e, 1.0, out=e)
        np.reciprocal(e, out=e)
        np.subtract(s[step], e, out=e)
        np.multiply(e, k, out=e)
        ra += e
        rb -= e
        r[ia[step]] = ra
        r[ib[step]] = rb
    return r.reshape(p, m)


def paper_elo_runs(battles, k: float = 32.0, base: float = BASE, scale: float = SCALE,
                   permutations: int = 10_000, seed: int = 0, workers: int | None = None) -> np.ndarray:
    """Final Elo ratings for each of `permutations` random orderings: shape (permutations, models).

    Chunks of orderings run on `workers` threads (default: the CPUs this process may use); numpy
    releases the GIL inside its array operations, so threads share the work."""
    t = battle_table(battles)

    def one(chunk: tuple[int, np.random.SeedSequence]) -> np.ndarray:
        return elo_over_orderings(t, _ordering_chunk(len(t), *chunk), k, base, scale)

    plan = _chunk_plan(permutations, seed)
    workers = min(workers or _cpus(), len(plan))
    if workers <= 1:
        return np.concatenate([one(c) for c in plan])
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(workers) as pool:
        return np.concatenate(list(pool.map(one, plan)))


def _cpus() -> int:
    import os

    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def compute_paper_elo(battles, k: float = 32.0, base: float = BASE, scale: float = SCALE,
                      permutations: int = 10_000, seed: int = 0) -> dict[str, float]:
    """The QLoRA paper's Elo: {model: mean final rating over `permutations` random orderings}."""
    t = battle_table(battles)
    return dict(zip(t.models, paper_elo_runs(t, k, base, scale, permutations, seed).mean(axis=0).tolist()))


# ── Bradley–Terry ──────────────────────────────────────────────────────────────────────────────
def win_matrix(battles) -> np.ndarray:
    """W[i, j] = wins of model i over model j, a tie counting half to each: shape (models, models)."""
    t = battle_table(battles)
    m = len(t.models)
    out = np.zeros((m, m))
    np.add.at(out, (t.a, t.b), t.score)
    np.add.at(out, (t.b, t.a), 1.0 - t.score)
    return out


def fit_bt(wins: np.ndarray, reg: float = 1e-6, tol: float = 1e-10, max_iter: int = 200) -> np.ndarray:
    """Bradley–Terry strengths θ (natural-log odds, mean 0) maximizing
    Σ_ij W_ij·log σ(θ_i − θ_j) − reg/2·|θ|², by damped Newton steps.

    The tiny ridge term keeps θ finite when a model won (or lost) every battle, where the maximum
    likelihood estimate is infinite; such a model ends up a few thousand Elo points away."""
    m = wins.shape[0]
    games = wins + wins.T
    theta = np.zeros(m)

    def objective(th):
        diff = th[:, None] - th[None, :]
        return float(-(wins * np.logaddexp(0.0, -diff)).sum() - 0.5 * reg * th @ th)

    value = objective(theta)
    for _ in range(max_iter):
        p = 1.0 / (1.0 + np.exp(-(theta[:, None] - theta[None, :])))  # P(i beats j)
        grad = (wins - games * p).sum(axis=1) - reg * theta
        if np.abs(grad).max() < tol * max(1.0, games.sum()):
            break
        h = games * p * (1.0 - p)
        neg_hessian = np.diag(h.sum(axis=1) + reg) - h
        step = np.linalg.solve(neg_hessian, grad)
        size = 1.0
        while size > 1e-8:  # backtracking: Newton's full step may overshoot far from the optimum
            candidate = theta + size * step
            new = objective(candidate)
            if new >= value + 1e-4 * size * (grad @ step):
                break
            size /= 2
        theta, value = candidate, new
    return theta - theta.mean()


def compute_bt(battles, base: float = BASE, scale: float = SCALE, anchor: str | None = None,
               reg: float = 1e-6) -> dict[str, float]:
    """Bradley–Terry ratings on the Elo scale: {model: base + scale·θ/ln 10}, mean `base`, or with
    `anchor` the named model at exactly `base`."""
    t = battle_table(battles)
    ratings = base + scale / math.log(10) * fit_bt(win_matrix(t), reg=reg)
    if anchor is not None:
        ratings += base - ratings[t.models.index(anchor)]
    return dict(zip(t.models, ratings.tolist()))


# ── intervals and ranks ────────────────────────────────────────────────────────────────────────
def bootstrap(battles, rate: Callable[[BattleTable], Mapping[str, float]], rounds: int = 100,
              seed: int = 0) -> np.ndarray:
    """Ratings of `rounds` resamples of the battles (n drawn with replacement, in the drawn order):
    shape (rounds, models), columns in `battle_table(battles).models` order. A model that is absent
    from a resample gets NaN there."""
    t = battle_table(battles)
    rng = np.random.default_rng(seed)
    out = np.full((rounds, len(t.models)), np.nan)
    col = {name: i for i, name in enumerate(t.models)}
    for i in range(rounds):
        sample = t.take(rng.integers(0, len(t), len(t)))
        present = np.unique(np.concatenate([sample.a, sample.b]))
        # re-index to the models present, so each method sees only models that actually played
        sub = BattleTable(tuple(t.models[j] for j in present), np.searchsorted(present, sample.a),
                          np.searchsorted(present, sample.b), sample.score)
        for name, value in rate(sub).items():
            out[i, col[name]] = value
    return out


def intervals(samples: np.ndarray, level: float = 0.95) -> tuple[np.ndarray, np.ndarray]:
    """Percentile intervals per column of `samples` (rounds, models): (low, high)."""
    tail = (1.0 - level) / 2 * 100
    return np.nanpercentile(samples, tail, axis=0), np.nanpercentile(samples, 100 - tail, axis=0)


def rank_upper_bound(low: Sequence[float], high: Sequence[float]) -> list[int]:
    """1 + the number of models whose lower bound exceeds this model's upper bound."""
    low, high = np.asarray(low), np.asarray(high)
    return [1 + int((low > h).sum()) for h in high]


def win_rates(battles) -> tuple[tuple[str, ...], np.ndarray]:
    """(models, R): R[i, j] = share of i's battles against j that i won (ties half), NaN if none."""
    t = battle_table(battles)
    w = win_matrix(t)
    games = w + w.T
    with np.errstate(invalid="ignore", divide="ignore"):
        return t.models, np.where(games > 0, w / games, np.nan)


# ── the registry of rating methods ─────────────────────────────────────────────────────────────
K = 32.0  # the QLoRA paper's K factor, the default of every Elo method
PERMUTATIONS = 10_000  # orderings the paper's Elo averages over (the paper's N)


def _rate_paper(t: BattleTable, k: float, permutations: int, seed: int) -> dict[str, float]:
    return compute_paper_elo(t, k=k, permutations=permutations, seed=seed)


def _rate_elo(t: BattleTable, k: float, permutations: int, seed: int) -> dict[str, float]:
    return compute_elo(t, k=k)


def _rate_bt(t: BattleTable, k: float, permutations: int, seed: int) -> dict[str, float]:
    return compute_bt(t)


def _paper_interval(t: BattleTable, k: float, permutations: int, seed: int):
    """The paper's "±": the mean over orderings with a 95% interval of that mean (1.96·sd/√N)."""
    runs = paper_elo_runs(t, k=k, permutations=permutations, seed=seed)
    ratings = runs.mean(axis=0)
    half = 1.96 * runs.std(axis=0, ddof=1) / math.sqrt(len(runs)) if len(runs) > 1 else np.zeros(len(t.models))
    return ratings, ratings - half, ratings + half


@dataclass(frozen=True)
class Method:
    """One rating method of the registry.

    `rate(table, k=, permutations=, seed=)` → {model: rating} (a method ignores the settings it does not
    use); `bootstrap_rounds`: the default rounds of bootstrap intervals (0: none); `interval(table, k=,
    permutations=, seed=)` → (ratings, low, high) arrays in `table.models` order: the method's own
    interval, used when there is no bootstrap; `about`: one line, with {k:g} and {permutations:,}
    filled in from the settings; `interval_about`: what that own interval measures."""

    rate: Callable[..., dict[str, float]]
    bootstrap_rounds: int
    about: str
    interval: Callable | None = None
    interval_about: str | None = None

    def describe(self, k: float = K, permutations: int = PERMUTATIONS) -> str:
        return self.about.format(k=k, permutations=permutations)


METHODS: dict[str, Method] = {
    "paper": Method(_rate_paper, 0, "the QLoRA paper's Elo: mean over {permutations:,} random orderings, K={k:g}, "
                    "start 1000", _paper_interval, "± is the 95% interval of the mean over orderings"),
    "elo": Method(_rate_elo, 0, "online Elo in file order, K={k:g}, start 1000"),
    "bt": Method(_rate_bt, 100, "Bradley–Terry maximum likelihood on the Elo scale (mean 1000; 400 points = 10:1 odds)"),
}
DEFAULT_METHOD = "paper"


def method_choices() -> str:
    """'paper, elo, bt': for help texts and error messages."""
    return ", ".join(METHODS)


# ── the leaderboard ────────────────────────────────────────────────────────────────────────────
@dataclass
class Rating:
    """One leaderboard row. `ci_low`/`ci_high` are None when the method gave no interval; `rank` is
    the rank upper bound where there are intervals, else the plain rank."""

    model: str
    rating: float
    ci_low: float | None
    ci_high: float | None
    battles: int
    rank: int


def leaderboard(battles, method: str = DEFAULT_METHOD, *, k: float = K, permutations: int = PERMUTATIONS,
                bootstrap_rounds: int | None = None, seed: int = 0) -> list[Rating]:
    """Ratings of every model, best first, by a `METHODS` entry.

    Intervals (95%):
    - `bootstrap_rounds` > 0: percentile bootstrap over battles, for any method (for `paper` each
      round averages over `permutations` orderings, so the cost multiplies);
    - default rounds: the method's (100 for `bt`, 0 for `elo` and `paper`);
    - no bootstrap: the method's own interval where it has one (`paper`: the paper's "±", a 95%
      interval for the mean over orderings, 1.96·sd/√N; it measures only the noise of the
      orderings, not of the battles), else none (`elo`).
    """
    if method not in METHODS:
        raise ValueError(f"unknown rating method {method!r}; expected one of {method_choices()}")
    spec = METHODS[method]
    t = battle_table(battles)
    if not len(t):
        return []
    if bootstrap_rounds is None:
        bootstrap_rounds = spec.bootstrap_rounds

    def rate(table: BattleTable) -> dict[str, float]:
        return spec.rate(table, k=k, permutations=permutations, seed=seed)

    low = high = None
    if not bootstrap_rounds and spec.interval is not None:
        ratings, low, high = spec.interval(t, k=k, permutations=permutations, seed=seed)
    else:
        got = rate(t)
        ratings = np.array([got[name] for name in t.models])
    if bootstrap_rounds:
        low, high = intervals(bootstrap(t, rate, bootstrap_rounds, seed=seed))
    return _rows(t, ratings, low, high)


def _rows(t: BattleTable, ratings: np.ndarray, low: np.ndarray | None, high: np.ndarray | None) -> list[Rating]:
    """Leaderboard rows, best first: ranks from the intervals where there are any, else plain ranks."""
    counts = t.counts()
    if low is not None:
        ranks = rank_upper_bound(low, high)
    else:
        order = np.argsort(-ratings, kind="stable")
        ranks = [0] * len(t.models)
        for place, i in enumerate(order, start=1):
            ranks[i] = place
    rows = [Rating(name, float(ratings[i]), None if low is None else float(low[i]),
                   None if high is None else float(high[i]), int(counts[i]), ranks[i])
            for i, name in enumerate(t.models)]
    return sorted(rows, key=lambda r: (-r.rating, r.model))


# ── style control ──────────────────────────────────────────────────────────────────────────────
# Bradley–Terry with the two answers' style difference as covariates (LMSYS "Does style matter?",
# 2024; FastChat PR 3495): P(a beats b) = σ(θ_a − θ_b + Σ_f β_f·x_f), x_f the battle's normalized
# style difference. θ are then the strengths "at equal style" and β what style alone buys.
STYLE_REG = 1e-6  # the ridge of `fit_bt`, so without style effects the ratings equal `compute_bt`'s


class NoStyle(UserError):
    """The battles do not carry what style control needs (the answers or their style counts)."""


@dataclass(frozen=True)
class StyleTable:
    """Battles with their style: `diffs[i, f]` = (a − b) / (a + b + 1) for feature `FEATURES[f]` of
    battle i (model_a's count a, model_b's b), shape (n, len(FEATURES)), float64."""

    battles: BattleTable
    diffs: np.ndarray

    def take(self, index: np.ndarray) -> "StyleTable":
        return StyleTable(self.battles.take(index), self.diffs[index])


def style_table(battles: Sequence[Mapping]) -> StyleTable:
    """Battle dicts → a `StyleTable`. The normalization is FastChat's: the difference over the sum
    plus one (so two answers without any header give 0, not 0/0). Raises `NoStyle` (one line) when
    any battle has no style (`chatbuild.style.battle_style`)."""
    diffs = np.empty((len(battles), len(FEATURES)))
    missing = []
    for i, battle in enumerate(battles):
        got = battle_style(battle)
        if got is None:
            missing.append(battle)
            continue
        a, b = (np.array([side[f] for f in FEATURES]) for side in got)
        diffs[i] = (a - b) / (a + b + 1.0)
    if missing:
        first = missing[0]
        raise NoStyle(f"style control cannot run: {len(missing)} of {len(battles)} battles carry neither the answers "
                      f"nor their style counts (e.g. question {first.get('question_id')!r}, {first['model_a']} vs "
                      f"{first['model_b']}); judge them again with this version of `chatbuild eval judge`")
    return StyleTable(battle_table(battles), diffs)


def style_scale(diffs: np.ndarray) -> np.ndarray:
    """Per feature, the standard deviation of the differences over the battles (FastChat standardizes
    the same way), so each coefficient is "per standard deviation". NaN for a constant feature (it
    cannot be told apart from the strengths and is left out of the fit).

    Unlike FastChat we do not subtract the mean: a zero difference must mean "equal style", else the
    mean difference acts like a bonus for the side listed first. In the arena the sides are random and
    the mean is near 0 anyway; a judge run lists the models in a fixed order, where it is not."""
    sd = diffs.std(axis=0)
    return np.where(sd > 1e-12, sd, np.nan)


def fit_style_bt(a: np.ndarray, b: np.ndarray, score: np.ndarray, x: np.ndarray, models: int,
                 reg: float = STYLE_REG, tol: float = 1e-10, max_iter: int = 200) -> tuple[np.ndarray, np.ndarray]:
    """Strengths θ (natural-log odds, mean 0, shape (models,)) and style coefficients β (shape (p,))
    maximizing Σ_k [s_k·log σ(z_k) + (1 − s_k)·log σ(−z_k)] − reg/2·(|θ|² + |β|²), with
    z_k = θ[a_k] − θ[b_k] + x_k·β and s_k model_a's score (ties 0.5), by damped Newton steps, the
    Hessian assembled per model pair (no n × models design matrix)."""
    n, p = x.shape
    w = np.zeros(models + p)

    def logits(params):
        th, be = params[:models], params[models:]
        return th[a] - th[b] + x @ be

    def objective(params):
        z = logits(params)
        return float(-(score * np.logaddexp(0.0, -z) + (1.0 - score) * np.logaddexp(0.0, z)).sum()
                     - 0.5 * reg * params @ params)

    value = objective(w)
    for _ in range(max_iter):
        prob = 1.0 / (1.0 + np.exp(-logits(w)))
        r = score - prob
        grad = np.concatenate([np.bincount(a, r, models) - np.bincount(b, r, models), x.T @ r]) - reg * w
        if np.abs(grad).max() < tol * max(1.0, n):
            break
        v = prob * (1.0 - prob)
        h = np.zeros((models + p, models + p))  # the negative Hessian
        np.add.at(h, (a, a), v)
        np.add.at(h, (b, b), v)
        np.add.at(h, (a, b), -v)
        np.add.at(h, (b, a), -v)
        cross = np.zeros((models, p))
        np.add.at(cross, a, v[:, None] * x)
        np.add.at(cross, b, -v[:, None] * x)
        h[:models, models:] = cross
        h[models:, :models] = cross.T
        h[models:, models:] = (x * v[:, None]).T @ x
        h[np.diag_indices_from(h)] += reg
        step = np.linalg.solve(h, grad)
        size = 1.0
        while size > 1e-8:  # backtracking, as in `fit_bt`
            candidate = w + size * step
            new = objective(candidate)
            if new >= value + 1e-4 * size * (grad @ step):
                break
            size /= 2
        w, value = candidate, new
    theta = w[:models]
    return theta - theta.mean(), w[models:]


@dataclass
class StyleCoefficient:
    """One style feature's fitted effect: `value` in natural-log odds of model_a winning per standard
    deviation (`sd`) of the normalized difference; `elo` the same on the Elo scale (·400/ln 10);
    interval ends None without bootstrap, all None for a feature that never varied."""

    feature: str
    value: float | None
    ci_low: float | None
    ci_high: float | None
    sd: float | None

    @property
    def elo(self) -> float | None:
        return None if self.value is None else self.value * SCALE / math.log(10)


def _fit_style(st: StyleTable, sd: np.ndarray, reg: float) -> tuple[np.ndarray, np.ndarray]:
    """θ over `st.battles.models` and β over all features (NaN for the constant ones)."""
    keep = ~np.isnan(sd)
    t = st.battles
    theta, beta = fit_style_bt(t.a, t.b, t.score, st.diffs[:, keep] / sd[keep], len(t.models), reg)
    full = np.full(len(sd), np.nan)
    full[keep] = beta
    return theta, full


def compute_style_control(battles, base: float = BASE, scale: float = SCALE,
                          reg: float = STYLE_REG) -> tuple[dict[str, float], dict[str, float]]:
    """Style-adjusted Bradley–Terry ratings on the Elo scale (mean `base`, like `compute_bt`) and the
    style coefficients ({feature: log-odds per sd}, NaN if constant): ({model: rating}, {feature: β})."""
    st = battles if isinstance(battles, StyleTable) else style_table(battles)
    theta, beta = _fit_style(st, style_scale(st.diffs), reg)
    ratings = base + scale / math.log(10) * theta
    return dict(zip(st.battles.models, ratings.tolist())), dict(zip(FEATURES, beta.tolist()))


def style_leaderboard(battles, bootstrap_rounds: int = 100, seed: int = 0,
                      reg: float = STYLE_REG) -> tuple[list[Rating], list[StyleCoefficient]]:
    """The style-controlled leaderboard: rows best first (rank UB from 95% percentile bootstrap
    intervals, battles resampled with replacement, the features' sd fixed from all battles as FastChat
    does) and one `StyleCoefficient` per feature. Raises `NoStyle` if a battle has no style."""
    st = battles if isinstance(battles, StyleTable) else style_table(battles)
    t = st.battles
    if not len(t):
        return [], []
    sd = style_scale(st.diffs)
    theta, beta = _fit_style(st, sd, reg)
    ratings = BASE + SCALE / math.log(10) * theta
    low = high = beta_low = beta_high = None
    if bootstrap_rounds:
        rng = np.random.default_rng(seed)
        rating_samples = np.full((bootstrap_rounds, len(t.models)), np.nan)
        beta_samples = np.full((bootstrap_rounds, len(FEATURES)), np.nan)
        for i in range(bootstrap_rounds):
            sample = st.take(rng.integers(0, len(t), len(t)))
            present = np.unique(np.concatenate([sample.battles.a, sample.battles.b]))
            # re-indexed to the models present, as `bootstrap` does
            sub = StyleTable(BattleTable(tuple(t.models[j] for j in present), np.searchsorted(present, sample.battles.a),
                                         np.searchsorted(present, sample.battles.b), sample.battles.score), sample.diffs)
            th, be = _fit_style(sub, sd, reg)
            rating_samples[i, present] = BASE + SCALE / math.log(10) * th
            beta_samples[i] = be
        low, high = intervals(rating_samples)
        beta_low, beta_high = np.full(len(FEATURES), np.nan), np.full(len(FEATURES), np.nan)
        fitted = ~np.isnan(sd)  # constant features have no coefficient in any round
        if fitted.any():
            beta_low[fitted], beta_high[fitted] = intervals(beta_samples[:, fitted])

    def opt(x) -> float | None:
        return None if x is None or not math.isfinite(x) else float(x)

    coefficients = [StyleCoefficient(f, opt(beta[j]), opt(None if beta_low is None else beta_low[j]),
                                     opt(None if beta_high is None else beta_high[j]), opt(sd[j]))
                    for j, f in enumerate(FEATURES)]
    return _rows(t, ratings, low, high), coefficients


# ── one baseline, and single-answer grades ─────────────────────────────────────────────────────
@dataclass
class MeanInterval:
    """A mean over `n` values with its 95% bootstrap percentile interval (None where n is 0)."""

    mean: float | None
    low: float | None
    high: float | None
    n: int


def mean_interval(values: Sequence[float], rounds: int = 1000, seed: int = 0, level: float = 0.95) -> MeanInterval:
    """The mean of `values` and a percentile interval over `rounds` resamples (n drawn with
    replacement). No values: all None; one value: a zero-width interval."""
    x = np.asarray(values, dtype=float)
    if not len(x):
        return MeanInterval(None, None, None, 0)
    means = x[np.random.default_rng(seed).integers(0, len(x), (rounds, len(x)))].mean(axis=1) if rounds else x[None]
    tail = (1.0 - level) / 2 * 100
    return MeanInterval(float(x.mean()), float(np.percentile(means, tail)), float(np.percentile(means, 100 - tail)),
                        len(x))


def baseline_win_rates(battles: Sequence[Mapping], baseline: str, rounds: int = 1000,
                       seed: int = 0) -> dict[str, MeanInterval]:
    """{model: its win rate against `baseline`}: the mean of its scores in the battles it played
    against the baseline (1 win, 0.5 tie, 0 loss, either side), with a bootstrap interval over those
    battles. Battles without the baseline are not counted; models in name order."""
    scores: dict[str, list[float]] = {}
    for b in battles:
        a, other = b["model_a"], b["model_b"]
        if baseline not in (a, other) or a == other:
            continue
        score = SCORE_OF[b["winner"]]
        model, score = (other, 1.0 - score) if a == baseline else (a, score)
        scores.setdefault(model, []).append(score)
    return {m: mean_interval(scores[m], rounds, seed) for m in sorted(scores)}


@dataclass
class MeanGrade:
    """One model's single-answer grades: the mean with its bootstrap interval over the `n` valid
    grades, and how many replies held no valid grade (`invalid`, left out of the mean)."""

    mean: float | None
    low: float | None
    high: float | None
    n: int
    invalid: int


def mean_grades(grades: Sequence[Mapping], rounds: int = 1000, seed: int = 0,
                models: Sequence[str] | None = None) -> dict[str, MeanGrade]:
    """{model: MeanGrade} over grade records ({"model": ..., "grade": 1-10 or None for an invalid
    reply}), in `models`' order (every one listed, n 0 without grades) or in order of appearance."""
    order = list(dict.fromkeys(models if models is not None else (g["model"] for g in grades)))
    valid: dict[str, list[float]] = {m: [] for m in order}
    invalid = dict.fromkeys(order, 0)
    for g in grades:
        if g["model"] not in valid:
            continue
        if g["grade"] is None:
            invalid[g["model"]] += 1
        else:
            valid[g["model"]].append(g["grade"])
    out = {}
    for m in order:
        mi = mean_interval(valid[m], rounds, seed)
        out[m] = MeanGrade(mi.mean, mi.low, mi.high, mi.n, invalid[m])
    return out


def baseline_of(battles: Sequence[Mapping]) -> str | None:
    """The baseline these battles were judged against, or None when they are not baseline-mode:
    the `baseline` field when every battle carries the same one (`eval judge --mode baseline`
    writes it); for battles without the field, the one model that plays in every battle, when at
    least three models play (with two, every battle holds both and pairwise looks the same)."""
    if not battles:
        return None
    marks = {b.get("baseline") for b in battles}
    if len(marks) == 1 and None not in marks:
        mark = marks.pop()
        return mark if all(mark in (b["model_a"], b["model_b"]) for b in battles) else None
    if marks != {None}:
        return None  # a mix of baseline runs, or of baseline and pairwise battles: no single baseline
    common = {battles[0]["model_a"], battles[0]["model_b"]}
    for b in battles[1:]:
        common &= {b["model_a"], b["model_b"]}
    models = {m for b in battles for m in (b["model_a"], b["model_b"])}
    return common.pop() if len(common) == 1 and len(models) >= 3 else None
