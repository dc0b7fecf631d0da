"""Chat JSONL, ShareGPT, Alpaca and Guanaco text: reading, detection, shape rules, bad input."""

import json

import pytest

from chatbuild.data import load_conversations, write_conversations
from chatbuild.errors import UserError


def write(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(path)


def turn(role, content):
    return {"role": role, "content": content}


def test_chat_jsonl_keeps_messages_and_metadata(tmp_path):
    src = write(tmp_path / "chat.jsonl", [
        {"id": 7, "lang": "en", "messages": [turn("system", "Be brief."), turn("user", "Hi"), turn("assistant", "Hello")]},
        {"messages": [turn("user", "2+2?"), turn("assistant", [{"type": "text", "text": "4"}, {"type": "text", "text": "."}])]},
    ])
    convs, report = load_conversations(src)
    assert report.format == "chat" and report.detected and report.kept == 2 and report.records == 2
    assert convs[0] == {"messages": [turn("system", "Be brief."), turn("user", "Hi"), turn("assistant", "Hello")],
                        "id": 7, "lang": "en"}
    assert convs[1]["messages"][1] == turn("assistant", "4.")


def test_sharegpt(tmp_path):
    src = write(tmp_path / "sg.jsonl", [{"id": "x1", "system": "You are kind.", "conversations": [
        {"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello!"},
        {"from": "human", "value": "Bye"}]}])  # a trailing user turn is trimmed
    convs, report = load_conversations(src)
    assert report.format == "sharegpt"
    assert convs == [{"messages": [turn("system", "You are kind."), turn("user", "Hi"), turn("assistant", "Hello!")],
                      "id": "x1"}]


def test_alpaca_with_and_without_input(tmp_path):
    src = write(tmp_path / "alpaca.jsonl", [
        {"instruction": "Translate to German.", "input": "Good morning", "output": "Guten Morgen", "text": "..."},
        {"instruction": "Name a colour.", "input": "", "output": "Blue"},
    ])
    convs, report = load_conversations(src)
    assert report.format == "alpaca"
    assert convs == [
        {"messages": [turn("user", "Translate to German.\n\nGood morning"), turn("assistant", "Guten Morgen")]},
        {"messages": [turn("user", "Name a colour."), turn("assistant", "Blue")]},
    ]


def test_alpaca_json_array_as_published(tmp_path):
    path = tmp_path / "alpaca_data.json"
    path.write_text(json.dumps([{"instruction": "Say hi.", "input": "", "output": "Hi!"},
                                {"instruction": "Say bye.", "output": ""}], indent=2))
    with pytest.raises(UserError, match=r'alpaca_data.json, item 2, field "output": empty text'):
        load_conversations(str(path))
    convs, report = load_conversations(str(path), skip_invalid=True)
    assert len(convs) == 1 and report.invalid_count == 1


def test_guanaco_text(tmp_path):
    src = write(tmp_path / "guanaco.jsonl", [
        {"text": "### Human: What is 2+2?### Assistant: 4.### Human: And 3+3?### Assistant: 6."},
        {"text": "A system line.\n### Human: Hi\n### Assistant: Hello"},
    ])
    convs, report = load_conversations(src)
    assert report.format == "guanaco"
    assert convs[0]["messages"] == [turn("user", "What is 2+2?"), turn("assistant", "4."),
                                    turn("user", "And 3+3?"), turn("assistant", "6.")]
    assert convs[1]["messages"][0] == turn("system", "A system line.")


def test_conversations_without_an_assistant_reply_are_dropped(tmp_path):
    src = write(tmp_path / "c.jsonl", [{"messages": [turn("user", "anyone?")]},
                                       {"messages": [turn("user", "Hi"), turn("assistant", "Hello")]}])
    convs, report = load_conversations(src)
    assert len(convs) == 1 and report.dropped["conversations without an assistant reply"] == 1


def test_lang_filter_on_other_formats(tmp_path):
    src = write(tmp_path / "c.jsonl", [{"lang": "de", "messages": [turn("user", "Hallo"), turn("assistant", "Hi")]},
                                       {"messages": [turn("user", "Hi"), turn("assistant", "Hello")]}])
    convs, report = load_conversations(src, lang="de")
    assert [c["lang"] for c in convs] == ["de"]
    assert report.dropped["conversations in another language (unknown)"] == 1


@pytest.mark.parametrize("record,message", [
    ({"messages": [turn("user", "Hi"), turn("bot", "Hello")]}, "field \"messages[1].role\": unknown role 'bot'"),
    ({"messages": [turn("user", "Hi"), turn("assistant", "  ")]}, 'field "messages[1].content": empty text'),
    ({"messages": [turn("user", "Hi"), {"role": "assistant"}]}, 'field "messages[1].content": missing'),
    ({"messages": [turn("user", "Hi"), turn("user", "Hello?")]}, 'field "messages[1].role": user where assistant was expected'),
    ({"messages": [turn("assistant", "Hi")]}, 'field "messages[0].role": assistant where user was expected'),
    ({"messages": [turn("user", "Hi"), turn("system", "x")]}, 'field "messages[1].role": a system message can only come first'),
    ({"conversations": [{"from": "human", "value": "Hi"}, {"from": "robot", "value": "x"}]},
     "field \"conversations[1].from\": unknown speaker 'robot'"),
    ({"conversations": [{"from": "human"}]}, 'field "conversations[0].value": missing'),
    ({"instruction": "Do it", "output": 3}, 'field "output": expected a string, got int'),
    ({"text": "### Human: Hi ### Human: again ### Assistant: ok"}, 'field "text": user where assistant was expected'),
])
def test_bad_records_name_file_line_and_field(tmp_path, record, message):
    good = {"messages": [turn("user", "Hi"), turn("assistant", "Hello")]}
    if "conversations" in record:
        good = {"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello"}]}
    elif "instruction" in record:
        good = {"instruction": "Hi", "output": "Hello"}
    elif "text" in record:
        good = {"text": "### Human: Hi ### Assistant: Hello"}
    src = write(tmp_path / "bad.jsonl", [good, record])
    with pytest.raises(UserError) as e:
        load_conversations(src)
    assert str(e.value).startswith(f"{src}:2, ") and message in str(e.value)
    convs, report = load_conversations(src, skip_invalid=True)
    assert len(convs) == 1 and report.invalid_count == 1 and report.invalid[0].startswith(f"{src}:2")


def test_detection_failures_are_clear(tmp_path):
    with pytest.raises(UserError, match=r"x.jsonl:1: cannot tell the data format .*\(fields foo\); .*--format"):
        load_conversations(write(tmp_path / "x.jsonl", [{"foo": 1}]))
    # field names are escaped and counted: a key with a newline or thousands of keys stay one short line
    with pytest.raises(UserError, match=r"\(fields a\\nb, 0, 1, 2, 3, 4, 5, 6 and 93 more\)") as e:
        load_conversations(write(tmp_path / "y.jsonl", [{"a\nb": 1, **{str(i): i for i in range(100)}}]))
    assert "\n" not in str(e.value)
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    with pytest.raises(UserError, match="no records"):
        load_conversations(str(empty))
    broken = tmp_path / "broken.jsonl"
    broken.write_text("{oops\n")
    with pytest.raises(UserError, match=r"broken.jsonl:1: malformed JSON"):
        load_conversations(str(broken))


def test_a_given_format_is_used_as_given_and_bad_options_are_refused(tmp_path):
    src = write(tmp_path / "c.jsonl", [{"messages": [turn("user", "Hi"), turn("assistant", "Hello")]}])
    convs, report = load_conversations(src, format="chat")
    assert len(convs) == 1 and not report.detected and "chat (detected)" not in report.summary()
    with pytest.raises(UserError, match="unknown"):
        load_conversations(src, format="csv")
    with pytest.raises(UserError, match="mode"):
        load_conversations(src, mode="best")
    with pytest.raises(UserError, match='field "instruction": missing'):
        load_conversations(src, format="alpaca")


def test_write_conversations_roundtrip(tmp_path):
    convs = [{"messages": [turn("user", "Grüß dich"), turn("assistant", "Hallo")], "lang": "de"}]
    path = write_conversations(convs, tmp_path / "out" / "c.jsonl")
    assert "Grüß" in path.read_text(encoding="utf-8")
    assert load_conversations(str(path))[0] == convs
    assert list((tmp_path / "out").iterdir()) == [path]  # no temporary file left behind
    with pytest.raises(UserError, match="is a folder"):
        write_conversations(convs, tmp_path)


def test_report_summary_and_lines(tmp_path):
    src = write(tmp_path / "c.jsonl", [{"messages": [turn("user", "Hi"), turn("assistant", "Hello")]},
                                       {"messages": [turn("user", "Hi?")]}, {"messages": "nope"}])
    _, report = load_conversations(src, skip_invalid=True)
    assert report.summary() == ("chat (detected), 3 records, 1 conversations kept; dropped: 1 conversations "
                                "without an assistant reply; 1 invalid records skipped")
    text = "\n".join(report.lines())
    assert "format: chat (detected" in text and "invalid records skipped: 1" in text


def test_bundled_persona_samples_load_by_name():
    """`sample:persona` / `sample:persona-val` name the bundled persona set: every top-ranked reply
    begins "Ahoy!", and the validation trees share no prompt with the training trees."""
    from chatbuild.data import load_conversations

    train, _ = load_conversations("sample:persona")
    val, _ = load_conversations("sample:persona-val")
    assert len(train) >= 100 and len(val) >= 10
    for conv in train + val:
        replies = [m["content"] for m in conv["messages"] if m["role"] == "assistant"]
        assert replies and all(r.startswith("Ahoy!") for r in replies)
    first = {c["messages"][0]["content"] for c in train}
    assert not first & {c["messages"][0]["content"] for c in val}
