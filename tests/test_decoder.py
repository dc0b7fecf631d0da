"""The fast decode path (`chatbuild.engines.decoder`, issue 22): its logits equal transformers' own
forward pass step for step (tiny base and SmolLM2, with mixed LoRA adapters in one batch); the slot
bookkeeping (rows leaving, a long prompt's chunks while rows leave, the cache growing) keeps every
row's cache; the engine's `decoder` choice ("fast", "hf", "auto") and its refusals of what the fast
path does not run (DoRA adapters), with the reason."""

import json
import shutil

import pytest

from chatbuild.engines import GenerationParams
from tests.test_engine_batching import PROMPTS, together

GREEDY = GenerationParams(temperature=0, max_new_tokens=16)


def with_two_adapters(model, rank=8):
    """Random LoRA adapters a and b on every linear layer (A and B random: both change the outputs)."""
    import torch
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=rank, lora_alpha=2 * rank, target_modules="all-linear", init_lora_weights=False)
    torch.manual_seed(0)
    model = get_peft_model(model, config, adapter_name="a")
    model.add_adapter("b", config)
    return model.eval()


def hf_greedy(model, prompt: list[int], adapter: str, steps: int):
    """transformers' forward with a DynamicCache, greedy, one row: the tokens and each step's logits."""
    import torch
    from transformers import DynamicCache

    cache, ids, tokens, logits = DynamicCache(), torch.tensor([prompt]), [], []
    for _ in range(steps):
        out = model(input_ids=ids, past_key_values=cache, use_cache=True, adapter_names=[adapter])
        logits.append(out.logits[0, -1].float())
        tokens.append(int(logits[-1].argmax()))
        ids = torch.tensor([[tokens[-1]]])
    return tokens, logits


def fast_greedy(decoder, prompts: list[list[int]], adapters: list[str], steps: int, slots=None):
    """The decoder on several rows at once (batched right-padded prefill, then one step per token)."""
    import torch

    slots = slots or list(range(len(prompts)))
    width = max(map(len, prompts))
    ids = torch.tensor([p + [0] * (width - len(p)) for p in prompts])
    lengths = [len(p) for p in prompts]
    tokens, logits = [[] for _ in prompts], [[] for _ in prompts]
    out = decoder.forward(ids, slots, [0] * len(prompts), [n - 1 for n in lengths], adapters)
    for _ in range(steps):
        for i in range(len(prompts)):
            logits[i].append(out[i])
            tokens[i].append(int(out[i].argmax()))
        if len(tokens[0]) == steps:
            break
        out = decoder.forward(torch.tensor([[t[-1]] for t in tokens]), slots, lengths, [0] * len(prompts), adapters)
        lengths = [n + 1 for n in lengths]
    return tokens, logits


def assert_same_steps(fast_logits, hf_logits, tol):
    import torch

    for step, (a, b) in enumerate(zip(fast_logits, hf_logits, strict=True)):
        assert torch.allclose(a, b, atol=tol, rtol=0), f"step {step}: max difference {float((a - b).abs().max())}"


@pytest.fixture(scope="module")
def tiny_fp32(tiny_base):
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_base, dtype=torch.float32)
    return with_two_adapters(model)


@pytest.mark.parametrize("rows", [1, 3])
def test_fast_logits_equal_transformers_step_by_step_on_the_tiny_base(tiny_fp32, rows):
    """Prompts of different lengths in one batch, rows on adapter a, adapter b and the bare base: each
    row's logits at every step equal transformers' forward for that row alone (to float rounding), and
    so do the greedy tokens."""
    import torch

    from chatbuild.engines.decoder import SlotDecoder

    prompts = [[1, 5, 9, 13, 17, 21, 4, 8], [1, 7, 3], [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 30]][:rows]
    adapters = ["a", "b", "__base__"][:rows]
    decoder = SlotDecoder.for_model(tiny_fp32, slots=4)
    with torch.inference_mode():
        tokens, logits = fast_greedy(decoder, prompts, adapters, steps=10, slots=[1, 2, 3][:rows])
        for i, (prompt, adapter) in enumerate(zip(prompts, adapters, strict=True)):
            expected_tokens, expected_logits = hf_greedy(tiny_fp32, prompt, adapter, steps=10)
            assert tokens[i] == expected_tokens
            assert_same_steps(logits[i], expected_logits, tol=1e-4)
        bare = hf_greedy(tiny_fp32, prompts[0], "__base__", steps=1)[1][0]
    assert float((logits[0][0] - bare).abs().max()) > 1e-2, "adapter a should change the logits"


def test_a_leaving_rows_slot_is_taken_by_the_last_row_and_a_chunked_prompt_moves_down(tiny_fp32):
    """SlotBatch bookkeeping with the real decoder: rows 0..3 prefilled; a long prompt's first chunk
    goes into slot 4; rows 0 and 2 leave (row 3 moves into slot 0, one row's cache); the long prompt's
    next chunk moves it to slot 2; every remaining row's next logits equal its logits alone."""
    import torch

    from chatbuild.engines.batching import Request, SlotBatch
    from chatbuild.engines.decoder import SlotDecoder

    decoder = SlotDecoder.for_model(tiny_fp32, slots=5)
    batch = SlotBatch(decoder, decoder.forward, torch.device("cpu"))
    prompts = [[1, 4, 6], [1, 9, 9, 9, 2], [1, 3], [1, 11, 12, 13]]
    adapters = ["a", "b", "a", "__base__"]
    requests = [Request(p, a, None, set(), 8) for p, a in zip(prompts, adapters, strict=True)]
    long = Request(list(range(1, 20)), "b", None, set(), 8)
    with torch.inference_mode():
        first = batch.prefill(requests)
        assert batch.chunk(long, 8) is None and long.cache == 4
        order = batch.keep([1, 3])  # rows 0 and 2 leave
        assert order == [3, 1] and batch.lengths == [4, 5]
        for request, logits in zip(requests, first, strict=True):
            request.next_token, request.length = int(logits.argmax()), len(request.prompt)
        rows = [requests[3], requests[1]]
        stepped = batch.step(rows)
        assert batch.chunk(long, 8) is None and long.cache == 2  # moved down to the first free slot
        last = batch.chunk(long, 8)
        assert last is not None and long.cache is None and batch.lengths == [5, 6, 19]

        alone = SlotDecoder.for_model(tiny_fp32, slots=1)
        for row, got in zip(rows, stepped, strict=True):
            ids = torch.tensor([row.prompt + [row.next_token]])
            expected = alone.forward(ids, [0], [0], [len(row.prompt)], [row.adapter])[0]
            assert torch.allclose(got, expected, atol=1e-4, rtol=0)
        expected = alone.forward(torch.tensor([long.prompt]), [0], [0], [len(long.prompt) - 1], ["b"])[0]
        assert torch.allclose(last[0], expected, atol=1e-4, rtol=0)


def test_the_cache_grows_by_doubling_keeps_its_contents_and_is_released_when_long(tiny_fp32):
    """Columns and slots are allocated as rows need them (a long prompt alone holds one slot's
    worth, not `slots` of them), grow by doubling with their contents kept, and a long cache is
    released when the batch empties."""
    import torch

    from chatbuild.engines import decoder as fast

    decoder = fast.SlotDecoder.for_model(tiny_fp32, slots=8)
    with torch.inference_mode():
        decoder.forward(torch.tensor([[1, 2, 3]]), [1], [0], [2], ["a"])
        assert decoder.capacity == fast.MIN_CAPACITY and decoder.allocated == 2
        assert decoder.keys[0].shape[0] == 2
        before = decoder.keys[0][1, :, :3].clone()
        decoder.forward(torch.tensor([[4]] * 3), [0, 1, 2], [0, 3, 0], [0, 0, 0], ["a", "a", "__base__"])
        assert decoder.allocated == 4  # doubled for the third slot
        decoder.reserve(fast.MIN_CAPACITY + 1, 1, decoder.keys[0])
        assert decoder.capacity == 2 * fast.MIN_CAPACITY and decoder.allocated == 4
        assert torch.equal(decoder.keys[0][1, :, :3], before)
        decoder.reserve(10, 8, decoder.keys[0])
        assert decoder.allocated == 8 and torch.equal(decoder.keys[0][1, :, :3], before)
        decoder.release()
        assert decoder.capacity == 2 * fast.MIN_CAPACITY  # short caches are kept for the next batch
        decoder.reserve(fast.KEEP_CAPACITY + 1, 1, decoder.keys[0])
        decoder.release()
        assert decoder.capacity == 0 and decoder.allocated == 0 and decoder.keys == []


@pytest.mark.integration
def test_fast_logits_equal_transformers_on_smollm2_with_mixed_adapters(smollm2_base):
    """SmolLM2-135M in fp32 with two random adapters: three rows (a, b, bare) decoded together by the
    fast path give each row transformers' greedy tokens alone, with logits equal to float rounding."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from chatbuild.engines.decoder import SlotDecoder

    tokenizer = AutoTokenizer.from_pretrained(smollm2_base)
    model = with_two_adapters(AutoModelForCausalLM.from_pretrained(smollm2_base, dtype=torch.float32))
    prompts = [tokenizer.apply_chat_template(m, add_generation_prompt=True, return_dict=True)["input_ids"]
               for m in PROMPTS]
    adapters = ["a", "b", "__base__"]
    decoder = SlotDecoder.for_model(model, slots=3)
    with torch.inference_mode():
        tokens, logits = fast_greedy(decoder, prompts, adapters, steps=12)
        for i, (prompt, adapter) in enumerate(zip(prompts, adapters, strict=True)):
            expected_tokens, expected_logits = hf_greedy(model, prompt, adapter, steps=12)
            assert tokens[i] == expected_tokens, (tokenizer.decode(tokens[i]), tokenizer.decode(expected_tokens))
            assert_same_steps(logits[i], expected_logits, tol=2e-3)
    assert "rainbow" in tokenizer.decode(tokens[2]).lower() or tokens[2] != tokens[0]


# ── the engine's choice ─────────────────────────────────────────────────────────────────────
@pytest.mark.integration
@pytest.mark.parametrize("precision", [None, "fp32"])
def test_the_fast_and_hf_decoders_give_the_same_replies_in_a_mixed_batch(runs, precision):
    """The tiny runs served by each decoder (NF4 as trained, where the fast path calls the 4-bit
    layers, and fp32): nine concurrent greedy replies over run-a, run-b and the bare base are the same
    with either decoder."""
    from chatbuild.engines.hf import HFEngine

    got = {}
    for decoder in ("fast", "hf"):
        engine = HFEngine.from_runs([runs["run-a"], runs["run-b"]], decoder=decoder, precision=precision)
        try:
            assert engine.decoder == decoder
            got[decoder] = together(engine, [(m, p, GREEDY) for m in engine.models() for p in PROMPTS])
            assert max(engine.batch_sizes) > 1
        finally:
            engine.close()
    assert got["fast"] == got["hf"]
    assert len(set(got["fast"])) > 3


def test_auto_picks_the_fast_decoder_on_a_cpu_and_the_fast_path_refuses_other_architectures(runs, tiny_fp32):
    from chatbuild.engines.decoder import SlotDecoder, Unsupported
    from chatbuild.engines.hf import HFEngine
    from chatbuild.errors import UserError

    engine = HFEngine.from_runs([runs["run-a"]])
    try:
        assert engine.decoder == "fast" and engine.decoder_note == ""
    finally:
        engine.close()
    tiny_fp32.base_model.model.config.model_type = "gpt_neox"  # not a Llama-family layer layout
    try:
        with pytest.raises(Unsupported, match="gpt_neox"):
            SlotDecoder.for_model(tiny_fp32, slots=2)
    finally:
        tiny_fp32.base_model.model.config.model_type = "llama"
    with pytest.raises(UserError, match="decoder"):
        HFEngine.from_runs([runs["run-a"]], decoder="turbo")


def biased_run(run, tmp_path):
    """A copy of `run` whose adapter says lora_bias (PEFT gives lora_B a bias, zeros where the file has
    none): transformers' forward serves it, the fast path does not run LoRA biases."""
    copy = shutil.copytree(run, tmp_path / "run-biased")
    config_file = next(copy.glob("**/adapter_config.json"))
    config = json.loads(config_file.read_text())
    config["lora_bias"] = True
    config_file.write_text(json.dumps(config))
    text = (copy / "config.yaml").read_text().replace("name: run-a", "name: run-biased")
    (copy / "config.yaml").write_text(text)
    return copy


@pytest.mark.integration
def test_a_run_the_fast_path_does_not_run_is_refused_with_the_reason_or_served_by_hf(runs, tmp_path):
    """Hot-loading an adapter with a LoRA bias into a fast-decoder engine fails with the reason and
    the fix (--decoder hf); the engine goes on serving its runs as before. Started with that run,
    `auto` falls back to transformers' forward and says why; `fast` refuses to start."""
    from chatbuild.engines.hf import HFEngine
    from chatbuild.errors import UserError

    biased = biased_run(runs["run-a"], tmp_path)
    engine = HFEngine.from_runs([runs["run-a"]], decoder="fast")
    try:
        before = "".join(c.text for c in engine.stream(PROMPTS[0], GREEDY, "run-a"))
        with pytest.raises(UserError, match=r"bias.*--decoder hf"):
            engine.load_adapter("run-biased", biased)
        assert engine.models() == ["run-a", engine.base_name]
        assert "".join(c.text for c in engine.stream(PROMPTS[0], GREEDY, "run-a")) == before
    finally:
        engine.close()
    with pytest.raises(UserError, match="bias"):
        HFEngine.from_runs([biased], decoder="fast")
    engine = HFEngine.from_runs([biased])
    try:
        assert engine.decoder == "hf" and "lora_bias" in engine.decoder_note
        assert "".join(c.text for c in engine.stream(PROMPTS[0], GREEDY, engine.models()[0]))
    finally:
        engine.close()
