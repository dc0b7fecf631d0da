"""`chatbuild eval judge`: an LLM judges the models' answers, in one of three modes.

    chatbuild eval judge --answers answers/*.jsonl --judge-url http://127.0.0.1:8000/v1 \\
        --judge-model gpt-4o --out battles.jsonl                       # pairwise (the default)
    chatbuild eval judge ... --mode baseline --baseline gpt-4o-answers  # each model vs one baseline
    chatbuild eval judge ... --mode single --out grades.jsonl           # a 1-10 grade per answer
    chatbuild eval judge ... --reference refs.jsonl                     # reference-guided (math, coding, reasoning)
    chatbuild eval judge --answers answers/ --judge-model runs/my-run --out battles.jsonl   # a local judge

Modes:
- pairwise: every pair of models on every question, both orders (below). The QLoRA paper's setup.
- baseline (`--baseline MODEL`): every other model against that one only, both orders, as pairwise
  judges a pair; the battles are ordinary battles, and the report adds each model's win rate
  against the baseline (ties half) with a bootstrap interval (`chatbuild.ratings.baseline_win_rates`):
  Arena-Hard's setup (Li et al. 2024), which needs n-1 pairs per question instead of n(n-1)/2.
- single: each answer alone gets a grade from 1 to 10 (MT-bench's single-answer grading, Zheng et
  al. 2023; `GRADE_SYSTEM_PROMPT`, our own wording). The grade is the LAST "[[N]]" marker of the
  reply and must be a whole number from 1 to 10 ("[[7]]", "[[ 7 ]]"); a reply whose last marker is
  anything else ("[[7.5]]", "[[11]]", "[[seven]]") or that has none is invalid: stored with its raw
  text, counted, never guessed. --out gets a grades JSONL, one line per answer:

      {"model": "X", "question_id": 3, "category": "math", "grade": 7, "judge": "gpt-4o",
       "judge_reply": "...", "reference_guided": true}

  (`grade` null when invalid), and the report (printed, and <out>.report.json) each model's mean
  grade with a 95% bootstrap interval over its graded answers (`chatbuild.ratings.mean_interval`),
  and the invalid-grade count.

Reference answers (`--reference FILE`, JSONL of {"question_id": ..., "answer": "..."}): for the
questions whose category is one of `--reference-categories` (default math, coding, reasoning) the
judge's prompt includes the reference answer, in every mode (MT-bench's reference-guided judging:
judges grade math they cannot solve badly, and a reference fixes much of it). Other questions are
judged without one. The battles and grades of those questions say `"reference_guided": true`.

The judge: `--judge-url URL --judge-model NAME` is a model on an OpenAI-compatible server. Without
--judge-url, --judge-model is a local run folder or a base chatbuild can load ("tiny", "smollm2", a
model folder), served in this process by `chatbuild.engines` (the hf engine): the loop then works
offline. A small local judge is weak (it tends to follow the position an answer is shown in), so
the report prints its position bias (`chatbuild.agreement.weak_judge_warning`) next to its verdicts,
and its battles and grades are stored with `"local_judge": true` so the UI's Leaderboard tab shows it too.
Baseline-mode battles carry `"baseline": MODEL` (the tab's "Win rate vs" table reads it).

How a battle is decided:
1. For question q and models X, Y the judge sees both answers twice: X as "Assistant A" and Y as
   "Assistant B", then swapped (LLM judges favour a position; the QLoRA paper and the MT-bench
   paper both measured it). Prompt: `SYSTEM_PROMPT` and `USER_TEMPLATE` (our own wording).
2. Each reply must end with a verdict marker, [[A]], [[B]] or [[TIE]]. Only the LAST marker counts
   (a judge may quote markers while reasoning); a reply without one is "invalid": recorded with its
   raw text and reported, never guessed.
3. Both orders agree → that winner. They disagree (e.g. each order prefers the answer shown first)
   → a tie. Either is invalid → no battle; the pair is reported as invalid.

Storage and resume: every judge reply (verdict and raw text) is stored in SQLite (`--db`, default
beside --out) as soon as it arrives, keyed by a hash of the judge model, the two models in order
and the exact prompt (question and both answers). A rerun asks only for the keys it does not have,
so an interrupted run resumes without asking twice, and changing an answer re-judges just its pairs.
Requests run `--concurrency` at a time, with retries and exponential backoff (`eval.client`).

Output: --out gets one battle per judged pair and question (battles JSONL, `chatbuild.battles`):

    {"question_id": 3, "model_a": "X", "model_b": "Y", "winner": "tie", "judge": "gpt-4o",
     "tstamp": ..., "source": "judge", "order_verdicts": ["model_a", "model_b"], "judge_prompt": "...",
     "style_a": {"chars": 812, "headers": 2, "list_items": 5, "bold": 1}, "style_b": {...},
     "question": ["the user turns"], "category": "writing"}

`order_verdicts` holds each order's verdict as a winner label (X first, then Y first); `style_a` and
`style_b` the two answers' style counts (`chatbuild.style`, for style control); `question` the user
turns (judge and arena battles on the same question meet in `chatbuild eval agreement`); `category`
the question's, where it has one (`eval elo --by-category`). The battles also go into the database's
battles table (source "judge") for the UI leaderboard, replacing what an earlier run stored for the
same judge, question and pair. A report
(printed, and saved as <out>.report.json) counts invalid and failed judgments, questions skipped for
missing answers, and the judge's position bias (how often the answer shown first wins) and length
bias (how often the longer answer wins a decisive battle).

Missing answers: a pair is judged on the questions both models answered; the report counts the
rest. Answers for questions outside --questions are ignored and counted.
"""

import argparse
import hashlib
import itertools
import json
import os
import re
import sys
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path

from chatbuild import storage
from chatbuild.agreement import weak_judge_warning
from chatbuild.battles import write_battles
from chatbuild.data.sources import read_jsonl
from chatbuild.errors import UserError, where
from chatbuild.style import style_features
from eval.answers import read_answers
from eval.questions import Question, load_questions

PROMPT_VERSION = "chatbuild-pairwise-v1"

SYSTEM_PROMPT = (
    "You are an impartial judge. You compare the answers of two AI assistants to the same user "
    "question and decide which answer serves the user better.\n\n"
    "Weigh helpfulness, relevance, accuracy, depth and clarity. Rules:\n"
    "- The order in which the answers are shown must not influence you.\n"
    "- A longer answer is not better for being longer.\n"
    "- If the answers are equally good, or equally bad, call it a tie.\n\n"
    "First explain your comparison in a few sentences. Then end your reply with a last line that "
    "holds only your verdict, exactly one of: [[A]] if Assistant A's answer is better, [[B]] if "
    "Assistant B's answer is better, [[TIE]] for a tie."
)
USER_TEMPLATE = (  # {reference}: empty, or REFERENCE_BLOCK (reference-guided judging)
    "[User question]\n{question}\n\n{reference}"
    "[The start of Assistant A's answer]\n{answer_a}\n[The end of Assistant A's answer]\n\n"
    "[The start of Assistant B's answer]\n{answer_b}\n[The end of Assistant B's answer]"
)
MULTI_TURN_TEMPLATE = (
    "Compare how the two assistants did over the whole conversation, above all in their last reply.\n\n{reference}"
    "[The start of the conversation with Assistant A]\n{answer_a}\n[The end of the conversation with Assistant A]\n\n"
    "[The start of the conversation with Assistant B]\n{answer_b}\n[The end of the conversation with Assistant B]"
)
# Reference-guided judging (the MT-bench paper's remedy for judges that cannot solve the math they
# grade): the reference answer goes after the question, and the system prompt says how to use it.
REFERENCE_RULE = ("\n\nA reference answer is given. Use it to check correctness: an answer that contradicts "
                  "the reference on a fact or a result is wrong, however well written.")
REFERENCE_BLOCK = "[Reference answer]\n{reference}\n[The end of the reference answer]\n\n"
REFERENCE_CATEGORIES = ("math", "coding", "reasoning")

MODES = ("pairwise", "baseline", "single")
GRADE_PROMPT_VERSION = "chatbuild-single-v1"
GRADE_SYSTEM_PROMPT = (
    "You are an impartial judge. You grade the answer of an AI assistant to a user question on a scale "
    "from 1 to 10.\n\n"
    "Weigh helpfulness, relevance, accuracy, depth and clarity. 1 means useless or wrong, 5 adequate "
    "with clear flaws, 10 an answer that could not be better. A longer answer is not better for being "
    "longer.\n\n"
    "First explain your assessment in a few sentences. Then end your reply with a last line that holds "
    "only your grade in double square brackets, for example: [[6]]"
)
GRADE_TEMPLATE = (
    "[User question]\n{question}\n\n{reference}"
    "[The start of the assistant's answer]\n{answer}\n[The end of the assistant's answer]"
)
GRADE_MULTI_TURN_TEMPLATE = (
    "Grade how the assistant did over the whole conversation, above all in its last reply.\n\n{reference}"
    "[The start of the conversation with the assistant]\n{answer}\n[The end of the conversation with the assistant]"
)
GRADE_MARKER = re.compile(r"\[\[([^\[\]]*)\]\]")
GRADE_CHOICES = [f"[[{n}]]" for n in range(1, 11)]

VERDICT_MARKER = re.compile(r"\[\[(A|B|TIE)\]\]", re.IGNORECASE)
VERDICT_OF = {"A": "A", "B": "B", "TIE": "tie"}
GUIDED_CHOICES = ["[[A]]", "[[B]]", "[[TIE]]"]


def parse_verdict(text: str) -> str:
    """"A", "B" or "tie" from the LAST verdict marker in `text`; "invalid" if there is none."""
    found = VERDICT_MARKER.findall(text or "")
    return VERDICT_OF[found[-1].upper()] if found else "invalid"


def parse_grade(text: str) -> int | None:
    """The grade in the LAST "[[...]]" marker of `text` if it is a whole number from 1 to 10 (spaces
    around it allowed); None otherwise: no marker, or a last marker that is not such a number."""
    found = GRADE_MARKER.findall(text or "")
    if not found:
        return None
    value = found[-1].strip()
    return int(value) if value.isascii() and value.isdigit() and 1 <= int(value) <= 10 else None


# A verdict as a winner label: in the first order model_a is shown as A, in the second model_b is.
LABEL_FIRST_ORDER = {"A": "model_a", "B": "model_b", "tie": "tie"}
LABEL_SECOND_ORDER = {"A": "model_b", "B": "model_a", "tie": "tie"}


def combine(first: str, second: str) -> str | None:
    """The battle's winner from two verdicts: `first` with model_a shown as A, `second` with model_b
    shown as A. Agreement → that winner; disagreement → "tie"; an invalid verdict → None."""
    w1, w2 = LABEL_FIRST_ORDER.get(first), LABEL_SECOND_ORDER.get(second)
    if w1 is None or w2 is None:
        return None
    return w1 if w1 == w2 else "tie"


# ── the plan: which judgments a set of answers needs ───────────────────────────────────────────
@dataclass(frozen=True)
class Task:
    """One judge request: `first` is shown as Assistant A."""

    key: str
    question_id: object
    first: str
    second: str
    messages: tuple


@dataclass(frozen=True)
class Pair:
    """Two models on one question; `keys` = (model_a shown first, model_b shown first)."""

    question_id: object
    model_a: str
    model_b: str
    keys: tuple[str, str]


@dataclass
class Plan:
    tasks: list[Task]
    pairs: list[Pair]
    missing: dict[str, int]  # model → questions it has no answer for
    ignored: int  # answers to questions outside the question set
    questions: dict = field(default_factory=dict)  # question_id → Question
    referenced: set = field(default_factory=set)  # question ids judged with a reference answer


def load_references(path: str | Path) -> dict:
    """{question_id: reference answer} from a JSONL of {"question_id": ..., "answer": "..."}. Bad
    lines are UserErrors naming file:line."""
    path = Path(path)
    out = {}
    for n, rec in read_jsonl(path, "reference answers file"):
        if not isinstance(rec, dict) or "question_id" not in rec or "answer" not in rec:
            raise UserError(f'{where(path, n)}: a reference needs "question_id" and "answer"')
        qid, text = rec["question_id"], rec["answer"]
        if not isinstance(qid, (int, str)) or isinstance(qid, bool):
            raise UserError(f'{where(path, n, "question_id")}: must be a number or a string, got {qid!r}')
        if not isinstance(text, str) or not text.strip():
            raise UserError(f'{where(path, n, "answer")}: must be a non-empty string')
        if qid in out:
            raise UserError(f"{where(path, n)}: a second reference for question {qid!r}")
        out[qid] = text
    if not out:
        raise UserError(f"{path}: no reference answers in the file")
    return out


def reference_for(question: Question, references: dict | None, categories=REFERENCE_CATEGORIES) -> str | None:
    """The reference answer the judge sees for `question`: only where its category is one of
    `categories` and the references have one."""
    if not references or question.category not in categories:
        return None
    return references.get(question.question_id)


def load_answer_files(paths: list[str | Path]) -> dict[str, dict]:
    """{model: {question_id: record}} from answers JSONL files (or folders of them)."""
    files = []
    for p in map(Path, paths):
        files += sorted(p.glob("*.jsonl")) if p.is_dir() else [p]
    if not files:
        raise UserError("no answers files given")
    out: dict[str, dict] = defaultdict(dict)
    for f in files:
        if not f.is_file():
            raise UserError(f"{f}: no such answers file")
        for rec in read_answers(f):
            if rec["question_id"] in out[rec["model"]]:
                raise UserError(f'{f}: a second answer of "{rec["model"]}" to question {rec["question_id"]!r}')
            out[rec["model"]][rec["question_id"]] = rec
    if len(out) < 2:
        raise UserError(f"judging needs answers of at least two models; found {', '.join(out) or 'none'}")
    return dict(out)


def questions_from_answers(answers: dict[str, dict]) -> list[Question]:
    """The questions, from the "question" field our answer files carry (when no --questions)."""
    found: dict = {}
    for model, recs in answers.items():
        for qid, rec in recs.items():
            turns = rec.get("question")
            if not (isinstance(turns, list) and turns and all(isinstance(t, str) for t in turns)):
                raise UserError(f'the answer of "{model}" to question {qid!r} does not carry its question; '
                                f"pass the questions file with --questions")
            if qid in found and found[qid].turns != tuple(turns):
                raise UserError(f"question {qid!r} reads differently in the answers of two models; "
                                f"pass the questions file with --questions")
            found[qid] = Question(qid, tuple(turns))
    return sorted(found.values(), key=lambda q: (isinstance(q.question_id, str), q.question_id))


def render(question: Question, rec_a: dict, rec_b: dict, reference: str | None = None) -> list[dict]:
    """The judge's messages for one question with rec_a shown as Assistant A (and the reference
    answer, when given, after the question)."""
    block = REFERENCE_BLOCK.format(reference=reference) if reference is not None else ""
    if len(question.turns) == 1:
        user = USER_TEMPLATE.format(question=question.text, reference=block, answer_a=rec_a["answer"],
                                    answer_b=rec_b["answer"])
    else:  # the reference answers the last turn
        user = MULTI_TURN_TEMPLATE.format(reference=block, answer_a=_conversation(question, rec_a, "A"),
                                          answer_b=_conversation(question, rec_b, "B"))
    system = SYSTEM_PROMPT + (REFERENCE_RULE if reference is not None else "")
    return [{"role": "system", "content": system}, {"role": "user", "content": user}]


def render_grade(question: Question, rec: dict, reference: str | None = None) -> list[dict]:
    """The judge's messages for grading one answer alone."""
    block = REFERENCE_BLOCK.format(reference=reference) if reference is not None else ""
    if len(question.turns) == 1:
        user = GRADE_TEMPLATE.format(question=question.text, reference=block, answer=rec["answer"])
    else:
        user = GRADE_MULTI_TURN_TEMPLATE.format(reference=block, answer=_conversation(question, rec, ""))
    system = GRADE_SYSTEM_PROMPT + (REFERENCE_RULE if reference is not None else "")
    return [{"role": "system", "content": system}, {"role": "user", "content": user}]


def _conversation(question: Question, rec: dict, who: str) -> str:
    replies = rec.get("answers")
    if not (isinstance(replies, list) and len(replies) == len(question.turns)):
        replies = [None] * (len(question.turns) - 1) + [rec["answer"]]  # only the last reply is known
    lines = []
    for turn, reply in zip(question.turns, replies):
        lines.append(f"### User:\n{turn}")
        if reply is not None:
            lines.append(f"### Assistant {who}:\n{reply}" if who else f"### Assistant:\n{reply}")
    return "\n\n".join(lines)


def judgment_key(judge_model: str, first: str, second: str, messages: list[dict]) -> str:
    """Identifies one judge request: the judge, who is shown first and second, and the exact prompt
    (so a changed answer, question or prompt wording is judged anew, and nothing else is)."""
    payload = [judge_model, first, second, messages]
    return hashlib.sha256(json.dumps(payload, ensure_ascii=False).encode()).hexdigest()


def model_pairs(models: list[str], baseline: str | None = None) -> list[tuple[str, str]]:
    """Which models meet: every pair (in the order given), or with a `baseline` each other model
    against it, the baseline as model_b."""
    if baseline is None:
        return list(itertools.combinations(models, 2))
    if baseline not in models:
        raise UserError(f'--baseline "{baseline}" has no answers here; the models are {", ".join(models)}')
    return [(m, baseline) for m in models if m != baseline]


def plan(questions: list[Question], answers: dict[str, dict], judge_model: str, baseline: str | None = None,
         references: dict | None = None, categories=REFERENCE_CATEGORIES) -> Plan:
    """Every pair of models (`model_pairs`) on every question both answered, both orders."""
    models = list(answers)
    qids = {q.question_id for q in questions}
    tasks, pairs, referenced = [], [], set()
    for q in questions:
        reference = reference_for(q, references, categories)
        for a, b in model_pairs(models, baseline):
            ra, rb = answers[a].get(q.question_id), answers[b].get(q.question_id)
            if ra is None or rb is None:
                continue
            m1, m2 = render(q, ra, rb, reference), render(q, rb, ra, reference)
            k1, k2 = judgment_key(judge_model, a, b, m1), judgment_key(judge_model, b, a, m2)
            tasks += [Task(k1, q.question_id, a, b, tuple(m1)), Task(k2, q.question_id, b, a, tuple(m2))]
            pairs.append(Pair(q.question_id, a, b, (k1, k2)))
            if reference is not None:
                referenced.add(q.question_id)
    missing = {m: sum(q.question_id not in answers[m] for q in questions) for m in models}
    ignored = sum(qid not in qids for recs in answers.values() for qid in recs)
    return Plan(tasks, pairs, {m: n for m, n in missing.items() if n}, ignored, {q.question_id: q for q in questions},
                referenced)


# ── judging ────────────────────────────────────────────────────────────────────────────────────
def ask_each(todo: list, ask, client, concurrency: int, progress, log=print) -> list[tuple[object, str]]:
    """Run `ask(task)` for every task, `concurrency` at a time, logging `progress(counts, failed)`
    every 50 and at the end (`counts`: a Counter of what `ask` returned). Returns the tasks that
    failed for good, with the reason; `UserError` (a wrong URL, key or model) stops everything."""
    from eval.client import RequestFailed, run_concurrently

    failed, counts = [], Counter()
    try:
        for done, (task, result, error) in enumerate(run_concurrently(ask, todo, concurrency), start=1):
            if isinstance(error, RequestFailed):
                failed.append((task, str(error)))
            elif error is not None:
                raise error
            else:
                counts[result] += 1
            if done % 50 == 0 or done == len(todo):
                log(f"judge: {done}/{len(todo)} ({progress(counts, len(failed))})")
    except BaseException:
        # An interrupt, or a UserError from one request (wrong key, model or URL): stop the requests
        # in flight. Stored replies stay; the rest is asked on the next run.
        client.close()
        raise
    return failed


def run_judgments(tasks: list[Task], db: Path, client, judge_model: str, concurrency: int = 8,
                  max_tokens: int = 1024, retry_invalid: bool = False, log=print,
                  guided: bool = False) -> list[tuple[Task, str]]:
    """Ask the judge for every task not yet stored in `db` (and, with `retry_invalid`, again for
    stored invalid ones). Each reply is stored as soon as it arrives. Returns the tasks that failed
    for good, with the reason (`ask_each`)."""
    stored = storage.get_judgments(db, [t.key for t in tasks])
    todo = [t for t in tasks if t.key not in stored or (retry_invalid and stored[t.key].verdict == "invalid")]
    log(f"judge {judge_model}: {len(tasks)} judgments needed, {len(tasks) - len(todo)} already stored, "
        f"{len(todo)} to ask")
    if not todo:
        return []

    def ask(task: Task) -> str:
        # guided: the server may only answer with a verdict marker (vLLM's and our guided_choice), for
        # judges too small to follow the prompt; their verdicts then carry no explanation.
        extra = {"guided_choice": GUIDED_CHOICES} if guided else {}
        got = client.complete(judge_model, list(task.messages), temperature=0, max_tokens=max_tokens, **extra)
        verdict = parse_verdict(got.text)
        j = storage.Judgment(task.key, judge_model, task.question_id, task.first, task.second, verdict, got.text,
                             time.time(), {"prompt": PROMPT_VERSION, "latency": round(got.latency, 3),
                                           "attempts": got.attempts, "finish_reason": got.finish_reason,
                                           "usage": got.usage})
        with storage.transaction(db) as conn:
            storage.add_judgment(conn, j)
        return verdict

    def progress(counts: Counter, failed: int) -> str:
        return (f"{counts['A']} A, {counts['B']} B, {counts['tie']} tie, {counts['invalid']} invalid, "
                f"{failed} failed")

    return ask_each(todo, ask, client, concurrency, progress, log)


def battles_and_report(p: Plan, db: Path, judge_model: str, answers: dict[str, dict]) -> tuple[list[dict], dict]:
    """Battles for the plan's pairs from the stored judgments, and the report (module docstring)."""
    got = storage.get_judgments(db, [t.key for t in p.tasks])
    battles, invalid, unjudged, inconsistent = [], [], 0, 0
    position = Counter()  # over valid single judgments: which shown position won
    longer = decisive = 0
    for pair in p.pairs:
        j1, j2 = got.get(pair.keys[0]), got.get(pair.keys[1])
        for j in (j1, j2):
            if j is not None and j.verdict != "invalid":
                position[{"A": "first", "B": "second", "tie": "tie"}[j.verdict]] += 1
        if j1 is None or j2 is None:
            unjudged += 1
            continue
        winner = combine(j1.verdict, j2.verdict)
        if winner is None:
            invalid.append({"question_id": pair.question_id, "model_a": pair.model_a, "model_b": pair.model_b,
                            "verdicts": [j1.verdict, j2.verdict]})
            continue
        w1, w2 = LABEL_FIRST_ORDER[j1.verdict], LABEL_SECOND_ORDER[j2.verdict]
        if w1 != w2:
            inconsistent += 1
        if winner in ("model_a", "model_b"):
            len_a = len(answers[pair.model_a][pair.question_id]["answer"])
            len_b = len(answers[pair.model_b][pair.question_id]["answer"])
            if len_a != len_b:
                decisive += 1
                longer += (winner == "model_a") == (len_a > len_b)
        rec_a, rec_b = answers[pair.model_a][pair.question_id], answers[pair.model_b][pair.question_id]
        battle = {"question_id": pair.question_id, "model_a": pair.model_a, "model_b": pair.model_b,
                  "winner": winner, "judge": judge_model, "tstamp": max(j1.tstamp, j2.tstamp),
                  "source": "judge", "order_verdicts": [w1, w2], "judge_prompt": PROMPT_VERSION,
                  "style_a": style_features(answer_text(rec_a)), "style_b": style_features(answer_text(rec_b))}
        question = p.questions.get(pair.question_id)
        if question is not None:
            battle["question"] = list(question.turns)
            if question.category:
                battle["category"] = question.category
        if pair.question_id in p.referenced:
            battle["reference_guided"] = True
        battles.append(battle)
    valid_pairs = len(p.pairs) - unjudged - len(invalid)
    n_pos = sum(position.values())
    report = {
        "judge": judge_model,
        "prompt": PROMPT_VERSION,
        "pairs": len(p.pairs),
        "battles": len(battles),
        "ties": sum(b["winner"] == "tie" for b in battles),
        "inconsistent": inconsistent,
        "invalid_pairs": len(invalid),
        "invalid_judgments": sum(j.verdict == "invalid" for j in got.values()),
        "invalid_examples": invalid[:10],
        "unjudged_pairs": unjudged,
        "missing_answers": p.missing,
        "ignored_answers": p.ignored,
        "position_bias": {k: round(position[k] / n_pos, 4) if n_pos else None for k in ("first", "second", "tie")},
        "order_consistency": round(1 - inconsistent / valid_pairs, 4) if valid_pairs else None,
        "length_bias": {"longer_won": round(longer / decisive, 4) if decisive else None, "decisive_battles": decisive},
        "mean_answer_chars": {m: round(sum(len(r["answer"]) for r in recs.values()) / len(recs), 1)
                              for m, recs in answers.items()},
        "reference_guided_questions": len(p.referenced),
    }
    return battles, report


def interval_json(m) -> dict:
    """A `chatbuild.ratings.MeanInterval` (or `MeanGrade`) for the report, rounded."""
    def r(x):
        return None if x is None else round(x, 4)

    return {"mean": r(m.mean), "low": r(m.low), "high": r(m.high), "n": m.n}


# ── single-answer grading ──────────────────────────────────────────────────────────────────────
@dataclass(frozen=True)
class GradeTask:
    """One grading request: `model`'s answer to one question."""

    key: str
    question_id: object
    model: str
    messages: tuple
    category: str | None = None  # stored with the grade: the Leaderboard tab's category filter reads it


def grade_plan(questions: list[Question], answers: dict[str, dict], judge_model: str,
               references: dict | None = None, categories=REFERENCE_CATEGORIES) -> tuple[list[GradeTask], Plan]:
    """A grading task for every answer to a question in the set, and the plan's bookkeeping
    (missing and ignored answers, questions, reference-guided ones; no pairs)."""
    qids = {q.question_id for q in questions}
    tasks, referenced = [], set()
    for q in questions:
        reference = reference_for(q, references, categories)
        for model, recs in answers.items():
            rec = recs.get(q.question_id)
            if rec is None:
                continue
            messages = render_grade(q, rec, reference)
            key = judgment_key(judge_model, model, "", messages)  # the empty second model: a grade, not a pair
            tasks.append(GradeTask(key, q.question_id, model, tuple(messages), q.category or None))
            if reference is not None:
                referenced.add(q.question_id)
    missing = {m: sum(q.question_id not in answers[m] for q in questions) for m in answers}
    ignored = sum(qid not in qids for recs in answers.values() for qid in recs)
    return tasks, Plan([], [], {m: n for m, n in missing.items() if n}, ignored,
                       {q.question_id: q for q in questions}, referenced)


def run_grades(tasks: list[GradeTask], db: Path, client, judge_model: str, concurrency: int = 8,
               max_tokens: int = 1024, retry_invalid: bool = False, log=print,
               guided: bool = False, local: bool = False) -> list[tuple[GradeTask, str]]:
    """`run_judgments` for grading requests: ask what `db` lacks, store each reply as it arrives,
    with the question's category and, for a `local` judge, `local_judge` in its extra."""
    stored = storage.get_grades(db, [t.key for t in tasks])
    todo = [t for t in tasks if t.key not in stored or (retry_invalid and stored[t.key].grade is None)]
    log(f"judge {judge_model}: {len(tasks)} grades needed, {len(tasks) - len(todo)} already stored, "
        f"{len(todo)} to ask")
    if not todo:
        return []

    def ask(task: GradeTask) -> str:
        extra = {"guided_choice": GRADE_CHOICES} if guided else {}
        got = client.complete(judge_model, list(task.messages), temperature=0, max_tokens=max_tokens, **extra)
        grade = parse_grade(got.text)
        g = storage.Grade(task.key, judge_model, task.question_id, task.model, grade, got.text, time.time(),
                          {"prompt": GRADE_PROMPT_VERSION, "latency": round(got.latency, 3),
                           "attempts": got.attempts, "finish_reason": got.finish_reason, "usage": got.usage,
                           **({"category": task.category} if task.category else {}),
                           **({"local_judge": True} if local else {})})
        with storage.transaction(db) as conn:
            storage.add_grade(conn, g)
        return "invalid" if grade is None else "graded"

    def progress(counts: Counter, failed: int) -> str:
        return f"{counts['graded']} graded, {counts['invalid']} invalid, {failed} failed"

    return ask_each(todo, ask, client, concurrency, progress, log)


def grades_and_report(tasks: list[GradeTask], p: Plan, db: Path, judge_model: str, rounds: int = 1000,
                      seed: int = 0) -> tuple[list[dict], dict]:
    """Grade records for --out (module docstring) from the stored grades, and the report: each
    model's mean grade with a bootstrap interval, invalid counts."""
    from chatbuild.ratings import mean_grades

    got = storage.get_grades(db, [t.key for t in tasks])
    records, invalid = [], []
    for t in tasks:
        g = got.get(t.key)
        if g is None:
            continue
        question = p.questions.get(t.question_id)
        rec = {"model": t.model, "question_id": t.question_id,
               "category": question.category if question is not None else None,
               "grade": g.grade, "judge": judge_model, "judge_reply": g.raw}
        if t.question_id in p.referenced:
            rec["reference_guided"] = True
        records.append(rec)
        if g.grade is None:
            invalid.append({"question_id": t.question_id, "model": t.model, "reply": g.raw[-200:]})
    models = {m: {**interval_json(g), "invalid": g.invalid}
              for m, g in mean_grades(records, rounds, seed, models=[t.model for t in tasks]).items()}
    report = {
        "judge": judge_model,
        "mode": "single",
        "prompt": GRADE_PROMPT_VERSION,
        "answers": len(tasks),
        "graded": sum(r["grade"] is not None for r in records),
        "invalid_grades": len(invalid),
        "invalid_examples": invalid[:10],
        "ungraded": len(tasks) - len(records),
        "missing_answers": p.missing,
        "ignored_answers": p.ignored,
        "reference_guided_questions": len(p.referenced),
        "mean_grades": models,
        "grade_counts": {str(n): sum(r["grade"] == n for r in records) for n in range(1, 11)},
    }
    return records, report


def describe_grades(report: dict) -> str:
    """The single-mode report as a few readable lines and a table of mean grades."""
    lines = [f"{report['graded']} of {report['answers']} answers graded 1-10"]
    if report["invalid_grades"]:
        lines.append(f"{report['invalid_grades']} judge replies had no valid final [[1]]..[[10]] grade; they are "
                     "left out (grade null in the file), raw texts are in the database")
    if report["ungraded"]:
        lines.append(f"{report['ungraded']} answers are not graded yet (failed requests); rerun to resume")
    for model, n in report["missing_answers"].items():
        lines.append(f"{model} has no answer for {n} question(s)")
    width = max(map(len, report["mean_grades"]), default=5)
    lines.append(f"{'model':<{width}}  mean grade  95% interval   graded  invalid")
    for model, m in sorted(report["mean_grades"].items(), key=lambda kv: -(kv[1]["mean"] or 0)):
        mean = f"{m['mean']:.2f}" if m["mean"] is not None else "-"
        ci = f"{m['low']:.2f}-{m['high']:.2f}" if m["mean"] is not None else "-"
        lines.append(f"{model:<{width}}  {mean:>10}  {ci:<13}  {m['n']:>6}  {m['invalid']:>7}")
    return "\n".join(lines)


def describe_baseline(report: dict) -> str:
    """Win rates against the baseline, one line per model (best first)."""
    b = report["baseline"]
    rates = sorted(b["win_rates"].items(), key=lambda kv: -(kv[1]["mean"] or 0))
    width = max((len(m) for m, _ in rates), default=5)
    lines = [f"win rate against {b['model']} (ties count half; 95% bootstrap interval over battles):"]
    for model, r in rates:
        lines.append(f"  {model:<{width}}  {r['mean']:6.1%}  ({r['low']:.1%} to {r['high']:.1%})  {r['n']} battles")
    return "\n".join(lines)


def answer_text(rec: dict) -> str:
    """All of a model's replies to one question (every turn's, when the answer file has them), for
    its style counts (`chatbuild.style`: FastChat counts the whole conversation's replies too)."""
    replies = rec.get("answers")
    if isinstance(replies, list) and replies and all(isinstance(r, str) for r in replies):
        return "\n".join(replies)
    return rec["answer"]


def describe(report: dict) -> str:
    """The report as a few readable lines."""
    pb, lb = report["position_bias"], report["length_bias"]
    lines = [f"{report['battles']} battles from {report['pairs']} pairs ({report['ties']} ties, of which "
             f"{report['inconsistent']} because the two orders disagreed)"]
    if report["invalid_pairs"]:
        lines.append(f"{report['invalid_pairs']} pairs had an unparseable verdict ({report['invalid_judgments']} "
                     f"judge replies without a final [[A]]/[[B]]/[[TIE]]); they are left out, raw texts are in the database")
    if report["unjudged_pairs"]:
        lines.append(f"{report['unjudged_pairs']} pairs are not fully judged yet (failed requests); rerun to resume")
    for model, n in report["missing_answers"].items():
        lines.append(f"{model} has no answer for {n} question(s); its pairs skip them")
    if report["ignored_answers"]:
        lines.append(f"{report['ignored_answers']} answers are to questions outside the question set (ignored)")
    if pb["first"] is not None:
        lines.append(f"position bias: the answer shown first won {pb['first']:.0%}, second {pb['second']:.0%}, "
                     f"tie {pb['tie']:.0%} of single judgments; orders agreed on {report['order_consistency']:.0%} of pairs")
    if lb["longer_won"] is not None:
        lines.append(f"length bias: the longer answer won {lb['longer_won']:.0%} of {lb['decisive_battles']} decisive battles")
    return "\n".join(lines)


def judge(answers: dict[str, dict], questions: list[Question] | None, client, judge_model: str, out: Path,
          db: Path, concurrency: int = 8, max_tokens: int = 1024, retry_invalid: bool = False,
          log=print, guided: bool = False, mode: str = "pairwise", baseline: str | None = None,
          references: dict | None = None, categories=REFERENCE_CATEGORIES, local: bool = False) -> tuple[dict, list]:
    """The whole step: plan, ask what is missing, write --out and the report. Returns (report,
    failed tasks). `mode` is one of MODES (module docstring); `local`: the judge runs in this
    process, and the report says how weak such a judge is."""
    if mode not in MODES:
        raise UserError(f'--mode "{mode}" is unknown; use {", ".join(MODES)}')
    if (mode == "baseline") != (baseline is not None):
        raise UserError("--mode baseline needs --baseline MODEL" if baseline is None
                        else f"--baseline applies to --mode baseline, not {mode}")
    if questions is None:
        questions = questions_from_answers(answers)
    if mode == "single":
        return grade(answers, questions, client, judge_model, out, db, concurrency, max_tokens, retry_invalid, log,
                     guided, references, categories, local)
    p = plan(questions, answers, judge_model, baseline, references, categories)
    if not p.pairs:
        raise UserError("no question was answered by two models; nothing to judge" if baseline is None
                        else f"no question was answered by both {baseline} and another model; nothing to judge")
    failed = run_judgments(p.tasks, db, client, judge_model, concurrency, max_tokens, retry_invalid, log, guided)
    battles, report = battles_and_report(p, db, judge_model, answers)
    for b in battles:  # marks the Leaderboard tab reads (module docstring)
        if baseline is not None:
            b["baseline"] = baseline
        if local:
            b["local_judge"] = True
    report["mode"] = mode
    report["failed_requests"] = len(failed)
    report["retries"] = getattr(client, "retried", 0)
    if baseline is not None:
        from chatbuild.ratings import baseline_win_rates

        rates = baseline_win_rates(battles, baseline)
        report["baseline"] = {"model": baseline, "win_rates": {m: interval_json(r) for m, r in rates.items()}}
    if local:
        report["local_judge"] = True
    with storage.transaction(db) as conn:
        storage.replace_battles(conn, battles, source="judge")
    write_battles(out, battles)
    report_path = out.with_name(out.stem + ".report.json")
    report_path.write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n")
    log(describe(report))
    if baseline is not None and report["baseline"]["win_rates"]:
        log(describe_baseline(report))
    if local:
        log(weak_judge_warning(judge_model, battles))
    log(f"battles: {out}  report: {report_path}  judge replies: {db}")
    return report, failed


def grade(answers: dict[str, dict], questions: list[Question], client, judge_model: str, out: Path, db: Path,
          concurrency: int = 8, max_tokens: int = 1024, retry_invalid: bool = False, log=print,
          guided: bool = False, references: dict | None = None, categories=REFERENCE_CATEGORIES,
          local: bool = False) -> tuple[dict, list]:
    """`judge` in single mode: grade every answer, write the grades JSONL and the report."""
    tasks, p = grade_plan(questions, answers, judge_model, references, categories)
    if not tasks:
        raise UserError("no answer is to a question in the question set; nothing to grade")
    failed = run_grades(tasks, db, client, judge_model, concurrency, max_tokens, retry_invalid, log, guided, local)
    records, report = grades_and_report(tasks, p, db, judge_model)
    report["failed_requests"] = len(failed)
    report["retries"] = getattr(client, "retried", 0)
    if local:
        report["local_judge"] = True
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    report_path = out.with_name(out.stem + ".report.json")
    report_path.write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n")
    log(describe_grades(report))
    if local:
        log(weak_judge_warning(judge_model, grade_counts=report["grade_counts"]))
    log(f"grades: {out}  report: {report_path}  judge replies: {db}")
    return report, failed


# ── command line ───────────────────────────────────────────────────────────────────────────────
def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--answers", nargs="+", required=True, metavar="FILE",
                   help="answers JSONL files (or folders of them), from `chatbuild eval answers` or in its format")
    p.add_argument("--questions", default=None,
                   help='"demo", "vicuna" or a questions JSONL (default: the questions stored in the answers)')
    p.add_argument("--judge-url", default=None,
                   help="OpenAI-compatible API of the judge, e.g. http://127.0.0.1:8000/v1 (default: none, "
                        "--judge-model is then a local run or base run in this process)")
    p.add_argument("--judge-model", required=True, metavar="NAME|RUN|BASE",
                   help="the judge model's name on --judge-url's server; without --judge-url, a run folder or a "
                        'base chatbuild loads ("tiny", "smollm2", a model folder), judged in-process (offline)')
    p.add_argument("--judge-api-key", default=None,
                   help="key for the judge's server (default: $CHATBUILD_JUDGE_API_KEY, then $OPENAI_API_KEY)")
    p.add_argument("--mode", choices=MODES, default="pairwise",
                   help="pairwise: every pair of models (default); baseline: every model vs --baseline; "
                        "single: a 1-10 grade per answer (--out is then a grades JSONL)")
    p.add_argument("--baseline", default=None, metavar="MODEL", help="the model every other one meets (--mode baseline)")
    p.add_argument("--reference", default=None, metavar="FILE",
                   help='reference answers, JSONL of {"question_id": ..., "answer": ...}, shown to the judge for '
                        "questions of the --reference-categories")
    p.add_argument("--reference-categories", default=",".join(REFERENCE_CATEGORIES), metavar="LIST",
                   help=f"comma-separated question categories that get the reference (default: "
                        f"{','.join(REFERENCE_CATEGORIES)})")
    p.add_argument("--out", required=True, metavar="FILE.jsonl", help="where the battles (or, in single mode, grades) go")
    p.add_argument("--db", default=None, help="SQLite file for the judge's replies (default: beside --out, .sqlite)")
    add_request_arguments(p)
    p.add_argument("--retry-invalid", action="store_true", help="ask again where a stored verdict was unparseable")
    p.add_argument("--guided-choice", action="store_true",
                   help="ask the judge to answer only [[A]], [[B]] or [[TIE]] (single mode: [[1]]..[[10]]); vLLM's "
                        "guided_choice, which chatbuild serve and the local judge support too: for small judges")


def add_request_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--concurrency", type=int, default=8, help="judge requests at once (default: 8)")
    p.add_argument("--max-tokens", type=int, default=1024, help="most tokens per judge reply (default: 1024)")
    p.add_argument("--timeout", type=float, default=120.0, help="seconds per request (default: 120)")
    p.add_argument("--retries", type=int, default=4, help="retries per request after failures (default: 4)")
    p.add_argument("--backoff", type=float, default=1.0, help="first retry wait in seconds, doubling (default: 1)")


def judge_api_key(given: str | None) -> str | None:
    return given or os.environ.get("CHATBUILD_JUDGE_API_KEY") or os.environ.get("OPENAI_API_KEY")


def categories_of(text: str) -> tuple[str, ...]:
    """--reference-categories "math, coding" → ("math", "coding")."""
    found = tuple(c.strip() for c in text.split(",") if c.strip())
    if not found:
        raise UserError("--reference-categories: give at least one category")
    return found


def open_judge(url: str | None, model: str, api_key: str | None = None, timeout: float = 120.0, retries: int = 4,
               backoff: float = 1.0):
    """(client, the judge's model name, local): an OpenAI-compatible client for a judge at `url`, or,
    without a URL, `eval.client.EngineClient` over the in-process engine serving `model`: a run
    folder (under its run name) or a base (`chatbuild.bases.resolve_base`: "tiny", "smollm2", a folder)."""
    from eval.client import ChatClient, EngineClient

    if url:
        return ChatClient(url, api_key, timeout=timeout, retries=retries, backoff=backoff), model, False
    from chatbuild.runs import is_run

    if re.fullmatch(r".+@https?://\S+", model):
        raise UserError(f'--judge-model "{model}": give the URL with --judge-url and the model name alone')
    try:
        from chatbuild.bases import resolve_base
        from chatbuild.engines import open_engine
    except ImportError as e:
        raise UserError(f"a local judge needs the serving engine ({e}); serve it and pass --judge-url") from None
    if is_run(model):
        engine = open_engine([model])
        return EngineClient(engine), engine.models()[0], True
    path = Path(model)
    if path.exists() and not (path / "config.json").is_file():
        raise UserError(f"--judge-model {model}: neither a finished run folder nor a model folder")
    if not path.exists() and (model.startswith((".", "/", "~")) or model.count("/") > 1):
        raise UserError(f"--judge-model {model}: no such run folder or model folder")
    try:
        engine = open_engine([], base=resolve_base(model), base_name=None if path.exists() else model)
    except UserError as e:
        raise UserError(f"--judge-model {model} (no --judge-url, so a run or base judged in-process): {e}") from None
    return EngineClient(engine), engine.models()[-1], True


def run(args: argparse.Namespace) -> int:
    if args.concurrency < 1 or args.max_tokens < 1 or args.retries < 0:
        raise UserError("--concurrency and --max-tokens must be >= 1, --retries >= 0")
    if (args.mode == "baseline") != (args.baseline is not None):
        raise UserError("--mode baseline needs --baseline MODEL" if args.baseline is None
                        else f"--baseline applies to --mode baseline, not {args.mode}")
    answers = load_answer_files(args.answers)
    if args.baseline is not None:
        model_pairs(list(answers), args.baseline)  # an unknown baseline is refused before a judge loads
    questions = load_questions(args.questions) if args.questions else None
    references = load_references(args.reference) if args.reference else None
    categories = categories_of(args.reference_categories)
    out = Path(args.out)
    db = Path(args.db) if args.db else out.with_suffix(".sqlite")
    client, judge_model, local = open_judge(args.judge_url, args.judge_model, judge_api_key(args.judge_api_key),
                                            args.timeout, args.retries, args.backoff)
    try:
        _, failed = judge(answers, questions, client, judge_model, out, db, args.concurrency, args.max_tokens,
                          args.retry_invalid, guided=args.guided_choice, mode=args.mode, baseline=args.baseline,
                          references=references, categories=categories, local=local)
    finally:
        client.close()
    if failed:
        for task, reason in failed[:5]:
            what = (f"{task.model}'s answer" if isinstance(task, GradeTask)
                    else f"{task.first} shown first vs {task.second}")
            print(f"failed: question {task.question_id!r}, {what}: {reason}", file=sys.stderr)
        print(f"{len(failed)} judge requests failed; rerun the same command to retry them", file=sys.stderr)
        return 1
    return 0
