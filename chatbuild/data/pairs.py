"""Preference pairs: a prompt (the conversation so far, ending with a user turn) and two replies to it,
one preferred (`chosen`) over the other (`rejected`). What DPO and ORPO train on.

One pair per line in chatbuild's own JSONL form (what `chatbuild data prepare --mode pairs` writes):

    {"prompt": [{"role": "user", "content": "..."}], "chosen": {"role": "assistant", "content": "..."},
     "rejected": {"role": "assistant", "content": "..."}, "message_tree_id": "...", "lang": "en"}

`Pair` is the in-memory form; `check_pair` is the one place the rules are written down.

Pairs from OASST1 trees (`pairs_from_trees`; the tree rules 1, 2 and 6 of `chatbuild.data.oasst` hold):
every usable prompter message with two or more usable *ranked* assistant replies is a prompt: the
conversation from the root down to it, through its actual ancestors. Its best-ranked reply is chosen
against each other ranked reply in rank order ("best vs rest": people ranked the siblings against each
other, so the top one is the preference every comparison agrees on), at most `max_per_prompt` pairs per
prompt (default MAX_PER_PROMPT: OASST1 prompts have up to ~5 ranked replies, so the cap rarely cuts but
keeps one much-answered prompt from dominating). A reply tied in rank with the best one, or with the
same text, gives no pair. Unranked replies never pair.

Pair files (`read_pair_records`), the form told apart per record:
- ours (above): `prompt` a list of messages, `chosen` / `rejected` assistant messages (or strings);
- TRL's standard form: `{"prompt": str, "chosen": str, "rejected": str}`, the prompt one user turn;
- TRL's conversational form: `chosen` / `rejected` whole conversations (message lists) whose shared
  beginning is the prompt and which each end in one assistant reply; or `prompt` a message list and
  `chosen` / `rejected` lists holding one assistant message.
`message_tree_id` and `lang` are read when present (the split groups by the tree id); other fields are
ignored. A message's content may be a string or a list of `{"type": "text", "text"}` parts.
"""

from collections.abc import Iterable
from dataclasses import dataclass

from chatbuild.data import oasst
from chatbuild.data.formats import text_content
from chatbuild.data.report import Report
from chatbuild.data.sources import Record
from chatbuild.errors import UserError
from chatbuild.templates import check_messages

MAX_PER_PROMPT = 4  # pairs per OASST1 prompt: the best reply against the next 4 ranked ones


@dataclass(frozen=True)
class Pair:
    prompt: tuple[dict, ...]  # messages; an optional system message first, turns alternate, the last is "user"
    chosen: str
    rejected: str
    message_tree_id: str | None = None  # what the train/validation split groups by (OASST1 tree)
    lang: str | None = None

    def to_json(self) -> dict:
        return {"prompt": [dict(m) for m in self.prompt], "chosen": {"role": "assistant", "content": self.chosen},
                "rejected": {"role": "assistant", "content": self.rejected},
                "message_tree_id": self.message_tree_id, "lang": self.lang}

    def key(self) -> tuple:
        """What makes two pairs the same pair (for dropping duplicates): prompt, chosen and rejected."""
        return tuple((m["role"], m["content"]) for m in self.prompt), self.chosen, self.rejected


def check_pair(pair: Pair, where: str = "pair") -> None:
    """UserError naming `where` when the pair cannot be trained on: a prompt that is not a conversation
    ending with a user turn, an empty reply, or a chosen reply equal to the rejected one."""
    prompt = list(pair.prompt)
    check_messages(prompt, where=f"{where}, prompt")
    if prompt[-1]["role"] != "user":
        raise UserError(f'{where}: the prompt must end with a user turn (it ends with "{prompt[-1]["role"]}")')
    for field, reply in (("chosen", pair.chosen), ("rejected", pair.rejected)):
        if not isinstance(reply, str) or not reply.strip():
            raise UserError(f'{where}, field "{field}": the reply is empty')
    if pair.chosen.strip() == pair.rejected.strip():
        raise UserError(f"{where}: chosen and rejected are the same reply")


# ── from OASST1 trees ────────────────────────────────────────────────────────────────────────────
def pairs_from_trees(messages: list[oasst.Message], skipped: set[str], report: Report, langs: list[str] | None = None,
                     include_synthetic: bool = False, max_per_prompt: int | None = MAX_PER_PROMPT) -> list[Pair]:
    """The pairs of every usable tree (module docstring), trees in input order, prompts depth first with
    replies in rank order. `max_per_prompt=None`: no cap."""
    by_id, children = oasst._link(messages, skipped, report)
    pairs = []
    for root in oasst.usable_roots(by_id, report, langs, include_synthetic):
        usable = oasst._usable_children(root, children, include_synthetic, report)  # sorted by _rank_order
        stack = [[root]]
        while stack:
            path = stack.pop()
            stack += [[*path, c] for c in reversed(usable[path[-1].id])]
            if path[-1].role == "prompter":
                pairs += _best_vs_rest(path, usable[path[-1].id], root, report, max_per_prompt)
    return pairs


def _best_vs_rest(path: list[oasst.Message], replies: list[oasst.Message], root: oasst.Message, report: Report,
                  max_per_prompt: int | None) -> list[Pair]:
    ranked = [r for r in replies if r.rank is not None]  # in rank order: `replies` is sorted by _rank_order
    if len(ranked) < 2:
        report.drop("prompts with fewer than 2 ranked replies")
        return []
    best, rest = ranked[0], []
    for r in ranked[1:]:
        if r.rank == best.rank:
            report.drop("replies tied in rank with the best one")
        elif r.text.strip() == best.text.strip():
            report.drop("replies with the same text as the best one")
        else:
            rest.append(r)
    if max_per_prompt is not None and len(rest) > max_per_prompt:
        report.drop(f"pairs over the cap of {max_per_prompt} per prompt", len(rest) - max_per_prompt)
        rest = rest[:max_per_prompt]
    prompt = tuple({"role": oasst.ROLES[m.role], "content": m.text} for m in path)
    return [Pair(prompt, best.text, r.text, root.tree or root.id, root.lang) for r in rest]


# ── from pair files ──────────────────────────────────────────────────────────────────────────────
MESSAGE_ROLES = ("system", "user", "assistant")


class _Bad(Exception):
    """A field of a pair record is wrong: reported through the Report with the record's location."""

    def __init__(self, field: str | None, problem: str):
        super().__init__(problem)
        self.field, self.problem = field, problem


def read_pair_records(records: Iterable[Record], report: Report) -> list[Pair]:
    """Pair records, in any of the file forms (module docstring), -> checked pairs in input order."""
    out = []
    for rec in records:
        report.records += 1
        if rec.error:
            report.reject(rec.where(), rec.error)
            continue
        if not isinstance(rec.value, dict):
            report.reject(rec.where(), f"expected a JSON object, got {type(rec.value).__name__}")
            continue
        try:
            pair = _parse_pair(rec.value)
        except _Bad as e:
            report.reject(rec.where(e.field), e.problem)
            continue
        try:
            check_pair(pair, rec.where())
        except UserError as e:
            report.invalid_message(str(e))
            continue
        out.append(pair)
    return out


def _parse_pair(d: dict) -> Pair:
    for field in ("chosen", "rejected"):
        if d.get(field) is None:
            raise _Bad(field, "missing")
    prompt = d.get("prompt")
    if prompt is None:  # TRL's implicit prompt: two whole conversations, the same up to the last reply
        if not isinstance(d["chosen"], list) or not isinstance(d["rejected"], list):
            raise _Bad("prompt", "missing (without one, chosen and rejected must be whole conversations: message lists)")
        chosen, rejected = _messages(d["chosen"], "chosen"), _messages(d["rejected"], "rejected")
        n = 0
        while n < min(len(chosen), len(rejected)) and chosen[n] == rejected[n]:
            n += 1
        prompt = chosen[:n]
        chosen_reply, rejected_reply = _last_reply(chosen, n, "chosen"), _last_reply(rejected, n, "rejected")
    else:
        if isinstance(prompt, str):
            if not prompt.strip():
                raise _Bad("prompt", "empty text")
            prompt = [{"role": "user", "content": prompt}]
        else:
            prompt = _messages(prompt, "prompt")
        chosen_reply, rejected_reply = _reply(d["chosen"], "chosen"), _reply(d["rejected"], "rejected")
    tree, lang = d.get("message_tree_id"), d.get("lang")
    if tree is not None and (isinstance(tree, bool) or not isinstance(tree, str | int)):
        raise _Bad("message_tree_id", f"expected a string or null, got {tree!r}")
    if lang is not None and not isinstance(lang, str):
        raise _Bad("lang", f"expected a language code or null, got {lang!r}")
    return Pair(tuple(prompt), chosen_reply, rejected_reply, None if tree is None else str(tree), lang)


def _messages(value, field: str) -> list[dict]:
    if not isinstance(value, list):
        raise _Bad(field, f"expected a list of messages, got {type(value).__name__}")
    if not value:
        raise _Bad(field, "no messages")
    return [_message(m, f"{field}[{i}]") for i, m in enumerate(value)]


def _message(m, field: str) -> dict:
    if not isinstance(m, dict):
        raise _Bad(field, "expected an object with role and content")
    role = m.get("role")
    if role not in MESSAGE_ROLES:
        raise _Bad(f"{field}.role", "missing" if role is None else
                   f'unknown role {role!r}; expected "system", "user" or "assistant"')
    content = text_content(m.get("content"))
    if content is None:
        raise _Bad(f"{field}.content", "missing" if m.get("content") is None else "expected a string (or a list of text parts)")
    if not content.strip():
        raise _Bad(f"{field}.content", "empty text")
    return {"role": role, "content": content}


def _reply(value, field: str) -> str:
    """A reply given as a string, an assistant message, or a list holding one assistant message."""
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        if len(value) != 1:
            raise _Bad(field, f"expected one assistant message (the prompt is given apart), got {len(value)} messages")
        value, field = value[0], f"{field}[0]"
    m = _message(value, field)
    if m["role"] != "assistant":
        raise _Bad(f"{field}.role", f'the reply must be an assistant message, got "{m["role"]}"')
    return m["content"]


def _last_reply(conversation: list[dict], shared: int, field: str) -> str:
    """The one assistant message after the `shared` prompt messages of an implicit-prompt pair."""
    rest = conversation[shared:]
    if not rest:
        raise _Bad(field, "chosen and rejected are the same conversation")
    if len(rest) != 1:
        raise _Bad(field, f"chosen and rejected must differ only in their last message, an assistant reply; "
                          f"they share {shared} messages and {field} has {len(rest)} more")
    if rest[0]["role"] != "assistant":
        raise _Bad(f"{field}[{shared}].role", f'the reply must be an assistant message, got "{rest[0]["role"]}"')
    return rest[0]["content"]
