"""Continuous batching in the in-process engine: replies decoded together, for different adapters
and the bare base in one batch, are the replies each request gets alone; rows join mid-flight and
leave (cancelled) without disturbing the others; guided choices and seeded sampling hold in a batch.
Plus the left-padded cache bookkeeping on plain tensors."""

import threading

import pytest

from chatbuild.engines import GenerationParams

PROMPTS = [
    [{"role": "user", "content": "What should I cook tonight?"}],
    [{"role": "user", "content": "Hi"}],
    [{"role": "system", "content": "You answer briefly and kindly, in plain words."},
     {"role": "user", "content": "Can you explain how a rainbow forms after the rain stops?"}],
]
GREEDY = GenerationParams(temperature=0, max_new_tokens=16)
SEEDED = GenerationParams(temperature=1.0, top_p=0.9, top_k=50, max_new_tokens=12, seed=11, repetition_penalty=1.2)


def reply(engine, model, messages, params=GREEDY, cancel=None) -> str:
    return "".join(c.text for c in engine.stream(messages, params, model, cancel=cancel))


def together(engine, requests: list[tuple], on_chunk=None, cancels: dict | None = None) -> list[str]:
    """Run `requests` [(model, messages, params)] concurrently, each read by its own thread (request i
    with the cancel event `cancels[i]`, if any), and return their replies. They are all submitted while
    the decode thread is held up, so they share batches."""
    results, errors = [None] * len(requests), []

    def ask(i, model, messages, params):
        try:
            pieces = []
            for chunk in engine.stream(messages, params, model, cancel=(cancels or {}).get(i)):
                pieces.append(chunk.text)
                if on_chunk:
                    on_chunk(i, chunk)
            results[i] = "".join(pieces)
        except Exception as e:  # reported by the main thread
            errors.append(e)

    threads = [threading.Thread(target=ask, args=(i, *r)) for i, r in enumerate(requests)]
    with engine._lock:  # no forward pass until every request is queued
        for t in threads:
            t.start()
        wait_until(lambda: engine.active == len(requests))
    for t in threads:
        t.join(timeout=120)
    assert not errors, errors
    return results


def wait_until(condition, timeout=30.0):
    import time

    end = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < end, "timed out"
        time.sleep(0.005)


def mixed_requests(engine, params=GREEDY) -> list[tuple]:
    return [(model, messages, params) for model in engine.models() for messages in PROMPTS]


# ── unit: the cache bookkeeping ─────────────────────────────────────────────────────────────
def test_kv_batch_left_pads_joins_and_trims_on_leave():
    import torch
    from transformers import DynamicCache

    from chatbuild.engines.batching import KVBatch

    def row_cache(length, value):
        cache = DynamicCache()
        cache.update(torch.full((1, 2, length, 3), float(value)), torch.full((1, 2, length, 3), -float(value)), 0)
        return cache

    kv = KVBatch()
    kv.join(row_cache(4, 1), 4)
    kv.join(row_cache(2, 2), 2)
    kv.join(row_cache(5, 3), 5)
    assert kv.mask.tolist() == [[0, 1, 1, 1, 1], [0, 0, 0, 1, 1], [1, 1, 1, 1, 1]]
    keys = kv.cache.layers[0].keys
    assert keys.shape == (3, 2, 5, 3)
    assert keys[1, :, :3].abs().sum() == 0 and (keys[1, :, 3:] == 2).all()  # zeros where the mask hides
    kv.step_mask()
    kv.keep([0, 1])  # the longest row leaves: the column only it used goes too
    assert kv.mask.tolist() == [[1, 1, 1, 1, 1], [0, 0, 1, 1, 1]]
    assert kv.cache.layers[0].values.shape == (2, 2, 4, 3) and (kv.cache.layers[0].values[0] == -1).all()
    kv.keep([])
    assert kv.rows == 0


# ── integration: the tiny base in 4 bits, two adapters and the bare base in one batch ──────────
@pytest.mark.integration
def test_batched_greedy_replies_equal_replies_alone(engine):
    requests = mixed_requests(engine)
    alone = [reply(engine, m, msgs, p) for m, msgs, p in requests]
    assert len(set(alone)) > 3, f"the models should answer differently: {alone}"
    before = engine.batch_sizes.copy()
    assert together(engine, requests) == alone
    steps = engine.batch_sizes - before
    assert max(steps) == len(requests), f"the 9 replies should have shared decode steps: {steps}"
    assert engine.active == 0


@pytest.mark.integration
def test_max_batch_bounds_the_batch_and_the_rest_wait(runs):
    from chatbuild.engines.hf import HFEngine

    engine = HFEngine.from_runs([runs["run-a"]], max_batch=2)
    try:
        requests = [(m, msgs, GREEDY) for m in engine.models() for msgs in PROMPTS[:2]]
        alone = [reply(engine, *r) for r in requests]
        assert together(engine, requests) == alone
        assert max(engine.batch_sizes) == 2

        # A request cancelled while it waits for a row ends at once, not when a row frees up.
        running = [engine.stream(PROMPTS[0], GenerationParams(temperature=0, max_new_tokens=300), m)
                   for m in ("run-a", "run-a")]
        for stream in running:
            next(stream)
        cancel = threading.Event()
        waiting = engine.stream(PROMPTS[1], GREEDY, "run-a", cancel=cancel)
        finished = []
        reader = threading.Thread(target=lambda: finished.extend(waiting))
        reader.start()
        wait_until(lambda: engine.active == 3)
        cancel.set()
        reader.join(timeout=30)
        assert finished[-1].finish_reason == "cancelled" and finished[-1].completion_tokens == 0
        assert engine.active == 2
        for stream in running:
            stream.close()
        assert engine.active == 0
    finally:
        engine.close()


@pytest.mark.integration
def test_a_request_joining_mid_flight_gets_its_reply_alone(engine):
    first_alone = reply(engine, "run-a", PROMPTS[0])
    second_alone = reply(engine, "run-b", PROMPTS[2])
    before = engine.batch_sizes.copy()
    scheduler = engine._scheduler
    forward, permits, calls = scheduler.batch.forward, threading.Semaphore(4), []  # the first's prefill + 3 steps

    def gated(*args):
        calls.append(len(args[0]))
        permits.acquire()
        return forward(*args)

    replies = {}

    def read(name, model, messages):
        replies[name] = reply(engine, model, messages)

    scheduler.batch.forward = gated
    try:
        first = threading.Thread(target=read, args=("first", "run-a", PROMPTS[0]))
        first.start()
        wait_until(lambda: len(calls) == 5)  # 4 tokens of the first reply made; the 5th step waits
        second = threading.Thread(target=read, args=("second", "run-b", PROMPTS[2]))
        second.start()
        wait_until(lambda: engine.active == 2)
    finally:
        permits.release(10_000)
        scheduler.batch.forward = forward
    first.join(timeout=60)
    second.join(timeout=60)
    assert replies == {"first": first_alone, "second": second_alone}
    assert (engine.batch_sizes - before)[2] > 0, "the second request should have joined the first's batch"


@pytest.mark.integration
def test_cancelling_one_row_leaves_the_others_undisturbed(engine):
    requests = mixed_requests(engine)
    alone = [reply(engine, m, msgs, p) for m, msgs, p in requests]
    victim = 4
    cancel = threading.Event()
    finishes = {}

    def on_chunk(i, chunk):
        if i == victim:
            cancel.set()
        if chunk.finish_reason:
            finishes[i] = (chunk.finish_reason, chunk.completion_tokens)

    model, messages, _ = requests[victim]
    requests[victim] = (model, messages, GenerationParams(temperature=0, max_new_tokens=200))
    results = together(engine, requests, on_chunk, cancels={victim: cancel})
    assert finishes[victim][0] == "cancelled" and finishes[victim][1] < 200
    assert [r for i, r in enumerate(results) if i != victim] == [r for i, r in enumerate(alone) if i != victim]
    assert engine.active == 0


@pytest.mark.integration
def test_guided_choices_hold_in_a_batch(engine):
    choices = [GenerationParams(temperature=0, choices=["yes", "no"]),
               GenerationParams(temperature=0, choices=["Paris", "London", "Rome"]),
               GenerationParams(temperature=1.0, seed=3, choices=["A", "B"])]
    requests = [(m, PROMPTS[0], p) for m in engine.models() for p in choices] + [("run-a", PROMPTS[1], GREEDY)]
    alone = [reply(engine, *r) for r in requests]
    results = together(engine, requests)
    assert results == alone
    for (_, _, params), text in zip(requests, results, strict=True):
        if params.choices:
            assert text in params.choices


@pytest.mark.integration
def test_seeded_sampling_is_reproducible_alone_and_batched(engine):
    requests = [(m, PROMPTS[0], SEEDED) for m in engine.models()] + [("run-a", PROMPTS[2], GREEDY),
                                                                      ("run-a", PROMPTS[0], SEEDED)]
    alone = [reply(engine, *r) for r in requests]
    assert alone == [reply(engine, *r) for r in requests]
    results = together(engine, requests)
    assert results == alone
    assert results[0] == results[-1]  # the same seeded request twice in one batch


# ── batched and chunked prefill ─────────────────────────────────────────────────────────────
@pytest.mark.integration
def test_prompts_arriving_together_are_prefilled_in_one_pass_and_reply_as_alone(engine):
    """9 prompts for 3 models queued at once: one prefill pass takes several of them (left-padded, each
    with its adapter), and every reply is still the one it gets alone."""
    requests = mixed_requests(engine)
    alone = [reply(engine, m, msgs, p) for m, msgs, p in requests]
    before = engine._scheduler.prefill_sizes.copy()
    assert together(engine, requests) == alone
    passes = engine._scheduler.prefill_sizes - before
    assert max(passes) > 1 and sum(k * v for k, v in passes.items()) == len(requests), passes


@pytest.mark.integration
def test_prompts_joining_at_different_times_reply_like_plain_generate(engine, runs, tiny_base):
    """Four requests start one after another, each once the previous one has made a few tokens, so
    rows join a batch already decoding (and one arrives with two others at once); each greedy reply
    equals transformers' `generate` on a model holding only that request's adapter."""
    import torch
    from peft import PeftModel

    from chatbuild.modeling import load_base_model, load_tokenizer
    from chatbuild.templates import ChatFormat, prompt_ids

    requests = [("run-a", PROMPTS[0]), ("run-b", PROMPTS[2]), (tiny_base.name, PROMPTS[1]), ("run-a", PROMPTS[2])]
    tokenizer = load_tokenizer(str(tiny_base))
    expected = []
    for model, messages in requests:
        reference = load_base_model(str(tiny_base), quant="nf4", compute_dtype="float32", device="cpu")
        if model != tiny_base.name:
            reference = PeftModel.from_pretrained(reference, runs[model] / "adapter")
        ids = prompt_ids(ChatFormat(), tokenizer, messages)
        out = reference.eval().generate(input_ids=torch.tensor([ids]), do_sample=False,
                                        max_new_tokens=GREEDY.max_new_tokens)
        expected.append(tokenizer.decode(out[0, len(ids):], skip_special_tokens=True).split("### Human:")[0].strip())

    scheduler = engine._scheduler
    forward, steps = scheduler.batch.forward, []

    def counted(*args):
        steps.append(args[0].shape)
        return forward(*args)

    replies = [None] * len(requests)

    def read(i):
        replies[i] = reply(engine, *requests[i])

    threads = [threading.Thread(target=read, args=(i,)) for i in range(len(requests))]
    scheduler.batch.forward = counted
    try:
        threads[0].start()
        wait_until(lambda: len(steps) >= 4)  # the first request has decoded a few tokens
        threads[1].start()
        wait_until(lambda: len(steps) >= 8)
        with engine._lock:  # the next two arrive together, while a step runs
            threads[2].start()
            threads[3].start()
            wait_until(lambda: len(scheduler._waiting) == 2)
        for t in threads:
            t.join(timeout=120)
    finally:
        scheduler.batch.forward = forward
    assert replies == expected
    assert any(shape[0] >= 3 and shape[1] == 1 for shape in steps), f"rows should have shared steps: {steps}"


@pytest.mark.integration
def test_a_long_prompt_is_prefilled_in_chunks_while_a_running_reply_goes_on(engine):
    """With `prefill_tokens` 8, no forward pass takes more than 8 tokens a row: a long prompt arriving
    while another reply decodes is prefilled 8 tokens at a time, between the running reply's steps,
    and both replies are the ones they get alone."""
    from chatbuild.engines.batching import PREFILL_TOKENS

    long_alone = reply(engine, "run-b", PROMPTS[2])
    short_alone = reply(engine, "run-a", PROMPTS[0], GenerationParams(temperature=0, max_new_tokens=40))
    scheduler = engine._scheduler
    forward, shapes = scheduler.batch.forward, []

    def recorded(*args):
        shapes.append(tuple(args[0].shape))
        return forward(*args)

    replies = {}
    scheduler.batch.forward, scheduler.prefill_tokens = recorded, 8
    try:
        short = threading.Thread(target=lambda: replies.update(
            short=reply(engine, "run-a", PROMPTS[0], GenerationParams(temperature=0, max_new_tokens=40))))
        short.start()
        wait_until(lambda: len(shapes) >= 3)
        start = len(shapes)
        replies["long"] = reply(engine, "run-b", PROMPTS[2])
        short.join(timeout=120)
    finally:
        scheduler.batch.forward, scheduler.prefill_tokens = forward, PREFILL_TOKENS
    assert replies == {"short": short_alone, "long": long_alone}
    assert max(width for _, width in shapes) <= 8, shapes
    chunks = [i for i in range(start, len(shapes)) if shapes[i][1] > 1]
    assert len(chunks) >= 3, f"the long prompt should have come in several chunks: {shapes}"
    assert any(shapes[i] == (1, 1) for i in range(chunks[1], chunks[-1])), "the running reply should step between chunks"
