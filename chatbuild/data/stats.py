"""What `chatbuild data inspect` shows about a set of conversations: counts by language and role, and
histograms of turns and lengths, as text (and optionally as a PNG).

Lengths are tokens of the training example (the conversation rendered in a chat format, exactly what
`chatbuild.templates.encode` gives, untruncated) when a tokenizer is given, else whitespace-separated
words of all messages; the output says which.
"""

import math
from collections import Counter
from pathlib import Path

from chatbuild.errors import UserError

BAR = 40  # characters of the longest histogram bar


def conversation_lengths(convs: list[dict], tokenizer=None, fmt=None) -> tuple[list[int], str]:
    """Length of each conversation, and the unit ("tokens (...)" or "words")."""
    if tokenizer is None:
        return [sum(len(m["content"].split()) for m in c["messages"]) for c in convs], "words"
    from chatbuild.data.batching import tokenize_conversations

    examples = tokenize_conversations(convs, fmt, tokenizer, max_length=None)
    return [len(e) for e in examples], f"tokens (chat format {fmt.name})"


def describe(convs: list[dict], lengths: list[int], unit: str) -> list[str]:
    out = []
    langs = Counter(c.get("lang") for c in convs)
    roles: dict = {}
    for c in convs:
        for m in c["messages"]:
            roles.setdefault(c.get("lang"), Counter())[m["role"]] += 1
    out.append("")
    out.append(f"{'language':<10} {'conversations':>13} {'user':>7} {'assistant':>9} {'system':>6}")
    for lang, n in sorted(langs.items(), key=lambda kv: (-kv[1], str(kv[0]))):
        r = roles.get(lang, Counter())
        out.append(f"{lang or 'unknown':<10} {n:>13} {r['user']:>7} {r['assistant']:>9} {r['system']:>6}")
    total = sum(roles.values(), Counter())
    out.append(f"{'all':<10} {len(convs):>13} {total['user']:>7} {total['assistant']:>9} {total['system']:>6}")
    turns = [sum(m["role"] == "assistant" for m in c["messages"]) for c in convs]
    out += ["", *histogram(turns, "assistant replies per conversation")]
    out += ["", *histogram(lengths, f"length per conversation, in {unit}", log_bins=True)]
    if lengths:
        s = sorted(lengths)
        q = {p: s[min(len(s) - 1, int(p / 100 * len(s)))] for p in (50, 90, 99)}
        out.append(f"  min {s[0]}, median {q[50]}, p90 {q[90]}, p99 {q[99]}, max {s[-1]}, total {sum(s):,}")
    return out


def reply_lengths(pairs: list, tokenizer=None) -> tuple[list[int], list[int], str]:
    """Lengths of each pair's chosen and rejected reply (the reply text alone), and the unit."""
    if tokenizer is None:
        def measure(text):
            return len(text.split())
        unit = "words"
    else:
        def measure(text):
            return len(tokenizer(text, add_special_tokens=False)["input_ids"])
        unit = "tokens"
    return [measure(p.chosen) for p in pairs], [measure(p.rejected) for p in pairs], unit


def describe_pairs(pairs: list, chosen: list[int], rejected: list[int], unit: str) -> list[str]:
    """Counts of preference pairs by language and prompt, reply lengths chosen vs rejected, and how often
    the chosen reply is the longer one: preference data that mostly prefers longer replies teaches length
    as much as quality (Singhal et al., 2023, "A Long Way to Go: Investigating Length Correlations in RLHF")."""
    prompts = Counter(p.key()[0] for p in pairs)
    out = ["", f"{'language':<10} {'pairs':>7} {'prompts':>7}"]
    by_lang: dict = {}
    for p in pairs:
        by_lang.setdefault(p.lang, []).append(p)
    for lang, group in sorted(by_lang.items(), key=lambda kv: (-len(kv[1]), str(kv[0]))):
        out.append(f"{lang or 'unknown':<10} {len(group):>7} {len({p.key()[0] for p in group}):>7}")
    out.append(f"{'all':<10} {len(pairs):>7} {len(prompts):>7}")
    out += ["", *histogram(list(prompts.values()), "pairs per prompt")]
    out += ["", *histogram([sum(m["role"] == "user" for m in p.prompt) for p in pairs], "user turns per prompt")]
    out += ["", f"{'reply length, in ' + unit:<24} {'median':>6} {'mean':>8}"]
    for name, lengths in (("chosen", chosen), ("rejected", rejected)):
        if lengths:
            out.append(f"  {name:<22} {sorted(lengths)[len(lengths) // 2]:>6} {sum(lengths) / len(lengths):>8.1f}")
    if pairs:
        longer = sum(c > r for c, r in zip(chosen, rejected))
        shorter = sum(c < r for c, r in zip(chosen, rejected))
        same = len(pairs) - longer - shorter
        out.append(f"chosen reply longer than the rejected one in {longer} of {len(pairs)} pairs "
                   f"({100 * longer / len(pairs):.0f}%); shorter in {shorter}, the same length in {same}")
    return out


def histogram(values: list[int], title: str, log_bins: bool = False) -> list[str]:
    """A text histogram: one line per bin, `label | bar count`."""
    out = [title + ":"]
    if not values:
        return out + ["  (none)"]
    bins = _log2_bins(values) if log_bins or max(values) > 20 else [(v, v) for v in range(min(values), max(values) + 1)]
    counts = [sum(lo <= v <= hi for v in values) for lo, hi in bins]
    labels = [str(lo) if lo == hi else f"{lo}-{hi}" for lo, hi in bins]
    width, top = max(map(len, labels)), max(counts)
    for label, n in zip(labels, counts):
        out.append(f"  {label:>{width}} | {'#' * math.ceil(BAR * n / top) if n else '':<{BAR}} {n}")
    return out


def _log2_bins(values: list[int]) -> list[tuple[int, int]]:
    lo = 2 ** int(math.log2(max(1, min(values))))
    bins = [(0, 0)] if min(values) == 0 else []
    while lo <= max(values):
        bins.append((lo, 2 * lo - 1))
        lo *= 2
    return bins


def plot(turns: list[int], lengths: list[int], unit: str, path: str | Path) -> Path:
    """Both histograms as one PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    path = Path(path)
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    if turns:
        a.hist(turns, bins=range(min(turns), max(turns) + 2), align="left", rwidth=0.8)
    a.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    a.set_xlabel("assistant replies per conversation")
    a.set_ylabel("conversations")
    if lengths:
        edges = [lo for lo, _ in _log2_bins(lengths) if lo > 0]
        b.hist(lengths, bins=[*edges, 2 * edges[-1]] if edges else 1)
        b.set_xscale("log", base=2)
    b.set_xlabel(f"length per conversation, in {unit}")
    b.set_ylabel("conversations")
    fig.tight_layout()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=100)
    except OSError as e:
        raise UserError(f"{path}: cannot write the plot ({e})") from None
    finally:
        plt.close(fig)
    return path
