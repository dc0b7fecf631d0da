"""OASST1 trees -> threads: every rule of `chatbuild.data.oasst` on small trees written here, both input
layouts, parquet and gzip inputs, the split, bad input, and property tests on random trees."""

import gzip
import itertools
import json
from datetime import datetime, timedelta, timezone

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from chatbuild.data import SAMPLE, load_conversations, split_conversations
from chatbuild.data.oasst import extract_threads, messages_from_table, messages_from_trees
from chatbuild.data.report import Report
from chatbuild.data.sources import Record
from chatbuild.errors import UserError

_clock = itertools.count()
START = datetime(2023, 2, 1, tzinfo=timezone.utc)


def msg(mid, parent=None, role=None, text=None, tree="t1", rank=None, created=None, **flags):
    """One flat-table row. Roles default by id (p, q, r... prompter; a, b, c... assistant); dates
    increase in the order rows are made unless given."""
    row = {"message_id": mid, "parent_id": parent, "message_tree_id": tree,
           "role": role or ("prompter" if mid[0] in "pqr" else "assistant"), "text": text or f"text of {mid}",
           "lang": "en", "rank": rank, "deleted": False, "review_result": True, "synthetic": False,
           "tree_state": "ready_for_export",
           "created_date": created or (START + timedelta(seconds=next(_clock))).isoformat()}
    row.update(flags)
    return row


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def load(tmp_path, rows, **kw):
    return load_conversations(str(write_jsonl(tmp_path / "oasst.jsonl", rows)), **kw)


def texts(convs):
    return [[m["content"] for m in c["messages"]] for c in convs]


def to_trees(rows):
    """The nested-trees layout of the same messages (as OASST1's *.trees.jsonl files hold them)."""
    by_parent = {}
    for r in rows:
        by_parent.setdefault(r["parent_id"], []).append(r)

    def node(r):
        out = {k: v for k, v in r.items() if k not in ("parent_id", "message_tree_id", "tree_state")}
        out["replies"] = [node(c) for c in by_parent.get(r["message_id"], [])]
        return out

    return [{"message_tree_id": r["message_tree_id"], "tree_state": r["tree_state"], "prompt": node(r)}
            for r in by_parent.get(None, [])]


def in_memory(rows, layout="oasst1"):
    recs = [Record("mem.jsonl", i + 1, "line", r) for i, r in enumerate(rows)]
    return recs, (messages_from_table if layout == "oasst1" else messages_from_trees)


# ── rule 3: top1 ──────────────────────────────────────────────────────────────────────────────────
def test_top1_steps_to_the_smallest_rank_at_every_level(tmp_path):
    rows = [msg("p0"), msg("a1", "p0", rank=1), msg("a0", "p0", rank=0),
            msg("p1", "a0"), msg("a10", "p1", rank=1), msg("a11", "p1", rank=0), msg("p2", "a1"), msg("a2", "p2", rank=0)]
    convs, report = load(tmp_path, rows)
    assert texts(convs) == [["text of p0", "text of a0", "text of p1", "text of a11"]]
    assert report.format == "oasst1" and report.detected and report.kept == 1


def test_ranked_replies_win_over_unranked_ones_and_null_ranks_are_skipped(tmp_path):
    rows = [msg("p0"), msg("a_early", "p0", created="2023-01-01T00:00:00+00:00"),
            msg("a_r2", "p0", rank=2), msg("a_none", "p0", rank=None), msg("a_r1", "p0", rank=1)]
    convs, _ = load(tmp_path, rows)
    assert texts(convs)[0][-1] == "text of a_r1"


def test_unranked_replies_go_by_created_date_then_message_id(tmp_path):
    rows = [msg("p0"), msg("a_b", "p0", created="2023-03-01T10:00:00+00:00"),
            msg("a_z", "p0", created="2023-03-01T09:00:00.5+00:00"),
            msg("a_a", "p0", created="2023-03-01T09:00:00.5+00:00")]
    convs, _ = load(tmp_path, rows)
    assert texts(convs)[0][-1] == "text of a_a"  # a_a and a_z tie on the date; a_a < a_z
    rows[2]["created_date"] = "2023-03-01T08:00:00Z"  # other spellings of dates compare as dates
    convs, _ = load(tmp_path, rows)
    assert texts(convs)[0][-1] == "text of a_z"


def test_rank_ties_go_by_created_date_then_message_id(tmp_path):
    rows = [msg("p0"), msg("a_late", "p0", rank=0, created="2023-03-02T00:00:00+00:00"),
            msg("a_y", "p0", rank=0, created="2023-03-01T00:00:00+00:00"),
            msg("a_x", "p0", rank=0, created="2023-03-01T00:00:00+00:00")]
    convs, _ = load(tmp_path, rows)
    assert texts(convs)[0][-1] == "text of a_x"


def test_prompter_replies_are_chosen_by_date_when_unranked(tmp_path):
    rows = [msg("p0"), msg("a0", "p0", rank=0), msg("p_late", "a0", created="2023-05-01T00:00:00+00:00"),
            msg("p_early", "a0", created="2023-04-01T00:00:00+00:00"), msg("a_late", "p_late", rank=0),
            msg("a_early", "p_early", rank=0)]
    convs, _ = load(tmp_path, rows)
    assert texts(convs) == [["text of p0", "text of a0", "text of p_early", "text of a_early"]]


# ── rule 1: usable messages ───────────────────────────────────────────────────────────────────────
def test_a_deleted_reply_removes_its_whole_subtree(tmp_path):
    rows = [msg("p0"), msg("a0", "p0", rank=0, deleted=True), msg("p1", "a0"), msg("a2", "p1", rank=0),
            msg("a1", "p0", rank=1)]
    convs, report = load(tmp_path, rows, mode="all")
    assert texts(convs) == [["text of p0", "text of a1"]]
    assert report.dropped["messages deleted"] == 1
    assert report.dropped["messages below a removed message"] == 2


def test_a_rejected_review_removes_the_subtree_but_a_pending_one_does_not(tmp_path):
    rows = [msg("p0"), msg("a0", "p0", rank=0, review_result=False), msg("p1", "a0"),
            msg("a1", "p0", rank=1, review_result=None)]
    convs, report = load(tmp_path, rows, mode="all")
    assert texts(convs) == [["text of p0", "text of a1"]]
    assert report.dropped["messages rejected in review"] == 1


def test_synthetic_messages_are_dropped_unless_included(tmp_path):
    rows = [msg("p0"), msg("a0", "p0", rank=0, synthetic=True), msg("a1", "p0", rank=1)]
    convs, report = load(tmp_path, rows)
    assert texts(convs)[0][-1] == "text of a1" and report.dropped["messages synthetic"] == 1
    convs, _ = load(tmp_path, rows, include_synthetic=True)
    assert texts(convs)[0][-1] == "text of a0"


def test_missing_or_null_flags_mean_usable(tmp_path):
    rows = [msg("p0"), msg("a0", "p0", rank=0)]
    for r in rows:
        del r["deleted"], r["synthetic"]
        r["review_result"] = None
    convs, _ = load(tmp_path, rows)
    assert len(convs) == 1


# ── rule 2: trees ─────────────────────────────────────────────────────────────────────────────────
@pytest.mark.parametrize("state", ["growing", "aborted_low_grade", "prompt_lottery_waiting"])
def test_trees_not_ready_for_export_are_dropped(tmp_path, state):
    rows = [msg("p0", tree_state=state), msg("a0", "p0", rank=0, tree_state=state),
            msg("q0", tree="t2"), msg("b0", "q0", tree="t2")]
    convs, report = load(tmp_path, rows)
    assert [c["message_tree_id"] for c in convs] == ["t2"]
    assert report.dropped[f"trees not ready_for_export (tree_state {state})"] == 1


def test_a_tree_without_tree_state_is_used(tmp_path):
    rows = [msg("p0"), msg("a0", "p0")]
    for r in rows:
        del r["tree_state"]
    assert len(load(tmp_path, rows)[0]) == 1


@pytest.mark.parametrize("flag,reason", [({"deleted": True}, "deleted"), ({"review_result": False}, "rejected in review"),
                                         ({"synthetic": True}, "synthetic"), ({"role": "assistant"}, None)])
def test_a_tree_whose_root_is_not_a_usable_prompter_message_is_dropped(tmp_path, flag, reason):
    rows = [msg("p0", **flag), msg("a0" if "role" not in flag else "p1", "p0")]
    convs, report = load(tmp_path, rows)
    assert convs == []
    assert report.dropped[f"trees whose root is {reason}" if reason else "trees whose root is not a prompter message"] == 1


# ── rules 4 and 5: all threads, trimming, duplicates ─────────────────────────────────────────────
def branching_tree():
    return [msg("p0"), msg("a0", "p0", rank=0), msg("a1", "p0", rank=1),
            msg("p1", "a0"), msg("a10", "p1", rank=1), msg("a11", "p1", rank=0),
            msg("p2", "a0"),  # a prompter leaf: its thread is trimmed to [p0, a0]
            msg("p3", "a1")]  # another: trimmed to [p0, a1]


def test_all_mode_gives_every_root_to_leaf_path_with_the_top1_thread_first(tmp_path):
    convs, report = load(tmp_path, branching_tree(), mode="all")
    assert texts(convs) == [
        ["text of p0", "text of a0", "text of p1", "text of a11"],
        ["text of p0", "text of a0", "text of p1", "text of a10"],
        ["text of p0", "text of a0"],
        ["text of p0", "text of a1"],
    ]
    top1, _ = load(tmp_path, branching_tree(), mode="top1")
    assert texts(top1) == texts(convs)[:1]


def test_threads_are_trimmed_to_end_with_an_assistant_and_dropped_without_one(tmp_path):
    rows = [msg("p0"), msg("a0", "p0", rank=0), msg("p1", "a0"),  # trimmed to [p0, a0]
            msg("q0", tree="t2")]  # a lone prompt: dropped
    convs, report = load(tmp_path, rows)
    assert texts(convs) == [["text of p0", "text of a0"]]
    assert report.dropped["threads without an assistant reply"] == 1


def test_identical_threads_are_kept_once_within_and_across_trees(tmp_path):
    rows = [msg("p0"), msg("a0", "p0", rank=0), msg("p1", "a0"), msg("p2", "a0"),  # both trim to [p0, a0]
            msg("q0", tree="t2", text="text of p0"), msg("b0", "q0", text="text of a0", tree="t2")]  # same texts
    convs, report = load(tmp_path, rows, mode="all")
    assert texts(convs) == [["text of p0", "text of a0"]] and convs[0]["message_tree_id"] == "t1"
    assert report.dropped["duplicate threads"] == 2


# ── rules 6 and 7: language, output shape ─────────────────────────────────────────────────────────
def test_lang_keeps_threads_by_the_language_of_their_root(tmp_path):
    rows = [msg("p0", lang="de"), msg("a0", "p0", lang="en"), msg("q0", tree="t2", lang="en"),
            msg("b0", "q0", tree="t2", lang="de"), msg("r0", tree="t3", lang="fr"), msg("c0", "r0", tree="t3")]
    convs, report = load(tmp_path, rows, lang=["de", "fr"])
    assert [(c["message_tree_id"], c["lang"]) for c in convs] == [("t1", "de"), ("t3", "fr")]
    assert report.dropped["trees in another language (en)"] == 1
    assert [c["lang"] for c in load(tmp_path, rows, lang="en")[0]] == ["en"]


def test_output_lines_have_user_and_assistant_roles_tree_id_and_lang(tmp_path):
    rows = [msg("p0"), msg("a0", "p0")]
    for r in rows:
        del r["message_tree_id"]  # optional: the root's message_id names the tree
    convs, _ = load(tmp_path, rows)
    assert convs == [{"messages": [{"role": "user", "content": "text of p0"},
                                   {"role": "assistant", "content": "text of a0"}],
                      "message_tree_id": "p0", "lang": "en"}]


# ── both layouts, other containers ────────────────────────────────────────────────────────────────
def mixed_forest():
    return [*branching_tree(),
            msg("q0", tree="t2", lang="de"), msg("b0", "q0", tree="t2", rank=0, deleted=True),
            msg("b1", "q0", tree="t2", rank=1), msg("q1", "b1", tree="t2"), msg("b2", "q1", tree="t2", synthetic=True),
            msg("r0", tree="t3", tree_state="growing"), msg("c0", "r0", tree="t3", tree_state="growing")]


@pytest.mark.parametrize("mode", ["top1", "all"])
def test_flat_table_and_nested_trees_give_identical_output(tmp_path, mode):
    rows = mixed_forest()
    flat, flat_report = load(tmp_path, rows, mode=mode)
    nested_file = write_jsonl(tmp_path / "trees.jsonl", to_trees(rows))
    nested, nested_report = load_conversations(str(nested_file), mode=mode)
    assert nested_report.format == "oasst1-trees" and nested_report.detected
    assert nested == flat and len(flat) >= 2
    assert nested_report.dropped == flat_report.dropped


@pytest.mark.parametrize("mode", ["top1", "all"])
def test_the_bundled_sample_gives_identical_output_in_both_layouts(tmp_path, mode):
    rows = [json.loads(line) for line in SAMPLE.read_text().splitlines() if line.strip()]
    flat, _ = load_conversations("sample", mode=mode)
    nested, _ = load_conversations(str(write_jsonl(tmp_path / "trees.jsonl", to_trees(rows))), mode=mode)
    assert nested == flat and len(flat) > 20


def test_parquet_and_gzipped_jsonl_give_the_same_threads(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = mixed_forest()
    expected, _ = load(tmp_path, rows, mode="all")
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "oasst.parquet")  # rank: nullable int64
    got, report = load_conversations(str(tmp_path / "oasst.parquet"), mode="all")
    assert got == expected and report.format == "oasst1"
    with gzip.open(tmp_path / "oasst.jsonl.gz", "wt") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    got, _ = load_conversations(str(tmp_path / "oasst.jsonl.gz"), mode="all")
    assert got == expected
    trees = tmp_path / "trees.jsonl.gz"
    with gzip.open(trees, "wt") as f:
        f.writelines(json.dumps(t) + "\n" for t in to_trees(rows))
    assert load_conversations(str(trees), mode="all")[0] == expected


def test_parquet_rank_written_by_pandas_as_float_with_nan(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [msg("p0"), msg("a1", "p0", rank=1.0), msg("a0", "p0", rank=0.0), msg("a2", "p0", rank=float("nan"))]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "o.parquet")
    convs, _ = load_conversations(str(tmp_path / "o.parquet"))
    assert texts(convs)[0][-1] == "text of a0"


def test_an_unreachable_hub_id_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(UserError, match="OpenAssistant/oasst1.*cannot load it as a dataset"):
        load_conversations("OpenAssistant/oasst1")
    with pytest.raises(UserError, match="no such file, and not a hub dataset id"):
        load_conversations("no/such/file.jsonl")


# ── rule 8: the split ─────────────────────────────────────────────────────────────────────────────
def forest(n_trees):
    rows = []
    for t in range(n_trees):
        rows += [msg(f"p{t}", tree=f"t{t}"), msg(f"a{t}", f"p{t}", tree=f"t{t}", rank=0),
                 msg(f"p{t}x", f"a{t}", tree=f"t{t}"), msg(f"a{t}x", f"p{t}x", tree=f"t{t}", rank=0),
                 msg(f"a{t}y", f"p{t}x", tree=f"t{t}", rank=1)]
    return rows


def test_split_by_tree_is_deterministic_for_a_seed_and_never_shares_a_tree(tmp_path):
    convs, _ = load(tmp_path, forest(40), mode="all")  # 2 threads per tree
    train, val = split_conversations(convs, 0.1, seed=3)
    assert len(val) == 8 and len(train) == 72
    assert not {c["message_tree_id"] for c in train} & {c["message_tree_id"] for c in val}
    assert split_conversations(convs, 0.1, seed=3) == (train, val)
    assert split_conversations(list(reversed(convs)), 0.1, seed=3)[1] == list(reversed(val))  # order-free
    assert split_conversations(convs, 0.1, seed=4)[1] != val
    assert split_conversations(convs, 0.0, seed=3) == (convs, [])


def test_split_without_tree_ids_goes_by_content_and_keeps_at_least_one_of_each():
    convs = [{"messages": [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": "a"}]} for i in range(3)]
    train, val = split_conversations(convs, 0.01, seed=0)
    assert len(val) == 1 and len(train) == 2
    with pytest.raises(UserError, match="val_fraction"):
        split_conversations(convs, 1.0, seed=0)


# ── bad input ─────────────────────────────────────────────────────────────────────────────────────
BAD_ROWS = [
    (lambda r: r.pop("message_id"), 'field "message_id": missing'),
    (lambda r: r.pop("parent_id"), 'field "parent_id": missing'),
    (lambda r: r.update(role="user"), "field \"role\": unknown role 'user'"),
    (lambda r: r.pop("text"), 'field "text": missing'),
    (lambda r: r.update(text="   "), 'field "text": empty text'),
    (lambda r: r.update(rank="first"), 'field "rank": expected an integer'),
    (lambda r: r.update(deleted="no"), 'field "deleted": expected true, false or null'),
    (lambda r: r.update(created_date="yesterday"), 'field "created_date": expected an ISO 8601 date'),
]


@pytest.mark.parametrize("spoil,message", BAD_ROWS)
def test_a_bad_row_names_file_line_and_field(tmp_path, spoil, message):
    rows = [msg("p0"), msg("a0", "p0"), msg("p1", "a0"), msg("a1", "p1")]
    spoil(rows[2])
    path = write_jsonl(tmp_path / "bad.jsonl", rows)
    with pytest.raises(UserError) as e:
        load_conversations(str(path))
    assert str(e.value).startswith(f"{path}:3, ") and message in str(e.value)
    convs, report = load_conversations(str(path), skip_invalid=True)
    assert texts(convs) == [["text of p0", "text of a0"]]
    assert report.invalid[0].startswith(f"{path}:3")
    # The reply below the skipped row goes with it; without a readable id, it is an orphan (invalid too).
    no_id = "message_id" in message
    assert (report.invalid_count, report.dropped["messages below an invalid record"]) == ((2, 0) if no_id else (1, 1))


def test_malformed_json_names_the_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps(msg("p0")) + "\n\n" + json.dumps(msg("a0", "p0")) + '\n{"message_id": "x",\n')
    with pytest.raises(UserError, match=f"{path}:4: malformed JSON"):
        load_conversations(str(path))
    convs, report = load_conversations(str(path), skip_invalid=True)
    assert len(convs) == 1 and report.invalid_count == 1 and report.records == 3


def test_orphans_cycles_duplicates_and_non_alternating_roles(tmp_path):
    cases = [
        ([msg("p0"), msg("a0", "p0"), msg("p1", "ghost")], ':3: parent_id "ghost": no message has this id (orphan)'),
        ([msg("p0"), msg("a0", "p0"), msg("px", "ay"), msg("ay", "px")], ":3: parent_id links form a cycle (px -> ay -> px)"),
        ([msg("p0"), msg("a0", "p0"), msg("a0", "p0")], ':3: message_id "a0" appears twice (first at'),
        ([msg("p0"), msg("a0", "p0"), msg("a1", "a0")], ":3: role assistant under a message of role assistant"),
        ([msg("p0"), msg("a0", "p0"), msg("p1", "a0", tree="t9")], ':3: message_tree_id "t9" differs'),
    ]
    for rows, message in cases:
        path = write_jsonl(tmp_path / "bad.jsonl", rows)
        with pytest.raises(UserError) as e:
            load_conversations(str(path))
        assert f"{path}{message}" in str(e.value)
        convs, report = load_conversations(str(path), skip_invalid=True)
        assert texts(convs) == [["text of p0", "text of a0"]] and report.invalid_count == 1


def test_a_cycle_with_replies_hanging_below_it(tmp_path):
    rows = [msg("p0"), msg("a0", "p0"), msg("pc", "ac"), msg("ac", "pc"), msg("a_below", "pc")]
    convs, report = load(tmp_path, rows, skip_invalid=True)
    assert len(convs) == 1 and report.invalid_count == 1
    assert report.dropped["messages below an invalid record"] == 1


def test_nested_trees_name_the_path_of_a_bad_message(tmp_path):
    rows = [msg("p0"), msg("a0", "p0"), msg("p1", "a0"), msg("a1", "p1"), msg("a2", "p0")]
    trees = to_trees(rows)
    trees[0]["prompt"]["replies"][0]["replies"][0]["text"] = ""
    path = write_jsonl(tmp_path / "trees.jsonl", trees)
    with pytest.raises(UserError, match=r'trees.jsonl:1, field "prompt.replies\[0\].replies\[0\].text": empty text'):
        load_conversations(str(path))
    convs, report = load_conversations(str(path), skip_invalid=True, mode="all")
    assert texts(convs) == [["text of p0", "text of a0"], ["text of p0", "text of a2"]]
    assert report.dropped["messages below an invalid record"] == 1
    path.write_text('{"message_tree_id": "t1", "tree_state": "ready_for_export"}\n')
    with pytest.raises(UserError, match='field "prompt": missing'):
        load_conversations(str(path), format="oasst1-trees")


# ── properties on random trees ────────────────────────────────────────────────────────────────────
@st.composite
def random_rows(draw):
    """Forests with random flags, ranks and dates where any row may be broken: an unknown or repeated
    role, empty text, a missing parent, a parent link that makes a cycle, a duplicate id."""
    rows = draw(valid_trees())
    n = len(rows)
    for i, row in enumerate(rows):
        row["synthetic"] = draw(st.integers(0, 9)) == 0
        row["tree_state"] = draw(st.sampled_from(["ready_for_export"] * 5 + ["growing"]))
        row["created_date"] = draw(st.sampled_from([None, "2023-01-01T00:00:00+00:00", "2023-01-02T00:00:00Z"]))
        damage = draw(st.sampled_from(["none"] * 40 + ["role", "flip", "text", "orphan", "cycle", "dup", "tree"]))
        if damage == "role":
            row["role"] = "bot"
        elif damage == "flip":
            row["role"] = "assistant" if row["role"] == "prompter" else "prompter"
        elif damage == "text":
            row["text"] = ""
        elif damage == "orphan":
            row["parent_id"] = "ghost"
        elif damage == "cycle":
            row["parent_id"] = f"m{draw(st.integers(i, n - 1))}"
        elif damage == "dup" and i:
            row["message_id"] = f"m{draw(st.integers(0, i - 1))}"
        elif damage == "tree":
            row["message_tree_id"] = "elsewhere"
    return rows


@st.composite
def valid_trees(draw):
    """Well-formed forests: roles alternate by depth, every parent exists."""
    n = draw(st.integers(1, 16))
    rows, depth = [], {}
    for i in range(n):
        parent = draw(st.integers(0, i - 1)) if i and draw(st.integers(0, 4)) else None
        depth[i] = 0 if parent is None else depth[parent] + 1
        rows.append({
            "message_id": f"m{i}", "parent_id": None if parent is None else f"m{parent}",
            "message_tree_id": f"m{i}" if parent is None else rows[parent]["message_tree_id"],
            "role": ("prompter", "assistant")[depth[i] % 2],
            "text": draw(st.sampled_from(["hi", "hello", "same", "x"])), "lang": draw(st.sampled_from(["en", "de"])),
            "rank": draw(st.one_of(st.none(), st.integers(0, 2))), "deleted": draw(st.integers(0, 9)) == 0,
            "review_result": draw(st.sampled_from([True] * 6 + [None, False])), "synthetic": False,
            "tree_state": "ready_for_export",
            "created_date": draw(st.sampled_from(["2023-01-01T00:00:00+00:00", "2023-01-02T00:00:00+00:00"])),
        })
    return rows


def check_threads(convs, mode, langs):
    keys = set()
    for c in convs:
        roles = [m["role"] for m in c["messages"]]
        assert roles and roles[::2] == ["user"] * len(roles[::2]) and roles[1::2] == ["assistant"] * len(roles[1::2])
        assert roles[-1] == "assistant"
        assert all(m["content"].strip() for m in c["messages"])
        key = json.dumps(c["messages"])
        assert key not in keys
        keys.add(key)
        if langs:
            assert c["lang"] in langs
    if mode == "top1":
        trees = [c["message_tree_id"] for c in convs]
        assert len(trees) == len(set(trees))


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(rows=random_rows(), mode=st.sampled_from(["top1", "all"]), langs=st.sampled_from([None, ["en"]]),
       synthetic=st.booleans())
def test_random_trees_never_crash_and_threads_alternate_and_end_with_an_assistant(rows, mode, langs, synthetic):
    records, read = in_memory(rows)
    report = Report("mem.jsonl", skip_invalid=True)
    messages, skipped = read(records, report)
    convs = extract_threads(messages, skipped, report, mode, langs, synthetic)
    check_threads(convs, mode, langs)
    try:  # without skipping, a random forest either loads or stops with a UserError (never anything else)
        strict = Report("mem.jsonl")
        messages, skipped = read(in_memory(rows)[0], strict)
        check_threads(extract_threads(messages, skipped, strict, mode, langs, synthetic), mode, langs)
    except UserError:
        pass


@settings(max_examples=100, deadline=None)
@given(rows=valid_trees(), mode=st.sampled_from(["top1", "all"]))
def test_random_valid_trees_read_the_same_in_both_layouts(rows, mode):
    out = []
    for layout, data in (("oasst1", rows), ("oasst1-trees", to_trees(rows))):
        records, read = in_memory(data, layout)
        report = Report("mem.jsonl")
        messages, skipped = read(records, report)
        out.append(extract_threads(messages, skipped, report, mode))
    assert out[0] == out[1]
    check_threads(out[0], mode, None)
    if mode == "all":  # every top1 thread is one of the threads of all mode
        records, read = in_memory(rows)
        report = Report("mem.jsonl")
        top1 = extract_threads(*read(records, report), report, "top1")
        assert {json.dumps(c["messages"]) for c in top1} <= {json.dumps(c["messages"]) for c in out[0]}
