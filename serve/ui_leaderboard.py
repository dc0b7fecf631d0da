"""The Leaderboard tab: ratings from the stored battles (arena votes and judge verdicts).

Bradley–Terry ratings on the Elo scale with 95% bootstrap intervals, via `chatbuild.ratings`
(the same code as `chatbuild eval elo`), the battle count per model, and two pictures: the interval
plot and the win-rate heat map, drawn by `chatbuild.leaderboard` (which draws `eval elo`'s PNG too).
Filters: source (human votes, judge verdicts) and "anonymous battles only", on by default: arena
votes cast in named mode, where the voter picked both models by name, are left out (as FastChat's
arena rates anonymous battles only), since one person can pick a favourite and vote for it turn
after turn. Judge verdicts carry no such mark and always count.
Recomputed when the tab is opened and on Refresh. API name: `/leaderboard`.
"""

import io

import gradio as gr

from chatbuild import leaderboard, ratings, storage
from serve.ui_common import UIContext

SOURCES = ["human", "judge", "import"]
COLUMNS = ["Rank (UB)", "Model", "Rating", "95% interval", "Battles"]
METHOD = "bt"  # a `chatbuild.ratings.METHODS` entry: order-free, with bootstrap intervals
BOOTSTRAP_ROUNDS = ratings.METHODS[METHOD].bootstrap_rounds
FEW_BATTLES = 20  # below this many battles a model's rating is flagged as not yet trustworthy


def build_leaderboard_tab(ctx: UIContext, tab: gr.Tab) -> None:
    with gr.Row():
        sources = gr.CheckboxGroup(SOURCES, value=SOURCES, label="Battles from",
                                   info="human: arena votes · judge: model-judged evaluations · import: imported files")
        anonymous_only = gr.Checkbox(True, label="Anonymous battles only",
                                     info="leaves out arena votes cast after picking the models by name "
                                          "(named mode); judge verdicts always count")
        refresh = gr.Button("Refresh", size="sm", scale=0, elem_id="leaderboard-refresh")
    summary = gr.Markdown(elem_id="leaderboard-summary")
    table = gr.Dataframe(headers=COLUMNS, datatype=["number", "str", "number", "str", "number"],
                         interactive=False, elem_id="leaderboard-table")
    with gr.Row():
        # The figures carry their own titles: a component label would cover the top of the picture.
        interval_plot = gr.Image(label="Ratings with 95% intervals", show_label=False, type="pil",
                                 interactive=False, buttons=["download"], elem_id="leaderboard-intervals")
        heat_map = gr.Image(label="Win-rate heat map", show_label=False, type="pil", interactive=False,
                            buttons=["download"], elem_id="leaderboard-heatmap")

    def compute(sources, anonymous_only):
        battles = storage.list_battles(ctx.db_path, source=sources, named=not anonymous_only) if sources else []
        return render(battles, sources, anonymous_only)

    outputs = [summary, table, interval_plot, heat_map]
    gr.on([refresh.click, tab.select, sources.change, anonymous_only.change], compute,
          [sources, anonymous_only], outputs, api_name="leaderboard", concurrency_limit=2,
          concurrency_id="leaderboard")


def render(battles: list[dict], sources, anonymous_only: bool):
    """(summary markdown, table rows, interval plot, heat map) for these battles."""
    what = "sources: " + (", ".join(sources) if sources else "none") + ("; anonymous only" if anonymous_only else "")
    counted = (" Arena votes cast in named mode (both models picked by name) are left out; judge verdicts count."
               if anonymous_only else " Arena votes cast in named mode (both models picked by name) are included.")
    if not battles:
        return f"No battles stored yet ({what}). Vote in the Arena tab to add some.{counted}", [], None, None
    rows = ratings.leaderboard(battles, method=METHOD, bootstrap_rounds=BOOTSTRAP_ROUNDS)
    summary = (f"**{len(battles)}** battles ({what}) between **{len(rows)}** models · Bradley–Terry ratings "
               f"on the Elo scale (mean 1000), 95% bootstrap intervals over {BOOTSTRAP_ROUNDS} resamples; "
               f"rank (UB) is the best rank the intervals allow.{counted}")
    few = [r.model for r in rows if r.battles < FEW_BATTLES]
    if few:  # true to the maths, but a rating from a handful of battles is mostly noise: say so
        summary += (f" ⚠️ Too few battles to trust yet for {', '.join(few)} (under {FEW_BATTLES} each): "
                    "their ratings can swing by hundreds of points with the next vote.")
    table = [[r.rank, r.model, round(r.rating, 1), leaderboard.interval_text(r, 0, offsets=True), r.battles]
             for r in rows]
    return (summary, table, _to_image(leaderboard.interval_plot(rows, "rating (Bradley–Terry, Elo scale)")),
            _to_image(leaderboard.heat_map(battles, [r.model for r in rows])))


# ── pictures ───────────────────────────────────────────────────────────────────────────────────
def _to_image(fig):
    from PIL import Image

    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    buf.seek(0)
    return Image.open(buf).convert("RGB")
