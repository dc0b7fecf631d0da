"""How a leaderboard reads and looks: interval text, the title line, the interval plot and the win-rate
heat map, the same for `chatbuild eval elo` (its PNG) and the UI's Leaderboard tab.

Rows are `chatbuild.ratings.Rating`s, best first. Figures are bare matplotlib `Figure`s (no pyplot: no
GUI backend, no global state shared between the UI's request threads); the caller saves them to a
file or turns them into an image. matplotlib is imported only when a figure is drawn.
"""

import math

from chatbuild.ratings import METHODS, win_rates


def has_interval(row) -> bool:
    """Whether a row has a (finite) 95% interval."""
    return all(x is not None and math.isfinite(x) for x in (row.ci_low, row.ci_high))


def interval_text(row, decimals: int = 1, offsets: bool = False) -> str:
    """'812.3 – 901.0', with `offsets` also how far each end lies from the rating, '812 – 901 (−40/+49)';
    '–' for a row without an interval."""
    if not has_interval(row):
        return "–"
    text = f"{row.ci_low:.{decimals}f} – {row.ci_high:.{decimals}f}"
    if offsets:
        text += f" (−{row.rating - row.ci_low:.{decimals}f}/+{row.ci_high - row.rating:.{decimals}f})"
    return text


def caption(method: str, battles: int, k: float, permutations: int, bootstrap: int | None) -> str:
    """One line saying how the ratings were computed: the method, the battles, where intervals come from."""
    spec = METHODS[method]
    rounds = spec.bootstrap_rounds if bootstrap is None else bootstrap
    out = spec.describe(k=k, permutations=permutations) + f"; {battles:,} battles"
    if rounds:
        out += f"; 95% intervals from {rounds} bootstrap rounds"
    elif spec.interval_about:
        out += f"; {spec.interval_about}"
    return out


def style_caption(battles: int, bootstrap: int) -> str:
    """The caption of a style-controlled leaderboard."""
    out = ("Bradley–Terry with style control (length, headers, list items and bold as covariates, FastChat's "
           f"method) on the Elo scale (mean 1000; ratings at equal style); {battles:,} battles")
    return out + (f"; 95% intervals from {bootstrap} bootstrap rounds" if bootstrap else "")


# ── figures ────────────────────────────────────────────────────────────────────────────────────
def figure(width: float, height: float, dpi: int = 100):
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), dpi=dpi, layout="constrained")


def draw_intervals(ax, rows, xlabel: str = "rating") -> None:
    """Ratings as points with their 95% intervals as error bars, best at the top, and a dashed line at
    1000 (the scale's start and the Bradley–Terry mean)."""
    names = [r.model for r in rows][::-1]
    values = [r.rating for r in rows][::-1]
    low = [r.rating - r.ci_low if has_interval(r) else 0 for r in rows][::-1]
    high = [r.ci_high - r.rating if has_interval(r) else 0 for r in rows][::-1]
    ax.errorbar(values, range(len(rows)), xerr=[low, high], fmt="o", color="#4f46e5", ecolor="#a5b4fc",
                elinewidth=3, capsize=4)
    ax.set_yticks(range(len(rows)), names)
    ax.axvline(1000, color="#9ca3af", linewidth=0.8, linestyle="--")
    ax.set_xlabel(xlabel)
    ax.set_title("Ratings with 95% intervals" if any(map(has_interval, rows)) else "Ratings", loc="left", fontsize=11)
    ax.grid(axis="x", alpha=0.3)


def draw_heat_map(ax, battles, order: list[str]):
    """The observed win rates, rows and columns in `order`: cell (i, j) is the share of i's battles
    against j that i won (ties half), blank where they never met. Returns the image (for a colour bar)."""
    models, rates = win_rates(battles)
    index = [models.index(m) for m in order]
    rates = rates[index][:, index]
    n = len(order)
    image = ax.imshow(rates, cmap="RdBu", vmin=0, vmax=1)
    ax.set_xticks(range(n), order, rotation=30, ha="right")
    ax.set_yticks(range(n), order)
    ax.set_xlabel("opponent")
    ax.set_title("Win rate, row vs column (ties ½)", loc="left", fontsize=11)
    for i in range(n):
        for j in range(n):
            if not math.isnan(rates[i, j]):
                ax.text(j, i, f"{rates[i, j]:.2f}", ha="center", va="center", fontsize=9,
                        color="white" if abs(rates[i, j] - 0.5) > 0.3 else "black")
    return image


def interval_plot(rows, xlabel: str = "rating"):
    """A figure of `draw_intervals`."""
    fig = figure(6, 1.2 + 0.45 * len(rows))
    draw_intervals(fig.add_subplot(), rows, xlabel)
    return fig


def heat_map(battles, order: list[str]):
    """A figure of `draw_heat_map`, with its colour bar."""
    n = len(order)
    fig = figure(1.8 + 0.9 * n, 1.2 + 0.8 * n)
    ax = fig.add_subplot()
    fig.colorbar(draw_heat_map(ax, battles, order), ax=ax, shrink=0.8, label="win rate")
    return fig


def leaderboard_plot(rows, battles, title: str, xlabel: str = "rating"):
    """Both pictures side by side under `title` (the PNG of `chatbuild eval elo --plot`)."""
    n = len(rows)
    fig = figure(6 + 0.9 * n, 3.5 + 0.45 * n, dpi=110)
    left, right = fig.subplots(1, 2, width_ratios=[1, 1.2])
    draw_intervals(left, rows, xlabel)
    fig.colorbar(draw_heat_map(right, battles, [r.model for r in rows]), ax=right, shrink=0.8)
    fig.suptitle(title, fontsize=10)
    return fig


def style_rows(coefficients, digits: int = 3, elo_digits: int = 1) -> list[str]:
    """Markdown table rows, one per fitted style coefficient (chatbuild.ratings.StyleCoefficient): value
    in log-odds per sd, its interval and Elo points; "never varied" for a feature without a value. Used
    by `eval elo --style-control` and the Leaderboard tab, under their own headers."""
    rows = []
    for c in coefficients:
        if c.value is None:
            rows.append(f"| {c.feature} | – | never varied | – |")
        else:
            interval = "–" if c.ci_low is None else f"{c.ci_low:.{digits}f} – {c.ci_high:.{digits}f}"
            rows.append(f"| {c.feature} | {c.value:.{digits}f} | {interval} | {c.elo:+.{elo_digits}f} |")
    return rows
