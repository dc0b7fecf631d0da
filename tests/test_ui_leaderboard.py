"""The Leaderboard tab's style control, category filter and judge–human agreement panel, through
gradio_client on the real serving app (a scripted engine: the tab never generates)."""

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
        summary, table, _, _, style, category, panel = client.predict(["judge"], True, api_name="/leaderboard")
    assert "**1510** battles (sources: judge; anonymous only)" in summary and "style control" not in summary
    assert style == ""
    assert {"coding", "writing"} <= {c[0] if isinstance(c, list) else c for c in category["choices"]}
    assert "gpt-j" in panel and f"{KAPPA:.2f}" in panel and "Shown first won" in panel


def test_style_control_and_category(url):
    with gradio_client(url) as client:
        summary, table, *_ , style, _, _ = client.predict(["judge"], True, True, "coding", api_name="/leaderboard")
    assert "with style control" in summary and "category coding" in summary and "**500** battles" in summary
    assert "| chars |" in style
    expected, _ = compute_style_control([b for b in judged() if b["category"] == "coding"])
    assert {row[1]: row[2] for row in table["data"]} == pytest.approx(expected, abs=0.051)  # shown to 0.1
    with gradio_client(url) as client:  # the constructed arena/judge battles carry no style counts
        summary, table, *_ = client.predict(["human", "judge"], True, True, "All categories", api_name="/leaderboard")
    assert "style control cannot run" in summary and table["data"] in ([], [[None] * 5], [["", "", "", "", ""]])
