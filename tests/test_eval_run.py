"""Answer generation and the whole `chatbuild eval run` loop over real HTTP, against one scripted
OpenAI-compatible server that plays three models and the judge."""

import json
import re
import sys
import threading
from collections import Counter

import pytest
from test_eval_server import Reply, ScriptedServer

from chatbuild.cli import main
from chatbuild.errors import UserError
from eval.answers import ModelSpec, open_in_process_engine, parse_model, read_answers
from eval.questions import load_questions

STRENGTH = {"alpha": 3, "beta": 2, "gamma": 1}


class ModelsAndJudge:
    """Models reply "<<model:NAME>> ..." (stronger ones longer); the judge prefers the stronger
    model's answer, whichever position it is shown in."""

    def __init__(self, fail_question_text: str | None = None):
        self.requests = Counter()  # (model, first user message) → count
        self.bodies = []
        self.lock = threading.Lock()
        self.fail_question_text = fail_question_text

    def __call__(self, body) -> Reply:
        messages = body["messages"]
        with self.lock:
            self.bodies.append(body)
        if messages[0]["role"] == "system" and "impartial judge" in messages[0]["content"]:
            user = messages[-1]["content"]
            split = re.split(r"\[The start of (?:the conversation with )?Assistant B", user)
            a = re.findall(r"<<model:(\w+)>>", split[0])[-1]
            b = re.findall(r"<<model:(\w+)>>", split[1])[-1]
            return Reply("Comparing both. " + ("[[A]]" if STRENGTH[a] > STRENGTH[b] else "[[B]]"))
        model = body["model"]
        first = messages[0]["content"]
        with self.lock:
            self.requests[(model, first)] += 1
        if first == self.fail_question_text:
            return Reply(status=500)
        turn = sum(m["role"] == "user" for m in messages)
        return Reply(f"<<model:{model}>> turn {turn}: " + "words " * (5 * STRENGTH[model]))


def test_answers_from_served_models_with_paper_sampling_and_resume(tmp_path, capsys):
    questions = load_questions("demo")
    multi = [q for q in questions if len(q.turns) > 1]
    out = tmp_path / "answers"
    script = ModelsAndJudge()
    with ScriptedServer(script, models=["alpha", "beta"]) as server:
        args = ["eval", "answers", "--questions", "demo", "--model", f"alpha@{server.url}",
                "--model", f"beta@{server.url}", "--out", str(out), "--concurrency", "3"]
        assert main(args) == 0
        first_requests = sum(script.requests.values())
        assert first_requests == 2 * sum(len(q.turns) for q in questions)
        assert all(b["temperature"] == 0.7 and b["top_p"] == 0.9 and b["max_tokens"] == 512 for b in script.bodies)

        recs = read_answers(out / "alpha.jsonl")
        assert [r["question_id"] for r in recs] == [q.question_id for q in questions]  # in question order
        r0 = recs[0]
        assert set(r0) >= {"question_id", "model", "answer", "generation"} and r0["model"] == "alpha"
        assert r0["generation"] == {"temperature": 0.7, "top_p": 0.9, "max_tokens": 512, "engine": "openai",
                                    "url": server.url}
        assert r0["question"] == list(questions[0].turns)
        if multi:  # each turn saw the conversation so far
            m = next(r for r in recs if r["question_id"] == multi[0].question_id)
            assert len(m["answers"]) == len(multi[0].turns) and m["answer"] == m["answers"][-1]
            assert m["answer"].startswith(f"<<model:alpha>> turn {len(multi[0].turns)}")

        # resume: lose two answers and leave a cut-off last line; only those two are asked again
        lines = (out / "alpha.jsonl").read_text().splitlines()
        (out / "alpha.jsonl").write_text("\n".join(lines[2:]) + "\n" + lines[0][:25])
        assert main(args) == 0
        assert sum(script.requests.values()) == first_requests + len(questions[0].turns) + len(questions[1].turns)
        assert [r["question_id"] for r in read_answers(out / "alpha.jsonl")] == [q.question_id for q in questions]
        assert "cut-off last line" in capsys.readouterr().err


def test_failed_questions_are_reported_and_the_rest_kept(tmp_path, capsys):
    questions = load_questions("demo")
    script = ModelsAndJudge(fail_question_text=questions[2].turns[0])
    with ScriptedServer(script) as server:
        args = ["eval", "answers", "--model", f"alpha@{server.url}", "--out", str(tmp_path), "--retries", "1"]
        assert main(args) == 2
        err = capsys.readouterr().err
        assert "1 question(s) could not be answered" in err and "rerun to retry" in err
        assert len(read_answers(tmp_path / "alpha.jsonl")) == len(questions) - 1


def test_model_specs():
    assert parse_model("gpt-4o@https://api.example.org/v1") == ModelSpec("gpt-4o", url="https://api.example.org/v1")
    assert parse_model("org/model@http://127.0.0.1:8000") == ModelSpec("org/model", url="http://127.0.0.1:8000")
    assert parse_model("tiny-base") == ModelSpec("tiny-base")  # a model of the in-process engine
    with pytest.raises(UserError, match="no such run folder"):
        parse_model("runs/missing")
    with pytest.raises(UserError, match="needs at least one run folder"):
        open_in_process_engine([ModelSpec("tiny-base")])


def test_run_folders_without_the_engine_get_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "chatbuild.engines", None)  # as if the serving layer were absent
    with pytest.raises(UserError, match="needs the serving layer's engine.*chatbuild serve"):
        open_in_process_engine([ModelSpec("tiny", run=tmp_path)])


def test_eval_run_end_to_end_and_resume(tmp_path, capsys):
    script = ModelsAndJudge()
    with ScriptedServer(script, models=list(STRENGTH) + ["judge"]) as server:
        cfg = tmp_path / "eval.yaml"
        cfg.write_text(
            "questions: demo\n"
            f"models: [alpha@{server.url}, beta@{server.url}, gamma@{server.url}]\n"
            f"judge: {{url: '{server.url}', model: judge, backoff: 0.01}}\n"
            "ratings: {method: bt, bootstrap: 20}\n"
            "out: results\n"
        )
        assert main(["eval", "run", str(cfg), "judge.concurrency=4", "generation.concurrency=3"]) == 0
        printed = capsys.readouterr().out
        assert "== 1. answers" in printed and "== 3. ratings" in printed

        out = tmp_path / "results"  # relative to the config file
        for f in ("config.yaml", "answers/alpha.jsonl", "answers/gamma.jsonl", "judge.sqlite", "battles.jsonl",
                  "battles.report.json", "leaderboard.json", "leaderboard.md", "leaderboard.png"):
            assert (out / f).exists(), f
        board = json.loads((out / "leaderboard.json").read_text())
        assert board["method"] == "bt" and [r["model"] for r in board["ratings"]] == ["alpha", "beta", "gamma"]
        n_questions = len(load_questions("demo"))
        assert sum(r["battles"] for r in board["ratings"]) == 2 * 3 * n_questions

        asked = len(script.bodies)
        assert main(["eval", "run", str(cfg)]) == 0  # resumable: everything is already there
        assert len(script.bodies) == asked


def test_eval_run_config_errors(tmp_path, capsys):
    cfg = tmp_path / "eval.yaml"
    cfg.write_text("models: [a@http://x/v1]\njudge: {url: 'http://x/v1', model: j}\n")
    assert main(["eval", "run", str(cfg)]) == 2
    assert "at least two models" in capsys.readouterr().err
    cfg.write_text("models: [a@http://x/v1, b@http://x/v1]\njudge: {url: 'http://x/v1', model: j}\nratngs: {}\n")
    assert main(["eval", "run", str(cfg)]) == 2
    assert "did you mean ratings" in capsys.readouterr().err
    cfg.write_text("models: [a@http://x/v1, b@http://x/v1]\n")
    assert main(["eval", "run", str(cfg)]) == 2
    assert "judge.model is required" in capsys.readouterr().err
    two = "models: [a@http://x/v1, b@http://x/v1]\n"
    for judge, ratings, message in [
        ("{url: 'http://x/v1', model: j, mode: triple}", "{}", 'judge.mode "triple" is not one of pairwise, baseline, single'),
        ("{url: 'http://x/v1', model: j, mode: baseline}", "{}", "judge.baseline is required with mode baseline"),
        ("{url: 'http://x/v1', model: j, baseline: a}", "{}", "judge.baseline applies to mode baseline, not pairwise"),
        ("{url: 'http://x/v1', model: j}", "{style_control: true}", "ratings.style_control is Bradley-Terry"),
    ]:
        cfg.write_text(f"{two}judge: {judge}\nratings: {ratings}\n")
        assert main(["eval", "run", str(cfg)]) == 2
        assert message in capsys.readouterr().err


def test_eval_run_baseline_mode_with_style_control_by_category(tmp_path, capsys):
    script = ModelsAndJudge()
    with ScriptedServer(script, models=list(STRENGTH) + ["judge"]) as server:
        cfg = tmp_path / "eval.yaml"
        cfg.write_text(
            f"models: [alpha@{server.url}, beta@{server.url}, gamma@{server.url}]\n"
            f"judge: {{url: '{server.url}', model: judge, mode: baseline, baseline: beta}}\n"
            "ratings: {method: bt, bootstrap: 5, style_control: true, by_category: true}\n"
        )
        assert main(["eval", "run", str(cfg)]) == 0
    printed = capsys.readouterr().out
    assert "2. judge (baseline)" in printed and "win rate against beta" in printed
    out = tmp_path / "eval-out"
    battles = [json.loads(line) for line in (out / "battles.jsonl").read_text().splitlines()]
    assert battles and all(b["model_b"] == "beta" for b in battles)
    report = json.loads((out / "battles.report.json").read_text())
    assert report["baseline"]["win_rates"]["alpha"]["mean"] == 1.0 and report["baseline"]["win_rates"]["gamma"]["mean"] == 0.0
    board = json.loads((out / "leaderboard.json").read_text())
    categories = {c["category"] for c in board["categories"]}
    assert categories == {q.category for q in load_questions("demo")}
    assert all("style" in c for c in board["categories"])
    assert "### coding" in (out / "leaderboard.md").read_text()


def test_eval_run_single_mode_with_references_next_to_the_config(tmp_path, capsys):
    script = ModelsAndJudge()
    grading = []

    def respond(body):
        system = body["messages"][0]["content"]
        if "grade the answer" in system:
            grading.append(body["messages"])
            model = re.findall(r"<<model:(\w+)>>", body["messages"][-1]["content"])[-1]
            return Reply(f"Fine. [[{3 * STRENGTH[model]}]]")
        return script(body)

    math = [q for q in load_questions("demo") if q.category == "math"]
    (tmp_path / "refs.jsonl").write_text(json.dumps({"question_id": math[0].question_id, "answer": "REF-42"}) + "\n")
    with ScriptedServer(respond, models=list(STRENGTH) + ["judge"]) as server:
        cfg = tmp_path / "eval.yaml"
        cfg.write_text(
            f"models: [alpha@{server.url}, beta@{server.url}, gamma@{server.url}]\n"
            f"judge: {{url: '{server.url}', model: judge, mode: single, reference: refs.jsonl}}\n"
        )
        assert main(["eval", "run", str(cfg)]) == 0
    out = tmp_path / "eval-out"
    report = json.loads((out / "grades.report.json").read_text())
    assert {m: g["mean"] for m, g in report["mean_grades"].items()} == {"alpha": 9.0, "beta": 6.0, "gamma": 3.0}
    assert report["invalid_grades"] == 0 and not (out / "leaderboard.json").exists()
    with_ref = [m for m in grading if "REF-42" in m[-1]["content"]]
    assert len(with_ref) == 3 and all(math[0].text in m[-1]["content"] for m in with_ref)
    assert "mean grades" in capsys.readouterr().out


def test_eval_run_with_a_judge_that_never_gives_a_verdict(tmp_path, capsys):
    """A tiny local judge rarely ends with [[A]]/[[B]]/[[TIE]]: the run reports it instead of crashing."""
    script = ModelsAndJudge()

    def respond(body):
        reply = script(body)
        return Reply("I like both.") if "impartial judge" in body["messages"][0]["content"] else reply

    with ScriptedServer(respond) as server:
        cfg = tmp_path / "eval.yaml"
        cfg.write_text(f"models: [alpha@{server.url}, beta@{server.url}]\njudge: {{url: '{server.url}', model: j}}\n")
        assert main(["eval", "run", str(cfg)]) == 0
    printed = capsys.readouterr().out
    assert "no battles to rate" in printed and "pairs had an unparseable verdict" in printed
    assert not (tmp_path / "eval-out" / "leaderboard.json").exists()


def test_config_models_a_folder_beside_the_config_is_not_a_run(tmp_path):
    """A bare model name stays a name even when a folder of that name sits beside the config (the
    demo writes eval.yaml next to its base, "tiny-base"); a path with "/" is resolved, and a broken
    one is a clear error."""
    from eval.run import load_eval_config

    (tmp_path / "tiny-base").mkdir()
    (tmp_path / "runs" / "half").mkdir(parents=True)
    cfg_path = tmp_path / "eval.yaml"
    cfg_path.write_text("models: [tiny-base, 'm@http://127.0.0.1:9/v1']\njudge: {url: 'http://127.0.0.1:9/v1', model: j}\n")
    assert load_eval_config(cfg_path).models == ["tiny-base", "m@http://127.0.0.1:9/v1"]
    cfg_path.write_text("models: [runs/half, tiny-base]\njudge: {url: 'http://127.0.0.1:9/v1', model: j}\n")
    assert load_eval_config(cfg_path).models[0] == str(tmp_path / "runs" / "half")
    with pytest.raises(UserError, match="not a finished run folder"):
        parse_model(load_eval_config(cfg_path).models[0])
    # a local judge (no url): a path is resolved against the config, a base name is kept; a reference too
    cfg_path.write_text("models: [a@http://x/v1, b@http://x/v1]\njudge: {model: runs/half, reference: r.jsonl}\n")
    cfg = load_eval_config(cfg_path)
    assert cfg.judge.model == str(tmp_path / "runs" / "half") and cfg.judge.reference == str(tmp_path / "r.jsonl")
    cfg_path.write_text("models: [a@http://x/v1, b@http://x/v1]\njudge: {model: smollm2}\n")
    assert load_eval_config(cfg_path).judge.model == "smollm2"


@pytest.mark.integration
def test_the_demo_evaluation_step_runs_and_fills_the_served_leaderboard(tiny_run, tmp_path, capsys):
    """`chatbuild demo` step 3 as the demo runs it: the run and its base answer over our own server,
    the base judges, and the battles land in the database the served Leaderboard tab reads."""
    from chatbuild import storage
    from chatbuild.demo import evaluate_demo
    from chatbuild.runs import load_run

    db = tmp_path / "data" / "chatbuild.sqlite"
    db.parent.mkdir()
    evaluate_demo(tmp_path / "eval", tiny_run, db, answer_tokens=16, show_prompts=False)
    out = capsys.readouterr().out
    assert "3. ratings" in out and (tmp_path / "eval" / "leaderboard.json").is_file()
    run_name = load_run(tiny_run).name
    answers = {p.stem for p in (tmp_path / "eval" / "answers").glob("*.jsonl")}
    assert run_name in answers and len(answers) == 2
    stored = storage.list_battles(db, source=["judge"])
    written = (tmp_path / "eval" / "battles.jsonl").read_text().splitlines()
    assert len(stored) == len(written) > 0
    assert {b["model_a"] for b in stored} | {b["model_b"] for b in stored} == answers
    assert "battles stored in" in out
