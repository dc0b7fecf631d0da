"""Judge–human agreement: does the LLM judge pick what people pick, and is it biased where they are not?

Pure functions over battles (the battles JSONL shape, `chatbuild.battles`), as the MT-bench paper
(Zheng et al. 2023, "Judging LLM-as-a-Judge", §4.2; FastChat's `compute_agreement.py`) measures it.

Who is who: a battle is a human's when its `source` is "human" or its `judge` is "human" (arena
votes), a judge's when its `source` is "judge" (`chatbuild eval judge`). Imported data name their
raters in `judge` (FastChat's MT-bench human judgments: "expert_0", "author_3", "gpt4_pair"), so
both can instead be picked by glob patterns on that field (`humans=["expert_*", "author_*"]`).

Which battles meet: a human vote and a judge verdict are compared when they are on the same model
pair and the same question, where "same question" is either the same user turns (the judge's
battles carry `question`, the arena's `conversation_a` holds them: someone asked the arena the
benchmark's question) or the same `question_id` and `turn` (imported benchmark judgments). Every
(human vote, judge verdict) pair on the same question and models counts once, as in FastChat.

Outcomes are compared with the two models in name order: "first" (the model whose name sorts first
won), "second", or "tie" (`tie` and `tie (bothbad)` alike). Agreement is the share of equal
outcomes; Cohen's κ = (p_o − p_e) / (1 − p_e), p_e from the two raters' outcome shares (Cohen 1960).
Both come with ties as a third class, and without ties: only the pairs where neither chose a tie.

Biases, per rater (humans together, each judge alone):
- position: of the single judgments, the share won by the answer shown first, second, and ties. A
  judge battle with `order_verdicts` holds two single judgments (model_a shown first, then model_b);
  any other battle is one judgment with model_a shown first (the arena's left side).
- length: of the decisive battles whose two answers' lengths are known (`chatbuild.style`) and
  differ, the share won by the longer answer.
"""

import math
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from fnmatch import fnmatch

from chatbuild.style import battle_style

OUTCOMES = ("first", "second", "tie")
HUMANS = "humans"  # the name of the human rater group in a report


def is_human(battle: Mapping, patterns: Sequence[str] | None = None) -> bool:
    """Whether a battle is a human's: `judge` matches one of `patterns`, or without patterns, the
    source or the judge is "human"."""
    if patterns:
        return any(fnmatch(str(battle.get("judge", "")), p) for p in patterns)
    return battle.get("source") == "human" or battle.get("judge") == "human"


def is_judge(battle: Mapping, patterns: Sequence[str] | None = None) -> bool:
    """Whether a battle is an LLM judge's: `judge` matches one of `patterns`, or without patterns,
    the source is "judge"."""
    if patterns:
        return any(fnmatch(str(battle.get("judge", "")), p) for p in patterns)
    return battle.get("source") == "judge"


def question_keys(battle: Mapping) -> list[tuple]:
    """The keys under which a battle meets others on the same question (module docstring)."""
    keys = []
    turns = battle.get("question")
    if not (isinstance(turns, list) and turns and all(isinstance(t, str) for t in turns)):
        conversation = battle.get("conversation_a")
        turns = [m.get("content") for m in conversation if isinstance(m, dict) and m.get("role") == "user"] \
            if isinstance(conversation, list) else None
    if turns and all(isinstance(t, str) for t in turns):
        keys.append(("text", tuple(t.strip() for t in turns)))
    if battle.get("question_id") is not None:
        keys.append(("id", battle["question_id"], battle.get("turn")))
    return keys


def outcome(battle: Mapping) -> str:
    """"first", "second" or "tie", with the models in name order."""
    if battle["winner"] not in ("model_a", "model_b"):
        return "tie"
    winner = battle[battle["winner"]]
    return "first" if winner == min(battle["model_a"], battle["model_b"]) else "second"


def cohen_kappa(x: Sequence[str], y: Sequence[str]) -> float | None:
    """Cohen's κ of two raters' labels over the same items; None when undefined (no items, or both
    raters always gave one and the same label, so chance agreement is 1)."""
    n = len(x)
    if n == 0 or n != len(y):
        return None
    labels = set(x) | set(y)
    observed = sum(a == b for a, b in zip(x, y)) / n
    chance = sum((list(x).count(label) / n) * (list(y).count(label) / n) for label in labels)
    return None if math.isclose(chance, 1.0) else (observed - chance) / (1.0 - chance)


@dataclass
class Agreement:
    """One judge against the humans on the pairs both rated; rates are None without pairs."""

    judge: str
    pairs: int
    agreement: float | None
    kappa: float | None
    pairs_without_ties: int
    agreement_without_ties: float | None
    kappa_without_ties: float | None


@dataclass
class Bias:
    """One rater's position and length bias (module docstring); shares are None without data."""

    rater: str
    judgments: int
    first: float | None
    second: float | None
    tie: float | None
    decisive: int
    longer_won: float | None


def matched(humans: Sequence[Mapping], judges: Sequence[Mapping]) -> list[tuple[Mapping, Mapping]]:
    """Every (human battle, judge battle) pair on the same question and model pair."""
    index = defaultdict(list)
    for j, battle in enumerate(judges):
        for key in question_keys(battle):
            index[(key, frozenset((battle["model_a"], battle["model_b"])))].append(j)
    out = []
    for h in humans:
        found: set[int] = set()
        for key in question_keys(h):
            found.update(index.get((key, frozenset((h["model_a"], h["model_b"]))), ()))
        out += [(h, judges[j]) for j in sorted(found)]
    return out


def agreement(pairs: Sequence[tuple[Mapping, Mapping]], judge: str) -> Agreement:
    """Agreement and κ, with and without ties, over (human, judge) battle pairs."""
    human = [outcome(h) for h, _ in pairs]
    machine = [outcome(j) for _, j in pairs]
    decisive = [(a, b) for a, b in zip(human, machine) if a != "tie" and b != "tie"]

    def rate(xs, ys):
        return sum(a == b for a, b in zip(xs, ys)) / len(xs) if xs else None

    dh, dm = [a for a, _ in decisive], [b for _, b in decisive]
    return Agreement(judge, len(pairs), rate(human, machine), cohen_kappa(human, machine),
                     len(decisive), rate(dh, dm), cohen_kappa(dh, dm))


SHOWN_FIRST = ({"model_a": "first", "model_b": "second"}, {"model_a": "second", "model_b": "first"})


def positions(battle: Mapping) -> list[str]:
    """The battle's single judgments as "first" / "second" / "tie" (which shown position won)."""
    verdicts = battle.get("order_verdicts")
    if isinstance(verdicts, list) and len(verdicts) == 2 and all(isinstance(v, str) for v in verdicts):
        return [SHOWN_FIRST[i].get(v, "tie") for i, v in enumerate(verdicts)]
    return [SHOWN_FIRST[0].get(battle["winner"], "tie")]


def bias(battles: Iterable[Mapping], rater: str) -> Bias:
    """Position and length bias of one rater's battles."""
    shown, longer, decisive = [], 0, 0
    for b in battles:
        shown += positions(b)
        style = battle_style(b) if b["winner"] in ("model_a", "model_b") else None
        if style is not None and style[0]["chars"] != style[1]["chars"]:
            decisive += 1
            longer += (b["winner"] == "model_a") == (style[0]["chars"] > style[1]["chars"])

    def share(label):
        return shown.count(label) / len(shown) if shown else None

    return Bias(rater, len(shown), share("first"), share("second"), share("tie"), decisive,
                longer / decisive if decisive else None)


def weak_judge_warning(judge: str, battles: Iterable[Mapping] | None = None,
                       grade_counts: Mapping[str, int] | None = None) -> str:
    """The plain warning a small local judge's results come with (`eval judge` prints it, the
    Leaderboard tab shows it next to them): its position bias over `battles`, and with
    `grade_counts` ({"1": n, ..., "10": n}) how often it gave its favourite grade."""
    text = (f"judge {judge} ran in chatbuild's own process: a small local model is a weak judge; read its "
            "verdicts as a smoke test, not as a ranking")
    if battles:
        b = bias(battles, judge)
        if b.first is not None:
            text += (f". Its position bias: the answer shown first won {b.first:.0%} of its {b.judgments} "
                     f"single judgments, the second {b.second:.0%}, tie {b.tie:.0%} (an unbiased judge wins about "
                     "as often either way). Check it against people with `chatbuild eval agreement`")
    graded = sum(grade_counts.values()) if grade_counts else 0
    if graded:
        top = max(grade_counts, key=grade_counts.get)
        text += (f". It gave [[{top}]] to {grade_counts[top] / graded:.0%} of the {graded} answers it graded "
                 f"({sum(n > 0 for n in grade_counts.values())} distinct grades)")
    return text


@dataclass
class Report:
    """Agreement per judge, and the biases of the humans and of each judge."""

    human_battles: int
    judge_battles: int
    agreements: list[Agreement]
    biases: list[Bias]


def agreement_report(battles: Sequence[Mapping], humans: Sequence[str] | None = None,
                     judges: Sequence[str] | None = None) -> Report:
    """The whole comparison over a pool of battles (module docstring); `humans`/`judges`: glob
    patterns on the `judge` field, instead of the source (for imported data)."""
    human = [b for b in battles if is_human(b, humans)]
    by_judge: dict[str, list[Mapping]] = defaultdict(list)
    for b in battles:
        if is_judge(b, judges) and not is_human(b, humans):
            by_judge[str(b.get("judge") or "judge")].append(b)
    agreements = [agreement(matched(human, js), name) for name, js in sorted(by_judge.items())]
    biases = [bias(human, HUMANS)] + [bias(js, name) for name, js in sorted(by_judge.items())]
    return Report(len(human), sum(map(len, by_judge.values())), agreements, biases)


def describe(report: Report) -> str:
    """The report as plain-text tables."""

    def pct(x):
        return "–" if x is None else f"{x:.0%}"

    def num(x):
        return "–" if x is None else f"{x:.3f}"

    lines = [f"{report.human_battles} human votes, {report.judge_battles} judge verdicts"]
    width = max(8, *(len(b.rater) for b in report.biases))
    lines.append("\nagreement with the humans, on the question and model pairs both rated")
    lines.append(f"{'judge':<{width}}  {'pairs':>5}  {'agree':>6}  {'kappa':>6}  |  without ties: {'pairs':>5}  "
                 f"{'agree':>6}  {'kappa':>6}")
    for a in report.agreements:
        lines.append(f"{a.judge:<{width}}  {a.pairs:>5}  {pct(a.agreement):>6}  {num(a.kappa):>6}  |  "
                     f"{'':>14} {a.pairs_without_ties:>5}  {pct(a.agreement_without_ties):>6}  "
                     f"{num(a.kappa_without_ties):>6}")
    if not report.agreements:
        lines.append("(no judge verdicts)")
    lines.append("\nposition bias (share of single judgments won by the answer shown first / second / tie) "
                 "and length bias (share of decisive battles won by the longer answer)")
    lines.append(f"{'rater':<{width}}  {'judgments':>9}  {'first':>6}  {'second':>6}  {'tie':>6}  |  "
                 f"{'decisive':>8}  {'longer won':>10}")
    for b in report.biases:
        lines.append(f"{b.rater:<{width}}  {b.judgments:>9}  {pct(b.first):>6}  {pct(b.second):>6}  {pct(b.tie):>6}  |  "
                     f"{b.decisive:>8}  {pct(b.longer_won):>10}")
    return "\n".join(lines)
