"""Attacks on the in-process engine, performed for real against the HF engine over the tiny runs
(fixtures `runs`/`engine`, NF4 on CPU) through the HTTP API (uvicorn in a thread, raw httpx):

- a request whose sampling turns into NaN next to a healthy greedy stream (issue 17 item 2);
- one decode row whose sampler raises, at the scheduler: that row ends alone (issue 17 item 2);
- huge stop strings (item 4);
- 40 clients posting ~1 MB prompts while a small request runs, and a 10 MB UI chat history (item 5);
- out-of-range seed, temperature, repetition_penalty, top_k, NaN and infinities (issue 17 "Low").

What the tokenizer is handed is observed by wrapping `chatbuild.engines.hf.prompt_ids` in a spy that
records the characters of each conversation and then calls the real function.
"""

import json
import threading
import time

import httpx
import pytest
from reliability_helpers import record

from chatbuild.engines import GenerationParams, check_params
from chatbuild.errors import UserError
from serve.settings import Settings

pytestmark = pytest.mark.reliability

HELLO = [{"role": "user", "content": "What should I cook tonight?"}]
MAX_PROMPT_TOKENS = 200


@pytest.fixture(scope="module")
def api(engine):
    """(url, app) of a server over the module's engine: 200 prompt tokens, a 2 MB body limit (so that
    what refuses a 1 MB prompt here is the prompt check, not the body size), 8 slots, 64 queue places."""
    from test_ui_helpers import serving

    from serve.app import create_app

    app = create_app(engine, Settings(max_prompt_tokens=MAX_PROMPT_TOKENS, max_new_tokens=256,
                                      max_body_bytes=2_000_000, max_running=8, queue_size=64), ui=False)
    with serving(app) as url:
        yield url.rstrip("/"), app


def body(model: str, messages=HELLO, **extra) -> dict:
    return {"model": model, "messages": messages, "temperature": 0, "max_tokens": 8, **extra}


def post(url: str, payload: dict | str, timeout: float = 120) -> httpx.Response:
    content = payload if isinstance(payload, str) else json.dumps(payload)
    return httpx.post(f"{url}/v1/chat/completions", content=content, headers={"content-type": "application/json"},
                      timeout=timeout)


def content_of(r: httpx.Response) -> str:
    assert r.status_code == 200, r.text[:300]
    return r.json()["choices"][0]["message"]["content"]


@pytest.fixture
def tokenized(monkeypatch) -> list[int]:
    """Characters of message content of every conversation handed to the tokenizer from now on."""
    import chatbuild.engines.hf as hf

    seen, real = [], hf.prompt_ids

    def spy(fmt, tokenizer, messages):
        seen.append(sum(len(m.get("content", "")) for m in messages if isinstance(m, dict)))
        return real(fmt, tokenizer, messages)

    monkeypatch.setattr(hf, "prompt_ids", spy)
    return seen


def longest_token_chars(engine, model: str) -> int:
    return max(len(t) for t in engine._served(model).tokenizer.get_vocab())


# ── item 2: one request's sampling failure ends that request only ─────────────────────────────
def test_a_nan_making_request_is_refused_and_a_concurrent_greedy_stream_is_untouched(api, engine):
    """The issue's attack: `temperature: 1, repetition_penalty: 1e-44` (scores divided by 1e-44 are
    infinite, their softmax NaN) sent while a greedy stream is decoding. The bad requests get 400
    naming repetition_penalty; the stream's text equals the greedy reply alone."""
    url, _ = api
    base = engine.base_name  # the bare base runs to max_tokens: a stream long enough to be hit
    greedy = body(base, max_tokens=48)
    alone = content_of(post(url, greedy))
    started, lines = threading.Event(), []

    def stream():
        with httpx.Client(timeout=120) as http, http.stream("POST", f"{url}/v1/chat/completions",
                                                            json={**greedy, "stream": True}) as r:
            for line in r.iter_lines():
                lines.append(line)
                if '"content": "' in line and '"content": ""' not in line:
                    started.set()

    reader = threading.Thread(target=stream)
    reader.start()
    assert started.wait(120), "the greedy stream never started"
    prompts = ["Hi", "Tell me a story about a cat.", "What is two plus two?", "Name a colour."]
    bad = [post(url, body(base, [{"role": "user", "content": p}], temperature=1, repetition_penalty=1e-44,
                          max_tokens=32)) for p in prompts]
    reader.join(timeout=120)
    text = "".join(json.loads(line[6:])["choices"][0]["delta"].get("content", "") for line in lines
                   if line.startswith("data: {") and '"choices": [{' in line)
    assert not any('"error"' in line for line in lines), lines[-3:]
    assert [line for line in lines if line][-1] == "data: [DONE]" and text == alone
    for r in bad:
        assert r.status_code == 400, r.text[:300]
        error = r.json()["error"]
        assert error["param"] == "repetition_penalty" and "repetition_penalty" in error["message"]


def test_a_row_whose_sampling_fails_ends_alone_and_the_batch_goes_on(engine):
    """The scheduler with the real model: three greedy rows, one row whose picker raises at its third
    token, and one whose picker is the engine's own sampler with `repetition_penalty=1e-44` (real NaN
    probabilities; built directly because the engine's checks refuse that value), all in one batch.
    The two bad rows end with their own errors; the greedy rows get the tokens they get alone."""
    from chatbuild.engines.batching import Request
    from chatbuild.engines.hf import _eos_ids, _token_picker

    served = engine._served(engine.base_name)
    prompts = [engine._prompt(served, [{"role": "user", "content": text}])
               for text in ("What should I cook tonight?", "Hi", "Name a colour.")]
    eos = _eos_ids(served.tokenizer, engine.model)

    def run(requests: list[Request]) -> list[list[int] | Exception]:
        with engine._lock:  # no forward pass until all are queued: they share batches
            for request in requests:
                engine._scheduler.submit(request)
        results = []
        for request in requests:
            tokens = []
            while True:
                event = request.events.get(timeout=120)
                if isinstance(event, Exception):
                    tokens = event
                    break
                token, finish = event
                if token is not None:
                    tokens.append(token)
                if finish:
                    break
            results.append(tokens)
        return results

    def greedy(ids):
        return Request(ids, served.adapter, _token_picker(GenerationParams(temperature=0), engine.device), eos, 24)

    alone = [run([greedy(ids)])[0] for ids in prompts]
    calls = []

    def faulty(seen, logits):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("injected sampling fault")
        return int(logits.argmax(dim=-1))

    nan_picker = _token_picker(GenerationParams(temperature=1.0, repetition_penalty=1e-44, seed=3), engine.device)
    together = run([greedy(prompts[0]), Request(prompts[1], served.adapter, faulty, eos, 24), greedy(prompts[1]),
                    Request(prompts[2], served.adapter, nan_picker, eos, 24), greedy(prompts[2])])
    assert [together[0], together[2], together[4]] == alone
    assert isinstance(together[1], RuntimeError) and "injected sampling fault" in str(together[1])
    assert isinstance(together[3], Exception) and "not finite" in str(together[3])
    assert run([greedy(prompts[0])])[0] == alone[0]  # the scheduler and its cache are fine afterwards


# ── item 4: stop strings ─────────────────────────────────────────────────────────────────────
def test_huge_stop_strings_are_refused_and_legitimate_ones_leave_replies_alone(api, engine):
    """Three 240 KB stop strings (the issue's attack: every token rebuilt all their prefixes): 400
    naming `stop`, and refused by the engine's own check too. Four stop strings at the length limit
    that never occur: the same reply as without them. Per-token cost of the stop check, recorded."""
    from chatbuild.engines.hf import ReplyText

    url, _ = api
    base = engine.base_name
    huge = [f"{i}" + "x" * 240_000 for i in range(3)]
    r = post(url, body(base, stop=huge, max_tokens=2))
    assert r.status_code == 400 and r.json()["error"]["param"] == "stop", r.text[:300]
    from chatbuild.engines import STOP_MAX_CHARS

    assert str(STOP_MAX_CHARS) in r.json()["error"]["message"]
    with pytest.raises(UserError, match="stop"):
        check_params(GenerationParams(stop=huge))

    legit = [f"{i}" + "\u2603" * (STOP_MAX_CHARS - 1) for i in range(4)]
    assert content_of(post(url, body(base, stop=legit, max_tokens=48))) == content_of(post(url, body(base, max_tokens=48)))

    tokenizer = engine._served(base).tokenizer
    ids = tokenizer("the cat sat on the mat and then it went home to sleep " * 40, add_special_tokens=False)["input_ids"]
    costs = {}
    for name, stops in {"none": [], "4 x 256 chars": legit, "3 x 240 KB": huge}.items():
        text = ReplyText(tokenizer, stops)
        n = len(ids) if name != "3 x 240 KB" else 20
        t0 = time.perf_counter()
        for token in ids[:n]:
            text.push(token)
        costs[name] = round((time.perf_counter() - t0) / n * 1e3, 3)
    record("stop_strings", ms_per_token=costs, huge_stop_status=r.status_code)


# ── item 5: prompts too long to tokenize ─────────────────────────────────────────────────────
def test_huge_prompts_are_refused_without_tokenizing_and_a_small_request_is_not_held_up(api, engine, tokenized):
    """40 clients post ~1 MB prompts at once while a 4-token request runs: every big one gets 400
    `context_length_exceeded` without the tokenizer seeing its text (at most max_prompt_tokens × the
    longest token's characters reach it), and the small request's reply is its greedy reply alone.
    Its latency, alone and under the attack, is recorded."""
    url, _ = api
    model = "run-a"
    small = body(model, max_tokens=4)
    expected = content_of(post(url, small))
    t0 = time.monotonic()
    content_of(post(url, small))
    alone_s = time.monotonic() - t0

    big = json.dumps(body(model, [{"role": "user", "content": "word " * 200_000}]))
    go, answers = threading.Barrier(41), []

    def attacker():
        go.wait()
        answers.append(post(url, big))

    threads = [threading.Thread(target=attacker) for _ in range(40)]
    for t in threads:
        t.start()
    go.wait()
    t0 = time.monotonic()
    reply = post(url, small)
    attacked_s = time.monotonic() - t0
    for t in threads:
        t.join(timeout=120)
    ceiling = MAX_PROMPT_TOKENS * longest_token_chars(engine, model)
    record("huge_prompts", clients=40, prompt_bytes=len(big), refused=sum(a.status_code == 400 for a in answers),
           small_request_alone_s=round(alone_s, 3), small_request_under_attack_s=round(attacked_s, 3),
           most_chars_tokenized=max(tokenized, default=0), char_ceiling=ceiling)
    assert content_of(reply) == expected
    assert len(answers) == 40
    for a in answers:
        assert a.status_code == 400 and a.json()["error"]["code"] == "context_length_exceeded", a.text[:300]
        assert "characters" in a.json()["error"]["message"]
    assert max(tokenized) <= ceiling, "a hopeless prompt reached the tokenizer"


def test_a_huge_ui_chat_history_is_refused_without_tokenizing(engine, tokenized, tmp_path):
    """The prompt check every UI reply runs first (`serve.ui_common.stream_reply`, through the server's
    one path, `serve.generation.generate`) with a 10 MB chat history: a one-line refusal naming the
    limit, and the tokenizer never sees it."""
    import asyncio

    from serve.api import ServeState
    from serve.ui_common import UIContext, stream_reply

    ctx = UIContext(ServeState(Settings(max_prompt_tokens=MAX_PROMPT_TOKENS), engine=engine), tmp_path / "db.sqlite")

    async def first_progress(messages):
        replies = stream_reply(ctx, messages, GenerationParams(temperature=0, max_new_tokens=1), "run-a",
                               threading.Event())
        try:
            return await anext(replies)
        finally:
            await replies.aclose()

    history = []
    for i in range(100):
        history += [{"role": "user", "content": f"question {i} " + "x" * 50_000},
                    {"role": "assistant", "content": "y" * 50_000}]
    history.append({"role": "user", "content": "and now?"})
    with pytest.raises(UserError) as e:
        asyncio.run(first_progress(history))
    assert "\n" not in str(e.value) and "max_prompt_tokens" in str(e.value)
    assert max(tokenized, default=0) <= MAX_PROMPT_TOKENS * longest_token_chars(engine, "run-a")
    assert asyncio.run(first_progress(HELLO)).completion_tokens >= 0  # a normal conversation passes


# ── "Low": numbers out of range are 400 naming the field, never 500 ──────────────────────────
OUT_OF_RANGE = [
    ("seed", 2**64), ("seed", -2**70), ("seed", -1),
    ("temperature", 2.5), ("temperature", -0.5),
    ("repetition_penalty", 1e-300), ("repetition_penalty", 1e-44), ("repetition_penalty", 0.1),
    ("repetition_penalty", 10.0),
    ("top_k", 10**30), ("top_p", 1.5),
]
NOT_FINITE = [("temperature", "NaN"), ("temperature", "Infinity"), ("top_p", "NaN"),
              ("repetition_penalty", "Infinity"), ("repetition_penalty", "-Infinity"), ("repetition_penalty", "1e999")]


def test_out_of_range_numbers_are_400_naming_the_field(api, engine):
    url, _ = api
    statuses = {}
    for field, value in OUT_OF_RANGE:
        r = post(url, body(engine.base_name, **{field: value}, max_tokens=2))
        statuses[f"{field}={value}"] = r.status_code
        assert r.status_code == 400, (field, value, r.text[:300])
        error = r.json()["error"]
        assert error["param"] == field and field in error["message"], (field, value, error)
    for field, literal in NOT_FINITE:  # JSON has no NaN; Python's parser (and pydantic's) accept these anyway
        raw = json.dumps(body(engine.base_name, max_tokens=2))[:-1] + f', "{field}": {literal}}}'
        r = post(url, raw)
        statuses[f"{field}={literal}"] = r.status_code
        assert r.status_code == 400 and r.json()["error"]["param"] == field, (field, literal, r.text[:300])
    record("out_of_range_numbers", cases=len(statuses), statuses=sorted(set(statuses.values())))


def test_a_tiny_temperature_decodes_greedily(api, engine):
    """`temperature: 1e-45` (the issue's 500: logits divided by it overflow) is below the greedy
    threshold: the reply is the greedy one."""
    url, _ = api
    greedy = content_of(post(url, body(engine.base_name, max_tokens=12)))
    for t in (1e-45, 1e-300, 1e-3):
        assert content_of(post(url, body(engine.base_name, temperature=t, max_tokens=12))) == greedy


def test_the_ui_refuses_out_of_range_sampling_values_in_one_line(tmp_path):
    """`serve.ui_common.params_from`, which every UI event runs on the sliders' values (which a
    gradio_client caller sets to anything): a one-line UserError naming the field."""
    from serve.api import ServeState
    from serve.ui_common import UIContext, params_from

    ctx = UIContext(ServeState(Settings()), tmp_path / "db.sqlite")
    assert params_from(ctx, 0.7, 0.9, 64, 40, 1.1, 7) == GenerationParams(
        temperature=0.7, top_p=0.9, max_new_tokens=64, top_k=40, repetition_penalty=1.1, seed=7)
    cases = [("seed", dict(seed=2**64)), ("seed", dict(seed=float("inf"))), ("seed", dict(seed="abc")),
             ("temperature", dict(temperature=float("nan"))), ("temperature", dict(temperature=9)),
             ("repetition_penalty", dict(repetition_penalty=1e-300)), ("top_k", dict(top_k=10**30)),
             ("top_p", dict(top_p=float("inf")))]
    for field, values in cases:
        args = dict(temperature=0.7, top_p=0.9, max_new_tokens=64, top_k=0, repetition_penalty=1.0, seed=-1) | values
        with pytest.raises(UserError, match=field) as e:
            params_from(ctx, **args)
        assert "\n" not in str(e.value)


def test_an_out_of_range_seed_through_gradio_client_gets_a_one_line_refusal(tmp_path):
    """Seeds beyond 64 bits sent to the Chat tab's /chat endpoint with gradio_client (the Seed box has
    no maximum; the sliders' own bounds Gradio checks itself). A scripted engine: what is tested is
    the UI's check, which comes before any engine. Each is refused with a one-line readout naming
    the field, and no request reaches the engine."""
    pytest.importorskip("gradio_client")
    from test_ui_helpers import ScriptedEngine, gradio_client, serving, ui_app

    engine = ScriptedEngine()
    cases = [("seed", dict(seed=2**64)), ("seed", dict(seed=10**30))]
    with serving(ui_app(engine, tmp_path / "db.sqlite")) as url, gradio_client(url, download_files=False) as client:
        for field, values in cases:
            a = dict(temperature=0.7, top_p=1.0, max_new_tokens=4, top_k=0, repetition_penalty=1.0, seed=None) | values
            history, box, readout = client.predict("hello", [], "alpha", "", a["temperature"], a["top_p"],
                                                   a["max_new_tokens"], a["top_k"], a["repetition_penalty"],
                                                   a["seed"], api_name="/chat")
            assert history == [] and box == "hello", (field, history)
            assert field in readout and "\n" not in readout.strip(), (field, readout)
    assert engine.requests == []
