"""The Leaderboard tab: ratings from the stored battles (arena votes and judge verdicts).

Bradley–Terry ratings on the Elo scale with 95% bootstrap intervals, via `chatbuild.ratings`
(the same code as `chatbuild eval elo`), the battle count per model, and two pictures: the interval
plot and the win-rate heat map, drawn by `chatbuild.leaderboard` (which draws `eval elo`'s PNG too).
Filters: source (human votes, judge verdicts) and "anonymous battles only", on by default: arena
votes cast in named mode, where the voter picked both models by name, are left out (as FastChat's
arena rates anonymous battles only), since one person can pick a favourite and vote for it turn
after turn. Judge verdicts carry no such mark and always count. A category filter rates only the
battles on questions of one category (`eval elo --by-category`; arena votes have none).
"Style control" rates with the answers' length and markdown as covariates (`eval elo --style-control`)
and shows the fitted style coefficients; battles that do not carry their answers' style make it say so.
Judge results beyond the ratings, as `chatbuild eval judge` reports them (the numbers come from the
same `chatbuild.ratings` functions): when a judge's battles are baseline-mode (`--mode baseline`
marks them; `ratings.baseline_of`) each model's "Win rate vs BASELINE" with a 95% bootstrap interval;
"Single-answer grades" (`--mode single`, the `grades` table) each model's mean grade with its interval,
graded and invalid counts, the latest grade per judge, model and question; and next to a small local
judge's results (marked `local_judge`) the warning the command line prints, with its position bias
(`agreement.weak_judge_warning`). Both follow the category filter and need "judge" among the sources.
Below, "Judge–human agreement" compares judge verdicts with arena votes on the same questions and
models (`chatbuild eval agreement`, over every stored battle): agreement, Cohen's κ, and the
position and length bias of the humans and of each judge.
Recomputed when the tab is opened and on Refresh. API name: `/leaderboard`.
"""

import io
from collections import Counter, defaultdict

import gradio as gr

from chatbuild import agreement, leaderboard, ratings, storage
from serve.ui_common import UIContext

SOURCES = ["human", "judge", "import"]
COLUMNS = ["Rank (UB)", "Model", "Rating", "95% interval", "Battles"]
METHOD = "bt"  # a `chatbuild.ratings.METHODS` entry: order-free, with bootstrap intervals
BOOTSTRAP_ROUNDS = ratings.METHODS[METHOD].bootstrap_rounds
FEW_BATTLES = 20  # below this many battles a model's rating is flagged as not yet trustworthy
ALL_CATEGORIES = "All categories"
JUDGE_ROUNDS = 1000  # bootstrap rounds for win rates and mean grades: `eval judge`'s, so the numbers match its report


def build_leaderboard_tab(ctx: UIContext, tab: gr.Tab) -> None:
    with gr.Row():
        sources = gr.CheckboxGroup(SOURCES, value=SOURCES, label="Battles from",
                                   info="human: arena votes · judge: model-judged evaluations · import: imported files")
        anonymous_only = gr.Checkbox(True, label="Anonymous battles only",
                                     info="leaves out arena votes cast after picking the models by name "
                                          "(named mode); judge verdicts always count")
        refresh = gr.Button("Refresh", size="sm", scale=0, elem_id="leaderboard-refresh")
    with gr.Row():
        style_control = gr.Checkbox(False, label="Style control", elem_id="leaderboard-style-control",
                                    info="rate at equal style: answer length, headers, lists and bold as covariates "
                                         "(LMSYS / FastChat style control)")
        category = gr.Dropdown([ALL_CATEGORIES], value=ALL_CATEGORIES, label="Category", allow_custom_value=True,
                               info="only battles on questions of this category", elem_id="leaderboard-category")
    summary = gr.Markdown(elem_id="leaderboard-summary")
    table = gr.Dataframe(headers=COLUMNS, datatype=["number", "str", "number", "str", "number"],
                         interactive=False, elem_id="leaderboard-table")
    style = gr.Markdown(elem_id="leaderboard-style")
    judges = gr.Markdown(elem_id="leaderboard-judges")
    with gr.Row():
        # The figures carry their own titles: a component label would cover the top of the picture.
        interval_plot = gr.Image(label="Ratings with 95% intervals", show_label=False, type="pil",
                                 interactive=False, buttons=["download"], elem_id="leaderboard-intervals")
        heat_map = gr.Image(label="Win-rate heat map", show_label=False, type="pil", interactive=False,
                            buttons=["download"], elem_id="leaderboard-heatmap")
    grades = gr.Markdown(elem_id="leaderboard-grades")
    with gr.Accordion("Judge–human agreement", open=False):
        agreement_panel = gr.Markdown(elem_id="leaderboard-agreement")

    def compute(sources, anonymous_only, style_control=False, category=ALL_CATEGORIES):
        battles = storage.list_battles(ctx.db_path, source=sources, named=not anonymous_only) if sources else []
        graded = latest_grades(storage.get_grades(ctx.db_path).values()) if "judge" in (sources or []) else []
        found = sorted(set(categories(battles)) | {g.extra["category"] for g in graded
                                                   if isinstance(g.extra.get("category"), str) and g.extra["category"]})
        chosen = category if category in found else ALL_CATEGORIES
        if chosen != ALL_CATEGORIES:
            battles = [b for b in battles if b.get("category") == chosen]
            graded = [g for g in graded if g.extra.get("category") == chosen]
        summary_text, rows, intervals, heat, style_text = render(battles, sources, anonymous_only, style_control, chosen)
        return (summary_text, rows, intervals, heat, style_text,
                gr.Dropdown(choices=[ALL_CATEGORIES, *found], value=chosen),
                agreement_markdown(storage.list_battles(ctx.db_path)),
                judges_markdown(battles), grades_markdown(graded, sources, chosen))

    outputs = [summary, table, interval_plot, heat_map, style, category, agreement_panel, judges, grades]
    gr.on([refresh.click, tab.select, sources.change, anonymous_only.change, style_control.change, category.input],
          compute, [sources, anonymous_only, style_control, category], outputs, api_name="leaderboard",
          concurrency_limit=2, concurrency_id="leaderboard")


def categories(battles: list[dict]) -> list[str]:
    """The question categories among these battles, sorted."""
    return sorted({b["category"] for b in battles if isinstance(b.get("category"), str) and b["category"]})


def render(battles: list[dict], sources, anonymous_only: bool, style_control: bool = False,
           category: str = ALL_CATEGORIES):
    """(summary markdown, table rows, interval plot, heat map, style coefficients markdown) for these battles."""
    what = "sources: " + (", ".join(sources) if sources else "none") + ("; anonymous only" if anonymous_only else "")
    if category != ALL_CATEGORIES:
        what += f"; category {category}"
    counted = (" Arena votes cast in named mode (both models picked by name) are left out; judge verdicts count."
               if anonymous_only else " Arena votes cast in named mode (both models picked by name) are included.")
    if not battles:
        return f"No battles stored yet ({what}). Vote in the Arena tab to add some.{counted}", [], None, None, ""
    style_text = ""
    if style_control:
        try:
            rows, coefficients = ratings.style_leaderboard(battles, bootstrap_rounds=BOOTSTRAP_ROUNDS)
        except ratings.NoStyle as e:
            return f"⚠️ {e}. Untick Style control for the plain ratings.", [], None, None, ""
        how = (f"Bradley–Terry ratings **with style control** (length, headers, list items and bold as covariates: "
               f"the ratings at equal style), Elo scale (mean 1000), 95% bootstrap intervals over "
               f"{BOOTSTRAP_ROUNDS} resamples")
        style_text = style_markdown(coefficients)
    else:
        rows = ratings.leaderboard(battles, method=METHOD, bootstrap_rounds=BOOTSTRAP_ROUNDS)
        how = (f"Bradley–Terry ratings on the Elo scale (mean 1000), 95% bootstrap intervals over "
               f"{BOOTSTRAP_ROUNDS} resamples")
    summary = (f"**{len(battles)}** battles ({what}) between **{len(rows)}** models · {how}; "
               f"rank (UB) is the best rank the intervals allow.{counted}")
    few = [r.model for r in rows if r.battles < FEW_BATTLES]
    if few:  # true to the maths, but a rating from a handful of battles is mostly noise: say so
        summary += (f" ⚠️ Too few battles to trust yet for {', '.join(few)} (under {FEW_BATTLES} each): "
                    "their ratings can swing by hundreds of points with the next vote.")
    table = [[r.rank, r.model, round(r.rating, 1), leaderboard.interval_text(r, 0, offsets=True), r.battles]
             for r in rows]
    xlabel = "rating (Bradley–Terry with style control, Elo scale)" if style_control else \
        "rating (Bradley–Terry, Elo scale)"
    return (summary, table, _to_image(leaderboard.interval_plot(rows, xlabel)),
            _to_image(leaderboard.heat_map(battles, [r.model for r in rows])), style_text)


def style_markdown(coefficients) -> str:
    """The style coefficients as a Markdown table, with how to read them."""
    lines = ["**Style coefficients**: how much each style difference alone moves the odds of winning, per "
             "standard deviation of (a − b)/(a + b + 1) over these battles; an interval that excludes 0 means "
             "the raters reward (or punish) that style.", "",
             "| Feature | Log-odds per sd | 95% interval | Elo points |", "|---|---:|---:|---:|"]
    lines += leaderboard.style_rows(coefficients, digits=2, elo_digits=0)
    return "\n".join(lines)


def judges_markdown(battles: list[dict]) -> str:
    """Per judge among these battles: its win rates against the baseline when its battles are
    baseline-mode, and a small local judge's warning with its position bias ("" when neither)."""
    by_judge = defaultdict(list)
    for b in battles:
        if b.get("source") == "judge":
            by_judge[str(b.get("judge") or "judge")].append(b)
    parts = []
    for judge, js in sorted(by_judge.items()):
        baseline = ratings.baseline_of(js)
        if baseline is not None:
            rates = ratings.baseline_win_rates(js, baseline, rounds=JUDGE_ROUNDS)
            lines = [f"**Win rate vs {baseline}** (judge {judge}; ties count half; 95% bootstrap interval over "
                     f"battles, {JUDGE_ROUNDS} resamples)", "",
                     "| Model | Win rate | 95% interval | Battles |", "|---|---:|---:|---:|"]
            for model, r in sorted(rates.items(), key=lambda kv: -kv[1].mean):
                lines.append(f"| {model} | {r.mean:.1%} | {r.low:.1%} – {r.high:.1%} | {r.n} |")
            parts.append("\n".join(lines))
        if any(b.get("local_judge") for b in js):
            parts.append("⚠️ " + agreement.weak_judge_warning(judge, js))
    return "\n\n".join(parts)


def latest_grades(grades) -> list[storage.Grade]:
    """The latest stored grade per judge, model and question (a changed answer or prompt makes a new
    request; its grade replaces the older one here, as a rerun's report would count it)."""
    latest = {}
    for g in sorted(grades, key=lambda g: g.tstamp):
        latest[(g.judge, g.model, g.question_id)] = g
    return list(latest.values())


def grades_markdown(grades: list, sources, category: str = ALL_CATEGORIES) -> str:
    """The single-answer grades panel: per judge, each model's mean grade with its interval, graded
    and invalid counts (`eval judge --mode single`'s report), and a local judge's warning."""
    where = "" if category == ALL_CATEGORIES else f" in category {category}"
    if "judge" not in (sources or []):
        return "**Single-answer grades**: tick *judge* in Battles from to see them."
    if not grades:
        return f"**Single-answer grades**: none stored{where} (`chatbuild eval judge --mode single`)."
    by_judge = defaultdict(list)
    for g in grades:
        by_judge[g.judge].append(g)
    lines = [f"**Single-answer grades** (1–10{where}; `eval judge --mode single`): each model's mean grade with a "
             f"95% bootstrap interval over its graded answers ({JUDGE_ROUNDS} resamples); replies without a valid "
             "grade are counted as invalid and left out.", "",
             "| Judge | Model | Mean grade | 95% interval | Graded | Invalid |", "|---|---|---:|---:|---:|---:|"]
    warnings = []
    for judge, gs in sorted(by_judge.items()):
        stats = ratings.mean_grades([{"model": g.model, "grade": g.grade} for g in gs], rounds=JUDGE_ROUNDS)
        for model, m in sorted(stats.items(), key=lambda kv: -(kv[1].mean or 0)):
            mean, ci = ("–", "–") if m.mean is None else (f"{m.mean:.2f}", f"{m.low:.2f} – {m.high:.2f}")
            lines.append(f"| {judge} | {model} | {mean} | {ci} | {m.n} | {m.invalid} |")
        if any(g.extra.get("local_judge") for g in gs):
            counts = Counter(str(g.grade) for g in gs if g.grade is not None)
            warnings.append("⚠️ " + agreement.weak_judge_warning(judge, grade_counts={str(n): counts[str(n)]
                                                                                       for n in range(1, 11)}))
    if warnings:
        lines += ["", *warnings]
    return "\n".join(lines)


def agreement_markdown(battles: list[dict]) -> str:
    """The judge–human agreement panel: agreement and κ per judge, then everyone's biases."""
    report = agreement.agreement_report(battles)
    if not report.human_battles or not report.judge_battles:
        return (f"{report.human_battles} arena votes and {report.judge_battles} judge verdicts stored: agreement needs "
                "both, on the same question and models (ask the arena an evaluation question, or import human "
                "judgments).")

    def pct(x):
        return "–" if x is None else f"{x:.0%}"

    def num(x):
        return "–" if x is None else f"{x:.2f}"

    lines = [f"{report.human_battles} arena votes, {report.judge_battles} judge verdicts. Compared where both rated "
             "the same question and models; κ is Cohen's kappa (0: chance level, 1: always agree).", "",
             "| Judge | Pairs | Agreement | κ | Pairs without ties | Agreement | κ |", "|---|---:|---:|---:|---:|---:|---:|"]
    for a in report.agreements:
        lines.append(f"| {a.judge} | {a.pairs} | {pct(a.agreement)} | {num(a.kappa)} | {a.pairs_without_ties} | "
                     f"{pct(a.agreement_without_ties)} | {num(a.kappa_without_ties)} |")
    lines += ["", "| Rater | Judgments | Shown first won | Shown second won | Tie | Longer answer won (decisive) |",
              "|---|---:|---:|---:|---:|---:|"]
    for b in report.biases:
        lines.append(f"| {b.rater} | {b.judgments} | {pct(b.first)} | {pct(b.second)} | {pct(b.tie)} | "
                     f"{pct(b.longer_won)} of {b.decisive} |")
    return "\n".join(lines)


# ── pictures ───────────────────────────────────────────────────────────────────────────────────
def _to_image(fig):
    from PIL import Image

    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    buf.seek(0)
    return Image.open(buf).convert("RGB")
