"""The Leaderboard tab's style control, category filter, judge–human agreement panel, baseline win
rates, single-answer grades and a local judge's warning, through gradio_client on the real serving
app with a real SQLite store (a scripted engine: the tab never generates)."""

import numpy as np
import pytest

from chatbuild import storage
from chatbuild.ratings import compute_style_control

pytest.importorskip("gradio")
pytest.importorskip("gradio_client")

from test_ui_helpers import ScriptedEngine, gradio_client, serving, ui_app  # noqa: E402

from tests.test_agreement import KAPPA, constructed  # noqa: E402
from tests.test_style_control import simulate  # noqa: E402


def judged() -> list[dict]:
    battles = simulate(1500, seed=0)
    for i, b in enumerate(battles):
        b.update(question_id=i, source="judge", judge="gpt-j", category="coding" if i % 3 == 0 else "writing")
    return battles


@pytest.fixture(scope="module")
def url(tmp_path_factory):
    db = tmp_path_factory.mktemp("ui-leaderboard") / "chatbuild.sqlite"
    with storage.transaction(db) as conn:
        storage.add_battles(conn, judged())
        storage.add_battles(conn, constructed())  # arena votes and verdicts on the same questions (x, y)
    with serving(ui_app(ScriptedEngine(), db)) as url:
        yield url


def test_plain_ratings_with_the_old_two_argument_call(url):
    with gradio_client(url) as client:
        summary, table, _, _, style, category, panel, *_ = client.predict(["judge"], True, api_name="/leaderboard")
    assert "**1510** battles (sources: judge; anonymous only)" in summary and "style control" not in summary
    assert style == ""
    assert {"coding", "writing"} <= {c[0] if isinstance(c, list) else c for c in category["choices"]}
    assert "gpt-j" in panel and f"{KAPPA:.2f}" in panel and "Shown first won" in panel


def test_style_control_and_category(url):
    with gradio_client(url) as client:
        summary, table, _, _, style, *_ = client.predict(["judge"], True, True, "coding", api_name="/leaderboard")
    assert "with style control" in summary and "category coding" in summary and "**500** battles" in summary
    assert "| chars |" in style
    expected, _ = compute_style_control([b for b in judged() if b["category"] == "coding"])
    assert {row[1]: row[2] for row in table["data"]} == pytest.approx(expected, abs=0.051)  # shown to 0.1
    with gradio_client(url) as client:  # the constructed arena/judge battles carry no style counts
        summary, table, *_ = client.predict(["human", "judge"], True, True, "All categories", api_name="/leaderboard")
    assert "style control cannot run" in summary and table["data"] in ([], [[None] * 5], [["", "", "", "", ""]])


# ── judge results: baseline win rates, single-answer grades, a local judge's warning ──
def baseline_battles() -> list[dict]:
    """A local judge's baseline-mode battles (alpha and gamma against base), each decided by both
    orders (`order_verdicts`), and another judge's pairwise ones (no baseline: no win-rate table)."""
    outcomes = {"alpha": ["model_a", "tie", "model_b", "model_a"],  # alpha's scores 1, ½, 0, 1
                "gamma": ["model_b", "model_b", "model_a", "tie"]}  # gamma's scores 0, 0, 1, ½
    orders = {"model_a": ["model_a", "model_a"], "model_b": ["model_b", "model_b"],
              "tie": ["model_a", "model_b"]}  # the tie: each order picked the answer shown first
    battles = [{"question_id": q, "model_a": model, "model_b": "base", "winner": w, "judge": "tiny-judge",
                "source": "judge", "order_verdicts": orders[w], "baseline": "base", "local_judge": True,
                "category": "math" if q <= 2 else "writing"}
               for model, ws in outcomes.items() for q, w in enumerate(ws, 1)]
    battles += [{"question_id": q, "model_a": a, "model_b": b, "winner": "model_a", "judge": "gpt-j",
                 "source": "judge", "category": "math"}
                for q, (a, b) in enumerate([("alpha", "beta"), ("beta", "gamma"), ("alpha", "gamma")], 1)]
    return battles


def grades() -> list[storage.Grade]:
    """Grades by a local judge (one invalid, one superseded by a later grade of the same answer) and
    by another judge."""
    def grade(key, judge, qid, model, value, tstamp=2.0, **extra):
        return storage.Grade(key, judge, qid, model, value, f"... [[{value}]]", tstamp, extra)

    local = {"local_judge": True}
    return [grade("a1-old", "tiny-judge", 1, "alpha", 2, 1.0, category="math", **local),  # superseded by a1
            grade("a1", "tiny-judge", 1, "alpha", 8, category="math", **local),
            grade("a2", "tiny-judge", 2, "alpha", 6, category="math", **local),
            grade("a3", "tiny-judge", 3, "alpha", None, category="writing", **local),
            grade("a4", "tiny-judge", 4, "alpha", 10, category="writing", **local),
            grade("g1", "tiny-judge", 1, "gamma", 3, category="math", **local),
            grade("g3", "tiny-judge", 3, "gamma", 5, category="writing", **local),
            grade("b1", "gpt-j", 1, "beta", 7, category="math"),
            grade("b2", "gpt-j", 2, "beta", 9, category="math")]


def bootstrap_interval(values: list[float]) -> tuple[float, float]:
    """The 95% percentile interval of the mean over 1000 resamples drawn from seed 0: the rounds and
    seed `eval judge` uses, so the tab shows its report's numbers."""
    x = np.asarray(values, dtype=float)
    means = x[np.random.default_rng(0).integers(0, len(x), (1000, len(x)))].mean(axis=1)
    return float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5))


@pytest.fixture(scope="module")
def judged_url(tmp_path_factory):
    db = tmp_path_factory.mktemp("ui-judges") / "chatbuild.sqlite"
    with storage.transaction(db) as conn:
        storage.add_battles(conn, baseline_battles())
        for g in grades():
            storage.add_grade(conn, g)
    with serving(ui_app(ScriptedEngine(), db)) as url:
        yield url


def test_baseline_win_rates_and_the_local_judges_warning(judged_url):
    with gradio_client(judged_url) as client:
        *_, judges, _ = client.predict(["judge"], True, False, "All categories", api_name="/leaderboard")
    assert "**Win rate vs base** (judge tiny-judge" in judges and "judge gpt-j" not in judges
    for model, scores in {"alpha": [1, 0.5, 0, 1], "gamma": [0, 0, 1, 0.5]}.items():
        low, high = bootstrap_interval(scores)
        assert f"| {model} | {sum(scores) / 4:.1%} | {low:.1%} – {high:.1%} | 4 |" in judges
    assert judges.index("| alpha | 62.5%") < judges.index("| gamma | 37.5%")  # best first
    # 8 battles, 16 single judgments: 6 decisive ones give each position one win, 2 ties give the first two
    assert ("⚠️ judge tiny-judge ran in chatbuild's own process: a small local model is a weak judge" in judges
            and f"the answer shown first won {10 / 16:.0%} of its 16 single judgments, the second {6 / 16:.0%}, "
                "tie 0%" in judges)

    with gradio_client(judged_url) as client:
        *_, judges, _ = client.predict(["judge"], True, False, "math", api_name="/leaderboard")
    low, high = bootstrap_interval([1, 0.5])
    assert f"| alpha | 75.0% | {low:.1%} – {high:.1%} | 2 |" in judges and "| gamma | 0.0% | 0.0% – 0.0% | 2 |" in judges
    assert "of its 8 single judgments" in judges


def test_single_answer_grades_panel(judged_url):
    with gradio_client(judged_url) as client:
        *_, category, _, _, panel = client.predict(["judge"], True, False, "All categories", api_name="/leaderboard")
    assert {"math", "writing"} <= {c[0] if isinstance(c, list) else c for c in category["choices"]}
    # the latest grade per answer counts (alpha's question 1: 8, not the older 2); the invalid one apart
    expected = {("tiny-judge", "alpha"): ([8, 6, 10], 1), ("tiny-judge", "gamma"): ([3, 5], 0),
                ("gpt-j", "beta"): ([7, 9], 0)}
    for (judge, model), (values, invalid) in expected.items():
        low, high = bootstrap_interval(values)
        row = f"| {judge} | {model} | {sum(values) / len(values):.2f} | {low:.2f} – {high:.2f} | {len(values)} | {invalid} |"
        assert row in panel, panel
    # the local judge's warning, with its grade counts (5 answers graded, each grade once)
    assert "⚠️ judge tiny-judge ran in chatbuild's own process" in panel
    assert "It gave [[3]] to 20% of the 5 answers it graded (5 distinct grades)" in panel
    assert "judge gpt-j ran" not in panel

    with gradio_client(judged_url) as client:
        *_, panel = client.predict(["judge"], True, False, "math", api_name="/leaderboard")
    assert "1–10 in category math" in panel and "| tiny-judge | alpha | 7.00 | 6.00 – 8.00 | 2 | 0 |" in panel
    assert "| tiny-judge | gamma | 3.00 | 3.00 – 3.00 | 1 | 0 |" in panel
    with gradio_client(judged_url) as client:
        *_, judges, panel = client.predict(["human"], True, False, "All categories", api_name="/leaderboard")
    assert "tick *judge*" in panel and judges == ""
