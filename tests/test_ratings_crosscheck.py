"""Cross-checks of our Bradley–Terry against independent implementations on the same battles:
plain BT against the `evalica` package (Newman's iterations, a different algorithm from our Newton
steps), style-controlled BT against a general-purpose optimizer (scipy's L-BFGS, as FastChat fits
it) on the same penalized likelihood. Both to 0.1 rating points."""

import math

import numpy as np
import pytest

from chatbuild.ratings import (
    FEATURES,
    compute_bt,
    compute_style_control,
    fit_style_bt,
    style_scale,
    style_table,
)
from tests.test_ratings import random_battles, simulate_bt
from tests.test_style_control import simulate

evalica = pytest.importorskip("evalica")  # the dev extra
optimize = pytest.importorskip("scipy.optimize")  # comes with evalica


def evalica_bt(battles) -> dict[str, float]:
    """evalica's Bradley–Terry on our Elo scale. evalica returns strengths π = exp(θ) (ties half a win
    each, as ours); ours are R = 1000 + 400/ln 10 · θ with θ centred to mean 0."""
    winner = {"model_a": evalica.Winner.X, "model_b": evalica.Winner.Y, "tie": evalica.Winner.Draw,
              "tie (bothbad)": evalica.Winner.Draw}
    got = evalica.bradley_terry([b["model_a"] for b in battles], [b["model_b"] for b in battles],
                                [winner[b["winner"]] for b in battles], tolerance=1e-12, limit=100_000)
    theta = np.log(got.scores.to_numpy())
    theta -= theta.mean()
    return dict(zip(got.scores.index, (1000 + 400 / math.log(10) * theta).tolist()))


@pytest.mark.parametrize("battles", [
    simulate_bt({"a": 1200, "b": 1100, "c": 1000, "d": 950, "e": 800}, 3000, seed=1),
    random_battles(600, ["p", "q", "r", "s"], seed=2, ties=0.3),  # many ties, both kinds
], ids=["spread", "ties"])
def test_bt_agrees_with_evalica(battles):
    ours, theirs = compute_bt(battles), evalica_bt(battles)
    assert set(ours) == set(theirs)
    for model in ours:
        assert ours[model] == pytest.approx(theirs[model], abs=0.1)


def test_style_control_agrees_with_lbfgs_on_the_same_likelihood():
    battles = simulate(3000, seed=6)
    st = style_table(battles)
    t, x = st.battles, st.diffs / style_scale(st.diffs)
    m, reg = len(t.models), 1e-6

    def loss_and_grad(w):
        z = w[t.a] - w[t.b] + x @ w[m:]
        p = 1 / (1 + np.exp(-z))
        loss = (t.score * np.logaddexp(0, -z) + (1 - t.score) * np.logaddexp(0, z)).sum() + reg / 2 * w @ w
        r = t.score - p
        grad = -np.concatenate([np.bincount(t.a, r, m) - np.bincount(t.b, r, m), x.T @ r]) + reg * w
        return loss, grad

    found = optimize.minimize(loss_and_grad, np.zeros(m + len(FEATURES)), jac=True, method="L-BFGS-B",
                              options={"gtol": 1e-9, "maxiter": 10_000})
    theta = found.x[:m] - found.x[:m].mean()
    expected = 1000 + 400 / math.log(10) * theta
    ratings, betas = compute_style_control(battles)
    for model, value in zip(t.models, expected):
        assert ratings[model] == pytest.approx(value, abs=0.1)
    assert list(betas.values()) == pytest.approx(found.x[m:].tolist(), abs=1e-3)
    theta_newton, _ = fit_style_bt(t.a, t.b, t.score, x, m, reg)
    assert theta_newton == pytest.approx(theta, abs=1e-3)
