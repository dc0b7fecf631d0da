"""Chat templates and loss masks, verified token by token on the tiny base's tokenizer, for both
template kinds; truncation; serving prompts equal training prefixes."""

import re

import pytest

from chatbuild.errors import UserError
from chatbuild.templates import (
    GUANACO_SYSTEM,
    IGNORE_INDEX,
    ChatFormat,
    check_messages,
    encode,
    guanaco_jinja_template,
    parse_guanaco_text,
    prompt_ids,
    render,
)

# A template of another family (role headers, EOS after replies), to show "tokenizer" formats work
# with any incremental template. Jinja's own string literals make the newlines (transformers trims
# newlines after block tags).
OTHER_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}{{ '<|' + m['role'] + '|>\\n' + m['content'] }}"
    "{% if m['role'] == 'assistant' %}{{ eos_token }}{% endif %}{{ '\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}"
)

CONV = [{"role": "user", "content": "Hi there, how are you?"}, {"role": "assistant", "content": "I am fine.\nThanks!"},
        {"role": "user", "content": "Great"}, {"role": "assistant", "content": "Bye now"}]


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    """The tiny base's tokenizer (SentencePiece trained on the bundled sample; no model pretraining)."""
    from transformers import AutoTokenizer

    from pipelines.tiny_base import TinyBaseSpec, build_tiny_base

    path = build_tiny_base(tmp_path_factory.mktemp("tok") / "base", TinyBaseSpec(pretrain_steps=0), log=lambda *_: None)
    return AutoTokenizer.from_pretrained(path)


@pytest.fixture
def other_tokenizer(tokenizer):
    import copy

    tok = copy.deepcopy(tokenizer)
    tok.chat_template = OTHER_TEMPLATE
    return tok


def piece(tokenizer, token_id) -> str:
    """The text of one token, read from its SentencePiece piece (independent of offsets)."""
    p = tokenizer.convert_ids_to_tokens(token_id)
    m = re.fullmatch(r"<0x([0-9A-F]{2})>", p)
    return chr(int(m.group(1), 16)) if m else p.replace("\u2581", " ")


def runs(tokenizer, enc):
    """The example as alternating (trained?, text) runs, token by token."""
    out = []
    for token_id, label in zip(enc.input_ids, enc.labels):
        trained = label != IGNORE_INDEX
        if trained:
            assert label == token_id
        if out and out[-1][0] == trained:
            out[-1] = (trained, out[-1][1] + piece(tokenizer, token_id))
        else:
            out.append((trained, piece(tokenizer, token_id)))
    return out


def test_guanaco_mask_token_by_token(tokenizer):
    enc = encode(ChatFormat("guanaco"), tokenizer, CONV)
    assert runs(tokenizer, enc) == [
        (False, "<s>### Human: Hi there, how are you?\n### Assistant:"),
        (True, " I am fine.\nThanks!</s>"),
        (False, "\n### Human: Great\n### Assistant:"),
        (True, " Bye now</s>"),
        (False, "\n"),
    ]


def test_guanaco_system_prompt_is_never_trained(tokenizer):
    enc = encode(ChatFormat("guanaco", system_prompt=GUANACO_SYSTEM), tokenizer, CONV[:2])
    assert runs(tokenizer, enc) == [(False, f"<s>{GUANACO_SYSTEM}\n### Human: Hi there, how are you?\n### Assistant:"),
                                    (True, " I am fine.\nThanks!</s>"), (False, "\n")]
    own = [{"role": "system", "content": "Answer briefly."}, *CONV[:2]]  # the conversation's own system message wins
    assert runs(tokenizer, encode(ChatFormat("guanaco", system_prompt=GUANACO_SYSTEM), tokenizer, own))[0] == \
        (False, "<s>Answer briefly.\n### Human: Hi there, how are you?\n### Assistant:")


def test_train_on_prompts_trains_every_token_but_the_first(tokenizer):
    enc = encode(ChatFormat("guanaco"), tokenizer, CONV, train_on_prompts=True)
    assert enc.labels[0] == IGNORE_INDEX and enc.labels[1:] == enc.input_ids[1:]


def test_tokenizer_kind_with_another_template_masks_token_by_token(other_tokenizer):
    enc = encode(ChatFormat("tokenizer", stop=[]), other_tokenizer, CONV)
    assert runs(other_tokenizer, enc) == [
        (False, "<s><|user|>\nHi there, how are you?\n<|assistant|>\n"),
        (True, "I am fine.\nThanks!</s>\n"),
        (False, "<|user|>\nGreat\n<|assistant|>\n"),
        (True, "Bye now</s>\n"),
    ]


def test_tokenizer_kind_with_the_guanaco_template_matches_the_guanaco_kind(tokenizer):
    assert tokenizer.chat_template == guanaco_jinja_template()
    a = encode(ChatFormat("guanaco"), tokenizer, CONV)
    b = encode(ChatFormat("tokenizer"), tokenizer, CONV)
    assert a.input_ids == b.input_ids
    # Same trained tokens, except that the template's reply span runs to the end of its line.
    newline = [i for i, t in enumerate(b.input_ids) if piece(tokenizer, t) == "\n" and a.labels[i] != b.labels[i]]
    assert all(a.labels[i] == b.labels[i] or i in newline for i in range(len(a.labels)))


@pytest.mark.parametrize("system", [None, "Be brief."])
def test_the_guanaco_jinja_template_renders_exactly_what_render_renders(tokenizer, system):
    messages = ([{"role": "system", "content": system}] if system else []) + CONV
    for upto, gen in ((4, False), (3, True), (1, True)):
        text, _ = render(ChatFormat("guanaco"), tokenizer, messages[: upto + bool(system)], add_generation_prompt=gen)
        assert tokenizer.apply_chat_template(messages[: upto + bool(system)], tokenize=False,
                                             add_generation_prompt=gen) == text


@pytest.mark.parametrize("kind", ["guanaco", "tokenizer"])
def test_serving_prompts_are_the_training_text_cut_where_a_reply_begins(tokenizer, other_tokenizer, kind):
    tok = tokenizer if kind == "guanaco" else other_tokenizer
    fmt = ChatFormat(kind)
    full = encode(fmt, tok, CONV)
    for k in (1, 3):
        prompt = prompt_ids(fmt, tok, CONV[:k])
        assert full.input_ids[: len(prompt)] == prompt
        assert full.labels[len(prompt) - 1] == IGNORE_INDEX and full.labels[len(prompt)] != IGNORE_INDEX
    with pytest.raises(UserError, match="must end with a user message"):
        prompt_ids(fmt, tok, CONV[:2])


def test_a_template_that_is_not_incremental_is_refused(other_tokenizer):
    other_tokenizer.chat_template = ("{% for m in messages %}{% if loop.last %}LAST {% endif %}{{ m['content'] }}\n"
                                     "{% endfor %}")
    with pytest.raises(UserError, match="does not render conversations incrementally"):
        encode(ChatFormat("tokenizer"), other_tokenizer, CONV)
    other_tokenizer.chat_template = None
    with pytest.raises(UserError, match="has none"):
        encode(ChatFormat("tokenizer"), other_tokenizer, CONV)


# ── truncation ───────────────────────────────────────────────────────────────────────────────────
def boundaries(tokenizer, enc):
    """Index of the first token of each reply, and the index just past each reply's EOS."""
    starts, ends = [], []
    for i, (t, label) in enumerate(zip(enc.input_ids, enc.labels)):
        if label != IGNORE_INDEX and (i == 0 or enc.labels[i - 1] == IGNORE_INDEX):
            starts.append(i)
        if t == tokenizer.eos_token_id:
            ends.append(i + 1)
    return starts, ends


def test_truncation_cuts_after_the_last_whole_reply_that_fits(tokenizer):
    fmt = ChatFormat("guanaco")
    full = encode(fmt, tokenizer, CONV)
    _, (end1, end2) = boundaries(tokenizer, full)
    assert encode(fmt, tokenizer, CONV, max_length=len(full)).input_ids == full.input_ids  # fits: untouched
    for max_length in (end1, end1 + 3, end2 - 1):
        cut = encode(fmt, tokenizer, CONV, max_length=max_length)
        assert cut.input_ids == full.input_ids[:end1] and cut.labels == full.labels[:end1]
        assert cut.input_ids[-1] == tokenizer.eos_token_id == cut.labels[-1]
    cut = encode(fmt, tokenizer, CONV, max_length=end2)
    assert cut.input_ids == full.input_ids[:end2]


def test_truncation_inside_the_first_reply_ends_with_a_trained_eos(tokenizer):
    fmt = ChatFormat("guanaco")
    full = encode(fmt, tokenizer, CONV)
    (start1, _), (end1, _) = boundaries(tokenizer, full)
    for max_length in (start1 + 2, end1 - 1):
        cut = encode(fmt, tokenizer, CONV, max_length=max_length)
        assert len(cut) == max_length
        assert cut.input_ids[:-1] == full.input_ids[: max_length - 1] and cut.labels[:-1] == full.labels[: max_length - 1]
        assert cut.input_ids[-1] == tokenizer.eos_token_id == cut.labels[-1]


def test_truncation_never_leaves_a_reply_that_is_only_eos_and_never_adds_eos_to_a_prompt(tokenizer):
    fmt = ChatFormat("guanaco")
    full = encode(fmt, tokenizer, CONV)
    (start1, _), _ = boundaries(tokenizer, full)
    for max_length in (start1 + 1, start1, 5):  # only the reply's first token would fit; the prompt alone
        cut = encode(fmt, tokenizer, CONV, max_length=max_length)
        assert cut.input_ids == full.input_ids[: min(max_length, start1)]
        assert set(cut.labels) == {IGNORE_INDEX}  # nothing to learn: the caller drops it


def test_truncation_with_train_on_prompts_still_cuts_at_turn_boundaries(tokenizer):
    fmt = ChatFormat("guanaco")
    full = encode(fmt, tokenizer, CONV, train_on_prompts=True)
    ends = [i + 1 for i, t in enumerate(full.input_ids) if t == tokenizer.eos_token_id]
    cut = encode(fmt, tokenizer, CONV, max_length=ends[1] - 1, train_on_prompts=True)
    assert cut.input_ids == full.input_ids[: ends[0]] and cut.labels == full.labels[: ends[0]]


def test_truncation_for_the_tokenizer_kind(other_tokenizer):
    fmt = ChatFormat("tokenizer")
    full = encode(fmt, other_tokenizer, CONV)
    end1 = full.input_ids.index(other_tokenizer.eos_token_id) + 1
    cut = encode(fmt, other_tokenizer, CONV, max_length=len(full) - 2)
    # The template's reply span includes the newline after EOS, so the cut comes one token later.
    assert cut.input_ids == full.input_ids[: end1 + 1]
    assert cut.labels[end1 - 1] == other_tokenizer.eos_token_id


# ── shapes and helpers ───────────────────────────────────────────────────────────────────────────
@pytest.mark.parametrize("messages,message", [
    ([], "no messages"),
    ([{"role": "bot", "content": "x"}], 'role "bot"'),
    ([{"role": "user", "content": None}], "no text content"),
    ([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}], "turns alternate"),
    ([{"role": "user", "content": "a"}, {"role": "system", "content": "b"}], "only the first message"),
    (["hello"], "not an object"),
])
def test_check_messages(messages, message):
    with pytest.raises(UserError, match=message):
        check_messages(messages)


def test_chat_format_roundtrip_and_unknown_name(tmp_path):
    fmt = ChatFormat("guanaco", system_prompt=GUANACO_SYSTEM)
    fmt.save(tmp_path / "chat_format.json")
    assert ChatFormat.load(tmp_path / "chat_format.json") == fmt
    with pytest.raises(UserError, match="unknown"):
        ChatFormat("vicuna")
    (tmp_path / "bad.json").write_text("{")
    with pytest.raises(UserError, match="not a readable chat_format.json"):
        ChatFormat.load(tmp_path / "bad.json")


def test_parse_guanaco_text_reads_back_what_render_writes(tokenizer):
    messages = [{"role": "system", "content": "Be kind."}, *CONV]
    text, _ = render(ChatFormat("guanaco"), tokenizer, messages)
    assert parse_guanaco_text(text.replace(tokenizer.bos_token, "").replace(tokenizer.eos_token, "")) == messages
