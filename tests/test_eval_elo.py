"""`chatbuild eval elo` and the battles JSONL reader: the JSON shape, tables, files, bad input."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from chatbuild.battles import describe_skipped, read_battles
from chatbuild.cli import main
from chatbuild.errors import UserError

REPO = Path(__file__).resolve().parent.parent


def battles_file(path: Path, n: int = 60) -> Path:
    # x beats y, y beats z, mostly; some ties
    rows = []
    for i in range(n):
        a, b = [("x", "y"), ("y", "z"), ("x", "z")][i % 3]
        winner = "tie" if i % 7 == 0 else "model_a" if i % 5 else "model_b"
        rows.append({"question_id": i, "model_a": a, "model_b": b, "winner": winner, "judge": "j", "tstamp": float(i)})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


# ── the reader ──
def test_read_battles_keeps_every_field(tmp_path):
    f = tmp_path / "b.jsonl"
    f.write_text('{"model_a": "x", "model_b": "y", "winner": "tie (bothbad)", "anony": true, "extra": [1]}\n\n')
    battles, skipped = read_battles(f)
    assert battles == [{"model_a": "x", "model_b": "y", "winner": "tie (bothbad)", "anony": True, "extra": [1]}]
    assert not skipped


@pytest.mark.parametrize("line, message", [
    ('{"model_a": "x", "model_b": "y", "winner": "model_c"}', "expected one of model_a, model_b, tie, tie (bothbad)"),
    ('{"model_a": "x", "model_b": "x", "winner": "tie"}', "cannot battle itself"),
    ('{"model_a": "x", "winner": "tie"}', 'missing field "model_b"'),
    ('{"model_a": "", "model_b": "y", "winner": "tie"}', "non-empty string"),
    ('["x", "y"]', "JSON object"),
    ("{not json", "not valid JSON"),
])
def test_bad_lines_name_file_and_line(tmp_path, line, message):
    f = tmp_path / "b.jsonl"
    f.write_text('{"model_a": "x", "model_b": "y", "winner": "model_a"}\n' + line + "\n")
    with pytest.raises(UserError, match=rf"b.jsonl:2: .*{_re(message)}"):
        read_battles(f)


def _re(s: str) -> str:
    import re

    return re.escape(s)


def test_skip_invalid_counts_by_reason(tmp_path):
    f = tmp_path / "b.jsonl"
    f.write_text("\n".join([
        '{"model_a": "x", "model_b": "y", "winner": "model_a"}',
        '{"model_a": "x", "model_b": "x", "winner": "tie"}',
        '{"model_a": "y", "model_b": "y", "winner": "tie"}',
        '{"model_a": "x", "model_b": "y", "winner": "A"}',
    ]) + "\n")
    battles, skipped = read_battles(f, skip_invalid=True)
    assert len(battles) == 1
    assert describe_skipped(skipped) == "skipped 3 lines: 2 self-battle, 1 unknown winner"


def test_empty_files_are_errors(tmp_path):
    f = tmp_path / "b.jsonl"
    f.write_text("\n")
    with pytest.raises(UserError, match="no battles in this file"):
        read_battles(f)
    f.write_text('{"model_a": "x", "model_b": "x", "winner": "tie"}\n')
    with pytest.raises(UserError, match=r"no battles in this file \(skipped 1 line: 1 self-battle\)"):
        read_battles(f, skip_invalid=True)
    with pytest.raises(UserError, match="no such battles file"):
        read_battles(tmp_path / "missing.jsonl")


# ── the command ──
@pytest.mark.parametrize("method, intervals", [("paper", True), ("elo", False), ("bt", True)])
def test_json_shape(tmp_path, capsys, method, intervals):
    f = battles_file(tmp_path / "b.jsonl")
    assert main(["eval", "elo", str(f), "--method", method, "--permutations", "50", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert list(out) == ["method", "ratings"] and out["method"] == method
    assert [list(r) for r in out["ratings"]] == [["model", "rating", "ci_low", "ci_high", "battles"]] * 3
    assert [r["model"] for r in out["ratings"]] == ["x", "y", "z"]
    ratings = [r["rating"] for r in out["ratings"]]
    assert ratings == sorted(ratings, reverse=True)
    assert [r["battles"] for r in out["ratings"]] == [40, 40, 40]
    for r in out["ratings"]:
        if intervals:
            assert r["ci_low"] <= r["rating"] <= r["ci_high"]
        else:
            assert r["ci_low"] is None and r["ci_high"] is None


def test_json_through_the_console_script(tmp_path):
    """The real command line, as a user runs it: stdout is exactly the JSON document."""
    f = battles_file(tmp_path / "b.jsonl")
    out = subprocess.run([sys.executable, "-m", "chatbuild.cli", "eval", "elo", str(f), "--method", "elo",
                          "--bootstrap", "20", "--json"], capture_output=True, text=True, cwd=REPO)
    assert out.returncode == 0, out.stderr
    doc = json.loads(out.stdout)
    assert doc["method"] == "elo" and all(r["ci_low"] is not None for r in doc["ratings"])


def test_table_markdown_and_plot(tmp_path, capsys, artifacts_dir):
    f = battles_file(tmp_path / "b.jsonl")
    md, png = tmp_path / "lb.md", artifacts_dir / "eval-elo-leaderboard.png"
    assert main(["eval", "elo", str(f), "--method", "bt", "--bootstrap", "30", "--markdown", str(md),
                 "--plot", str(png)]) == 0
    printed = capsys.readouterr().out
    assert "Bradley–Terry" in printed and "95% interval" in printed and "x " in printed
    text = md.read_text()
    assert "| Rank (UB) | Model | Rating | 95% interval | Battles |" in text and "| x |" in text
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_several_files_are_pooled_and_seed_matters(tmp_path, capsys):
    a, b = battles_file(tmp_path / "a.jsonl", 30), battles_file(tmp_path / "b.jsonl", 30)

    def ratings(*args):
        assert main(["eval", "elo", *args, "--json", "--permutations", "40"]) == 0
        return json.loads(capsys.readouterr().out)["ratings"]

    pooled = ratings(str(a), str(b))
    assert sum(r["battles"] for r in pooled) == 2 * 60
    assert ratings(str(a), str(b), "--seed", "1") == ratings(str(a), str(b), "--seed", "1")
    assert ratings(str(a), str(b), "--seed", "1") != ratings(str(a), str(b), "--seed", "2")


def test_bad_input_is_a_one_line_error(tmp_path, capsys):
    f = tmp_path / "b.jsonl"
    f.write_text('{"model_a": "x", "model_b": "x", "winner": "tie"}\n{"model_a": "x", "model_b": "y", "winner": "tie"}\n')
    assert main(["eval", "elo", str(f)]) == 2
    err = capsys.readouterr().err
    assert "b.jsonl:1" in err and "--skip-invalid" in err and "Traceback" not in err
    assert main(["eval", "elo", str(f), "--skip-invalid", "--json", "--permutations", "10"]) == 0
    captured = capsys.readouterr()
    assert "skipped 1 line: 1 self-battle" in captured.err
    assert json.loads(captured.out)["ratings"][0]["battles"] == 1
    assert main(["eval", "elo", str(f), "--skip-invalid", "--permutations", "0"]) == 2
    assert "--permutations must be >= 1" in capsys.readouterr().err


def test_a_new_rating_method_is_one_registry_entry(tmp_path, monkeypatch, capsys):
    """Registering a method in chatbuild.ratings.METHODS is all it takes: `eval elo --method` offers
    it and computes with it, and the eval config check accepts it."""
    from chatbuild import ratings
    from chatbuild.errors import ConfigError
    from chatbuild.evalconfig import EvalConfig, JudgeSettings, RatingSettings
    from eval.run import check

    def wins(table, k, permutations, seed):  # a model's rating: 1000 + its wins (ties half)
        w = ratings.win_matrix(table).sum(axis=1)
        return {m: 1000.0 + float(x) for m, x in zip(table.models, w)}

    cfg = EvalConfig(models=["a@http://x", "b@http://x"], judge=JudgeSettings(url="http://j", model="j"),
                     ratings=RatingSettings(method="wins"))
    with pytest.raises(ConfigError, match=r'ratings\.method "wins" is not one of paper, elo, bt$') as e:
        check(cfg, "e.yaml")
    assert e.value.key == "ratings.method"
    monkeypatch.setitem(ratings.METHODS, "wins", ratings.Method(wins, 0, "1000 + wins, ties half"))

    check(cfg, "e.yaml")
    with pytest.raises(SystemExit):
        main(["eval", "elo", "--help"])
    assert "{paper,elo,bt,wins}" in capsys.readouterr().out
    f = battles_file(tmp_path / "b.jsonl")
    assert main(["eval", "elo", str(f), "--method", "wins"]) == 0
    printed = capsys.readouterr().out
    assert printed.startswith("1000 + wins, ties half; 60 battles\n") and "1031.0" in printed  # x: 31 of its 40 battles


def test_interval_text():
    from chatbuild.leaderboard import interval_text
    from chatbuild.ratings import Rating

    row = Rating("x", 1010.0, 980.25, 1050.0, 12, 1)
    assert interval_text(row) == "980.2 – 1050.0"
    assert interval_text(row, 0, offsets=True) == "980 – 1050 (−30/+40)"
    assert interval_text(Rating("x", 1010.0, None, None, 12, 1)) == "–"
    assert interval_text(Rating("x", 1010.0, float("nan"), float("nan"), 12, 1)) == "–"


# ── style control and categories ──
def style_battles_file(path: Path, with_style: bool = True) -> Path:
    from tests.test_style_control import simulate

    rows = simulate(3000, seed=4)
    for i, r in enumerate(rows):
        r["question_id"], r["category"] = i, ("coding" if i % 3 == 0 else "writing")
        if not with_style:
            del r["style_a"], r["style_b"]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_style_control_json_has_adjusted_ratings_and_coefficients(tmp_path, capsys):
    f = style_battles_file(tmp_path / "b.jsonl")
    assert main(["eval", "elo", str(f), "--style-control", "--bootstrap", "20", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["method"] == "bt" and out["style_control"] is True
    models = [r["model"] for r in out["ratings"]]
    assert models[0] == "sage" and models[-1] == "rambler"  # the true best and worst
    style = {c["feature"]: c for c in out["style"]}
    assert set(style) == {"chars", "headers", "list_items", "bold"}
    assert style["chars"]["ci_low"] > 0 and style["chars"]["elo"] > 0
    assert main(["eval", "elo", str(f), "--method", "bt", "--bootstrap", "0", "--json"]) == 0
    raw = json.loads(capsys.readouterr().out)
    assert raw["ratings"][0]["model"] == "rambler" and "style" not in raw  # raw ratings reward length


def test_style_control_table_and_markdown(tmp_path, capsys):
    f = style_battles_file(tmp_path / "b.jsonl")
    md = tmp_path / "lb.md"
    assert main(["eval", "elo", str(f), "--style-control", "--bootstrap", "10", "--markdown", str(md)]) == 0
    printed = capsys.readouterr().out
    assert "style control" in printed and "style coefficients" in printed and "chars" in printed
    assert "| Style feature |" in md.read_text() and "| chars |" in md.read_text()


def test_style_control_on_old_battles_says_why_in_one_line(tmp_path, capsys):
    f = style_battles_file(tmp_path / "b.jsonl", with_style=False)
    assert main(["eval", "elo", str(f), "--style-control"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "style control cannot run: 3000 of 3000 battles" in err
    assert main(["eval", "elo", str(f), "--style-control", "--method", "paper"]) == 2
    assert "does not combine with --method paper" in capsys.readouterr().err


def test_by_category_rates_each_category_alone(tmp_path, capsys):
    f = style_battles_file(tmp_path / "b.jsonl")
    lines = f.read_text().splitlines()
    extra = json.loads(lines[0])
    del extra["category"]
    f.write_text("\n".join(lines + [json.dumps(extra)]) + "\n")
    assert main(["eval", "elo", str(f), "--method", "bt", "--bootstrap", "0", "--by-category", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert [(c["category"], c["battles"]) for c in out["categories"]] == [("coding", 1000), ("writing", 2000),
                                                                            ("uncategorized", 1)]
    from chatbuild.ratings import compute_bt

    coding = [json.loads(line) for line in lines if json.loads(line)["category"] == "coding"]
    expected = compute_bt(coding)
    for r in out["categories"][0]["ratings"]:
        assert r["rating"] == pytest.approx(expected[r["model"]])
    assert main(["eval", "elo", str(f), "--method", "bt", "--bootstrap", "0", "--by-category"]) == 0
    printed = capsys.readouterr().out
    assert "== category: coding (1000 battles)" in printed and "== category: uncategorized (1 battles)" in printed
    assert main(["eval", "elo", str(f), "--by-category", "--plot", str(tmp_path / "p.png")]) == 2
    assert "leave it out with --by-category" in capsys.readouterr().err
