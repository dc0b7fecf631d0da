"""`chatbuild eval judge`: every pair of models on every question, judged by an LLM in both orders.

    chatbuild eval judge --answers answers/*.jsonl --judge-url http://127.0.0.1:8000/v1 \\
        --judge-model gpt-4o --out battles.jsonl

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
from chatbuild.battles import write_battles
from chatbuild.errors import UserError
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
USER_TEMPLATE = (
    "[User question]\n{question}\n\n"
    "[The start of Assistant A's answer]\n{answer_a}\n[The end of Assistant A's answer]\n\n"
    "[The start of Assistant B's answer]\n{answer_b}\n[The end of Assistant B's answer]"
)
MULTI_TURN_TEMPLATE = (
    "Compare how the two assistants did over the whole conversation, above all in their last reply.\n\n"
    "[The start of the conversation with Assistant A]\n{answer_a}\n[The end of the conversation with Assistant A]\n\n"
    "[The start of the conversation with Assistant B]\n{answer_b}\n[The end of the conversation with Assistant B]"
)
VERDICT_MARKER = re.compile(r"\[\[(A|B|TIE)\]\]", re.IGNORECASE)
VERDICT_OF = {"A": "A", "B": "B", "TIE": "tie"}
GUIDED_CHOICES = ["[[A]]", "[[B]]", "[[TIE]]"]


def parse_verdict(text: str) -> str:
    """"A", "B" or "tie" from the LAST verdict marker in `text`; "invalid" if there is none."""
    found = VERDICT_MARKER.findall(text or "")
    return VERDICT_OF[found[-1].upper()] if found else "invalid"


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


def render(question: Question, rec_a: dict, rec_b: dict) -> list[dict]:
    """The judge's messages for one question with rec_a shown as Assistant A."""
    if len(question.turns) == 1:
        user = USER_TEMPLATE.format(question=question.text, answer_a=rec_a["answer"], answer_b=rec_b["answer"])
    else:
        user = MULTI_TURN_TEMPLATE.format(answer_a=_conversation(question, rec_a, "A"),
                                          answer_b=_conversation(question, rec_b, "B"))
    return [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": user}]


def _conversation(question: Question, rec: dict, who: str) -> str:
    replies = rec.get("answers")
    if not (isinstance(replies, list) and len(replies) == len(question.turns)):
        replies = [None] * (len(question.turns) - 1) + [rec["answer"]]  # only the last reply is known
    lines = []
    for turn, reply in zip(question.turns, replies):
        lines.append(f"### User:\n{turn}")
        if reply is not None:
            lines.append(f"### Assistant {who}:\n{reply}")
    return "\n\n".join(lines)


def judgment_key(judge_model: str, first: str, second: str, messages: list[dict]) -> str:
    """Identifies one judge request: the judge, who is shown first and second, and the exact prompt
    (so a changed answer, question or prompt wording is judged anew, and nothing else is)."""
    payload = [judge_model, first, second, messages]
    return hashlib.sha256(json.dumps(payload, ensure_ascii=False).encode()).hexdigest()


def plan(questions: list[Question], answers: dict[str, dict], judge_model: str) -> Plan:
    """Every pair of models (in the order of `answers`) on every question both answered, both orders."""
    models = list(answers)
    qids = {q.question_id for q in questions}
    tasks, pairs = [], []
    for q in questions:
        for a, b in itertools.combinations(models, 2):
            ra, rb = answers[a].get(q.question_id), answers[b].get(q.question_id)
            if ra is None or rb is None:
                continue
            m1, m2 = render(q, ra, rb), render(q, rb, ra)
            k1, k2 = judgment_key(judge_model, a, b, m1), judgment_key(judge_model, b, a, m2)
            tasks += [Task(k1, q.question_id, a, b, tuple(m1)), Task(k2, q.question_id, b, a, tuple(m2))]
            pairs.append(Pair(q.question_id, a, b, (k1, k2)))
    missing = {m: sum(q.question_id not in answers[m] for q in questions) for m in models}
    ignored = sum(qid not in qids for recs in answers.values() for qid in recs)
    return Plan(tasks, pairs, {m: n for m, n in missing.items() if n}, ignored, {q.question_id: q for q in questions})


# ── judging ────────────────────────────────────────────────────────────────────────────────────
def run_judgments(tasks: list[Task], db: Path, client, judge_model: str, concurrency: int = 8,
                  max_tokens: int = 1024, retry_invalid: bool = False, log=print,
                  guided: bool = False) -> list[tuple[Task, str]]:
    """Ask the judge for every task not yet stored in `db` (and, with `retry_invalid`, again for
    stored invalid ones). Each reply is stored as soon as it arrives. Returns the tasks that failed
    for good, with the reason; `UserError` (a wrong URL, key or model) stops everything at once."""
    from eval.client import RequestFailed, run_concurrently

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

    failed, counts = [], Counter()
    try:
        for done, (task, verdict, error) in enumerate(run_concurrently(ask, todo, concurrency), start=1):
            if isinstance(error, RequestFailed):
                failed.append((task, str(error)))
            elif error is not None:
                raise error
            else:
                counts[verdict] += 1
            if done % 50 == 0 or done == len(todo):
                log(f"judge: {done}/{len(todo)} ({counts['A']} A, {counts['B']} B, {counts['tie']} tie, "
                    f"{counts['invalid']} invalid, {len(failed)} failed)")
    except BaseException:
        # An interrupt, or a UserError from one request (wrong key, model or URL): stop the requests
        # in flight. Stored replies stay; the rest is asked on the next run.
        client.close()
        raise
    return failed


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
    }
    return battles, report


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
          log=print, guided: bool = False) -> tuple[dict, list]:
    """The whole step: plan, ask what is missing, write --out and the report. Returns (report,
    failed tasks)."""
    if questions is None:
        questions = questions_from_answers(answers)
    p = plan(questions, answers, judge_model)
    if not p.pairs:
        raise UserError("no question was answered by two models; nothing to judge")
    failed = run_judgments(p.tasks, db, client, judge_model, concurrency, max_tokens, retry_invalid, log, guided)
    battles, report = battles_and_report(p, db, judge_model, answers)
    report["failed_requests"] = len(failed)
    report["retries"] = getattr(client, "retried", 0)
    with storage.transaction(db) as conn:
        storage.replace_battles(conn, battles, source="judge")
    write_battles(out, battles)
    report_path = out.with_name(out.stem + ".report.json")
    report_path.write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n")
    log(describe(report))
    log(f"battles: {out}  report: {report_path}  judge replies: {db}")
    return report, failed


# ── command line ───────────────────────────────────────────────────────────────────────────────
def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--answers", nargs="+", required=True, metavar="FILE",
                   help="answers JSONL files (or folders of them), from `chatbuild eval answers` or in its format")
    p.add_argument("--questions", default=None,
                   help='"demo", "vicuna" or a questions JSONL (default: the questions stored in the answers)')
    p.add_argument("--judge-url", required=True, help="OpenAI-compatible API of the judge, e.g. http://127.0.0.1:8000/v1")
    p.add_argument("--judge-model", required=True, help="the judge model's name on that server")
    p.add_argument("--judge-api-key", default=None,
                   help="key for the judge's server (default: $CHATBUILD_JUDGE_API_KEY, then $OPENAI_API_KEY)")
    p.add_argument("--out", required=True, metavar="BATTLES.jsonl", help="where the battles go")
    p.add_argument("--db", default=None, help="SQLite file for the judge's replies (default: beside --out, .sqlite)")
    add_request_arguments(p)
    p.add_argument("--retry-invalid", action="store_true", help="ask again where a stored verdict was unparseable")
    p.add_argument("--guided-choice", action="store_true",
                   help="ask the server to answer only [[A]], [[B]] or [[TIE]] (vLLM's guided_choice; chatbuild serve "
                        "supports it too): for small local judges")


def add_request_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--concurrency", type=int, default=8, help="judge requests at once (default: 8)")
    p.add_argument("--max-tokens", type=int, default=1024, help="most tokens per judge reply (default: 1024)")
    p.add_argument("--timeout", type=float, default=120.0, help="seconds per request (default: 120)")
    p.add_argument("--retries", type=int, default=4, help="retries per request after failures (default: 4)")
    p.add_argument("--backoff", type=float, default=1.0, help="first retry wait in seconds, doubling (default: 1)")


def judge_api_key(given: str | None) -> str | None:
    return given or os.environ.get("CHATBUILD_JUDGE_API_KEY") or os.environ.get("OPENAI_API_KEY")


def run(args: argparse.Namespace) -> int:
    from eval.client import ChatClient

    if args.concurrency < 1 or args.max_tokens < 1 or args.retries < 0:
        raise UserError("--concurrency and --max-tokens must be >= 1, --retries >= 0")
    answers = load_answer_files(args.answers)
    questions = load_questions(args.questions) if args.questions else None
    out = Path(args.out)
    db = Path(args.db) if args.db else out.with_suffix(".sqlite")
    client = ChatClient(args.judge_url, judge_api_key(args.judge_api_key), timeout=args.timeout,
                        retries=args.retries, backoff=args.backoff)
    try:
        _, failed = judge(answers, questions, client, args.judge_model, out, db, args.concurrency, args.max_tokens,
                          args.retry_invalid, guided=args.guided_choice)
    finally:
        client.close()
    if failed:
        for task, reason in failed[:5]:
            print(f"failed: question {task.question_id!r}, {task.first} shown first vs {task.second}: {reason}",
                  file=sys.stderr)
        print(f"{len(failed)} judge requests failed; rerun the same command to retry them", file=sys.stderr)
        return 1
    return 0
