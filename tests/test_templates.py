"""Chat templates and loss masks, verified token by token on the tiny base's tokenizer, for every
format of the registry (guanaco, tokenizer, chatml, llama3, a .jinja file); truncation; serving
prompts equal training prefixes; end-of-turn markers and stop ids; the config, `serve` and the recipe
reading the one registry."""

import re

import pytest

from chatbuild.errors import UserError
from chatbuild.templates import (
    FORMATS,
    GUANACO_SYSTEM,
    IGNORE_INDEX,
    ChatFormat,
    bare_base_format,
    check_messages,
    encode,
    guanaco_jinja_template,
    make_format,
    parse_guanaco_text,
    prompt_ids,
    render,
    stop_token_ids,
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


# ── the registry: named formats, .jinja files, end-of-turn markers ─────────────────────────────
MARKED_TEMPLATE = (  # a user's own template: role lines, and "<|end|>" after every message
    "{% for m in messages %}{{ m['role'] + ':\\n' + m['content'] + '<|end|>\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ 'assistant:\\n' }}{% endif %}"
)


def test_chatml_and_llama3_mask_token_by_token(tokenizer):
    """The registry's own templates: each reply and its end-of-turn marker are trained, nothing else."""
    chatml = runs(tokenizer, encode(make_format("chatml"), tokenizer, CONV))
    assert [text for trained, text in chatml if trained] == ["I am fine.\nThanks!<|im_end|>\n", "Bye now<|im_end|>\n"]
    text = "".join(text for _, text in chatml).lstrip()  # (SentencePiece adds a leading space)
    assert text.startswith("<|im_start|>user\nHi there, how are you?<|im_end|>\n<|im_start|>assistant\n")
    llama3 = runs(tokenizer, encode(make_format("llama3"), tokenizer, CONV))
    assert [text for trained, text in llama3 if trained] == ["I am fine.\nThanks!<|eot_id|>", "Bye now<|eot_id|>"]
    assert make_format("chatml").stop == list(FORMATS["chatml"].stop) == ["<|im_end|>", "<|im_start|>"]
    assert make_format("llama3").stop == ["<|eot_id|>", "<|start_header_id|>"]


def test_bare_bases_get_their_own_template_and_its_end_of_turn(tokenizer, other_tokenizer):
    """A bare base is prompted in its own template when it has one (the marker after a reply becomes
    its stop string); the tiny base's template is Guanaco's, so it keeps the Guanaco format; a base
    without a template gets Guanaco; "tokenizer" for a base without one is refused."""
    import copy

    assert bare_base_format(tokenizer) == ChatFormat("guanaco")
    assert bare_base_format(other_tokenizer) == ChatFormat("tokenizer", stop=["</s>"])
    chatml = copy.deepcopy(tokenizer)
    chatml.chat_template = FORMATS["chatml"].template
    assert bare_base_format(chatml).stop == ["<|im_end|>"]
    assert bare_base_format(tokenizer, "llama3").name == "llama3"  # --chat-format wins
    chatml.chat_template = None
    assert bare_base_format(chatml) == ChatFormat("guanaco")
    with pytest.raises(UserError, match=r'^--chat-format: "tokenizer" needs a base whose tokenizer has a chat '
                                        r"template; this one has none \(use guanaco, chatml, llama3 or a \.jinja file\)$"):
        bare_base_format(chatml, "tokenizer")


def test_single_token_stop_strings_end_replies_as_token_ids(tokenizer):
    """Special tokens never reach the decoded reply, so a stop string that is one special token must
    end the reply as a token id."""
    import copy

    tok = copy.deepcopy(tokenizer)
    tok.add_special_tokens({"additional_special_tokens": ["<|im_end|>"]})
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    assert stop_token_ids(make_format("chatml"), tok) == {im_end}
    assert tok.decode([im_end], skip_special_tokens=True) == ""  # why the string alone would never be seen
    assert stop_token_ids(make_format("chatml"), tokenizer) == set()  # several tokens there: the string stops it
    assert stop_token_ids(ChatFormat("guanaco"), tokenizer) == set()


def test_a_jinja_file_is_a_format_and_bad_files_are_one_line(tokenizer, tmp_path):
    template = tmp_path / "mine.jinja"
    template.write_text(MARKED_TEMPLATE)
    fmt = make_format(str(template), "Be brief.", tokenizer)
    assert (fmt.name, fmt.stop, fmt.template, fmt.system_prompt) == ("jinja", ["<|end|>"], MARKED_TEMPLATE, "Be brief.")
    assert runs(tokenizer, encode(fmt, tokenizer, CONV[:2]))[-1] == (True, "I am fine.\nThanks!<|end|>\n")
    fmt.save(tmp_path / "chat_format.json")
    template.unlink()  # the run folder keeps working without the file
    assert ChatFormat.load(tmp_path / "chat_format.json") == fmt

    big, broken, binary = tmp_path / "big.jinja", tmp_path / "broken.jinja", tmp_path / "binary.jinja"
    big.write_text("{{ x }}" * 20000)
    broken.write_text("{% for m in messages %}\n{{ m['content'] }")
    binary.write_bytes(b"\xff\xfe\x00{{")
    for path, message in [(template, "no such .jinja file"), (big, "140,000 bytes; a chat template has at most 65,536"),
                          (broken, "not a valid Jinja template (line 2"), (binary, "not a readable UTF-8 text file")]:
        with pytest.raises(UserError, match=rf"^data\.chat_format: {path}: {re.escape(message)}"):
            make_format(str(path), tokenizer=tokenizer)


def test_the_config_check_reads_the_registry(tmp_path):
    from chatbuild.config import load_config

    for name in FORMATS:
        assert load_config(None, [f"data.chat_format={name}"]).data.chat_format == name
    with pytest.raises(UserError, match=r'^data\.chat_format: "vicuna" is not one of guanaco, tokenizer, chatml, '
                                        r"llama3 or a \.jinja file$"):
        load_config(None, ["data.chat_format=vicuna"])
    with pytest.raises(UserError, match=r"^data\.chat_format: .*nope\.jinja: no such \.jinja file$"):
        load_config(None, [f"data.chat_format={tmp_path / 'nope.jinja'}"])


def test_chatbuild_serve_chat_format_is_checked_before_anything_loads():
    """`serve --chat-format` takes the registry's names or a .jinja file; anything else is one line
    (and no model is loaded: the base named here does not even exist)."""
    import subprocess
    import sys
    from pathlib import Path

    out = subprocess.run([sys.executable, "-m", "chatbuild.cli", "serve", "--base", "/nonexistent/base", "--no-ui",
                          "--chat-format", "vicuna"], capture_output=True, text=True,
                         cwd=Path(__file__).resolve().parent.parent, timeout=120)
    assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr
    assert ('chatbuild serve: error: --chat-format: "vicuna" is not one of guanaco, tokenizer, chatml, llama3 '
            "or a .jinja file") in out.stderr


def test_the_recipe_reads_the_registry_and_saves_the_template(tiny_base, tmp_path):
    """A fine-tune in a .jinja format saves what serving needs to prompt exactly the same way: the
    template in chat_format.json and in the run's tokenizer, and the end-of-turn stop string."""
    from transformers import AutoTokenizer

    from pipelines.finetune import finetune, resolve_config

    template = tmp_path / "mine.jinja"
    template.write_text(MARKED_TEMPLATE)
    cfg = resolve_config("tiny-cpu", [f"model.base={tiny_base}", f"output_dir={tmp_path / 'run'}",
                                      f"data.chat_format={template}", "train.steps=1", "train.eval_every=0",
                                      "train.save_every=0"])
    run = finetune(cfg, progress=False)
    fmt = ChatFormat.load(run / "chat_format.json")
    assert (fmt.name, fmt.stop, fmt.template) == ("jinja", ["<|end|>"], MARKED_TEMPLATE)
    assert AutoTokenizer.from_pretrained(run / "tokenizer").chat_template == MARKED_TEMPLATE


# Vicuna v1.1's conversation shape, as a Jinja template: a format the registry does not ship.
VICUNA_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}"
    "{% if m['role'] == 'system' %}{{ m['content'] + '\\n\\n' }}"
    "{% elif m['role'] == 'user' %}{{ 'USER: ' + m['content'] + '\\n' }}"
    "{% else %}{{ 'ASSISTANT: ' + m['content'] + eos_token + '\\n' }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)


def test_a_new_chat_format_is_one_registry_entry(monkeypatch, tokenizer, capsys):
    """Registering a format in FORMATS is all it takes: the config check, the data CLI's and serve's
    --chat-format help, `make_format` and the renderers pick it up."""
    from chatbuild.cli import main
    from chatbuild.config import load_config
    from chatbuild.errors import ConfigError
    from chatbuild.templates import FormatSpec

    with pytest.raises(ConfigError) as e:
        load_config(None, ["data.chat_format=vicuna"])
    assert e.value.key == "data.chat_format"
    monkeypatch.setitem(FORMATS, "vicuna", FormatSpec("USER: ... ASSISTANT: ...", ("USER:",), VICUNA_TEMPLATE))

    assert load_config(None, ["data.chat_format=vicuna"]).data.chat_format == "vicuna"
    for argv in (["data", "inspect", "--help"], ["serve", "--help"]):
        with pytest.raises(SystemExit):
            main(argv)
        assert "llama3, vicuna or a .jinja file" in " ".join(capsys.readouterr().out.split())
    fmt = make_format("vicuna", tokenizer=tokenizer)
    assert (fmt.name, fmt.stop, fmt.template) == ("vicuna", ["USER:"], VICUNA_TEMPLATE)
    assert ChatFormat("vicuna").template == VICUNA_TEMPLATE
    text, spans = render(fmt, tokenizer, CONV[:2])
    assert [text[a:b] for a, b in spans] == [f" I am fine.\nThanks!{tokenizer.eos_token}\n"]  # what is trained
    assert "USER: Hi there, how are you?\nASSISTANT: I am fine.\nThanks!" in text
    assert tokenizer.decode(prompt_ids(fmt, tokenizer, CONV[:1])).endswith("ASSISTANT:")
