"""Chat formats: one definition renders training examples and serving prompts alike.

A `ChatFormat` is saved with every run (`chat_format.json`) and read back by serving, so the model is
always prompted exactly the way it was trained (the idea of litgpt's `prompt_style.yaml` and
alpaca-lora's single `Prompter`).

The formats, one registry (`FORMATS`) that the config check, the command lines and the recipe read:
- "guanaco": the QLoRA paper's format. Each turn is one line,

      <s>[system line\\n]### Human: {user}\\n### Assistant: {assistant}</s>\\n### Human: ...

  a reply ends with the tokenizer's EOS token, and serving also stops at the string "### Human:".
  The paper's system line (`GUANACO_SYSTEM`) is optional. The default for bases without a template.
- "tokenizer": whatever chat template the base's tokenizer carries (`tokenizer.apply_chat_template`);
  its end-of-turn marker (e.g. ChatML's `<|im_end|>`) is read off the template and becomes a stop string.
  A bare base that has a template is served with it.
- "chatml": `<|im_start|>{role}\\n{content}<|im_end|>\\n` per message (Qwen, SmolLM, many others).
- "llama3": `<|start_header_id|>{role}<|end_header_id|>\\n\\n{content}<|eot_id|>` per message.
- a `.jinja` file: a chat template of your own (the file's text is saved in chat_format.json, so the
  run folder keeps working without the file); its end-of-turn marker is read off it like "tokenizer"'s.

Adding a format is one `FormatSpec` entry in `FORMATS` (a Jinja template and its stop strings, or a
render function): the config check, `chatbuild data inspect --chat-format`, `chatbuild serve
--chat-format` and `ChatFormat` all read the registry. `DEFAULT_FORMAT` is the config's default.

Each registry format also says how Ollama writes it (`ollama_template`): a Modelfile TEMPLATE in the
Go text/template syntax Ollama uses, which `chatbuild export` puts beside a GGUF file. Filled with a
conversation the way Ollama fills it (`.System`, then `.Messages` with `.Role` and `.Content`), it
renders the text `render` renders, less the BOS token that llama.cpp adds itself (tests/test_export.py
checks this with a renderer of that template subset). Free-form formats ("tokenizer", .jinja files)
have none: a Jinja template cannot be translated to Go in general.

A stop string that is one token of the tokenizer (`<|im_end|>`, `<|eot_id|>` in their own families)
also ends a reply as a token id (`stop_token_ids`): special tokens never reach the reply text, so
their string would never be seen there.

Tokenization contract (`encode`): the conversation is rendered to text together with the character
spans the model should learn to produce (each assistant reply plus its end-of-turn marker); the whole
text is tokenized once, and a token is trained iff its first character lies inside such a span.
`labels` equal `input_ids` there and are -100 everywhere else. With `train_on_prompts=True` every
token but the first is trained (the paper's whole-text loss). Serving prompts (`prompt_ids`) are the
same rendering cut where the next assistant reply begins, so training and serving share their text.
"""

import json
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

from chatbuild.errors import ConfigError, UserError

IGNORE_INDEX = -100  # the label that CrossEntropyLoss (and transformers) skips

# The system line used with Guanaco in the QLoRA repository's evaluation prompts (a fact, quoted).
GUANACO_SYSTEM = (
    "A chat between a curious human and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)
GUANACO_HUMAN = "### Human:"
GUANACO_ASSISTANT = "### Assistant:"

ROLES = ("system", "user", "assistant")


# ChatML as most ChatML tokenizers write it: every message framed the same way, no default system line.
CHATML_TEMPLATE = (
    "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
# Llama 3's template without its tool-calling branches.
LLAMA3_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}"
    "{{ '<|start_header_id|>' + m['role'] + '<|end_header_id|>\\n\\n' + m['content'] | trim + '<|eot_id|>' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}"
)


# ── Guanaco's rendering rules (the registry below points at them) ───────────────────────────────
def _render_guanaco(tokenizer, messages, add_generation_prompt):
    """Guanaco's lines by hand (see the module docstring), with the reply spans `render` returns."""
    bos, eos = tokenizer.bos_token or "", tokenizer.eos_token or ""
    parts, spans, n = [bos], [], len(bos)
    for m in messages:
        if m["role"] == "system":
            piece = m["content"] + "\n"
        elif m["role"] == "user":
            piece = f"{GUANACO_HUMAN} {m['content']}\n"
        else:
            # The reply starts at the space after the header: the prompt ends with the header, so the
            # first thing the model produces is " <reply>".
            start = n + len(GUANACO_ASSISTANT)
            piece = f"{GUANACO_ASSISTANT} {m['content']}{eos}\n"
            spans.append((start, n + len(piece) - 1))
        parts.append(piece)
        n += len(piece)
    if add_generation_prompt:
        parts.append(GUANACO_ASSISTANT)
    return "".join(parts), spans


def guanaco_jinja_template() -> str:
    """The Guanaco format as a Jinja chat template, for tokenizers we build (the tiny base).

    Renders exactly what `render(ChatFormat("guanaco"), ...)` renders for the same messages."""
    return (
        "{{ bos_token }}"
        "{% for m in messages %}"
        "{% if m['role'] == 'system' %}{{ m['content'] }}\n"
        "{% elif m['role'] == 'user' %}" + GUANACO_HUMAN + " {{ m['content'] }}\n"
        "{% elif m['role'] == 'assistant' %}" + GUANACO_ASSISTANT + " {{ m['content'] }}{{ eos_token }}\n"
        "{% endif %}{% endfor %}"
        "{% if add_generation_prompt %}" + GUANACO_ASSISTANT + "{% endif %}"
    )


# ── how Ollama writes each format (Go text/template; see `ollama_template`) ─────────────────────
# The pattern (.System first, then one branch per role in `range .Messages`, the assistant header written
# after each user turn) follows LLaMA-Factory's Ollama Modelfile export. Ollama collects the system
# messages into .System and leaves them in .Messages too, so the branches skip the "system" role.
def _ollama_guanaco(tokenizer) -> str:
    return ("{{ if .System }}{{ .System }}\n{{ end }}"
            '{{ range .Messages }}{{ if eq .Role "user" }}' + GUANACO_HUMAN + " {{ .Content }}\n" + GUANACO_ASSISTANT
            + '{{ else if eq .Role "assistant" }} {{ .Content }}' + (tokenizer.eos_token or "") + "\n{{ end }}{{ end }}")


def _ollama_chatml(tokenizer) -> str:
    return ("{{ if .System }}<|im_start|>system\n{{ .System }}<|im_end|>\n{{ end }}"
            '{{ range .Messages }}{{ if eq .Role "user" }}<|im_start|>user\n{{ .Content }}<|im_end|>\n'
            '<|im_start|>assistant\n{{ else if eq .Role "assistant" }}{{ .Content }}<|im_end|>\n{{ end }}{{ end }}')


def _ollama_llama3(tokenizer) -> str:
    # The Jinja template trims each message; Go templates have no trim, so content is used as it is.
    return ("{{ if .System }}<|start_header_id|>system<|end_header_id|>\n\n{{ .System }}<|eot_id|>{{ end }}"
            '{{ range .Messages }}{{ if eq .Role "user" }}<|start_header_id|>user<|end_header_id|>\n\n{{ .Content }}'
            '<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n{{ else if eq .Role "assistant" }}'
            "{{ .Content }}<|eot_id|>{{ end }}{{ end }}")


# ── the registry ───────────────────────────────────────────────────────────────────────────────
@dataclass(frozen=True)
class FormatSpec:
    """One entry of the chat-format registry: everything about a format lives here.

    Rendering: `render(tokenizer, messages, add_generation_prompt)` → (text, reply spans), a format
    rendered by hand; else `template`, a Jinja chat template rendered by transformers; else (with
    `from_tokenizer`) the base tokenizer's own template. `stop`: strings that end a reply besides EOS
    (a `from_tokenizer` format reads its end-of-turn marker off the template instead). `saved_template`:
    the chat template a run's tokenizer is saved with when it has none of its own, for a format that
    has no `template` (Guanaco's, so a bare `apply_chat_template` renders what was trained).
    `ollama(tokenizer)`: the format as an Ollama TEMPLATE (`ollama_template`); `starts_with_bos`: its
    rendering begins with the tokenizer's BOS token, which the exported GGUF asks llama.cpp to add."""

    about: str
    stop: tuple[str, ...] = ()
    template: str | None = None
    render: Callable[..., tuple[str, list[tuple[int, int]]]] | None = None
    from_tokenizer: bool = False
    saved_template: str | None = None
    ollama: Callable[..., str] | None = None
    starts_with_bos: bool = False


FORMATS: dict[str, FormatSpec] = {
    "guanaco": FormatSpec("the QLoRA paper's ### Human: / ### Assistant: lines", (GUANACO_HUMAN,),
                          render=_render_guanaco, saved_template=guanaco_jinja_template(), ollama=_ollama_guanaco,
                          starts_with_bos=True),
    "tokenizer": FormatSpec("the base tokenizer's own chat template", from_tokenizer=True),
    "chatml": FormatSpec("<|im_start|>role ... <|im_end|>", ("<|im_end|>", "<|im_start|>"), CHATML_TEMPLATE,
                         ollama=_ollama_chatml),
    "llama3": FormatSpec("<|start_header_id|>role<|end_header_id|> ... <|eot_id|>", ("<|eot_id|>", "<|start_header_id|>"),
                         LLAMA3_TEMPLATE, ollama=_ollama_llama3, starts_with_bos=True),
}
DEFAULT_FORMAT = "guanaco"  # for bases without a chat template of their own, and the config's default
TOKENIZER = "tokenizer"  # the name a bare base with a chat template is served under (`bare_base_format`)
JINJA = "jinja"  # ChatFormat.name of a format read from a user's .jinja file
MAX_TEMPLATE_BYTES = 64 * 1024  # a chat template is a few hundred bytes; anything near this is not one


def format_choices() -> str:
    """'guanaco, tokenizer, chatml, llama3 or a .jinja file': for help texts and error messages."""
    return ", ".join(FORMATS) + " or a .jinja file"


@dataclass
class ChatFormat:
    """How conversations become text. Saved as `chat_format.json` in every run folder."""

    name: str = DEFAULT_FORMAT  # a FORMATS name, or "jinja" (then `template` holds the file's text)
    system_prompt: str | None = None  # used when a conversation brings no system message
    stop: list[str] = field(default_factory=lambda: list(FORMATS[DEFAULT_FORMAT].stop))  # strings that end a reply
    template: str | None = None  # the Jinja template of template formats (chatml, llama3) and .jinja files

    def __post_init__(self):
        if self.name not in FORMATS and self.name != JINJA:
            raise UserError(f'chat format "{self.name}" is unknown; use {format_choices()}')
        if self.template is None and self.name in FORMATS:
            self.template = FORMATS[self.name].template
        if self.name == JINJA and not self.template:
            raise UserError('chat format "jinja" needs its template text')

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(asdict(self), indent=2) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> "ChatFormat":
        try:
            data = json.loads(Path(path).read_text())
            return cls(name=data["name"], system_prompt=data.get("system_prompt"), stop=list(data.get("stop", [])),
                       template=data.get("template"))
        except (OSError, json.JSONDecodeError, KeyError, TypeError) as e:
            raise UserError(f"{path}: not a readable chat_format.json ({e})") from None


def check_format_name(value: str, key: str = "data.chat_format") -> None:
    """UserError (naming `key`) unless `value` is a registry name or a readable .jinja template file."""
    if value in FORMATS:
        return
    if not str(value).lower().endswith(".jinja"):
        raise ConfigError(key, f'"{value}" is not one of {format_choices()}')
    read_template_file(value, key)


def read_template_file(path: str | Path, key: str = "data.chat_format") -> str:
    """The text of a user's .jinja chat template, checked: a file, at most MAX_TEMPLATE_BYTES, UTF-8,
    valid Jinja (compiled in transformers' sandbox, the one that renders it later)."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise ConfigError(key, f"{path}: no such .jinja file")
    if path.stat().st_size > MAX_TEMPLATE_BYTES:
        raise ConfigError(key, f"{path}: {path.stat().st_size:,} bytes; a chat template has at most "
                               f"{MAX_TEMPLATE_BYTES:,}")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(key, f"{path}: not a readable UTF-8 text file ({e})") from None
    from jinja2 import TemplateError
    from transformers.utils.chat_template_utils import _compile_jinja_template

    try:
        _compile_jinja_template(text)
    except TemplateError as e:
        raise ConfigError(key, f"{path}: not a valid Jinja template (line {getattr(e, 'lineno', '?')}: {e})") from None
    return text


def make_format(value: str, system_prompt: str | None = None, tokenizer=None, key: str = "data.chat_format") -> ChatFormat:
    """The ChatFormat for a registry name or a .jinja file path, with its stop strings.

    `from_tokenizer` formats ("tokenizer") and .jinja files read their end-of-turn marker off the
    template, which needs the `tokenizer` (its BOS/EOS tokens appear in the rendering); a
    `from_tokenizer` format needs one with a template."""
    check_format_name(value, key)
    if value in FORMATS:
        spec = FORMATS[value]
        if spec.from_tokenizer:
            if tokenizer is not None and not getattr(tokenizer, "chat_template", None):
                others = ", ".join(n for n, f in FORMATS.items() if not f.from_tokenizer)
                raise ConfigError(key, f'"{value}" needs a base whose tokenizer has a chat template; this one has '
                                       f"none (use {others} or a .jinja file)")
            stop = end_of_turn(tokenizer, tokenizer.chat_template) if tokenizer is not None else []
            return ChatFormat(name=value, system_prompt=system_prompt, stop=stop)
        return ChatFormat(name=value, system_prompt=system_prompt, stop=list(spec.stop))
    text = read_template_file(value, key)
    stop = end_of_turn(tokenizer, text) if tokenizer is not None else []
    return ChatFormat(name=JINJA, system_prompt=system_prompt, stop=stop, template=text)


def bare_base_format(tokenizer, value: str | None = None, key: str = "--chat-format") -> ChatFormat:
    """How a bare base is prompted: `value` (a registry name or .jinja file) if given, else the base's
    own chat template when it has one, else the default (Guanaco). A template that is the default's
    saved one (the tiny base's) counts as the default, so its stop string comes with it."""
    if value is not None:
        return make_format(value, tokenizer=tokenizer, key=key)
    template = getattr(tokenizer, "chat_template", None)
    if template and template != FORMATS[DEFAULT_FORMAT].saved_template:
        return make_format(TOKENIZER, tokenizer=tokenizer)
    return ChatFormat()


def saved_chat_template(fmt: ChatFormat, tokenizer) -> str | None:
    """The chat template to save a run's tokenizer with, so it renders what was trained on; None: keep
    the tokenizer's own (a `from_tokenizer` format, or one without a template of its own while the
    tokenizer has one)."""
    if fmt.template is not None:
        return fmt.template
    spec = FORMATS.get(fmt.name)
    if spec is not None and spec.saved_template and not getattr(tokenizer, "chat_template", None):
        return spec.saved_template
    return None


def end_of_turn(tokenizer, template: str) -> list[str]:
    """The marker a template writes after an assistant reply (`<|im_end|>`, `<|eot_id|>`, `</s>`), as a
    one-item stop list; [] when there is none to see (whitespace only) or the template cannot render."""
    marker = "\x00reply\x00"
    try:
        text = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}, {"role": "assistant", "content": marker}],
                                             chat_template=template, tokenize=False)
    except Exception:  # noqa: BLE001 — a template that cannot render this fails later with its own message
        return []
    after = text[text.find(marker) + len(marker):].split() if marker in text else []
    return after[:1]


# Conversations that tell templates apart: with and without a system message, one and several turns.
_PROBES = (
    [{"role": "user", "content": "Hi there"}],
    [{"role": "user", "content": "Name a colour."}, {"role": "assistant", "content": "Blue."},
     {"role": "user", "content": "Another?"}],
    [{"role": "system", "content": "You answer briefly."}, {"role": "user", "content": "Hi there"}],
    [{"role": "system", "content": "You answer briefly."}, {"role": "user", "content": "Name a colour."},
     {"role": "assistant", "content": "Blue."}, {"role": "user", "content": "Another?"}],
)
_SENTINEL = "\x1fchatbuild-system\x1f"


def as_named_format(fmt: ChatFormat, tokenizer) -> ChatFormat:
    """`fmt` itself when it is a registry format; for a tokenizer's own or a .jinja template, the
    registry format that renders every probe conversation to the same text, with the template's
    implied default system prompt (SmolLM2's, for one) made explicit. UserError when none does.

    Programs that must write a format in another language (an Ollama TEMPLATE) start from here: a
    run trained on the base's own template is exportable when that template is, say, plain ChatML."""
    if fmt.name in FORMATS and fmt.name != TOKENIZER:
        return fmt
    for name, spec in FORMATS.items():
        if name == TOKENIZER or spec.ollama is None:
            continue
        candidate = ChatFormat(name=name, system_prompt=fmt.system_prompt, stop=list(fmt.stop))
        if fmt.system_prompt is None:
            try:
                candidate.system_prompt = _implied_system(fmt, candidate, tokenizer)
            except UserError:
                continue
        if all(_text(fmt, tokenizer, m) == _text(candidate, tokenizer, m) for m in _PROBES):
            return candidate
    return fmt


def _text(fmt: ChatFormat, tokenizer, messages: list[dict]) -> str | None:
    try:
        return render(fmt, tokenizer, messages, add_generation_prompt=True)[0]
    except (UserError, ValueError):  # a template that refuses a probe matches no format
        return None


def _implied_system(fmt: ChatFormat, candidate: ChatFormat, tokenizer) -> str | None:
    """The system prompt `fmt`'s template puts into a conversation that brings none, read off by
    lining its rendering up with `candidate`'s rendering of a conversation with a marked one."""
    bare = _text(fmt, tokenizer, _PROBES[0])
    if bare is None or bare == _text(candidate, tokenizer, _PROBES[0]):
        return None
    marked = _text(candidate, tokenizer, [{"role": "system", "content": _SENTINEL}, *_PROBES[0]])
    before, _, after = (marked or "").partition(_SENTINEL)
    if not marked or not bare.startswith(before) or not bare.endswith(after) or len(bare) < len(before) + len(after):
        raise UserError("no implied system prompt")
    return bare[len(before):len(bare) - len(after)] or None


def ollama_template(fmt: ChatFormat, tokenizer) -> tuple[str, bool]:
    """(TEMPLATE, starts_with_bos): the run's chat format as an Ollama Modelfile TEMPLATE, and whether
    its rendering begins with BOS (which the template leaves to llama.cpp). UserError for a format that
    has no Ollama template (see the module docstring)."""
    spec = FORMATS.get(fmt.name)
    if spec is None or spec.ollama is None:
        written = ", ".join(n for n, f in FORMATS.items() if f.ollama is not None)
        raise UserError(f'chat format "{fmt.name}" has no Ollama template (chatbuild writes them for {written}, and '
                        "for a template that renders exactly as one of those); fine-tune with one of those to "
                        "export a Modelfile")
    return spec.ollama(tokenizer), spec.starts_with_bos


def stop_token_ids(fmt: ChatFormat, tokenizer) -> set[int]:
    """Ids of the stop strings that are single tokens of `tokenizer` (see the module docstring)."""
    ids = set()
    for s in fmt.stop:
        encoded = tokenizer(s, add_special_tokens=False)["input_ids"]
        if len(encoded) == 1:
            ids.add(encoded[0])
    return ids


def check_messages(messages: list[dict], where: str = "conversation") -> None:
    """Validate the conversation shape: roles known, content a string, system only first,
    user and assistant alternating starting with user."""
    if not messages:
        raise UserError(f"{where}: no messages")
    expected = "user"
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise UserError(f"{where}: message {i} is not an object with role and content")
        role, content = m.get("role"), m.get("content")
        if role not in ROLES:
            raise UserError(f'{where}: message {i} has role "{role}"; expected one of {", ".join(ROLES)}')
        if not isinstance(content, str):
            raise UserError(f"{where}: message {i} ({role}) has no text content")
        if role == "system":
            if i != 0:
                raise UserError(f"{where}: message {i} is a system message; only the first message may be")
            continue
        if role != expected:
            raise UserError(f'{where}: message {i} is "{role}" but "{expected}" was expected (turns alternate)')
        expected = "assistant" if role == "user" else "user"


def _with_system(fmt: ChatFormat, messages: list[dict]) -> list[dict]:
    if fmt.system_prompt and (not messages or messages[0]["role"] != "system"):
        return [{"role": "system", "content": fmt.system_prompt}, *messages]
    return list(messages)


def render(fmt: ChatFormat, tokenizer, messages: list[dict], add_generation_prompt: bool = False):
    """Render a conversation to (text, spans): spans are (start, end) character ranges of what the
    assistant says, each including its end-of-turn marker (EOS)."""
    messages = _with_system(fmt, messages)
    spec = FORMATS.get(fmt.name)
    if spec is not None and spec.render is not None:
        return spec.render(tokenizer, messages, add_generation_prompt)
    return _render_with_template(tokenizer, fmt.template, messages, add_generation_prompt)


def _render_with_template(tokenizer, template, messages, add_generation_prompt):
    """`template` (None: the tokenizer's own) rendered by transformers, with the reply spans found by
    rendering each prefix of the conversation."""
    if template is None and not getattr(tokenizer, "chat_template", None):
        raise UserError(f'chat format "{TOKENIZER}" needs a tokenizer with a chat template; this one has none '
                        f'(use chat_format "{DEFAULT_FORMAT}")')

    def apply(msgs, gen):
        return tokenizer.apply_chat_template(msgs, chat_template=template, tokenize=False, add_generation_prompt=gen)

    text = apply(messages, add_generation_prompt)
    spans = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        before, upto = apply(messages[:i], True), apply(messages[: i + 1], False)
        if not (upto.startswith(before) and text.startswith(upto)):
            raise UserError("the tokenizer's chat template does not render conversations incrementally "
                            f'(an earlier turn changes when a later one is added); use chat_format "{DEFAULT_FORMAT}"')
        spans.append((len(before), len(upto)))
    return text, spans


@dataclass
class Encoded:
    input_ids: list[int]
    labels: list[int]  # IGNORE_INDEX where nothing is learned

    def __len__(self):
        return len(self.input_ids)


def encode(fmt: ChatFormat, tokenizer, messages: list[dict], max_length: int | None = None,
           train_on_prompts: bool = False, last_reply_only: bool = False) -> Encoded:
    """Tokenize a conversation for training (see the module docstring for the label contract).

    Truncation to `max_length` cuts right after the last complete assistant reply (its EOS included)
    that fits and leaves something to learn. If not even the first reply fits, it cuts inside that reply
    and makes the last token EOS (trained), so the example still ends the way a reply ends; a reply is
    never cut down to nothing but EOS. If the prompt alone fills `max_length`, the cut falls in the
    prompt, no EOS is added, and (unless `train_on_prompts`) nothing is left to learn: every label is
    -100 and the caller should drop the example."""
    check_messages(messages)
    text, spans = render(fmt, tokenizer, messages)
    if last_reply_only:  # the other replies are context (encode_reply)
        spans = spans[-1:]
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids, offsets = list(enc["input_ids"]), enc["offset_mapping"]
    in_reply = [any(s <= start < e for s, e in spans) for start, _ in offsets]
    trained = [i > 0 for i in range(len(ids))] if train_on_prompts else list(in_reply)
    if max_length is not None and len(ids) > max_length:
        ids, trained = _truncate(ids, trained, in_reply, offsets, spans, max_length, tokenizer.eos_token_id)
    labels = [t if keep else IGNORE_INDEX for t, keep in zip(ids, trained)]
    return Encoded(ids, labels)


def encode_reply(fmt: ChatFormat, tokenizer, prompt: list[dict], reply: str, max_length: int | None = None) -> Encoded:
    """Tokenize `prompt` (ending with a user turn) followed by the assistant's `reply`, learning only the
    reply (earlier assistant turns are context): one side of a preference pair. Truncation is `encode`'s
    with the reply as the only trained turn: a reply that does not fit is cut with a trained EOS; if the
    prompt alone fills `max_length`, every label is -100 and the caller should drop the pair."""
    return encode(fmt, tokenizer, [*prompt, {"role": "assistant", "content": reply}], max_length, last_reply_only=True)


def _truncate(ids, trained, in_reply, offsets, spans, max_length, eos_id):
    # Token index just past each reply's end: cut points at turn boundaries.
    ends = [next((i for i, (a, _) in enumerate(offsets) if a >= e), len(ids)) for _, e in spans]
    fitting = [k for k in ends if k <= max_length and any(trained[:k])]
    if fitting:
        k = max(fitting)
        return ids[:k], trained[:k]
    k = max(1, max_length)
    if in_reply[k - 1] and (k < 2 or not in_reply[k - 2]):
        k -= 1  # only the reply's first token would fit: cut before the reply instead
    ids, trained = ids[:k], trained[:k]
    if k and in_reply[k - 1] and eos_id is not None:
        ids[-1], trained[-1] = eos_id, True
    return ids, trained


def prompt_ids(fmt: ChatFormat, tokenizer, messages: list[dict]) -> list[int]:
    """Token ids of a serving prompt: the conversation so far, ending where the assistant speaks."""
    check_messages(messages)
    if messages[-1]["role"] != "user":
        raise UserError("a prompt must end with a user message")
    text, _ = render(fmt, tokenizer, messages, add_generation_prompt=True)
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def stop_strings(fmt: ChatFormat) -> list[str]:
    return list(fmt.stop)


def parse_guanaco_text(text: str) -> list[dict]:
    """Split Guanaco-format text ("### Human: ... ### Assistant: ...") into messages.

    Text before the first marker becomes a system message when it is not blank. EOS strings are the
    caller's business (strip them first)."""
    import re

    pieces = re.split(r"(### Human:|### Assistant:)", text)
    messages = []
    head = pieces[0].strip()
    if head:
        messages.append({"role": "system", "content": head})
    for marker, body in zip(pieces[1::2], pieces[2::2]):
        role = "user" if marker == GUANACO_HUMAN else "assistant"
        messages.append({"role": role, "content": body.strip()})
    return messages
