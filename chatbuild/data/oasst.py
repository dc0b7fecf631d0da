"""OASST1 message trees -> training threads, by the rules below (a contract: the README repeats it).

OASST1 (Köpf et al., 2023) is published as trees of messages: a prompter message at the root, replies
alternating assistant / prompter below it, sibling assistant replies ranked by people. It comes in two
layouts, both read here into the same `Message`s, so they give identical threads:
- the flat message table (`OpenAssistant/oasst1` on the hub; one message per row with `message_id`,
  `parent_id`, `message_tree_id`, `role`, `text`, `lang`, `rank`, `deleted`, `review_result`,
  `synthetic`, `tree_state`, `created_date`, ...);
- nested trees, one per line: `{"message_tree_id", "tree_state", "prompt": {message..., "replies": [...]}}`
  (the structure gives each message its parent; a message's own `parent_id` field is not consulted).

Rules:
1. A message is usable iff `deleted` is false, `review_result` is not false and `synthetic` is false
   (`include_synthetic` keeps synthetic ones). An unusable message removes its whole subtree.
2. A tree is used only if its `tree_state` (the root's, when the field is present) is
   `ready_for_export` and its root is a usable prompter message.
3. mode "top1" (the Guanaco choice of the highest-rated path): from the root, repeatedly step to the
   usable child with the smallest `rank`; if no usable child has a rank, to the earliest by
   `created_date`; ties by `created_date`, then `message_id`. Ranked children always win over unranked
   ones. One thread per tree.
4. mode "all": every root-to-leaf path through usable messages (in the order of rule 3, so the first
   thread of a tree is its top1 thread).
5. A thread is trimmed so it ends with an assistant message; a thread without one is dropped;
   identical threads (same roles and texts, across trees) are kept once, the first in input order.
6. `langs`: keep threads whose root `lang` is listed.
7. Roles map to user / assistant; each thread is `{"messages": [...], "message_tree_id", "lang"}`.
(8. The train/validation split by `message_tree_id` is `chatbuild.data.split_conversations`.)

Invalid input, each reported with file, line and field: a record that is not a JSON object, a missing or
mistyped field, a role other than prompter/assistant, empty text, a duplicate `message_id`, a reply
whose role equals its parent's, a `message_tree_id` that differs from the parent's, an orphan (a
`parent_id` that no message has), a cycle of parent links. When invalid records are skipped, whatever
hangs below them is dropped with them ("messages below an invalid record").
"""

from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime, timezone

from chatbuild.data.report import Report
from chatbuild.data.sources import Record

ROLES = {"prompter": "user", "assistant": "assistant"}
READY = "ready_for_export"


@dataclass
class Message:
    id: str
    parent: str | None
    tree: str | None  # message_tree_id as given (None: the root's message_id)
    role: str  # "prompter" | "assistant"
    text: str
    lang: str | None
    rank: int | None
    deleted: bool
    review: bool | None  # review_result
    synthetic: bool
    tree_state: str | None
    created: float | None  # created_date as a POSIX timestamp
    record: Record  # where it was read, for error messages
    path: str | None = None  # its place in a nested tree ("prompt.replies[0]")

    @property
    def where(self) -> str:
        return self.record.where(self.path)


# ── reading the two layouts ──────────────────────────────────────────────────────────────────────
def messages_from_table(records: Iterable[Record], report: Report) -> tuple[list[Message], set[str]]:
    """Flat table rows -> messages, plus the ids of rows skipped as invalid (their replies go too)."""
    messages, skipped = [], set()
    for rec in records:
        report.records += 1
        if rec.error:
            report.reject(rec.where(), rec.error)
            continue
        m = _parse_message(rec.value, rec, "", report, parent=_MISSING, tree=_MISSING, tree_state=_MISSING)
        if isinstance(m, Message):
            messages.append(m)
        elif m:
            skipped.add(m)
    return messages, skipped


def messages_from_trees(records: Iterable[Record], report: Report) -> tuple[list[Message], set[str]]:
    """Nested trees -> the same messages the flat table holds for them."""
    messages, skipped = [], set()
    for rec in records:
        report.records += 1
        if rec.error:
            report.reject(rec.where(), rec.error)
            continue
        tree = rec.value
        if not isinstance(tree, dict):
            report.reject(rec.where(), f"expected a JSON object (a message tree), got {type(tree).__name__}")
            continue
        tree_id, state = tree.get("message_tree_id"), tree.get("tree_state")
        if tree_id is not None and not isinstance(tree_id, str | int):
            report.reject(rec.where("message_tree_id"), f"expected a string, got {tree_id!r}")
            continue
        if state is not None and not isinstance(state, str):
            report.reject(rec.where("tree_state"), f"expected a string, got {state!r}")
            continue
        if not isinstance(tree.get("prompt"), dict):
            report.reject(rec.where("prompt"), "missing: a message tree needs its root message in \"prompt\"")
            continue
        tree_id = None if tree_id is None else str(tree_id)
        stack = [(tree["prompt"], "prompt", None)]  # depth first, children in file order
        while stack:
            node, path, parent = stack.pop()
            m = _parse_message(node, rec, path + ".", report, parent=parent, tree=tree_id, tree_state=state)
            if not isinstance(m, Message):  # invalid, and skipped: its replies go with it
                report.drop("messages below an invalid record", _count_replies(node))
                continue
            messages.append(m)
            replies = node.get("replies") or []
            if not isinstance(replies, list):
                report.reject(rec.where(path + ".replies"), "expected a list of messages")
                continue
            stack += [(r, f"{path}.replies[{i}]", m.id) for i, r in reversed(list(enumerate(replies)))]
    return messages, skipped


def _count_replies(node) -> int:
    replies = node.get("replies") if isinstance(node, dict) else None
    return sum(1 + _count_replies(r) for r in replies) if isinstance(replies, list) else 0


_MISSING = object()  # "take it from the record" (flat layout) vs a value given by the tree (nested layout)


def _parse_message(d, rec: Record, prefix: str, report: Report, parent, tree, tree_state):
    """A valid `Message`, or after a skipped invalid record its message_id (or None if unknown)."""
    if not isinstance(d, dict):
        report.reject(rec.where(prefix.rstrip(".") or None), f"expected a JSON object (a message), got {type(d).__name__}")
        return None
    mid = d.get("message_id")
    known_id = str(mid) if isinstance(mid, str | int) and not isinstance(mid, bool) and str(mid) else None

    def bad(field, problem):
        report.reject(rec.where(prefix + field), problem)
        return known_id

    if known_id is None:
        return bad("message_id", "missing" if mid is None else f"expected a non-empty string, got {mid!r}")
    if parent is _MISSING:
        if "parent_id" not in d:
            return bad("parent_id", "missing (null for a root message)")
        parent = d["parent_id"]
        if parent is not None and (not isinstance(parent, str | int) or isinstance(parent, bool)):
            return bad("parent_id", f"expected a message id or null, got {parent!r}")
        parent = None if parent is None else str(parent)
    if tree is _MISSING:
        tree = d.get("message_tree_id")
        if tree is not None and (not isinstance(tree, str | int) or isinstance(tree, bool)):
            return bad("message_tree_id", f"expected a string, got {tree!r}")
        tree = None if tree is None else str(tree)
    if tree_state is _MISSING:
        tree_state = d.get("tree_state")
        if tree_state is not None and not isinstance(tree_state, str):
            return bad("tree_state", f"expected a string, got {tree_state!r}")
    role = d.get("role")
    if role not in ROLES:
        return bad("role", "missing" if role is None else f'unknown role {role!r}; expected "prompter" or "assistant"')
    text = d.get("text")
    if not isinstance(text, str):
        return bad("text", "missing" if text is None else f"expected a string, got {type(text).__name__}")
    if not text.strip():
        return bad("text", "empty text")
    lang = d.get("lang")
    if lang is not None and not isinstance(lang, str):
        return bad("lang", f"expected a language code, got {lang!r}")
    rank = d.get("rank")
    if isinstance(rank, float) and (rank != rank):  # NaN: how pandas spells a missing rank
        rank = None
    if rank is not None:
        if isinstance(rank, bool) or not isinstance(rank, int | float) or rank != int(rank):
            return bad("rank", f"expected an integer or null, got {rank!r}")
        rank = int(rank)
    flags = {}
    for name in ("deleted", "review_result", "synthetic"):  # true, false, or null/missing
        v = d.get(name)
        if v is not None and not isinstance(v, bool):
            return bad(name, f"expected true, false or null, got {v!r}")
        flags[name] = v
    created = d.get("created_date")
    try:
        created = _timestamp(created)
    except ValueError:
        return bad("created_date", f"expected an ISO 8601 date, got {created!r}")
    report.input_messages[(lang, role)] += 1
    return Message(id=known_id, parent=parent, tree=tree, role=role, text=text, lang=lang, rank=rank,
                   deleted=bool(flags["deleted"]), review=flags["review_result"], synthetic=bool(flags["synthetic"]),
                   tree_state=tree_state, created=created, record=rec, path=prefix.rstrip(".") or None)


def _timestamp(value) -> float | None:
    if value is None:
        return None
    if isinstance(value, str):
        value = datetime.fromisoformat(value)
    if not isinstance(value, datetime):
        raise ValueError(value)
    if value.tzinfo is None:  # OASST1 dates carry +00:00; a naive one is taken as UTC
        value = value.replace(tzinfo=timezone.utc)
    return value.timestamp()


# ── trees and threads ────────────────────────────────────────────────────────────────────────────
def extract_threads(messages: list[Message], skipped: set[str], report: Report, mode: str = "top1",
                    langs: list[str] | None = None, include_synthetic: bool = False) -> list[dict]:
    """Threads of every usable tree, by rules 1-7 of the module docstring, in input order."""
    by_id, children = _link(messages, skipped, report)
    threads, seen = [], set()
    for root in usable_roots(by_id, report, langs, include_synthetic):
        tree_id = root.tree or root.id
        usable = _usable_children(root, children, include_synthetic, report)
        paths = [_top1_path(root, usable)] if mode == "top1" else _all_paths(root, usable)
        for path in paths:
            while path and path[-1].role != "assistant":
                path = path[:-1]
            if not path:
                report.drop("threads without an assistant reply")
                continue
            key = tuple((m.role, m.text) for m in path)
            if key in seen:
                report.drop("duplicate threads")
                continue
            seen.add(key)
            threads.append({"messages": [{"role": ROLES[m.role], "content": m.text} for m in path],
                            "message_tree_id": tree_id, "lang": root.lang})
    return threads


def usable_roots(by_id: dict[str, Message], report: Report, langs: list[str] | None,
                 include_synthetic: bool) -> Iterable[Message]:
    """The roots of the trees rules 2 and 6 keep, in input order, counting the trees they leave out."""
    for root in (m for m in by_id.values() if m.parent is None):
        if root.tree_state is not None and root.tree_state != READY:
            report.drop(f"trees not {READY} (tree_state {root.tree_state})")
            continue
        if root.role != "prompter":
            report.drop("trees whose root is not a prompter message")
            continue
        why = _unusable(root, include_synthetic)
        if why:
            report.drop(f"trees whose root is {why}")
            continue
        if langs is not None and root.lang not in langs:
            report.drop(f"trees in another language ({root.lang or 'unknown'})")
            continue
        yield root


def _link(messages: list[Message], skipped: set[str], report: Report):
    """Index messages and their replies; reject duplicates, orphans, cycles, non-alternating roles
    and mismatched tree ids. What hangs below a rejected message is dropped with it."""
    by_id: dict[str, Message] = {}
    for m in messages:
        if m.id in by_id:
            report.reject(m.where, f'message_id "{m.id}" appears twice (first at {by_id[m.id].where})')
            continue
        by_id[m.id] = m
    bad = set(skipped)  # ids whose subtree is out: skipped invalid records
    for m in by_id.values():
        if m.parent is None:
            continue
        parent = by_id.get(m.parent)
        if parent is None:
            if m.parent not in bad:
                report.reject(m.where, f'parent_id "{m.parent}": no message has this id (orphan)')
                bad.add(m.id)
        elif parent.role == m.role:
            report.reject(m.where, f"role {m.role} under a message of role {parent.role}; prompter and assistant must alternate")
            bad.add(m.id)
        elif m.tree is not None and parent.tree is not None and m.tree != parent.tree:
            report.reject(m.where, f'message_tree_id "{m.tree}" differs from its parent\'s ("{parent.tree}")')
            bad.add(m.id)

    # Every message must reach a root by parent links; the ones that cannot sit in (or below) a cycle.
    order = {}
    for n, m in enumerate(messages):
        order.setdefault(m.id, n)
    state: dict[str, str] = {}  # id -> "ok" (reaches a root) | "out" (in or below something rejected)
    for m in by_id.values():
        chain, on_chain, cur = [], set(), m
        while cur.id not in state:
            if cur.id in bad:
                state[cur.id] = "out"
                break
            if cur.parent is None:
                state[cur.id] = "ok"
                break
            chain.append(cur.id)
            on_chain.add(cur.id)
            parent = by_id.get(cur.parent)
            if parent is None:  # the parent was skipped as invalid
                state[cur.id] = "out"
                break
            if parent.id in on_chain:
                loop = chain[chain.index(parent.id):]
                first = min(loop, key=order.__getitem__)
                report.reject(by_id[first].where, "parent_id links form a cycle (" + " -> ".join([*loop, parent.id]) + ")")
                bad.update(loop)
                state[cur.id] = "out"
                break
            cur = parent
        for i in chain:
            state.setdefault(i, state[cur.id])
    report.drop("messages below an invalid record", sum(1 for i, v in state.items() if v == "out" and i not in bad))

    linked = {i: m for i, m in by_id.items() if state[i] == "ok"}
    children: dict[str, list[Message]] = {}
    for m in linked.values():
        if m.parent is not None:
            children.setdefault(m.parent, []).append(m)
    for kids in children.values():
        kids.sort(key=_rank_order)
    return linked, children


def _rank_order(m: Message):
    """Rule 3's preference: ranked before unranked, then rank, then created_date, then message_id."""
    return (m.rank is None, m.rank or 0, m.created is None, m.created or 0.0, m.id)


def _unusable(m: Message, include_synthetic: bool) -> str | None:
    if m.deleted:
        return "deleted"
    if m.review is False:
        return "rejected in review"
    if m.synthetic and not include_synthetic:
        return "synthetic"
    return None


def _usable_children(root: Message, children, include_synthetic: bool, report: Report) -> dict[str, list[Message]]:
    """Each usable message's usable replies (rule 1), counting what the rule removes."""
    usable, stack = {}, [root]
    while stack:
        m = stack.pop()
        usable[m.id] = []
        for c in children.get(m.id, []):
            why = _unusable(c, include_synthetic)
            if why:
                report.drop(f"messages {why}")
                report.drop("messages below a removed message", _subtree_size(c, children) - 1)
            else:
                usable[m.id].append(c)
                stack.append(c)
    return usable


def _subtree_size(m: Message, children) -> int:
    n, stack = 0, [m]
    while stack:
        n += 1
        stack += children.get(stack.pop().id, [])
    return n


def _top1_path(root: Message, usable) -> list[Message]:
    path = [root]
    while usable[path[-1].id]:
        path.append(usable[path[-1].id][0])  # children are sorted by _rank_order
    return path


def _all_paths(root: Message, usable) -> list[list[Message]]:
    paths, stack = [], [[root]]
    while stack:
        path = stack.pop()
        kids = usable[path[-1].id]
        if not kids:
            paths.append(path)
        stack += [[*path, c] for c in reversed(kids)]
    return paths
