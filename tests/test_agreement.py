"""Judge–human agreement: Cohen's κ on constructed cases with hand-computed values, how votes and
verdicts are matched, position and length bias, and `chatbuild eval agreement` on a database and files."""

import json

import pytest

from chatbuild import storage
from chatbuild.agreement import agreement_report, bias, cohen_kappa, matched, outcome
from chatbuild.cli import main

# (judge outcome, human outcome) counts, with the models in name order ("x" < "y"):
#            human: first second tie
# judge first        4     1     0
# judge second       1     2     1
# judge tie          0     0     1
CELLS = {("first", "first"): 4, ("first", "second"): 1, ("second", "first"): 1, ("second", "second"): 2,
         ("second", "tie"): 1, ("tie", "tie"): 1}
# with ties: p_o = 7/10; judge shares .5/.4/.1, human .5/.3/.2, p_e = .25+.12+.02 = .39; κ = .31/.61
KAPPA = 0.31 / 0.61
# without ties (8 pairs): p_o = 6/8; both raters 5/8 first, 3/8 second, p_e = 34/64; κ = (48−34)/(64−34) = 7/15
KAPPA_NO_TIES = 7 / 15
WINNER = {"first": "x", "second": "y"}


def arena_vote(question: str, out: str, flip: bool) -> dict:
    """A human battle on `question`: x on the left unless `flip`."""
    a, b = ("y", "x") if flip else ("x", "y")
    winner = "tie" if out == "tie" else "model_a" if WINNER[out] == a else "model_b"
    return {"question_id": f"arena-{question}", "model_a": a, "model_b": b, "winner": winner, "judge": "human",
            "source": "human", "anony": True, "turn": 1,
            "conversation_a": [{"role": "user", "content": question}, {"role": "assistant", "content": f"{a} says"}],
            "conversation_b": [{"role": "user", "content": question}, {"role": "assistant", "content": f"{b} says"}]}


def judge_verdict(qid: int, question: str, out: str, flip: bool, judge: str = "gpt-j") -> dict:
    a, b = ("y", "x") if flip else ("x", "y")
    winner = "tie (bothbad)" if out == "tie" else "model_a" if WINNER[out] == a else "model_b"
    return {"question_id": qid, "model_a": a, "model_b": b, "winner": winner, "judge": judge, "source": "judge",
            "question": [question]}


def constructed() -> list[dict]:
    battles, n = [], 0
    for (judge_out, human_out), count in CELLS.items():
        for _ in range(count):
            q = f"Question {n}?"
            # sides vary, so the comparison must go by model names, not positions
            battles.append(judge_verdict(n, q, judge_out, flip=n % 2 == 0))
            battles.append(arena_vote("  " + q + "\n", human_out, flip=n % 3 == 0))  # whitespace differs
            n += 1
    return battles


def test_cohen_kappa_by_hand():
    assert cohen_kappa(["a", "a", "b", "b"], ["a", "a", "b", "b"]) == 1.0
    assert cohen_kappa(["a", "b"], ["b", "a"]) == -1.0
    # p_o = 1/2, p_e = 1/2 → 0
    assert cohen_kappa(["a", "a", "b", "b"], ["a", "b", "a", "b"]) == pytest.approx(0.0)
    assert cohen_kappa(["a", "a"], ["a", "a"]) is None  # chance agreement 1: undefined
    assert cohen_kappa([], []) is None


def test_agreement_and_kappa_on_a_constructed_case():
    report = agreement_report(constructed())
    assert report.human_battles == 10 and report.judge_battles == 10
    [a] = report.agreements
    assert a.judge == "gpt-j" and a.pairs == 10
    assert a.agreement == pytest.approx(0.7) and a.kappa == pytest.approx(KAPPA)
    assert a.pairs_without_ties == 8
    assert a.agreement_without_ties == pytest.approx(0.75) and a.kappa_without_ties == pytest.approx(KAPPA_NO_TIES)


def test_votes_and_verdicts_meet_by_question_text_or_by_id_and_turn():
    human = arena_vote("What is 2+2?", "first", flip=False)
    other_question = judge_verdict(1, "What is 3+3?", "first", flip=False)
    other_models = {**judge_verdict(2, "What is 2+2?", "first", flip=False), "model_b": "z"}
    same = judge_verdict(3, "What is 2+2?", "second", flip=True)
    assert matched([human], [other_question, other_models, same]) == [(human, same)]
    # imported benchmark judgments: same question_id and turn, no texts
    expert = {"question_id": 81, "turn": 2, "model_a": "x", "model_b": "y", "winner": "model_b", "judge": "expert_1"}
    gpt4_turn2 = {"question_id": 81, "turn": 2, "model_a": "y", "model_b": "x", "winner": "model_a", "judge": "gpt4_pair"}
    gpt4_turn1 = {**gpt4_turn2, "turn": 1}
    assert matched([expert], [gpt4_turn1, gpt4_turn2]) == [(expert, gpt4_turn2)]
    assert outcome(expert) == outcome(gpt4_turn2) == "second"
    report = agreement_report([expert, gpt4_turn1, gpt4_turn2], humans=["expert_*"], judges=["gpt4*"])
    assert [(a.judge, a.pairs, a.agreement) for a in report.agreements] == [("gpt4_pair", 1, 1.0)]


def test_position_and_length_bias():
    style = {"headers": 0, "list_items": 0, "bold": 0}
    judged = [  # each order preferred the answer shown first: position bias, and a tie
        {"model_a": "x", "model_b": "y", "winner": "tie", "order_verdicts": ["model_a", "model_b"]},
        # both orders chose x (the longer answer)
        {"model_a": "x", "model_b": "y", "winner": "model_a", "order_verdicts": ["model_a", "model_a"],
         "style_a": {"chars": 900, **style}, "style_b": {"chars": 100, **style}},
        # both chose y, the shorter
        {"model_a": "x", "model_b": "y", "winner": "model_b", "order_verdicts": ["model_b", "model_b"],
         "style_a": {"chars": 500, **style}, "style_b": {"chars": 200, **style}},
    ]
    b = bias(judged, "j")
    # single judgments: first, first | first, second | second, first → 4 first, 2 second
    assert (b.judgments, b.first, b.second, b.tie) == (6, pytest.approx(4 / 6), pytest.approx(2 / 6), 0.0)
    assert (b.decisive, b.longer_won) == (2, 0.5)  # the tie has no lengths and is not decisive anyway
    votes = [{"model_a": "x", "model_b": "y", "winner": w} for w in ("model_a", "model_a", "model_b", "tie")]
    h = bias(votes, "humans")
    assert (h.judgments, h.first, h.second, h.tie, h.decisive, h.longer_won) == (4, 0.5, 0.25, 0.25, 0, None)


def test_cli_on_a_database_and_on_files(tmp_path, capsys):
    battles = constructed()
    db = tmp_path / "chatbuild.sqlite"
    with storage.transaction(db) as conn:
        storage.add_battles(conn, battles)
    assert main(["eval", "agreement", str(db), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["human_battles"] == 10 and out["judge_battles"] == 10
    [a] = out["agreements"]
    assert a["kappa"] == pytest.approx(KAPPA) and a["kappa_without_ties"] == pytest.approx(KAPPA_NO_TIES)
    assert [b["rater"] for b in out["biases"]] == ["humans", "gpt-j"]

    human_file, judge_file = tmp_path / "h.jsonl", tmp_path / "j.jsonl"
    human_file.write_text("".join(json.dumps(b) + "\n" for b in battles if b["source"] == "human"))
    judge_file.write_text("".join(json.dumps(b) + "\n" for b in battles if b["source"] == "judge"))
    assert main(["eval", "agreement", str(human_file), str(judge_file)]) == 0
    printed = capsys.readouterr().out
    assert "gpt-j" in printed and "70%" in printed and f"{KAPPA:.3f}" in printed and "position bias" in printed

    assert main(["eval", "agreement", str(judge_file)]) == 0
    assert "no human votes among these battles" in capsys.readouterr().out
    assert main(["eval", "agreement", str(tmp_path / "nope.jsonl")]) == 2
    assert "no such database or battles file" in capsys.readouterr().err
