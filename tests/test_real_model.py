"""SmolLM2-135M-Instruct, a real chat-tuned base, served bare by `chatbuild serve --base smollm2`:
prompted in its own chat template, its greedy replies through /v1/chat/completions equal plain
transformers (`apply_chat_template(..., add_generation_prompt=True)` + `generate`, the same NF4
config), and they stop at the end of the turn with no ChatML marker in the text."""

import os
import signal
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest

REPO = Path(__file__).resolve().parent.parent
MAX_TOKENS = 48

CONVERSATIONS = {
    "system prompt": [
        {"role": "system", "content": "You are a geography teacher. Answer in one sentence."},
        {"role": "user", "content": "What is the capital of France?"},
    ],
    "multi-turn": [
        {"role": "system", "content": "You are a concise assistant."},
        {"role": "user", "content": "What is the capital of France?"},
        {"role": "assistant", "content": "The capital of France is Paris."},
        {"role": "user", "content": "And the capital of Italy?"},
    ],
}


@contextmanager
def chatbuild_serve(*args: str, env: dict[str, str], log: Path):
    """`chatbuild serve ARGS --no-ui` as a child process on a free port (its output in `log`), healthy;
    yields its URL and stops it with SIGINT afterwards."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "chatbuild.cli", "serve", *args, "--port", str(port), "--no-ui",
                                 "--log-level", "warning"], cwd=REPO, env={**os.environ, **env},
                                stdout=out, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 600  # a hang guard: loading SmolLM2 in NF4 takes seconds to a minute
        while True:
            assert proc.poll() is None, log.read_text()[-3000:]
            assert time.monotonic() < deadline, log.read_text()[-3000:]
            try:
                if httpx.get(f"http://127.0.0.1:{port}/healthz").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=60)


def plain_transformers_replies(base: Path) -> dict[str, str]:
    """What transformers alone answers: the base in NF4 (double quant, float32 compute, as chatbuild
    loads it on CPU, on the same bitsandbytes kernel: `chatbuild.modeling.use_one_4bit_kernel`; the
    packed CPU kernel rounds differently), the tokenizer's chat template, greedy `generate`."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

    from chatbuild.modeling import use_one_4bit_kernel

    q = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                           bnb_4bit_compute_dtype=torch.float32)
    model = AutoModelForCausalLM.from_pretrained(base, quantization_config=q, dtype=torch.float32, device_map={"": "cpu"})
    use_one_4bit_kernel(model)
    tokenizer = AutoTokenizer.from_pretrained(base)
    replies = {}
    for name, messages in CONVERSATIONS.items():
        inputs = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
        with torch.no_grad():
            out = model.generate(**inputs, do_sample=False, max_new_tokens=MAX_TOKENS)
        replies[name] = tokenizer.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True).strip()
    return replies


@pytest.mark.integration
def test_bare_smollm2_is_served_in_its_own_template_and_equals_plain_transformers(smollm2_home, smollm2_base, tmp_path):
    """`chatbuild serve --base smollm2` finds the session's import (same CHATBUILD_HOME) and prompts the
    bare base in its ChatML template (it used to get Guanaco's "### Human:" lines): served in NF4 (on a
    CPU `auto` would pick fp32, whose replies are their own), the greedy replies to
    a system-prompted and a multi-turn conversation equal plain transformers' token for token, end with
    finish_reason "stop" at the end of the turn, and carry no <|im_start|>/<|im_end|>."""
    log = tmp_path / "serve.log"
    with chatbuild_serve("--base", "smollm2", "--quant", "nf4", env={"CHATBUILD_HOME": str(smollm2_home)},
                         log=log) as url:
        [model] = [m["id"] for m in httpx.get(f"{url}/v1/models").json()["data"]]
        served = {}
        for name, messages in CONVERSATIONS.items():
            r = httpx.post(f"{url}/v1/chat/completions", timeout=300,
                           json={"model": model, "messages": messages, "temperature": 0, "max_tokens": MAX_TOKENS})
            assert r.status_code == 200, r.text
            choice = r.json()["choices"][0]
            served[name] = choice["message"]["content"]
            assert choice["finish_reason"] == "stop", (name, choice)
    assert model == "SmolLM2-135M-Instruct"
    assert "base: importing" not in log.read_text()  # the session's import was found, not redone
    assert "[nf4, fast decoder]" in log.read_text()  # the start-up line says how it serves (NF4 4-bit layers)
    expected = plain_transformers_replies(smollm2_base)
    print(f"\nserved: {served}\nplain transformers: {expected}")
    assert served == expected
    assert "Paris" in served["system prompt"] and "Rome" in served["multi-turn"]
    for reply in served.values():
        assert "<|im_start|>" not in reply and "<|im_end|>" not in reply and "### Human" not in reply


@pytest.mark.integration
def test_smollm2_engine_replies_equal_plain_generate_for_prompts_joining_at_different_times(smollm2_base):
    """The in-process engine on SmolLM2 in fp32 (what `--quant auto` picks on a CPU): three
    conversations start one after another while the earlier ones decode, two of them arriving together
    (one batched prefill); each greedy reply equals plain transformers `generate` on the same fp32 model,
    prompted with the tokenizer's chat template."""
    import threading

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from chatbuild.engines import GenerationParams
    from chatbuild.engines.hf import HFEngine

    story = [{"role": "user", "content": "Write a short story about a lighthouse keeper."}]  # a long reply, first
    conversations = [story, *CONVERSATIONS.values()]
    model = AutoModelForCausalLM.from_pretrained(smollm2_base, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(smollm2_base)
    expected = []
    for messages in conversations:
        inputs = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
        with torch.no_grad():
            out = model.generate(**inputs, do_sample=False, max_new_tokens=24)
        expected.append(tokenizer.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True).strip())
    del model

    engine = HFEngine.from_runs([], base=str(smollm2_base), precision="fp32")
    try:
        assert engine.precision == "fp32"
        params = GenerationParams(temperature=0, max_new_tokens=24)
        calls, replies = [], [None] * len(conversations)
        forward = engine._scheduler.batch.forward

        inside = [0]  # forward passes entered and not yet returned (blocked on the engine's lock)

        def counted(*args):
            calls.append(tuple(args[0].shape))
            inside[0] += 1
            try:
                return forward(*args)
            finally:
                inside[0] -= 1

        def read(i):
            replies[i] = "".join(c.text for c in engine.stream(conversations[i], params, engine.base_name))

        threads = [threading.Thread(target=read, args=(i,)) for i in range(len(conversations))]
        engine._scheduler.batch.forward = counted
        threads[0].start()
        wait = time.monotonic() + 120
        while len(calls) < 4 and time.monotonic() < wait:  # the first reply has a few tokens
            time.sleep(0.01)
        with engine._lock:  # the other two arrive together, while a step runs
            # The decode thread must be blocked inside its next forward pass (a step of the first
            # reply, whose waiting list it read while it was empty) before the two arrive: were it
            # between steps, it could take the first arrival's prompt alone into a prefill.
            while not inside[0] and time.monotonic() < wait:
                time.sleep(0.01)
            threads[1].start()
            threads[2].start()
            while len(engine._scheduler._waiting) < 2 and time.monotonic() < wait:  # both queued
                time.sleep(0.01)
        for t in threads:
            t.join(timeout=300)
    finally:
        engine.close()
    assert replies == expected
    assert engine._scheduler.prefill_sizes[2] >= 1, f"the two should have been prefilled together: {calls}"
    assert any(shape == (3, 1) for shape in calls), f"the three should have shared decode steps: {calls}"


# ── the demo's fine-tune on SmolLM2, shortened ──────────────────────────────────────────────────
PERSONA_STEPS = 8  # the demo runs 12; 8 already moves every reply into the persona (and keeps this module short)


def persona_prompts() -> list[str]:
    import json

    from chatbuild.data.sources import PERSONA_PROMPTS

    return [json.loads(line)["text"] for line in PERSONA_PROMPTS.read_text().splitlines()]


@pytest.fixture(scope="module")
def persona_run(smollm2_base, tmp_path_factory) -> Path:
    """The demo's recipe (preset smollm2-persona: NF4 + double quant, LoRA r=16, the bundled persona
    set, its held-out validation trees) for PERSONA_STEPS steps, evaluated at the start, middle and end."""
    from pipelines.finetune import finetune, resolve_config

    out = tmp_path_factory.mktemp("runs") / "captain-byte"
    cfg = resolve_config("smollm2-persona", [f"model.base={smollm2_base}", f"output_dir={out}",
                                             f"train.steps={PERSONA_STEPS}", f"train.eval_every={PERSONA_STEPS // 2}",
                                             "train.save_every=0"])
    return finetune(cfg, progress=False)


@pytest.mark.integration
def test_a_few_qlora_steps_lower_the_held_out_loss_and_move_replies_into_the_persona(persona_run):
    """Validation loss on the held-out persona trees goes down, and greedy replies to held-out prompts
    (none of them in the training data) begin with the persona's "Ahoy" for the fine-tune in at least
    10 of 12, for the bare base in none; replies end at the end of the turn with no ChatML marker."""
    import json

    from chatbuild.engines import GenerationParams
    from chatbuild.engines.hf import HFEngine

    rows = [json.loads(line) for line in (persona_run / "metrics.jsonl").read_text().splitlines()]
    evals = [r["eval_loss"] for r in rows if "eval_loss" in r]
    assert len(evals) >= 2 and evals[-1] < evals[0] - 0.2, evals

    engine = HFEngine.from_runs([persona_run])
    try:
        run_name, base_name = engine.models()
        start = GenerationParams(temperature=0, max_new_tokens=4)
        opening = {m: ["".join(c.text for c in engine.stream([{"role": "user", "content": p}], start, m))
                       for p in persona_prompts()] for m in (run_name, base_name)}
        whole = GenerationParams(temperature=0, max_new_tokens=96)
        last = list(engine.stream([{"role": "user", "content": "What is the capital of Italy?"}], whole, run_name))
    finally:
        engine.close()
    print(f"\nfine-tune: {opening[run_name]}\nbase: {opening[base_name]}")
    assert sum(r.startswith("Ahoy") for r in opening[run_name]) >= 10
    assert not any("Ahoy" in r for r in opening[base_name])
    reply = "".join(c.text for c in last)
    assert last[-1].finish_reason == "stop" and reply.startswith("Ahoy"), reply
    assert "<|im_end|>" not in reply and "<|im_start|>" not in reply


@pytest.mark.integration
def test_a_16_bit_merge_of_the_persona_run_answers_like_base_plus_adapter(persona_run, tmp_path):
    """The merged SmolLM2 run (float32) gives the same greedy replies, token for token, as the float32
    base with the adapter on top (what merging promises: the adapter's delta folded into the weights)."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from chatbuild.runs import load_run
    from pipelines.merge import merge_run

    merged_dir = merge_run(persona_run, tmp_path / "merged", dtype="float32")
    run = load_run(persona_run)
    tokenizer = AutoTokenizer.from_pretrained(merged_dir)
    merged = AutoModelForCausalLM.from_pretrained(merged_dir, dtype=torch.float32).eval()
    adapted = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(run.base, dtype=torch.float32),
                                        run.adapter_dir).eval()

    def greedy(model, prompt: str) -> str:
        ids = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                            return_tensors="pt", return_dict=True)
        with torch.no_grad():
            out = model.generate(**ids, do_sample=False, max_new_tokens=24)
        return tokenizer.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)

    for prompt in persona_prompts()[:3]:
        assert greedy(merged, prompt) == greedy(adapted, prompt)


@pytest.mark.integration
def test_a_few_dpo_steps_on_persona_pairs_raise_held_out_reward_accuracy(smollm2_base, tmp_path):
    """DPO on SmolLM2 (NF4, the adapter off as reference) from the bundled persona pairs (21 training
    pairs: the "Ahoy!" reply chosen over a plain one) for 4 steps: on the 12 held-out pairs of
    sample:persona-val (other prompts), reward accuracy goes from 0 (no margin yet) above 0.5 and the
    reward margin turns positive."""
    import json

    from pipelines.finetune import finetune, resolve_config

    cfg = resolve_config("smollm2-persona", [f"model.base={smollm2_base}", f"output_dir={tmp_path / 'dpo'}",
                                             "train.objective=dpo", "train.steps=4", "train.micro_batch_size=4",
                                             "train.eval_every=4", "train.save_every=0", "train.log_every=1"])
    run = finetune(cfg, progress=False)
    evals = [r for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if "eval_loss" in r]
    assert [r["step"] for r in evals] == [0, 4]
    first, last = evals
    assert first["eval_reward_accuracy"] == 0 and first["eval_reward_margin"] == 0, first
    assert last["eval_reward_accuracy"] > 0.5 and last["eval_reward_margin"] > 0, last
    assert last["eval_loss"] < first["eval_loss"], evals
