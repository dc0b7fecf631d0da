"""Style control: style counts of answers, where a battle's style comes from, and Bradley–Terry with
style covariates recovering true strengths that raw Bradley–Terry gets wrong."""

import math

import numpy as np
import pytest

from chatbuild.ratings import (
    NoStyle,
    compute_bt,
    compute_style_control,
    fit_style_bt,
    style_leaderboard,
    style_table,
)
from chatbuild.style import battle_style, style_features

TRUE = {"sage": 1080.0, "fair": 1040.0, "wordy": 1000.0, "rambler": 960.0}  # Elo scale
LENGTH = {"sage": 300, "fair": 600, "wordy": 1500, "rambler": 2500}  # the better, the shorter
LENGTH_EFFECT = 3.0  # log-odds per unit of (len_a − len_b) / (len_a + len_b + 1)


def simulate(n: int, seed: int) -> list[dict]:
    """Battles where the winner follows Bradley–Terry on TRUE plus a bonus for the longer answer;
    the markdown counts are random and play no part."""
    rng = np.random.default_rng(seed)
    names = list(TRUE)
    out = []
    for _ in range(n):
        ia, ib = rng.choice(len(names), 2, replace=False)
        ma, mb = names[ia], names[ib]
        la, lb = (int(LENGTH[m] * rng.lognormal(0, 0.3)) for m in (ma, mb))
        z = math.log(10) / 400 * (TRUE[ma] - TRUE[mb]) + LENGTH_EFFECT * (la - lb) / (la + lb + 1)
        won = rng.random() < 1 / (1 + math.exp(-z))

        def style(length):
            return {"chars": length, "headers": int(rng.integers(0, 3)), "list_items": int(rng.integers(0, 5)),
                    "bold": int(rng.integers(0, 2))}

        out.append({"model_a": ma, "model_b": mb, "winner": "model_a" if won else "model_b",
                    "style_a": style(la), "style_b": style(lb)})
    return out


def centred(ratings: dict[str, float]) -> dict[str, float]:
    mean = sum(ratings.values()) / len(ratings)
    return {m: r - mean + 1000 for m, r in ratings.items()}


def test_style_control_recovers_true_strengths_that_raw_bt_misses():
    battles = simulate(12_000, seed=0)
    truth = centred(TRUE)
    order = sorted(TRUE, key=TRUE.get, reverse=True)

    raw = compute_bt(battles)
    assert raw["rambler"] > raw["wordy"] > raw["fair"] > raw["sage"]  # raw ratings reward length
    assert all(abs(raw[m] - truth[m]) > 60 for m in TRUE)

    rows, coefficients = style_leaderboard(battles, bootstrap_rounds=40, seed=1)
    assert [r.model for r in rows] == order
    # 25 points: over seeds 0-7 the largest error at this size was 15
    for r in rows:
        assert abs(r.rating - truth[r.model]) < 25, (r.model, r.rating, truth[r.model])
        assert r.ci_low < r.rating < r.ci_high
    by_feature = {c.feature: c for c in coefficients}
    length = by_feature["chars"]
    assert length.value > 0 and length.ci_low > 0  # the interval excludes 0
    # per standard deviation of the normalized difference: the true effect times that sd
    assert length.value == pytest.approx(LENGTH_EFFECT * length.sd, rel=0.15)
    assert length.elo == pytest.approx(length.value * 400 / math.log(10))
    for name in ("headers", "list_items", "bold"):  # no true effect: intervals cover 0
        c = by_feature[name]
        assert c.ci_low < 0 < c.ci_high, c


def test_without_style_effects_style_control_equals_plain_bt():
    rng = np.random.default_rng(3)
    battles = simulate(800, seed=2)
    for b in battles:  # outcomes now independent of style
        b["winner"] = str(rng.choice(["model_a", "model_b", "tie"]))
        b["style_a"] = b["style_b"] = {"chars": 100, "headers": 0, "list_items": 0, "bold": 0}
    ratings, betas = compute_style_control(battles)
    plain = compute_bt(battles)
    for m in plain:
        assert ratings[m] == pytest.approx(plain[m], abs=1e-6)
    assert all(math.isnan(v) for v in betas.values())  # constant features are left out, reported NaN


def test_fit_style_bt_matches_the_gradient_condition():
    """At the optimum the gradient of the penalized log-likelihood vanishes (checked numerically)."""
    rng = np.random.default_rng(5)
    n, m = 300, 4
    a = rng.integers(0, m, n)
    b = (a + rng.integers(1, m, n)) % m
    score = rng.choice([0.0, 0.5, 1.0], n)
    x = rng.normal(size=(n, 2))
    theta, beta = fit_style_bt(a, b, score, x, m, reg=0.1)

    def loglik(th, be):
        z = th[a] - th[b] + x @ be
        return (-(score * np.logaddexp(0, -z) + (1 - score) * np.logaddexp(0, z)).sum()
                - 0.05 * (th @ th + be @ be))

    eps = 1e-6
    for j in range(2):
        d = np.zeros(2)
        d[j] = eps
        assert (loglik(theta, beta + d) - loglik(theta, beta - d)) / (2 * eps) == pytest.approx(0, abs=1e-5)
    assert theta.mean() == pytest.approx(0, abs=1e-12)


def test_style_features_count_markdown_outside_code():
    text = ("# Title\n## Part\nSome **bold** and __also__ text.\n- one\n* two\n  + three\n1. first\n12. twelfth\n"
            "```python\n# not a header\n- not an item\n```\n#nospace is no header\n**not\nbold**")
    got = style_features(text)
    assert got == {"chars": len(text), "headers": 2, "list_items": 5, "bold": 2}


def test_battle_style_sources_in_order():
    counts = {"chars": 10, "headers": 1, "list_items": 0, "bold": 2}
    stored = {"model_a": "x", "model_b": "y", "winner": "tie", "style_a": counts, "style_b": counts,
              "conversation_a": [{"role": "assistant", "content": "ignored"}]}
    assert battle_style(stored) == ({k: float(v) for k, v in counts.items()},) * 2
    arena = {"model_a": "x", "model_b": "y", "winner": "tie",
             "conversation_a": [{"role": "user", "content": "hi there"}, {"role": "assistant", "content": "**yo**"},
                                {"role": "user", "content": "more"}, {"role": "assistant", "content": "# h\n- a"}],
             "conversation_b": [{"role": "user", "content": "hi there"}, {"role": "assistant", "content": "hello"}]}
    a, b = battle_style(arena)
    assert a == {"chars": len("**yo**\n# h\n- a"), "headers": 1, "list_items": 1, "bold": 1}
    assert b == {"chars": 5, "headers": 0, "list_items": 0, "bold": 0}
    fastchat = {"model_a": "x", "model_b": "y", "winner": "tie", "conv_metadata": {
        "sum_assistant_a_tokens": 120, "header_count_a": {"h1": 1, "h2": 2}, "list_count_a": {"ordered": 3, "unordered": 1},
        "bold_count_a": {"**": 2, "__": 0}, "sum_assistant_b_tokens": 40, "header_count_b": {"h1": 0},
        "list_count_b": {"ordered": 0}, "bold_count_b": {"**": 1}}}
    assert battle_style(fastchat) == ({"chars": 120.0, "headers": 3.0, "list_items": 4.0, "bold": 2.0},
                                      {"chars": 40.0, "headers": 0.0, "list_items": 0.0, "bold": 1.0})
    assert battle_style({"model_a": "x", "model_b": "y", "winner": "tie"}) is None


def test_old_battles_without_style_are_refused_in_one_line():
    battles = simulate(5, seed=0) + [{"question_id": 7, "model_a": "sage", "model_b": "fair", "winner": "tie"}]
    with pytest.raises(NoStyle) as e:
        style_table(battles)
    message = str(e.value)
    assert "\n" not in message
    assert "1 of 6 battles" in message and "question 7" in message and "sage vs fair" in message


def test_a_feature_that_never_varies_has_no_coefficient_and_the_rest_are_fitted():
    battles = simulate(600, seed=8)
    for b in battles:
        b["style_a"]["headers"] = b["style_b"]["headers"] = 0
    _, coefficients = style_leaderboard(battles, bootstrap_rounds=10)
    by_feature = {c.feature: c for c in coefficients}
    headers = by_feature["headers"]
    assert (headers.value, headers.ci_low, headers.ci_high, headers.sd, headers.elo) == (None,) * 5
    assert by_feature["chars"].ci_low > 0
