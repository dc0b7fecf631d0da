"""Evaluation on the embedded tiny model: answers from run folders in-process, and answers plus
judging over real HTTP against our own server (`serve.app`) hosting tiny runs.

The tiny runs' adapters are random (tests/runfolders.py), so answers and verdicts are meaningless;
what is checked is the machinery: the requests, both orders, stored raw replies, and a report whose
counts add up (a tiny judge rarely writes a verdict marker, so most verdicts are "invalid")."""

import json
import re

import pytest
from runfolders import make_run
from test_ui_helpers import serving

from chatbuild import storage
from chatbuild.cli import main
from eval.answers import read_answers

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def tiny_runs(tiny_base, tmp_path_factory):
    root = tmp_path_factory.mktemp("eval-runs")
    return make_run(tiny_base, root / "a", "tiny-a", seed=1), make_run(tiny_base, root / "b", "tiny-b", seed=2)


@pytest.fixture
def questions(tmp_path):
    f = tmp_path / "q.jsonl"
    f.write_text("".join(json.dumps({"question_id": i, "text": t}) + "\n" for i, t in
                         enumerate(["What should I cook tonight?", "How do plants grow?"], start=1))
                 + json.dumps({"question_id": 3, "turns": ["Name a color.", "Why that one?"]}) + "\n")
    return f


def test_answers_from_run_folders_in_process(tiny_runs, tiny_base, questions, tmp_path):
    out = tmp_path / "answers"
    args = ["eval", "answers", "--questions", str(questions), "--model", str(tiny_runs[0]), "--model", tiny_base.name,
            "--out", str(out), "--max-tokens", "12", "--seed", "0", "--concurrency", "2"]
    assert main(args) == 0
    a, base = read_answers(out / "tiny-a.jsonl"), read_answers(out / f"{tiny_base.name}.jsonl")
    assert [r["question_id"] for r in a] == [1, 2, 3] and [r["question_id"] for r in base] == [1, 2, 3]
    assert a[0]["generation"] == {"temperature": 0.7, "top_p": 0.9, "max_tokens": 12, "engine": "hf", "seed": 0,
                                  "run": str(tiny_runs[0])}
    assert base[0]["generation"]["model"] == tiny_base.name
    assert len(a[2]["answers"]) == 2  # the two-turn question
    assert main(args) == 0  # resumable: everything is there, the engine is not even opened


def test_answers_and_judge_over_http_against_our_served_tiny_model(tiny_runs, questions, tmp_path, capsys):
    from chatbuild.engines import open_engine
    from serve.app import create_app
    from serve.settings import Settings

    engine = open_engine(list(tiny_runs))
    try:
        with serving(create_app(engine, Settings(), ui=False)) as root:
            url = root.rstrip("/") + "/v1"
            answers = tmp_path / "answers"
            assert main(["eval", "answers", "--questions", str(questions), "--model", f"tiny-a@{url}",
                         "--model", f"tiny-b@{url}", "--out", str(answers), "--max-tokens", "12"]) == 0
            out = tmp_path / "battles.jsonl"
            rc = main(["eval", "judge", "--answers", str(answers), "--judge-url", url, "--judge-model", "tiny-a",
                       "--out", str(out), "--max-tokens", "24", "--concurrency", "2"])
            assert rc == 0, capsys.readouterr().err
    finally:
        engine.close()

    assert len(read_answers(answers / "tiny-b.jsonl")) == 3
    stored = storage.get_judgments(out.with_suffix(".sqlite"))
    assert len(stored) == 6  # 3 questions x 1 pair x 2 orders
    assert {(j.model_1, j.model_2) for j in stored.values()} == {("tiny-a", "tiny-b"), ("tiny-b", "tiny-a")}
    assert all(j.judge == "tiny-a" and j.verdict in ("A", "B", "tie", "invalid") for j in stored.values())
    assert all(j.extra["usage"].get("completion_tokens", 0) > 0 for j in stored.values())
    report = json.loads(out.with_name("battles.report.json").read_text())
    assert report["pairs"] == 3 and report["battles"] + report["invalid_pairs"] == 3
    assert report["invalid_judgments"] == sum(j.verdict == "invalid" for j in stored.values())


def test_guided_choice_makes_a_tiny_judge_give_valid_verdicts(tiny_runs, questions, tmp_path, capsys):
    """With --guided-choice the server may only answer a verdict marker (vLLM's guided_choice, which
    our API implements by restricting decoding), so even the tiny judge's verdicts all parse."""
    from chatbuild.engines import GenerationParams, open_engine
    from eval.judge import GUIDED_CHOICES
    from serve.app import create_app
    from serve.settings import Settings

    engine = open_engine(list(tiny_runs))
    try:
        for seed in range(4):  # sampled and greedy replies alike are exactly one of the choices
            for temperature in (0.0, 1.0):
                params = GenerationParams(temperature=temperature, seed=seed, max_new_tokens=16, choices=GUIDED_CHOICES)
                reply = "".join(c.text for c in engine.stream([{"role": "user", "content": "Which?"}], params, "tiny-b"))
                assert reply in GUIDED_CHOICES
        with serving(create_app(engine, Settings(), ui=False)) as root:
            url = root.rstrip("/") + "/v1"
            answers = tmp_path / "answers"
            assert main(["eval", "answers", "--questions", str(questions), "--model", f"tiny-a@{url}",
                         "--model", f"tiny-b@{url}", "--out", str(answers), "--max-tokens", "8"]) == 0
            out = tmp_path / "battles.jsonl"
            rc = main(["eval", "judge", "--answers", str(answers), "--judge-url", url, "--judge-model", "tiny-a",
                       "--out", str(out), "--max-tokens", "16", "--guided-choice"])
            assert rc == 0, capsys.readouterr().err
    finally:
        engine.close()
    stored = storage.get_judgments(out.with_suffix(".sqlite"))
    assert len(stored) == 6
    assert all(j.raw in GUIDED_CHOICES and j.verdict in ("A", "B", "tie") for j in stored.values()), stored
    report = json.loads(out.with_name("battles.report.json").read_text())
    assert report["invalid_judgments"] == 0 and report["battles"] == 3


def test_a_local_judge_from_a_run_or_the_bare_base_works_offline_and_shows_its_bias(tiny_runs, tiny_base, tmp_path,
                                                                                     capsys):
    """No --judge-url: the judge is a run folder (or the bare tiny base) in this process. Its verdicts
    are noise; what counts is that there are some, and that the report says how weak it is."""
    from test_eval_judge import write_inputs

    qfile, files = write_inputs(tmp_path, n_questions=2)
    out = tmp_path / "battles.jsonl"
    rc = main(["eval", "judge", "--answers", *map(str, files), "--questions", str(qfile), "--judge-model",
               str(tiny_runs[0]), "--out", str(out), "--max-tokens", "8", "--guided-choice"])
    assert rc == 0, capsys.readouterr().err
    stored = storage.get_judgments(out.with_suffix(".sqlite"))
    assert len(stored) == 2 * 3 * 2  # 2 questions x 3 pairs x 2 orders
    assert all(j.judge == "tiny-a" and j.verdict in ("A", "B", "tie") for j in stored.values())
    report = json.loads(out.with_name("battles.report.json").read_text())
    assert report["local_judge"] is True and report["battles"] == 6
    marked = storage.list_battles(out.with_suffix(".sqlite"), source="judge")  # the Leaderboard tab's warning reads it
    assert len(marked) == 6 and all(b["local_judge"] is True for b in marked)
    printed = capsys.readouterr().out
    bias = re.search(r"a small local model is a weak judge.*the answer shown first won (\d+)% of its 12 single "
                     r"judgments", printed)
    assert bias, printed
    first = sum(j.verdict == "A" for j in stored.values())
    assert int(bias.group(1)) == round(100 * first / 12)

    # single mode with the bare base as the judge: one grade per answer, valid with guided choice
    grades = tmp_path / "grades.jsonl"
    rc = main(["eval", "judge", "--answers", *map(str, files), "--questions", str(qfile), "--judge-model",
               str(tiny_base), "--mode", "single", "--out", str(grades), "--max-tokens", "8", "--guided-choice"])
    assert rc == 0, capsys.readouterr().err
    records = [json.loads(line) for line in grades.read_text().splitlines()]
    assert len(records) == 6 and all(r["judge"] == tiny_base.name and 1 <= r["grade"] <= 10 for r in records)
    printed = capsys.readouterr().out
    assert "a small local model is a weak judge" in printed and "distinct grades" in printed
    assert all(g.extra["local_judge"] is True for g in storage.get_grades(grades.with_suffix(".sqlite")).values())


def test_engine_client_fails_one_request_for_a_long_prompt_and_stops_for_an_unknown_model(tiny_runs):
    """The local judge's client: a prompt the engine refuses fails that request (the judge reports
    it and goes on); a wrong model name is a UserError, which stops the whole run."""
    from chatbuild.engines import UnknownModel, open_engine
    from eval.client import EngineClient, RequestFailed

    client = EngineClient(open_engine(list(tiny_runs), max_prompt_tokens=32))
    try:
        got = client.complete("tiny-a", [{"role": "user", "content": "Hi"}], max_tokens=4)
        assert got.usage["completion_tokens"] >= 1 and got.finish_reason in ("stop", "length")
        with pytest.raises(RequestFailed, match="prompt"):
            client.complete("tiny-a", [{"role": "user", "content": "word " * 200}], max_tokens=4)
        with pytest.raises(UnknownModel):
            client.complete("nobody", [{"role": "user", "content": "Hi"}], max_tokens=4)
    finally:
        client.close()
    client.close()  # a second close (the judge closes on an error, its caller again) does nothing
