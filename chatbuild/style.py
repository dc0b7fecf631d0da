"""An answer's style, counted: its length and markdown, the covariates of style control.

Style control (LMSYS, "Does style matter?", 2024; FastChat PR 3495) fits Bradley–Terry with the
difference in style between the two answers of a battle as extra covariates, so that a model is
not rated up for writing longer or more heavily formatted answers. The features, per answer (all
assistant replies of a conversation together), are FastChat's four:

    chars       length in characters (FastChat counts tokens; the feature is normalized as a ratio
                of the two answers below, so the unit almost cancels)
    headers     markdown headers: lines starting with 1–6 '#' and a space
    list_items  ordered ("1. ") and unordered ("- ", "* ", "+ ") list items at a line's start
    bold        bold spans, **…** and __…__ within one line

Markdown is counted after removing ```fenced code``` blocks (a '#' comment in code is not a header),
as FastChat's `add_markdown_info.py` does; the length counts everything.

Where a battle's style comes from (`battle_style`), first found wins:
1. `style_a` / `style_b`: these four counts, written by `chatbuild eval judge`;
2. `conversation_a` / `conversation_b` (arena votes, FastChat's clean battles): counted from the
   assistant messages;
3. FastChat's `conv_metadata` (sum_assistant_a_tokens, header_count_a, list_count_a, bold_count_a, …),
   whose length is in tokens.
A battle with none of these (judge battles written before this version) has no style.
"""

import re
from collections.abc import Mapping

FEATURES = ("chars", "headers", "list_items", "bold")

_CODE_BLOCK = re.compile(r"```[^`]*```")
_HEADER = re.compile(r"^#{1,6}\s", re.MULTILINE)
_LIST_ITEM = re.compile(r"^\s*(?:\d+\.|[-*+])\s", re.MULTILINE)
_BOLD = re.compile(r"\*\*[^*\n]+\*\*|__[^_\n]+__")


def style_features(text: str) -> dict[str, int]:
    """{"chars", "headers", "list_items", "bold"} counts of one answer (module docstring)."""
    markdown = _CODE_BLOCK.sub("", text)
    return {"chars": len(text), "headers": len(_HEADER.findall(markdown)),
            "list_items": len(_LIST_ITEM.findall(markdown)), "bold": len(_BOLD.findall(markdown))}


def conversation_text(conversation) -> str | None:
    """The assistant messages of a conversation ([{"role", "content"}, ...]) joined by newlines, or
    None when it is not such a list."""
    if not isinstance(conversation, list):
        return None
    replies = [m.get("content") for m in conversation if isinstance(m, dict) and m.get("role") == "assistant"]
    if not all(isinstance(r, str) for r in replies):
        return None
    return "\n".join(replies)


def battle_style(battle: Mapping) -> tuple[dict[str, float], dict[str, float]] | None:
    """(style of model_a's answer, style of model_b's answer), each {feature: count}, or None when
    the battle carries neither the counts nor the answers (module docstring: where it comes from)."""
    a, b = battle.get("style_a"), battle.get("style_b")
    if _counts(a) and _counts(b):
        return {f: float(a[f]) for f in FEATURES}, {f: float(b[f]) for f in FEATURES}
    text_a, text_b = conversation_text(battle.get("conversation_a")), conversation_text(battle.get("conversation_b"))
    if text_a is not None and text_b is not None:
        return ({f: float(v) for f, v in style_features(text_a).items()},
                {f: float(v) for f, v in style_features(text_b).items()})
    meta = battle.get("conv_metadata")
    if isinstance(meta, Mapping):
        try:
            return _from_fastchat(meta, "a"), _from_fastchat(meta, "b")
        except (KeyError, TypeError, ValueError):
            return None
    return None


def _counts(obj) -> bool:
    return isinstance(obj, Mapping) and all(
        isinstance(obj.get(f), (int, float)) and not isinstance(obj.get(f), bool) and obj[f] >= 0 for f in FEATURES)


def _from_fastchat(meta: Mapping, side: str) -> dict[str, float]:
    """FastChat's conv_metadata: counts may be numbers or {kind: count} dicts (summed, as FastChat does)."""

    def total(key: str) -> float:
        value = meta[f"{key}_{side}"]
        value = sum(value.values()) if isinstance(value, Mapping) else value
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            raise TypeError(key)
        return float(value)

    length = meta[f"sum_assistant_{side}_tokens"]
    if not isinstance(length, (int, float)) or isinstance(length, bool):
        raise TypeError("sum_assistant_tokens")
    return {"chars": float(length), "headers": total("header_count"), "list_items": total("list_count"), "bold": total("bold_count")}
