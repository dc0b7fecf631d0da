"""Bad input: property-based fuzzing of every file loader (only documented errors, never another
exception), the HTTP API fuzzed from its own OpenAPI schema (schemathesis: no 5xx, no hang), and the
size and nesting limits of a request body."""

import gzip
import json
import tempfile
from pathlib import Path

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from chatbuild.errors import UserError
from serve.settings import Settings

pytestmark = pytest.mark.reliability

# Field names the loaders look for, so that generated records get past the first checks and reach
# the deeper code (a dict of random keys would be rejected at once, every time).
KEYS = ["messages", "role", "content", "conversations", "from", "value", "instruction", "input", "output",
        "text", "message_id", "parent_id", "message_tree_id", "replies", "prompt", "lang", "rank", "deleted",
        "synthetic", "review_result", "tree_state", "created_date", "question_id", "turns", "model", "answer",
        "answers", "question", "model_a", "model_b", "winner", "judge", "anony", "tstamp", "category", "user",
        "assistant", "human", "gpt", "system", "type"]
SCALARS = (st.none() | st.booleans() | st.integers(-3, 2**70) | st.floats(allow_nan=True) |
           st.sampled_from(["user", "assistant", "system", "human", "gpt", "prompter", "en", "de", "ready_for_export",
                            "model_a", "model_b", "tie", "tie (bothbad)", "", "### Human: hi ### Assistant: yo"]) |
           st.text(max_size=12))
JSON = st.recursive(SCALARS, lambda inner: st.lists(inner, max_size=4) |
                    st.dictionaries(st.sampled_from(KEYS) | st.text(max_size=4), inner, max_size=6), max_leaves=30)
RECORDS = st.lists(JSON, min_size=1, max_size=6)
FUZZ = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def as_file(records, layout: str, folder: Path, suffix: str = ".jsonl") -> Path:
    """Records as JSON lines, one JSON array, gzip'd JSON lines, or raw garbage bytes."""
    path = folder / f"data{'.json' if layout == 'array' else suffix}{'.gz' if layout == 'gzip' else ''}"
    lines = "\n".join(json.dumps(r) for r in records) + "\n"
    if layout == "array":
        path.write_text(json.dumps(records))
    elif layout == "gzip":
        path.write_bytes(gzip.compress(lines.encode()))
    elif layout == "truncated":
        path.write_text(lines[: max(1, len(lines) // 2)])
    else:
        path.write_text(lines)
    return path


def only_user_errors(fn, *args, **kwargs):
    """Call `fn`; a UserError (or subclass, such as InvalidRecord) is a documented answer, anything
    else fails the test with its traceback."""
    try:
        return fn(*args, **kwargs)
    except UserError as e:
        assert str(e).strip() and "\n" not in str(e).strip(), f"not a one-line message: {e!r}"
        return None


@FUZZ
@given(records=RECORDS, layout=st.sampled_from(["lines", "array", "gzip", "truncated"]),
       fmt=st.sampled_from(["auto", "oasst1", "oasst1-trees", "chat", "sharegpt", "alpaca", "guanaco"]),
       mode=st.sampled_from(["top1", "all"]), skip_invalid=st.booleans(), lang=st.sampled_from([None, "en"]))
def test_conversation_loaders_raise_only_user_errors(records, layout, fmt, mode, skip_invalid, lang):
    from chatbuild.data import load_conversations

    with tempfile.TemporaryDirectory() as tmp:
        path = as_file(records, layout, Path(tmp))
        got = only_user_errors(load_conversations, str(path), format=fmt, mode=mode, skip_invalid=skip_invalid,
                               lang=lang)
    if got is not None:
        convs, _ = got
        for conv in convs:  # what a loader returns is well formed
            assert all(m["role"] in ("system", "user", "assistant") and isinstance(m["content"], str)
                       for m in conv["messages"])


@FUZZ
@given(data=st.binary(max_size=300), suffix=st.sampled_from([".jsonl", ".json", ".jsonl.gz"]))
def test_loaders_take_garbage_bytes(data, suffix):
    from chatbuild.battles import read_battles
    from chatbuild.data import load_conversations
    from eval.answers import read_answers
    from eval.questions import read_questions

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / f"garbage{suffix}"
        path.write_bytes(data)
        only_user_errors(load_conversations, str(path))
        only_user_errors(read_questions, path)
        only_user_errors(read_answers, path)
        only_user_errors(read_battles, path)
        only_user_errors(read_battles, path, skip_invalid=True)


@FUZZ
@given(records=RECORDS, skip_invalid=st.booleans())
def test_eval_readers_raise_only_user_errors(records, skip_invalid):
    from chatbuild import storage
    from chatbuild.battles import read_battles
    from eval.answers import read_answers
    from eval.judge import load_answer_files, questions_from_answers
    from eval.questions import read_questions

    with tempfile.TemporaryDirectory() as tmp:
        path = as_file(records, "lines", Path(tmp))
        only_user_errors(read_questions, path)
        only_user_errors(read_battles, path, skip_invalid=skip_invalid)
        only_user_errors(storage.import_battles, Path(tmp) / "db.sqlite", path, skip_invalid=skip_invalid)
        if only_user_errors(read_answers, path) is not None:
            answers = only_user_errors(load_answer_files, [path])
            if answers is not None:
                only_user_errors(questions_from_answers, answers)


# ── the HTTP API ───────────────────────────────────────────────────────────────────────────────
@pytest.fixture(scope="module")
def api(fast_run):
    """An in-process server (uvicorn in a thread, real HTTP) over the tiny model, with small limits."""
    from test_ui_helpers import serving

    from chatbuild.engines.hf import HFEngine
    from serve.app import create_app

    engine = HFEngine.from_runs([fast_run])
    app = create_app(engine, Settings(max_new_tokens=16, max_prompt_tokens=256, max_body_bytes=20_000,
                                      max_running=2, queue_size=64), ui=False)
    with serving(app) as url:
        yield url.rstrip("/"), app
    engine.close()


def test_schema_fuzzing_finds_no_server_error_and_no_hang(api):
    """Every operation of the served OpenAPI schema, with schema-valid and invalid data (schemathesis'
    positive and negative modes), 25 examples each: no answer is a 5xx, none takes over 30 s."""
    import schemathesis
    from hypothesis import given as given_

    url, _ = api
    schema = schemathesis.openapi.from_url(f"{url}/openapi.json")
    statuses, slowest = [], 0.0
    for result in schema.get_all_operations():
        operation = result.ok()
        modes = [schemathesis.GenerationMode.POSITIVE, schemathesis.GenerationMode.NEGATIVE]

        @settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck), database=None)
        @given_(case=operation.as_strategy(generation_mode=modes[0]) | operation.as_strategy(generation_mode=modes[1]))
        def check(case):
            nonlocal slowest
            response = case.call(base_url=url, timeout=30)
            slowest = max(slowest, float(response.elapsed))
            statuses.append(response.status_code)
            assert response.status_code < 500, (case.method, case.path, case.body, response.text[:300])

        check()
    from reliability_helpers import record

    record("schema_fuzzing", requests=len(statuses), server_errors=sum(s >= 500 for s in statuses),
           statuses=sorted(set(statuses)), slowest_s=round(slowest, 2))
    assert len(statuses) >= 50


def post(url: str, content: bytes, **headers) -> httpx.Response:
    return httpx.post(f"{url}/v1/chat/completions", content=content,
                      headers={"content-type": "application/json", **headers}, timeout=60)


def test_oversized_overlong_and_deeply_nested_bodies(api):
    url, _ = api
    hello = {"model": "fast", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
    big = json.dumps({**hello, "messages": [{"role": "user", "content": "x" * 30_000}]}).encode()
    r = post(url, big)
    assert r.status_code == 413 and "max_body_bytes" in r.json()["error"]["message"]

    def chunks():  # no Content-Length: the limit must hold while the body streams in
        yield big[:10_000]
        yield big[10_000:]

    r = httpx.post(f"{url}/v1/chat/completions", content=chunks(), headers={"content-type": "application/json"},
                   timeout=60)
    assert r.status_code == 413

    long_prompt = json.dumps({**hello, "messages": [{"role": "user", "content": "word " * 3000}]}).encode()
    r = post(url, long_prompt)
    assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded"

    depths = {}
    for where in ("top", "content", "tools", "ignored_field"):
        for depth in (1000, 8000):
            nest = "[" * depth + "]" * depth
            body = {"top": nest, "content": f'{{"model": "fast", "messages": [{{"role": "user", "content": {nest}}}]}}',
                    "tools": f'{{"model": "fast", "messages": [{{"role": "user", "content": "hi"}}], "tools": {nest}}}',
                    "ignored_field": f'{{"model": "fast", "messages": [{{"role": "user", "content": "hi"}}], '
                                     f'"x": {nest}}}'}[where]
            r = post(url, body.encode())
            depths[f"{where}/{depth}"] = r.status_code
            assert r.status_code in (400, 413), (where, depth, r.status_code, r.text[:300])
            assert r.json()["error"]["type"] == "invalid_request_error"
    assert httpx.get(f"{url}/healthz").status_code == 200
    from reliability_helpers import record

    record("body_limits", oversized=413, overlong_prompt=400, nested=depths)
