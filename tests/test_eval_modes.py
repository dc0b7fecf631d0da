"""The judge's other modes over real HTTP, against a scripted OpenAI-compatible judge
(`test_eval_server.ScriptedServer`, as tests/test_eval_judge.py uses it): single-answer grades,
every model against one baseline, and reference-guided prompts.

The scripted judge reads the prompt (which question, whose answer, which reference) and replies
as each test constructs it, so the grades, battles and win rates the judge command reports can be
checked against numbers worked out by hand."""

import json
import re
from collections import Counter

import pytest
from test_eval_judge import MODELS, honest, judge_args, shown, write_inputs
from test_eval_server import Reply, ScriptedServer

from chatbuild import storage
from chatbuild.battles import read_battles
from chatbuild.cli import main
from chatbuild.ratings import baseline_of, baseline_win_rates, mean_grades, mean_interval
from eval.judge import SYSTEM_PROMPT, parse_grade, render, render_grade
from eval.questions import Question


# ── grades ──
@pytest.mark.parametrize("text, grade", [
    ("Solid answer.\n[[7]]", 7),
    ("[[ 7 ]]", 7),
    ("[[10]]", 10),
    ("At first [[3]], but on reflection [[8]]", 8),  # the last marker counts
    ("[[8]] ... though really [[seven]]", None),  # the last marker is not a number: invalid, not 8
    ("[[7.5]]", None),  # whole numbers only
    ("[[11]]", None),
    ("[[0]]", None),
    ("Rating: 7", None),  # a number without the marker is not a grade
    ("[7]", None),
    ("", None),
])
def test_parse_grade_is_strict(text, grade):
    assert parse_grade(text) == grade


def grade_shown(body) -> tuple[int, str]:
    """(question id, whose answer) from a grading request."""
    user = body["messages"][-1]["content"]
    qid = int(re.search(r"Question (\d+):", user).group(1))
    model = re.search(r"assistant's answer\]\n\[(\w+)\]", user).group(1)
    return qid, model


def test_single_mode_grades_each_answer_and_reports_means_and_invalid_grades(tmp_path, capsys):
    qfile, files = write_inputs(tmp_path, n_questions=4)
    out = tmp_path / "grades.jsonl"
    asked = Counter()
    # alpha: 9, 8, 9, 8; beta: 5 each; gamma: 2, 3, then one reply without a marker and one "[[7.5]]"
    grades = {"alpha": [9, 8, 9, 8], "beta": [5, 5, 5, 5], "gamma": [2, 3, None, None]}

    def respond(body):
        assert "grade the answer" in body["messages"][0]["content"]
        qid, model = grade_shown(body)
        asked[qid, model] += 1
        if model == "gamma" and qid == 3:
            return Reply("A weak answer; I cannot put a number on it.")
        if model == "gamma" and qid == 4:
            return Reply("Between a 7 and an 8. [[7.5]]")
        return Reply(f"Considered [[1]] at first. Final: [[{grades[model][qid - 1]}]]")

    with ScriptedServer(respond) as server:
        assert main(judge_args(server, qfile, files, out, "--mode", "single")) == 0
        assert set(asked) == {(q, m) for q in range(1, 5) for m in MODELS} and max(asked.values()) == 1
        assert main(judge_args(server, qfile, files, out, "--mode", "single")) == 0  # a rerun asks nothing
        assert max(asked.values()) == 1

    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(records) == 12
    by = {(r["model"], r["question_id"]): r for r in records}
    assert [by["alpha", q]["grade"] for q in range(1, 5)] == [9, 8, 9, 8]
    assert [by["gamma", q]["grade"] for q in range(1, 5)] == [2, 3, None, None]
    assert by["gamma", 4]["judge_reply"] == "Between a 7 and an 8. [[7.5]]"
    assert all(r["category"] == "test" and r["judge"] == "judge" for r in records)

    report = json.loads(out.with_name("grades.report.json").read_text())
    assert report["mode"] == "single" and report["answers"] == 12
    assert report["graded"] == 10 and report["invalid_grades"] == 2
    means = report["mean_grades"]
    assert means["alpha"]["mean"] == 8.5 and means["alpha"]["n"] == 4 and means["alpha"]["invalid"] == 0
    assert means["beta"] == {"mean": 5.0, "low": 5.0, "high": 5.0, "n": 4, "invalid": 0}  # no spread, no width
    assert means["gamma"]["mean"] == 2.5 and means["gamma"]["n"] == 2 and means["gamma"]["invalid"] == 2
    assert 8.0 <= means["alpha"]["low"] < 8.5 < means["alpha"]["high"] <= 9.0
    assert report["grade_counts"]["5"] == 4 and report["grade_counts"]["9"] == 2
    printed = capsys.readouterr().out
    assert "2 judge replies had no valid final [[1]]..[[10]] grade" in printed
    assert re.search(r"alpha\s+8\.50", printed)
    stored = storage.get_grades(out.with_suffix(".sqlite"))
    assert len(stored) == 12 and all(g.extra["category"] == "test" for g in stored.values())  # the UI filters on it
    assert not any("local_judge" in g.extra for g in stored.values())


def test_mean_interval_brackets_the_mean():
    m = mean_interval([1, 2, 3, 4, 5, 6, 7, 8, 9, 10], rounds=2000, seed=1)
    assert m.mean == 5.5 and m.n == 10
    assert 3.0 < m.low < 5.5 < m.high < 8.0
    assert mean_interval([]).mean is None


# ── one baseline ──
def test_baseline_win_rates_on_constructed_battles():
    def battle(a, b, winner):
        return {"model_a": a, "model_b": b, "winner": winner}

    battles = [battle("x", "base", "model_a"), battle("x", "base", "tie"), battle("base", "x", "model_a"),
               battle("base", "x", "model_b"),  # as model_a the baseline's loss is x's win
               battle("y", "base", "model_b"), battle("y", "base", "tie (bothbad)"),
               battle("x", "y", "model_a")]  # no baseline: not counted
    rates = baseline_win_rates(battles, "base", rounds=500, seed=0)
    assert list(rates) == ["x", "y"]
    assert rates["x"].mean == (1 + 0.5 + 0 + 1) / 4 and rates["x"].n == 4
    assert rates["y"].mean == 0.25 and rates["y"].n == 2
    assert 0 <= rates["x"].low <= 0.625 <= rates["x"].high <= 1


def test_baseline_of_reads_the_mark_or_finds_the_one_common_model():
    def battle(a, b, **mark):
        return {"model_a": a, "model_b": b, "winner": "tie", **mark}

    unmarked = [battle("x", "base"), battle("base", "y"), battle("z", "base")]
    assert baseline_of(unmarked) == "base"
    assert baseline_of(unmarked[:1]) is None  # two models: pairwise looks the same
    assert baseline_of([*unmarked, battle("x", "y")]) is None
    marked = [battle("x", "base", baseline="base"), battle("y", "base", baseline="base")]
    assert baseline_of(marked) == "base"  # two models suffice when the battles say so
    assert baseline_of([*marked, battle("x", "base")]) is None  # marked and unmarked mixed
    assert baseline_of([*marked, battle("x", "y", baseline="y")]) is None
    assert baseline_of([]) is None


def test_mean_grades_counts_invalid_replies_apart_and_keeps_every_listed_model():
    grades = [{"model": "x", "grade": 8}, {"model": "x", "grade": None}, {"model": "x", "grade": 6},
              {"model": "y", "grade": None}, {"model": "z", "grade": 3}]
    got = mean_grades(grades, rounds=200, seed=0, models=["y", "x", "w"])
    assert list(got) == ["y", "x", "w"]  # z not listed: left out; w listed without grades: n 0
    assert (got["x"].mean, got["x"].n, got["x"].invalid) == (7.0, 2, 1) and 6 <= got["x"].low <= 7 <= got["x"].high <= 8
    assert (got["y"].mean, got["y"].n, got["y"].invalid) == (None, 0, 1)
    assert (got["w"].n, got["w"].invalid) == (0, 0)
    assert list(mean_grades(grades, rounds=10)) == ["x", "y", "z"]


def test_baseline_mode_judges_each_model_against_the_baseline_in_both_orders(tmp_path, capsys):
    qfile, files = write_inputs(tmp_path, n_questions=4)
    out = tmp_path / "battles.jsonl"
    asked = Counter()

    def respond(body):
        qid, a, b = shown(body)
        asked[qid, a, b] += 1
        if {a, b} == {"gamma", "beta"}:
            # gamma vs beta: question 1 gamma, 2 position bias (a tie), 3 and 4 beta
            if qid == 2:
                return Reply("[[A]]")
            winner = "gamma" if qid == 1 else "beta"
            return Reply("[[A]]" if a == winner else "[[B]]")
        return Reply(honest(a, b))  # alpha beats beta everywhere

    with ScriptedServer(respond) as server:
        rc = main(judge_args(server, qfile, files, out, "--mode", "baseline", "--baseline", "beta"))
    assert rc == 0, capsys.readouterr().err
    # only pairs with the baseline, each in both orders, each once
    assert set(asked) == {(q, x, y) for q in range(1, 5) for m in ("alpha", "gamma")
                          for x, y in ((m, "beta"), ("beta", m))}
    assert max(asked.values()) == 1

    battles, _ = read_battles(out)
    assert len(battles) == 8 and all(b["model_b"] == "beta" and b["source"] == "judge" for b in battles)
    assert all(b["baseline"] == "beta" and "local_judge" not in b for b in battles)  # the mark the UI reads
    gamma = {b["question_id"]: b for b in battles if b["model_a"] == "gamma"}
    assert [gamma[q]["winner"] for q in range(1, 5)] == ["model_a", "tie", "model_b", "model_b"]
    assert gamma[2]["order_verdicts"] == ["model_a", "model_b"]

    report = json.loads(out.with_name("battles.report.json").read_text())
    assert report["mode"] == "baseline" and report["pairs"] == 8
    rates = report["baseline"]["win_rates"]
    assert report["baseline"]["model"] == "beta" and set(rates) == {"alpha", "gamma"}
    assert rates["alpha"] == {"mean": 1.0, "low": 1.0, "high": 1.0, "n": 4}
    assert rates["gamma"]["mean"] == 0.375 and rates["gamma"]["n"] == 4  # (1 + 0.5 + 0 + 0) / 4
    assert 0 <= rates["gamma"]["low"] < 0.375 < rates["gamma"]["high"] <= 1
    printed = capsys.readouterr().out
    assert "win rate against beta" in printed and re.search(r"gamma\s+37\.5%", printed)


def test_baseline_mode_refuses_a_missing_or_unknown_baseline(tmp_path, capsys):
    qfile, files = write_inputs(tmp_path, n_questions=1)
    args = ["eval", "judge", "--answers", *map(str, files), "--questions", str(qfile), "--judge-url",
            "http://127.0.0.1:9/v1", "--judge-model", "j", "--out", str(tmp_path / "b.jsonl")]
    assert main([*args, "--mode", "baseline"]) == 2
    assert "--mode baseline needs --baseline MODEL" in capsys.readouterr().err
    assert main([*args, "--mode", "baseline", "--baseline", "delta"]) == 2
    assert '--baseline "delta" has no answers here' in capsys.readouterr().err
    assert main([*args, "--baseline", "beta"]) == 2
    assert "--baseline applies to --mode baseline" in capsys.readouterr().err


# ── reference answers ──
def write_categorized(tmp, categories: dict[int, str]):
    qfile, files = write_inputs(tmp, n_questions=len(categories))
    qfile.write_text("".join(json.dumps({"question_id": q, "category": c, "text": f"Question {q}: why?"}) + "\n"
                             for q, c in categories.items()))
    refs = tmp / "refs.jsonl"
    refs.write_text("".join(json.dumps({"question_id": q, "answer": f"REFERENCE-{q}"}) + "\n" for q in categories))
    return qfile, files, refs


@pytest.mark.parametrize("mode, extra", [("pairwise", []), ("single", []), ("baseline", ["--baseline", "beta"])])
def test_the_reference_reaches_the_prompt_only_for_the_chosen_categories(tmp_path, mode, extra):
    qfile, files, refs = write_categorized(tmp_path, {1: "math", 2: "writing", 3: "coding", 4: "reasoning"})
    prompts = []

    def respond(body):
        prompts.append(body["messages"])
        return Reply("[[5]]" if mode == "single" else "[[TIE]]")

    out = tmp_path / "out.jsonl"
    with ScriptedServer(respond) as server:
        assert main(judge_args(server, qfile, files, out, "--mode", mode, *extra, "--reference", str(refs))) == 0
    seen = Counter()
    for messages in prompts:
        qid = int(re.search(r"Question (\d+):", messages[-1]["content"]).group(1))
        has = [f"REFERENCE-{q}" in messages[-1]["content"] for q in range(1, 5)]
        if qid == 2:  # writing: no reference, nor the rule about one
            assert not any(has) and "reference" not in messages[0]["content"]
        else:
            assert has == [q == qid for q in range(1, 5)] and "reference answer is given" in messages[0]["content"]
            assert messages[-1]["content"].index("REFERENCE") < messages[-1]["content"].index("[The start of")
        seen[qid] += 1
    assert sorted(seen) == [1, 2, 3, 4]
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert {r["question_id"] for r in records if r.get("reference_guided")} == {1, 3, 4}

    # other categories on request: only writing gets its reference now
    prompts.clear()
    with ScriptedServer(respond) as server:
        assert main(judge_args(server, qfile, files, tmp_path / "again.jsonl", "--mode", mode, *extra, "--reference",
                               str(refs), "--reference-categories", "writing")) == 0
    for messages in prompts:
        qid = int(re.search(r"Question (\d+):", messages[-1]["content"]).group(1))
        assert ("REFERENCE-" in messages[-1]["content"]) == (qid == 2)


@pytest.mark.parametrize("content, message", [
    ('{"question_id": 1, "answer": "x"}\n{"question_id": 2}\n', 'refs.jsonl:2: a reference needs "question_id" and "answer"'),
    ('{"question_id": 1, "answer": "x"}\n{"question_id": 1, "answer": "y"}\n', "refs.jsonl:2: a second reference for question 1"),
    ('{"question_id": 1, "answer": ""}\n', 'refs.jsonl:1, field "answer": must be a non-empty string'),
    ('{"question_id": 1, "answer": "x"}\nnot json\n', "refs.jsonl:2: malformed JSON"),
])
def test_a_bad_reference_file_is_a_one_line_error_naming_the_line(tmp_path, capsys, content, message):
    qfile, files = write_inputs(tmp_path, n_questions=1)
    refs = tmp_path / "refs.jsonl"
    refs.write_text(content)
    args = ["eval", "judge", "--answers", *map(str, files), "--questions", str(qfile), "--judge-url",
            "http://127.0.0.1:9/v1", "--judge-model", "j", "--out", str(tmp_path / "b.jsonl"), "--reference", str(refs)]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_prompts_without_a_reference_are_unchanged_so_stored_judgments_still_count():
    """Stored judgments are keyed by the exact prompt: adding references must not change the prompt
    of a question judged without one (that would re-ask every judgment of an existing run)."""
    q = Question(1, ("Q?",), "writing")
    messages = render(q, {"answer": "x"}, {"answer": "y"})
    assert messages == [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content":
                        "[User question]\nQ?\n\n[The start of Assistant A's answer]\nx\n[The end of Assistant A's answer]"
                        "\n\n[The start of Assistant B's answer]\ny\n[The end of Assistant B's answer]"}]
    two_turns = Question(2, ("First?", "Second?"), "math")
    rec = {"answer": "b2", "answers": ["b1", "b2"]}
    user = render(two_turns, {"answer": "a2", "answers": ["a1", "a2"]}, rec, reference="R")[-1]["content"]
    assert user.index("[Reference answer]\nR\n") < user.index("### User:\nFirst?") < user.index("### Assistant B:\nb2")
    graded = render_grade(two_turns, rec, reference="R")
    assert "reference answer is given" in graded[0]["content"]
    assert graded[1]["content"].index("R\n[The end of the reference") < graded[1]["content"].index("### Assistant:\nb1")


def test_a_local_judge_that_is_no_run_or_model_folder_is_a_clear_error(tmp_path, capsys):
    qfile, files = write_inputs(tmp_path, n_questions=1)
    args = ["eval", "judge", "--answers", *map(str, files), "--questions", str(qfile), "--out", str(tmp_path / "b.jsonl"),
            "--judge-model"]
    assert main([*args, "./runs/missing"]) == 2
    assert "--judge-model ./runs/missing: no such run folder or model folder" in capsys.readouterr().err
    assert main([*args, str(tmp_path)]) == 2  # a folder, but neither a run nor a model
    assert "neither a finished run folder nor a model folder" in capsys.readouterr().err
    assert main([*args, "judge@http://127.0.0.1:9/v1"]) == 2
    assert "give the URL with --judge-url" in capsys.readouterr().err


def test_retry_invalid_asks_again_only_for_invalid_grades(tmp_path):
    qfile, files = write_inputs(tmp_path, n_questions=2)
    out = tmp_path / "grades.jsonl"
    asked = Counter()
    fixed = {"on": False}

    def respond(body):
        qid, model = grade_shown(body)
        asked[qid, model] += 1
        if model == "gamma" and not fixed["on"]:
            return Reply("No grade from me.")
        return Reply(f"[[{MODELS[model] * 3}]]")

    with ScriptedServer(respond) as server:
        assert main(judge_args(server, qfile, files, out, "--mode", "single")) == 0
        assert json.loads(out.with_name("grades.report.json").read_text())["invalid_grades"] == 2
        fixed["on"] = True
        assert main(judge_args(server, qfile, files, out, "--mode", "single")) == 0  # stored: not asked again
        assert sum(asked.values()) == 6
        assert main(judge_args(server, qfile, files, out, "--mode", "single", "--retry-invalid")) == 0
    assert sum(asked.values()) == 8 and asked[1, "gamma"] == asked[2, "gamma"] == 2
    report = json.loads(out.with_name("grades.report.json").read_text())
    assert report["invalid_grades"] == 0 and report["mean_grades"]["gamma"]["mean"] == 3.0
