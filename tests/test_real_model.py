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
    loads it on CPU), the tokenizer's chat template, greedy `generate`."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

    q = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                           bnb_4bit_compute_dtype=torch.float32)
    model = AutoModelForCausalLM.from_pretrained(base, quantization_config=q, dtype=torch.float32, device_map={"": "cpu"})
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
    bare base in its ChatML template (it used to get Guanaco's "### Human:" lines): the greedy replies to
    a system-prompted and a multi-turn conversation equal plain transformers' token for token, end with
    finish_reason "stop" at the end of the turn, and carry no <|im_start|>/<|im_end|>."""
    log = tmp_path / "serve.log"
    with chatbuild_serve("--base", "smollm2", env={"CHATBUILD_HOME": str(smollm2_home)}, log=log) as url:
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
    expected = plain_transformers_replies(smollm2_base)
    print(f"\nserved: {served}\nplain transformers: {expected}")
    assert served == expected
    assert "Paris" in served["system prompt"] and "Rome" in served["multi-turn"]
    for reply in served.values():
        assert "<|im_start|>" not in reply and "<|im_end|>" not in reply and "### Human" not in reply
