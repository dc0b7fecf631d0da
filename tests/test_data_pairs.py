"""Preference pairs: OASST1 trees with known ranks -> exact pairs (both layouts), the usability, tree,
language and synthetic rules, the cap, duplicates, the three pair-file forms, bad records, the split by
tree, `chatbuild data prepare|inspect --mode pairs`, and the counts of the bundled samples."""

import json
from pathlib import Path

import pytest

from chatbuild.cli import main
from chatbuild.data import load_conversations, load_pairs, split_pairs, write_pairs
from chatbuild.data.pairs import Pair
from chatbuild.errors import UserError
from tests.test_data_oasst import msg, to_trees, write_jsonl


def user(text):
    return {"role": "user", "content": text}


def assistant(text):
    return {"role": "assistant", "content": text}


def load(tmp_path, rows, layout="oasst1", **kw):
    path = write_jsonl(tmp_path / f"{layout}.jsonl", rows if layout == "oasst1" else to_trees(rows))
    return load_pairs(str(path), **kw)


def triples(pairs):
    """(prompt texts, chosen, rejected) of each pair."""
    return [([m["content"] for m in p.prompt], p.chosen, p.rejected) for p in pairs]


# A tree whose pairs are known: the root has three ranked replies and an unranked one; below the best
# reply a follow-up question has two ranked replies; below the second a question has only one.
TREE = [msg("p0"), msg("a0", "p0", rank=0), msg("a2", "p0", rank=2), msg("a1", "p0", rank=1), msg("a_none", "p0"),
        msg("p1", "a0"), msg("b1", "p1", rank=1), msg("b0", "p1", rank=0),
        msg("p2", "a1"), msg("c0", "p2", rank=0)]
TREE_PAIRS = [(["text of p0"], "text of a0", "text of a1"),
              (["text of p0"], "text of a0", "text of a2"),
              (["text of p0", "text of a0", "text of p1"], "text of b0", "text of b1")]


@pytest.mark.parametrize("layout", ["oasst1", "oasst1-trees"])
def test_best_ranked_reply_against_each_other_ranked_one(tmp_path, layout):
    pairs, report = load(tmp_path, TREE, layout)
    assert triples(pairs) == TREE_PAIRS
    assert pairs[2].prompt == (user("text of p0"), assistant("text of a0"), user("text of p1"))
    assert {p.message_tree_id for p in pairs} == {"t1"} and {p.lang for p in pairs} == {"en"}
    assert report.format == layout and report.unit == "pairs" and report.kept == 3
    assert report.dropped["prompts with fewer than 2 ranked replies"] == 1  # p2 (one ranked reply)


def test_unusable_messages_trees_and_languages_give_no_pairs(tmp_path):
    rows = [msg("p0"), msg("a0", "p0", rank=0, deleted=True), msg("a1", "p0", rank=1), msg("a2", "p0", rank=2),
            msg("a3", "p0", rank=3, review_result=False), msg("a4", "p0", rank=4, synthetic=True),
            # an unusable prompter message, and a usable one below an unusable reply: no pairs from either
            msg("p1", "a1", deleted=True), msg("b0", "p1", rank=0), msg("b1", "p1", rank=1),
            msg("p2", "a3"), msg("c0", "p2", rank=0), msg("c1", "p2", rank=1),
            # a tree still growing, and a German one
            msg("q0", tree="t2", tree_state="growing"), msg("x0", "q0", tree="t2", rank=0),
            msg("x1", "q0", tree="t2", rank=1, tree_state="growing"),
            msg("r0", tree="t3", lang="de"), msg("y0", "r0", tree="t3", rank=0, lang="de"),
            msg("y1", "r0", tree="t3", rank=1, lang="de")]
    pairs, report = load(tmp_path, rows)
    # a0 is deleted, so a1 is the best usable reply; a3 (rejected in review) and a4 (synthetic) are out
    assert triples(pairs) == [(["text of p0"], "text of a1", "text of a2"), (["text of r0"], "text of y0", "text of y1")]
    assert report.dropped["trees not ready_for_export (tree_state growing)"] == 1
    assert report.dropped["messages deleted"] == 2 and report.dropped["messages synthetic"] == 1

    pairs, report = load(tmp_path, rows, lang="en", include_synthetic=True)
    assert triples(pairs) == [(["text of p0"], "text of a1", "text of a2"), (["text of p0"], "text of a1", "text of a4")]
    assert report.dropped["trees in another language (de)"] == 1


def test_the_cap_keeps_the_pairs_against_the_next_ranked_replies(tmp_path):
    rows = [msg("p0"), *(msg(f"a{i}", "p0", rank=i) for i in (5, 3, 0, 1, 4, 2))]
    pairs, report = load(tmp_path, rows)
    assert [p.rejected for p in pairs] == ["text of a1", "text of a2", "text of a3", "text of a4"]
    assert {p.chosen for p in pairs} == {"text of a0"}
    assert report.dropped["pairs over the cap of 4 per prompt"] == 1
    assert [p.rejected for p in load(tmp_path, rows, max_per_prompt=2)[0]] == ["text of a1", "text of a2"]
    assert len(load(tmp_path, rows, max_per_prompt=None)[0]) == 5
    for bad in (0, -1, 1.5, True):
        with pytest.raises(UserError, match="max_per_prompt must be"):
            load(tmp_path, rows, max_per_prompt=bad)


def test_ties_same_texts_and_duplicates_give_no_pairs(tmp_path):
    rows = [msg("p0", text="Same question"), msg("a0", "p0", rank=0, text="Best"), msg("a1", "p0", rank=0, text="Tied"),
            msg("a2", "p0", rank=1, text="Best "), msg("a3", "p0", rank=2, text="Worse"),
            msg("q0", tree="t2", text="Same question"), msg("x0", "q0", tree="t2", rank=0, text="Best"),
            msg("x1", "q0", tree="t2", rank=1, text="Worse")]
    pairs, report = load(tmp_path, rows)
    assert triples(pairs) == [(["Same question"], "Best", "Worse")] and pairs[0].message_tree_id == "t1"
    assert report.dropped["replies tied in rank with the best one"] == 1
    assert report.dropped["replies with the same text as the best one"] == 1
    assert report.dropped["duplicate pairs"] == 1


# ── pair files ───────────────────────────────────────────────────────────────────────────────────
SYSTEM = {"role": "system", "content": "Be brief."}
FILE_FORMS = [  # (record, the pair it is)
    ({"prompt": [user("Hi"), assistant("Hello!"), user("A colour?")], "chosen": assistant("Blue."),
      "rejected": assistant("No."), "message_tree_id": "t9", "lang": "en"},
     Pair((user("Hi"), assistant("Hello!"), user("A colour?")), "Blue.", "No.", "t9", "en")),
    ({"prompt": "What is 2+2?", "chosen": "4.", "rejected": "5.", "score_chosen": 9.0},
     Pair((user("What is 2+2?"),), "4.", "5.")),
    ({"chosen": [SYSTEM, user("Capital of France?"), assistant("Paris.")],
      "rejected": [SYSTEM, user("Capital of France?"), assistant("Lyon.")]},
     Pair((SYSTEM, user("Capital of France?")), "Paris.", "Lyon.")),
    ({"prompt": [user("Name a fruit.")], "chosen": [assistant("An apple.")],
      "rejected": [{"role": "assistant", "content": [{"type": "text", "text": "A car."}]}], "lang": "en"},
     Pair((user("Name a fruit."),), "An apple.", "A car.", None, "en")),
]


def test_the_three_file_forms_are_read_per_record_and_round_trip(tmp_path):
    path = write_jsonl(tmp_path / "p.jsonl", [record for record, _ in FILE_FORMS])
    pairs, report = load_pairs(str(path))
    assert pairs == [pair for _, pair in FILE_FORMS]
    assert report.format == "pairs" and report.detected and report.records == 4 and report.kept == 4
    out = write_pairs(pairs, tmp_path / "out" / "pairs.jsonl")
    first = json.loads(out.read_text().splitlines()[0])
    assert set(first) == {"prompt", "chosen", "rejected", "message_tree_id", "lang"}
    assert load_pairs(str(out))[0] == pairs
    assert [p.lang for p in load_pairs(str(path), lang="en")[0]] == ["en", "en"]
    with pytest.raises(UserError, match="is a folder"):
        write_pairs(pairs, tmp_path)


@pytest.mark.parametrize("record, message", [
    ({"prompt": "Hi", "rejected": "No."}, 'p.jsonl:2, field "chosen": missing'),
    ({"prompt": "Hi", "chosen": "Same.", "rejected": " Same."}, "p.jsonl:2: chosen and rejected are the same reply"),
    ({"prompt": "Hi", "chosen": "Yes.", "rejected": "  "}, 'p.jsonl:2, field "rejected": the reply is empty'),
    ({"prompt": [user("Hi"), assistant("Hello")], "chosen": "Yes.", "rejected": "No."},
     "p.jsonl:2: the prompt must end with a user turn"),
    ({"prompt": [{"role": "human", "content": "Hi"}], "chosen": "Yes.", "rejected": "No."},
     "p.jsonl:2, field \"prompt\\[0\\].role\": unknown role 'human'"),
    ({"prompt": [user("Hi")], "chosen": [user("Yes.")], "rejected": "No."},
     'p.jsonl:2, field "chosen\\[0\\].role": the reply must be an assistant message'),
    ({"chosen": [user("Hi"), assistant("Yes.")], "rejected": [user("Hey"), assistant("No.")]},
     'p.jsonl:2, field "chosen": chosen and rejected must differ only in their last message'),
    ({"chosen": "Yes.", "rejected": "No."}, 'p.jsonl:2, field "prompt": missing'),
    ({"prompt": "Hi", "chosen": "Yes.", "rejected": "No.", "lang": 7}, 'p.jsonl:2, field "lang": expected a language'),
])
def test_a_bad_record_stops_the_load_in_one_line_or_is_counted(tmp_path, record, message):
    good = {"prompt": "Hello?", "chosen": "Hello!", "rejected": "Go away."}
    path = write_jsonl(tmp_path / "p.jsonl", [good, record, good | {"prompt": "Again?"}])
    with pytest.raises(UserError, match=message) as err:
        load_pairs(str(path))
    assert "\n" not in str(err.value)
    pairs, report = load_pairs(str(path), skip_invalid=True)
    assert [p.prompt[0]["content"] for p in pairs] == ["Hello?", "Again?"]
    assert report.invalid_count == 1 and report.invalid[0].startswith(f"{path}:2")
    assert "1 invalid records skipped" in report.summary()


def test_conversations_and_pairs_are_not_mistaken_for_each_other(tmp_path):
    pairs_file = write_jsonl(tmp_path / "p.jsonl", [FILE_FORMS[1][0]])
    with pytest.raises(UserError, match="holds preference pairs, not conversations: read it with --mode pairs"):
        load_conversations(str(pairs_file))
    chat = write_jsonl(tmp_path / "c.jsonl", [{"messages": [user("Hi"), assistant("Hello")]}])
    with pytest.raises(UserError, match="chat records are conversations, which hold no preferences"):
        load_pairs(str(chat))
    with pytest.raises(UserError, match='data format "chat" cannot give preference pairs'):
        load_pairs(str(chat), format="chat")


# ── the split ────────────────────────────────────────────────────────────────────────────────────
def test_split_never_puts_a_tree_or_a_prompt_on_both_sides(tmp_path):
    rows = []
    for t in range(20):  # 20 trees, each with two prompts that have pairs
        tree = f"t{t}"
        rows += [msg(f"p{t}", tree=tree), msg(f"a{t}_0", f"p{t}", tree=tree, rank=0),
                 msg(f"a{t}_1", f"p{t}", tree=tree, rank=1), msg(f"a{t}_2", f"p{t}", tree=tree, rank=2),
                 msg(f"q{t}", f"a{t}_0", tree=tree), msg(f"b{t}_0", f"q{t}", tree=tree, rank=0),
                 msg(f"b{t}_1", f"q{t}", tree=tree, rank=1)]
    pairs, _ = load(tmp_path, rows)
    assert len(pairs) == 60
    train, val = split_pairs(pairs, 0.25, seed=3)
    assert len(train) + len(val) == 60 and len({p.message_tree_id for p in val}) == 5
    assert not {p.message_tree_id for p in train} & {p.message_tree_id for p in val}
    assert split_pairs(pairs[::-1], 0.25, seed=3)[1] == val[::-1]  # the input order does not matter
    assert split_pairs(pairs, 0.25, seed=4)[1] != val

    untreed = [Pair((user(f"Q{i // 3}"),), f"good {i}", f"bad {i}") for i in range(30)]  # 10 prompts, 3 pairs each
    train, val = split_pairs(untreed, 0.3, seed=0)
    assert len(val) == 9 and not {p.key()[0] for p in train} & {p.key()[0] for p in val}


# ── the command line ─────────────────────────────────────────────────────────────────────────────
def test_prepare_writes_pairs_and_a_validation_split(tmp_path, capsys):
    out, val = tmp_path / "pairs.jsonl", tmp_path / "val.jsonl"
    assert main(["data", "prepare", "sample", "--mode", "pairs", "--out", str(out), "--val-fraction", "0.1",
                 "--val-out", str(val), "--max-per-prompt", "1"]) == 0
    printed = capsys.readouterr().out
    train_pairs, val_pairs = load_pairs(str(out))[0], load_pairs(str(val))[0]
    assert len(train_pairs) + len(val_pairs) == 62  # one pair per prompt of the sample
    assert val_pairs and not {p.message_tree_id for p in train_pairs} & {p.message_tree_id for p in val_pairs}
    assert "pairs over the cap of 1 per prompt" in printed and f"wrote {len(train_pairs)} pairs to {out}" in printed

    assert main(["data", "prepare", "sample", "--out", str(out), "--max-per-prompt", "2"]) == 2
    assert "--max-per-prompt goes with --mode pairs" in capsys.readouterr().err


def test_inspect_counts_pairs_and_the_length_bias(tmp_path, capsys):
    rows = [{"prompt": "Q1", "chosen": "one two three", "rejected": "one", "lang": "en"},
            {"prompt": "Q1", "chosen": "one two", "rejected": "x", "lang": "en"},
            {"prompt": "Q2", "chosen": "short", "rejected": "a much longer reply", "lang": "de"}]
    path = write_jsonl(tmp_path / "p.jsonl", rows)
    assert main(["data", "inspect", str(path), "--mode", "pairs"]) == 0
    printed = capsys.readouterr().out
    assert "format: pairs (detected: preference pairs" in printed and "kept: 3 pairs" in printed
    assert "chosen reply longer than the rejected one in 2 of 3 pairs (67%); shorter in 1, the same length in 0" in printed
    lines = printed.splitlines()
    assert lines[lines.index("pairs per prompt:") + 1].split() == ["1", "|", "#" * 40, "1"]
    assert any(line.split() == ["all", "3", "2"] for line in lines)  # pairs, prompts
    assert any(line.split() == ["rejected", "1", "2.0"] for line in lines)  # median and mean words


@pytest.mark.integration
def test_inspect_counts_reply_tokens_with_a_tokenizer(tiny_base, tiny_tokenizer, tmp_path, capsys):
    path = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "Q", "chosen": "The sea is wide and deep.", "rejected": "No."}])
    assert main(["data", "inspect", str(path), "--mode", "pairs", "--tokenizer", str(tiny_base)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert f"lengths: tokens of {tiny_base}, the reply text alone" in lines
    chosen = len(tiny_tokenizer("The sea is wide and deep.", add_special_tokens=False)["input_ids"])
    assert chosen > 6  # a tiny tokenizer splits words further; the word count would be 6
    assert any(line.split()[:2] == ["chosen", str(chosen)] for line in lines)


# ── the bundled data ─────────────────────────────────────────────────────────────────────────────
def test_the_bundled_samples_pair_counts():
    """The counts the README gives: the sample's 62 prompts with two or more ranked replies give 69 pairs
    (7 prompts have three); the persona sets pair an "Ahoy!" reply against a plain one."""
    pairs, report = load_pairs("sample")
    assert len(pairs) == 69 and len({p.key()[0] for p in pairs}) == 62
    assert {p.lang for p in pairs} == {"en", "de", "fr", "es"}
    assert f"`sample` gives **{len(pairs)} pairs**" in (Path(__file__).resolve().parent.parent / "README.md").read_text()
    for name, n in (("sample:persona", 21), ("sample:persona-val", 12)):
        pairs, _ = load_pairs(name)
        assert len(pairs) == n
        assert all(p.chosen.startswith("Ahoy!") and not p.rejected.startswith("Ahoy!") for p in pairs)
    train = {p.key()[0] for p in load_pairs("sample:persona")[0]}
    assert not train & {p.key()[0] for p in load_pairs("sample:persona-val")[0]}
