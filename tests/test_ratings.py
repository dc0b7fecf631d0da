"""The ratings math: Elo, the paper's averaged Elo, Bradley–Terry, bootstrap intervals, ranks."""

import math
import random

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from chatbuild import ratings
from chatbuild.ratings import (
    battle_table,
    compute_bt,
    compute_elo,
    compute_paper_elo,
    elo_over_orderings,
    leaderboard,
    paper_elo_runs,
    paper_orderings,
    rank_upper_bound,
    win_rates,
)

SWAP = {"model_a": "model_b", "model_b": "model_a", "tie": "tie", "tie (bothbad)": "tie (bothbad)"}


def random_battles(n: int, models: list[str], seed: int, ties: float = 0.2) -> list[dict]:
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        a, b = rng.sample(models, 2)
        u = rng.random()
        winner = "tie" if u < ties / 2 else "tie (bothbad)" if u < ties else rng.choice(["model_a", "model_b"])
        out.append({"model_a": a, "model_b": b, "winner": winner})
    return out


def simulate_bt(true: dict[str, float], n: int, seed: int) -> list[dict]:
    """Battles drawn from a Bradley–Terry model with Elo-scale ratings `true` (no ties)."""
    rng = np.random.default_rng(seed)
    names = list(true)
    out = []
    for _ in range(n):
        i, j = rng.choice(len(names), 2, replace=False)
        p_a = 1 / (1 + 10 ** ((true[names[j]] - true[names[i]]) / 400))
        out.append({"model_a": names[i], "model_b": names[j], "winner": "model_a" if rng.random() < p_a else "model_b"})
    return out


battle_lists = st.lists(
    st.tuples(st.sampled_from("abcde"), st.sampled_from("abcde"), st.sampled_from(list(SWAP))).filter(lambda t: t[0] != t[1]),
    min_size=1, max_size=60,
).map(lambda ts: [{"model_a": a, "model_b": b, "winner": w} for a, b, w in ts])


# ── online Elo ──
@settings(max_examples=60, deadline=None)
@given(battle_lists, st.sampled_from([4.0, 16.0, 32.0]))
def test_elo_is_zero_sum(battles, k):
    r = compute_elo(battles, k=k)
    assert sum(r.values()) == pytest.approx(1000 * len(r), abs=1e-6)


@settings(max_examples=60, deadline=None)
@given(battle_lists)
def test_elo_is_symmetric_under_swapping_sides(battles):
    swapped = [{"model_a": b["model_b"], "model_b": b["model_a"], "winner": SWAP[b["winner"]]} for b in battles]
    r, s = compute_elo(battles), compute_elo(swapped)
    assert r.keys() == s.keys()
    for m in r:
        assert r[m] == pytest.approx(s[m], abs=1e-9)


def test_elo_one_win_moves_half_k():
    r = compute_elo([{"model_a": "x", "model_b": "y", "winner": "model_a"}], k=32)
    assert r == {"x": 1016.0, "y": 984.0}
    r = compute_elo([{"model_a": "x", "model_b": "y", "winner": "tie (bothbad)"}], k=32)
    assert r == {"x": 1000.0, "y": 1000.0}


# ── the paper's Elo ──
def test_lockstep_rows_equal_per_ordering_elo():
    battles = random_battles(40, list("pqrs"), seed=1)
    orders = np.array([np.random.default_rng(i).permutation(40) for i in range(7)])
    runs = elo_over_orderings(battles, orders, k=32)
    models = battle_table(battles).models
    for row, order in zip(runs, orders):
        expected = compute_elo([battles[i] for i in order], k=32)
        assert row == pytest.approx([expected[m] for m in models], abs=1e-9)


def test_paper_is_the_mean_of_explicit_per_ordering_elo_runs(monkeypatch):
    monkeypatch.setattr(ratings, "ORDERING_CHUNK", 16)  # several chunks, so chunk seeding is covered
    battles = random_battles(25, list("pqrst"), seed=2)
    chunks = paper_orderings(len(battles), 50, seed=7)
    assert [c.shape for c in chunks] == [(16, 25)] * 3 + [(2, 25)]
    orders = np.concatenate(chunks)
    assert all(sorted(o) == list(range(25)) for o in orders)
    explicit = [compute_elo([battles[i] for i in o], k=32) for o in orders]
    paper = compute_paper_elo(battles, k=32, permutations=50, seed=7)
    for m in paper:
        assert paper[m] == pytest.approx(np.mean([e[m] for e in explicit]), abs=1e-9)


def test_paper_is_deterministic_for_a_seed_and_independent_of_threads(monkeypatch):
    monkeypatch.setattr(ratings, "ORDERING_CHUNK", 32)
    battles = random_battles(60, list("pqrst"), seed=3)
    one = paper_elo_runs(battles, permutations=100, seed=5, workers=1)
    two = paper_elo_runs(battles, permutations=100, seed=5, workers=2)
    np.testing.assert_array_equal(one, two)
    np.testing.assert_array_equal(one, paper_elo_runs(battles, permutations=100, seed=5, workers=1))
    assert not np.array_equal(one, paper_elo_runs(battles, permutations=100, seed=6, workers=1))
    assert one.sum(axis=1) == pytest.approx(1000 * 5)  # every ordering is zero-sum too


# ── Bradley–Terry ──
def test_bt_scale_400_points_is_10_to_1_odds():
    battles = ([{"model_a": "x", "model_b": "y", "winner": "model_a"}] * 10
               + [{"model_a": "y", "model_b": "x", "winner": "model_a"}])
    r = compute_bt(battles)
    assert r["x"] - r["y"] == pytest.approx(400, abs=0.01)
    assert (r["x"] + r["y"]) / 2 == pytest.approx(1000)
    anchored = compute_bt(battles, anchor="y")
    assert anchored["y"] == 1000 and anchored["x"] == pytest.approx(1400, abs=0.01)


def test_bt_ties_count_half_and_order_does_not_matter():
    battles = random_battles(200, list("pqrs"), seed=4, ties=0.5)
    r = compute_bt(battles)
    assert compute_bt(list(reversed(battles))) == pytest.approx(r)
    # two ties weigh the same as one win plus one loss
    tie = [{"model_a": "x", "model_b": "y", "winner": "tie"}] * 2 + [{"model_a": "x", "model_b": "y", "winner": "model_a"}]
    wl = [{"model_a": "x", "model_b": "y", "winner": w} for w in ("model_a", "model_b", "model_a")]
    assert compute_bt(tie)["x"] - compute_bt(tie)["y"] == pytest.approx(compute_bt(wl)["x"] - compute_bt(wl)["y"], abs=1e-6)


def test_bt_recovers_known_strengths_within_its_intervals():
    true = {"m1": 1250, "m2": 1150, "m3": 1100, "m4": 1000, "m5": 960, "m6": 900, "m7": 850, "m8": 790}
    mean = np.mean(list(true.values()))
    true = {m: v - mean + 1000 for m, v in true.items()}  # compute_bt centres on 1000
    battles = simulate_bt(true, 6000, seed=11)
    rows = leaderboard(battles, method="bt", bootstrap_rounds=200, seed=0)
    assert [r.model for r in rows] == sorted(true, key=true.get, reverse=True)
    for r in rows:
        assert r.ci_low <= true[r.model] <= r.ci_high, (r, true[r.model])
        assert abs(r.rating - true[r.model]) < 40
        assert 0 < r.ci_high - r.ci_low < 100


def test_bt_undefeated_model_stays_finite():
    battles = [{"model_a": "x", "model_b": "y", "winner": "model_a"}] * 5
    r = compute_bt(battles)
    assert all(math.isfinite(v) for v in r.values()) and r["x"] > r["y"] + 1000


# ── intervals, ranks, win rates, the leaderboard ──
def test_rank_upper_bound():
    #            a: clearly best   b, c: overlap   d: below everyone
    low = [1200, 1050, 1040, 800]
    high = [1300, 1120, 1110, 900]
    assert rank_upper_bound(low, high) == [1, 2, 2, 4]


def test_win_rates():
    battles = [{"model_a": "x", "model_b": "y", "winner": w} for w in ("model_a", "model_a", "tie", "model_b")]
    models, r = win_rates(battles)
    assert models == ("x", "y")
    assert r[0, 1] == pytest.approx(2.5 / 4) and r[1, 0] == pytest.approx(1.5 / 4)
    assert np.isnan(r[0, 0])


@pytest.mark.parametrize("method", ["paper", "elo", "bt"])
def test_leaderboard_shape(method):
    battles = simulate_bt({"a": 1200, "b": 1000, "c": 800}, 300, seed=1)
    rows = leaderboard(battles, method=method, permutations=64)
    assert [r.model for r in rows] == ["a", "b", "c"]
    assert sum(r.battles for r in rows) == 2 * len(battles)
    assert [r.rating for r in rows] == sorted((r.rating for r in rows), reverse=True)
    if method == "elo":
        assert all(r.ci_low is None and r.ci_high is None for r in rows)
        assert [r.rank for r in rows] == [1, 2, 3]
    else:
        assert all(r.ci_low <= r.rating <= r.ci_high for r in rows)


def test_no_battles_no_rows():
    assert leaderboard([], method="bt") == []


def test_bootstrap_is_deterministic_for_a_seed():
    battles = random_battles(120, list("pqrs"), seed=9)
    a = leaderboard(battles, method="elo", bootstrap_rounds=30, seed=3)
    b = leaderboard(battles, method="elo", bootstrap_rounds=30, seed=3)
    c = leaderboard(battles, method="elo", bootstrap_rounds=30, seed=4)
    assert a == b and a != c
    assert all(r.ci_low is not None for r in a)
