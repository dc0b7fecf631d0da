"""Conversation formats other than OASST1 trees, and telling formats apart.

Each record becomes one conversation `{"messages": [{"role", "content"}], ...metadata}`:
- chat:     `{"messages": [{"role": "system|user|assistant", "content": "..."}]}` (OpenAI style; content
            may also be a list of `{"type": "text", "text": ...}` parts);
- sharegpt: `{"conversations": [{"from": "human|gpt|system", "value": "..."}]}` (also user/assistant,
            and an optional top-level "system");
- alpaca:   `{"instruction", "input", "output"}` -> user "instruction\\n\\ninput" (or just the instruction
            when input is empty), assistant "output"; an optional "system" field;
- guanaco:  `{"text": "### Human: ... ### Assistant: ..."}` (text before the first marker is a system
            message).
Other top-level fields are kept as metadata (except Alpaca's "text", which repeats the prompt).

The same shape rules hold for all: an optional system message first, then user and assistant
alternating, starting with user; every content non-empty. Breaking them makes the record invalid. A
conversation ending with user turns is trimmed to its last assistant reply; one without any
assistant reply is dropped.
"""

import itertools
from collections.abc import Iterable, Iterator

from chatbuild.data.report import Report
from chatbuild.data.sources import Record
from chatbuild.errors import UserError
from chatbuild.templates import GUANACO_HUMAN, parse_guanaco_text

SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                  "chatgpt": "assistant", "bard": "assistant", "bing": "assistant", "model": "assistant",
                  "system": "system"}


def detect(value) -> str | None:
    """The format of one record, or None when nothing fits ("pairs": a preference pair, any form)."""
    if not isinstance(value, dict):
        return None
    if "chosen" in value and "rejected" in value:  # preference pairs, any form (chatbuild.data.pairs)
        return "pairs"
    if isinstance(value.get("messages"), list):
        return "chat"
    if isinstance(value.get("conversations"), list):
        return "sharegpt"
    if "instruction" in value and "output" in value:
        return "alpaca"
    if isinstance(value.get("prompt"), dict) and ("message_tree_id" in value or "replies" in value["prompt"]):
        return "oasst1-trees"
    if "message_id" in value and "role" in value and "text" in value:
        return "oasst1"
    if isinstance(value.get("text"), str) and GUANACO_HUMAN in value["text"]:
        return "guanaco"
    return None


def read(fmt: str, records: Iterable[Record], report: Report) -> list[dict]:
    convert = {"chat": _chat, "sharegpt": _sharegpt, "alpaca": _alpaca, "guanaco": _guanaco}[fmt]
    out = []
    for rec in records:
        report.records += 1
        if rec.error:
            report.reject(rec.where(), rec.error)
            continue
        if not isinstance(rec.value, dict):
            report.reject(rec.where(), f"expected a JSON object, got {type(rec.value).__name__}")
            continue
        conv = convert(rec, report)
        if conv is not None:
            out.append(conv)
    return out


def _chat(rec: Record, report: Report) -> dict | None:
    d = rec.value
    if not isinstance(d.get("messages"), list):
        return _bad(rec, report, "messages", "missing" if d.get("messages") is None else "expected a list of messages")
    messages, paths = [], []
    for i, m in enumerate(d["messages"]):
        field = f"messages[{i}]"
        if not isinstance(m, dict):
            return _bad(rec, report, field, "expected an object with role and content")
        role = m.get("role")
        if role not in ("system", "user", "assistant"):
            return _bad(rec, report, f"{field}.role", "missing" if role is None else
                        f'unknown role {role!r}; expected "system", "user" or "assistant"')
        content = text_content(m.get("content"))
        if content is None:
            return _bad(rec, report, f"{field}.content", "missing" if m.get("content") is None else
                        "expected a string (or a list of text parts)")
        messages.append({"role": role, "content": content})
        paths.append((f"{field}.role", f"{field}.content"))
    return _finish(rec, report, messages, paths, {k: v for k, v in d.items() if k != "messages"})


def text_content(content) -> str | None:
    if isinstance(content, str):
        return content
    if isinstance(content, list) and all(isinstance(p, dict) and p.get("type") == "text"
                                         and isinstance(p.get("text"), str) for p in content):
        return "".join(p["text"] for p in content)
    return None


def _sharegpt(rec: Record, report: Report) -> dict | None:
    d = rec.value
    if not isinstance(d.get("conversations"), list):
        return _bad(rec, report, "conversations", "missing" if d.get("conversations") is None else
                    "expected a list of turns")
    messages, paths = [], []
    system = d.get("system")
    if system is not None:
        if not isinstance(system, str):
            return _bad(rec, report, "system", f"expected a string, got {type(system).__name__}")
        if system.strip():
            messages.append({"role": "system", "content": system})
            paths.append(("system", "system"))
    for i, m in enumerate(d["conversations"]):
        field = f"conversations[{i}]"
        if not isinstance(m, dict):
            return _bad(rec, report, field, 'expected an object with "from" and "value"')
        who = m.get("from")
        role = SHAREGPT_ROLES.get(who.lower()) if isinstance(who, str) else None
        if role is None:
            return _bad(rec, report, f"{field}.from", "missing" if who is None else
                        f'unknown speaker {who!r}; expected "human", "gpt" or "system"')
        if not isinstance(m.get("value"), str):
            return _bad(rec, report, f"{field}.value", "missing" if m.get("value") is None else "expected a string")
        messages.append({"role": role, "content": m["value"]})
        paths.append((f"{field}.from", f"{field}.value"))
    meta = {k: v for k, v in d.items() if k not in ("conversations", "system")}
    return _finish(rec, report, messages, paths, meta)


def _alpaca(rec: Record, report: Report) -> dict | None:
    d = rec.value
    for field, required in (("instruction", True), ("input", False), ("output", True), ("system", False)):
        v = d.get(field)
        if v is None and not required:
            continue
        if not isinstance(v, str):
            return _bad(rec, report, field, "missing" if v is None else f"expected a string, got {type(v).__name__}")
        if required and not v.strip():
            return _bad(rec, report, field, "empty text")
    user = d["instruction"] + (f"\n\n{d['input']}" if (d.get("input") or "").strip() else "")
    messages = [{"role": "system", "content": d["system"]}] if (d.get("system") or "").strip() else []
    messages += [{"role": "user", "content": user}, {"role": "assistant", "content": d["output"]}]
    meta = {k: v for k, v in d.items() if k not in ("instruction", "input", "output", "system", "text")}
    paths = [("system", "system")] * (len(messages) - 2) + [("instruction", "instruction"), ("output", "output")]
    return _finish(rec, report, messages, paths, meta)


def _guanaco(rec: Record, report: Report) -> dict | None:
    d = rec.value
    text = d.get("text")
    if not isinstance(text, str):
        return _bad(rec, report, "text", "missing" if text is None else "expected a string")
    if GUANACO_HUMAN not in text:
        return _bad(rec, report, "text", f'no "{GUANACO_HUMAN}" turn in the text')
    messages = parse_guanaco_text(text)
    return _finish(rec, report, messages, [("text", "text")] * len(messages), {k: v for k, v in d.items() if k != "text"})


def _finish(rec: Record, report: Report, messages: list[dict], paths: list[tuple[str, str]], meta: dict) -> dict | None:
    """Check the shape rules (module docstring), trim trailing user turns, attach the metadata.
    `paths[i]` names the fields message i came from (its role, its content), for error messages."""
    expected = "user"
    for i, (m, (role_field, content_field)) in enumerate(zip(messages, paths)):
        if not m["content"].strip():
            return _bad(rec, report, content_field, "empty text")
        if m["role"] == "system":
            if i != 0:
                return _bad(rec, report, role_field, "a system message can only come first")
            continue
        if m["role"] != expected:
            return _bad(rec, report, role_field, f"{m['role']} where {expected} was expected "
                        "(user and assistant turns alternate, user first)")
        expected = "assistant" if expected == "user" else "user"
    while messages and messages[-1]["role"] != "assistant":
        messages = messages[:-1]
    if not any(m["role"] == "assistant" for m in messages):
        report.drop("conversations without an assistant reply")
        return None
    return {"messages": messages, **meta}


def _bad(rec: Record, report: Report, field: str | None, problem: str) -> None:
    report.reject(rec.where(field), problem)
    return None


def _field_names(record: dict, shown: int = 8) -> str:
    """A record's field names for a one-line message: control characters escaped (a key may hold a
    newline), long names cut, at most `shown` of them."""
    names = [repr(str(k))[1:-1][:40] for k in list(record)[:shown]]
    more = f" and {len(record) - shown} more" if len(record) > shown else ""
    return (", ".join(names) or "none") + more


def detect_format(records: Iterator[Record], source: str) -> tuple[str, Iterator[Record]]:
    """The format of the first record that parses, and all the records (none lost to peeking)."""
    seen = []
    for rec in records:
        seen.append(rec)
        if rec.error is None:
            fmt = detect(rec.value)
            if fmt is None:
                has = f"fields {_field_names(rec.value)}" if isinstance(rec.value, dict) else \
                    f"a JSON {type(rec.value).__name__}"
                raise UserError(f"{rec.where()}: cannot tell the data format from this record ({has}); expected "
                                "OASST1 messages or trees, chat, ShareGPT, Alpaca or Guanaco records (or preference pairs); name the format "
                                "(--format, or data.format in a config)")
            return fmt, itertools.chain(seen, records)
    if not seen:
        raise UserError(f"{source}: no records (empty)")
    raise UserError(f"{seen[0].where()}: {seen[0].error}; no record is readable, so the format is unknown")
