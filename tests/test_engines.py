"""The in-process engine: the right adapter answers each request (checked against plain PEFT),
concurrent requests get exactly what they would get alone, cancel really stops, stop strings and
token counts hold; plus the reply-text streaming rules on a fake tokenizer and the engine factory."""

import shutil
import subprocess
import sys
import threading

import pytest
import yaml
from runfolders import make_run

from chatbuild.engines import GenerationParams, PromptTooLong, UnknownModel, check_params, open_engine
from chatbuild.errors import UserError

HELLO = [{"role": "user", "content": "What should I cook tonight?"}]
GREEDY = GenerationParams(temperature=0, max_new_tokens=8)


@pytest.fixture(scope="module")
def solo(engine) -> dict[str, str]:
    """Each model's greedy reply to HELLO, generated alone."""
    return {m: reply(engine, m) for m in engine.models()}


def reply(engine, model, messages=HELLO, params=GREEDY, cancel=None) -> str:
    return "".join(c.text for c in engine.stream(messages, params, model, cancel=cancel))


def long_params(n: int = 400) -> GenerationParams:
    return GenerationParams(temperature=0, max_new_tokens=n)


# ── unit: no model ──────────────────────────────────────────────────────────────────────────
class FallbackTokenizer:
    """Decodes like a SentencePiece tokenizer with byte fallback: a run of byte tokens (`<0x..>`)
    becomes text only if the whole run is valid UTF-8, else one U+FFFD per byte."""

    PIECES = {1: " caf", 2: 0xC3, 3: 0xA9, 4: " ok", 5: "\n", 6: "###", 7: " Human:", 8: " ##", 9: "x", 10: 0x33, 11: 0xD7}

    def convert_ids_to_tokens(self, i):
        piece = self.PIECES[i]
        return f"<0x{piece:02X}>" if isinstance(piece, int) else piece

    def decode(self, ids, skip_special_tokens=True):
        out, run = [], bytearray()
        for piece in [self.PIECES[i] for i in ids] + [""]:
            if isinstance(piece, int):
                run.append(piece)
                continue
            try:
                out.append(run.decode("utf-8"))
            except UnicodeDecodeError:
                out.append("\ufffd" * len(run))
            run.clear()
            out.append(piece)
        return "".join(out)


def test_reply_text_releases_only_what_cannot_change():
    from chatbuild.engines.hf import ReplyText

    def pushes(ids, stop=("### Human:",)):
        text = ReplyText(FallbackTokenizer(), list(stop))
        return text, [text.push(i) for i in ids]

    # " caf" → "caf" (the reply's leading space dropped); the bytes C3 A9 wait until a normal token
    # follows; "\n" waits (trailing whitespace); "###" could start the stop string.
    text, out = pushes([1, 2, 3, 4, 5, 6])
    assert out == [("caf", False), ("", False), ("", False), ("é ok", False), ("", False), ("", False)]
    assert text.push(7) == ("", True)  # the stop string completed: the reply ends at "ok"
    assert text.sent == "café ok"

    text, out = pushes([9, 8, 9])  # " ##" might begin "### Human:" ... and then did not
    assert out == [("x", False), ("", False), (" ##x", False)]

    # 0x33 alone is "3", but 33 D7 together is invalid: both bytes become U+FFFD. Nothing is sent
    # that the whole decode later contradicts.
    text, out = pushes([9, 10, 11, 9])
    assert "".join(piece for piece, _ in out) + text.flush() == FallbackTokenizer().decode([9, 10, 11, 9]) == "x\ufffd\ufffdx"


def test_check_params_names_the_field():
    check_params(GenerationParams())
    for field, value in [("temperature", -1.0), ("top_p", 0.0), ("max_new_tokens", 0), ("repetition_penalty", 0.0),
                         ("top_k", -1)]:
        with pytest.raises(UserError, match=field):
            check_params(GenerationParams(**{field: value}))


def test_open_engine_refuses_unknown_kinds_and_missing_urls():
    with pytest.raises(UserError, match="unknown"):
        open_engine([], kind="tgi")
    with pytest.raises(UserError, match="URL"):
        open_engine([], kind="openai")
    with pytest.raises(UserError, match="nothing to serve"):
        open_engine([])


def test_the_openai_engine_serves_run_folders_with_their_stop_strings(tiny_base, tmp_path):
    """A run folder given to `--engine openai` names its model and brings its chat format: the remote
    request carries the run's stop strings and default system prompt. The remote end is our own
    server over a scripted engine that records what it was asked."""
    import json

    from test_ui_helpers import ScriptedEngine, serving

    from serve.app import create_app
    from serve.settings import Settings

    run = make_run(tiny_base, tmp_path / "alpha", "alpha", seed=3)
    fmt = json.loads((run / "chat_format.json").read_text())
    fmt["system_prompt"] = "Be brief."
    (run / "chat_format.json").write_text(json.dumps(fmt))
    scripted = ScriptedEngine(names=("alpha", "beta"))
    with serving(create_app(scripted, Settings(), ui=False)) as url:
        engine = open_engine([run, "beta"], kind="openai", url=url + "v1")
        try:
            assert engine.models() == ["alpha", "beta"]
            list(engine.stream(HELLO, GenerationParams(max_new_tokens=3, stop=["END"]), "alpha"))
            list(engine.stream(HELLO, GenerationParams(max_new_tokens=3), "beta"))
        finally:
            engine.close()
    (messages_a, params_a, _), (messages_b, params_b, _) = scripted.requests
    assert params_a.stop == ["END", *fmt["stop"]] and fmt["stop"]
    assert messages_a[0] == {"role": "system", "content": "Be brief."} and messages_a[1:] == HELLO
    assert params_b.stop == [] and messages_b == HELLO  # a plain model name: passed through unchanged


def test_remote_engines_declare_no_optional_capabilities():
    """The remote and vLLM engines are ChatEngines whose server counts tokens and loads adapters, so
    neither capability protocol holds: serve/ skips its prompt count and the Build tab does not
    hot-load onto them. (Construction opens no connection.)"""
    from chatbuild.engines import ChatEngine, CountsTokens, LoadsAdapters
    from chatbuild.engines.remote import FormattedEngine, RemoteEngine
    from chatbuild.engines.vllm import VLLMEngine

    remote = RemoteEngine("http://127.0.0.1:9", models=["alpha"])
    try:
        for engine in (remote, FormattedEngine(remote, {}), VLLMEngine(remote, process=None, chat_formats={})):
            assert isinstance(engine, ChatEngine), type(engine).__name__
            assert not isinstance(engine, CountsTokens) and not isinstance(engine, LoadsAdapters), type(engine).__name__
    finally:
        remote.close()


def test_importing_engines_stays_light():
    code = "import chatbuild.engines, sys; print(' '.join(sys.modules))"
    loaded = set(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split())
    heavy = {"torch", "transformers", "peft", "bitsandbytes", "fastapi", "httpx", "gradio"}
    assert not loaded & heavy


# ── integration: the tiny base in 4 bits with two random adapters ───────────────────────────
@pytest.mark.integration
def test_models_are_the_runs_then_the_base(engine, tiny_base):
    assert engine.models() == ["run-a", "run-b", tiny_base.name]


@pytest.mark.integration
def test_the_hf_engine_counts_tokens_and_loads_adapters(engine, runs):
    """Both optional capabilities, as `isinstance` checks (what serve/ asks), and its base key is the
    runs' own `Run.base_key()`."""
    from chatbuild.engines import ChatEngine, CountsTokens, LoadsAdapters
    from chatbuild.runs import load_run

    assert isinstance(engine, ChatEngine) and isinstance(engine, CountsTokens) and isinstance(engine, LoadsAdapters)
    assert engine.base_key == load_run(runs["run-a"]).base_key() == load_run(runs["run-b"]).base_key()
    assert engine.count_tokens(HELLO, "run-a") > 0


@pytest.mark.integration
def test_each_model_answers_like_plain_peft_with_only_its_adapter(engine, runs, tiny_base, solo):
    """The adapter chosen per request is the one applied, and "__base__" is the bare base: each greedy
    reply equals transformers' generate on a model holding only that adapter (or none)."""
    import torch
    from peft import PeftModel

    from chatbuild.modeling import load_base_model, load_tokenizer
    from chatbuild.templates import ChatFormat, prompt_ids

    tokenizer = load_tokenizer(str(tiny_base))
    ids = prompt_ids(ChatFormat(), tokenizer, HELLO)
    for model, adapter in [("run-a", runs["run-a"] / "adapter"), ("run-b", runs["run-b"] / "adapter"),
                           (tiny_base.name, None)]:
        reference = load_base_model(str(tiny_base), quant="nf4", compute_dtype="float32", device="cpu")
        if adapter is not None:
            reference = PeftModel.from_pretrained(reference, adapter)
        out = reference.eval().generate(input_ids=torch.tensor([ids]), do_sample=False,
                                        max_new_tokens=GREEDY.max_new_tokens)
        expected = tokenizer.decode(out[0, len(ids):], skip_special_tokens=True).split("### Human:")[0].strip()
        assert solo[model] == expected, model
    assert len(set(solo.values())) == 3, f"the adapters should change the replies: {solo}"


@pytest.mark.integration
def test_concurrent_requests_for_different_models_get_what_they_get_alone(engine, solo):
    models = engine.models()
    together = threading.Barrier(len(models))  # all three are mid-generation at once
    results, errors = {}, []

    def ask(model):
        try:
            pieces = []
            for i, chunk in enumerate(engine.stream(HELLO, GREEDY, model)):
                pieces.append(chunk.text)
                if i == 0:
                    together.wait(timeout=60)
            results[model] = "".join(pieces)
        except Exception as e:  # reported by the main thread
            errors.append(e)

    threads = [threading.Thread(target=ask, args=(m,)) for m in models]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert results == solo
    assert engine.active == 0


@pytest.mark.integration
def test_setting_cancel_stops_generation_at_the_next_token(engine):
    cancel = threading.Event()
    stream = engine.stream(HELLO, long_params(), "run-a", cancel=cancel)
    first = next(stream)
    assert engine.active == 1 and first.finish_reason is None
    cancel.set()
    rest = list(stream)
    assert rest[-1].finish_reason == "cancelled"
    assert rest[-1].completion_tokens <= first.completion_tokens + 1
    assert engine.active == 0
    assert engine.recent[-1].finish_reason == "cancelled"


@pytest.mark.integration
def test_closing_the_iterator_stops_generation(engine):
    stream = engine.stream(HELLO, long_params(), "run-b")
    first = next(stream)
    assert engine.active == 1
    stream.close()
    assert engine.active == 0
    record = engine.recent[-1]
    assert record.model == "run-b" and record.finish_reason == "cancelled"
    assert record.completion_tokens == first.completion_tokens  # not one token more


@pytest.mark.integration
def test_stop_strings_cut_the_reply_and_usage_counts_tokens(engine, solo):
    full = solo["run-a"]
    stop = next((full[i:i + 2] for i in range(len(full) // 3, len(full) - 1) if full[i:i + 2].isalnum()), None)
    assert stop, f"no stop string to pick from the reply {full!r}"
    chunks = list(engine.stream(HELLO, GenerationParams(temperature=0, max_new_tokens=8, stop=[stop]), "run-a"))
    assert "".join(c.text for c in chunks) == full[:full.index(stop)].rstrip()
    assert chunks[-1].finish_reason == "stop"
    assert all(c.finish_reason is None for c in chunks[:-1])
    prompt = engine.count_tokens(HELLO, "run-a")
    assert {c.prompt_tokens for c in chunks} == {prompt}
    counts = [c.completion_tokens for c in chunks]
    assert counts == sorted(counts) and 1 <= counts[-1] <= 8

    whole = list(engine.stream(HELLO, GREEDY, "run-a"))
    assert whole[-1].finish_reason == "length" and whole[-1].completion_tokens == 8


@pytest.mark.integration
def test_seeded_sampling_is_reproducible(engine):
    params = GenerationParams(temperature=1.0, top_p=0.9, top_k=50, max_new_tokens=6, seed=7, repetition_penalty=1.2)
    assert reply(engine, "run-b", params=params) == reply(engine, "run-b", params=params)


@pytest.mark.integration
def test_unknown_models_long_prompts_and_bad_conversations_are_refused_before_generating(engine, tiny_base):
    with pytest.raises(UnknownModel, match=f"run-a, run-b, {tiny_base.name}"):
        engine.stream(HELLO, GREEDY, "gpt-5")
    with pytest.raises(PromptTooLong, match="at most 1023") as e:
        engine.stream([{"role": "user", "content": "word " * 3000}], GREEDY, "run-a")
    assert e.value.tokens > 1023
    with pytest.raises(UserError, match="must end with a user message"):
        engine.stream([*HELLO, {"role": "assistant", "content": "Soup."}], GREEDY, "run-a")
    assert engine.active == 0


@pytest.mark.integration
def test_runs_on_different_bases_are_refused(runs, tmp_path):
    from chatbuild.engines.hf import HFEngine

    other = shutil.copytree(runs["run-b"], tmp_path / "other")
    config = yaml.safe_load((other / "config.yaml").read_text())
    config["model"]["base"] = "someone/another-base"
    (other / "config.yaml").write_text(yaml.safe_dump(config))
    with pytest.raises(UserError, match="different bases.*one `chatbuild serve` per base"):
        HFEngine.from_runs([runs["run-a"], other])


@pytest.mark.integration
def test_same_names_get_suffixes_and_adapters_hot_load(runs, tiny_base, tmp_path, solo):
    from chatbuild.engines.hf import HFEngine

    twin = shutil.copytree(runs["run-a"], tmp_path / "twin")  # another folder, the same run name
    engine = HFEngine.from_runs([], base=str(tiny_base))  # a bare base: the first adapter wraps it in PEFT
    try:
        assert engine.models() == [tiny_base.name]
        assert reply(engine, tiny_base.name) == solo[tiny_base.name]
        engine.load_adapter(engine.unique_name("run-a"), runs["run-a"])
        engine.load_adapter(engine.unique_name("run-a"), twin)
        engine.load_adapter("hot-b", runs["run-b"])
        assert engine.models() == ["run-a", "run-a-2", "hot-b", tiny_base.name]
        assert reply(engine, "run-a-2") == solo["run-a"]
        assert reply(engine, "hot-b") == solo["run-b"]
        assert reply(engine, tiny_base.name) == solo[tiny_base.name]
        with pytest.raises(UserError, match="already served"):
            engine.load_adapter("hot-b", runs["run-b"])
    finally:
        engine.close()
