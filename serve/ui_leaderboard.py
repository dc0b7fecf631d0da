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
Below, "Judge–human agreement" compares judge verdicts with arena votes on the same questions and
models (`chatbuild eval agreement`, over every stored battle): agreement, Cohen's κ, and the
position and length bias of the humans and of each judge.
Recomputed when the tab is opened and on Refresh. API name: `/leaderboard`.
"""

import io

import gradio as gr

from chatbuild import agreement, leaderboard, ratings, storage
from serve.ui_common import UIContext

SOURCES = ["human", "judge", "import"]
COLUMNS = ["Rank (UB)", "Model", "Rating", "95% interval", "Battles"]
METHOD = "bt"  # a `chatbuild.ratings.METHODS` entry: order-free, with bootstrap intervals
BOOTSTRAP_ROUNDS = ratings.METHODS[METHOD].bootstrap_rounds
FEW_BATTLES = 20  # below this many battles a model's rating is flagged as not yet trustworthy
ALL_CATEGORIES = "All categories"


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
    with gr.Row():
        # The figures carry their own titles: a component label would cover the top of the picture.
        interval_plot = gr.Image(label="Ratings with 95% intervals", show_label=False, type="pil",
                                 interactive=False, buttons=["download"], elem_id="leaderboard-intervals")
        heat_map = gr.Image(label="Win-rate heat map", show_label=False, type="pil", interactive=False,
                            buttons=["download"], elem_id="leaderboard-heatmap")
    with gr.Accordion("Judge–human agreement", open=False):
        agreement_panel = gr.Markdown(elem_id="leaderboard-agreement")

    def compute(sources, anonymous_only, style_control=False, category=ALL_CATEGORIES):
        battles = storage.list_battles(ctx.db_path, source=sources, named=not anonymous_only) if sources else []
        found = categories(battles)
        chosen = category if category in found else ALL_CATEGORIES
        shown = battles if chosen == ALL_CATEGORIES else [b for b in battles if b.get("category") == chosen]
        summary_text, rows, intervals, heat, style_text = render(shown, sources, anonymous_only, style_control, chosen)
        return (summary_text, rows, intervals, heat, style_text,
                gr.Dropdown(choices=[ALL_CATEGORIES, *found], value=chosen),
                agreement_markdown(storage.list_battles(ctx.db_path)))

    outputs = [summary, table, interval_plot, heat_map, style, category, agreement_panel]
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
    for c in coefficients:
        if c.value is None:
            lines.append(f"| {c.feature} | – | never varied | – |")
        else:
            interval = "–" if c.ci_low is None else f"{c.ci_low:.2f} – {c.ci_high:.2f}"
            lines.append(f"| {c.feature} | {c.value:.2f} | {interval} | {c.elo:+.0f} |")
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
