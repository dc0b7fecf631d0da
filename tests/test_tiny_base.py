"""The embedded tiny base loads like any hub model: plain, in NF4 with double quantization on CPU,
generates, and its chat template renders the Guanaco format our templates parse back."""

import hashlib

import pytest
import torch
from transformers import AutoModelForCausalLM, BitsAndBytesConfig

from chatbuild.templates import ChatFormat, parse_guanaco_text, render

CONVERSATION = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "How do I boil an egg?"},
    {"role": "assistant", "content": "Put it in boiling water for nine minutes."},
    {"role": "user", "content": "Und auf Deutsch? ¿Y en español?"},
    {"role": "assistant", "content": "Neun Minuten kochen. Nueve minutos."},
]


def test_folder_has_hf_files(tiny_base):
    for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "chatbuild_tiny_base.json"):
        assert (tiny_base / name).is_file(), name


def test_loads_with_transformers_and_generates(tiny_base, tiny_tokenizer):
    model = AutoModelForCausalLM.from_pretrained(tiny_base)
    assert model.config.model_type == "llama"
    n = sum(p.numel() for p in model.parameters())
    assert 1e6 < n < 2e7, n
    assert 2000 <= len(tiny_tokenizer) <= 4096
    ids = tiny_tokenizer("### Human: What is the capital of France?\n### Assistant:", return_tensors="pt").input_ids
    out = model.generate(ids, max_new_tokens=12, do_sample=False, pad_token_id=tiny_tokenizer.eos_token_id)
    new = out[0, ids.shape[1]:]
    assert len(new) > 0 and all(0 <= t < len(tiny_tokenizer) for t in new.tolist())


def test_loads_in_nf4_with_double_quant_on_cpu(tiny_base, tiny_tokenizer):
    import bitsandbytes as bnb

    q = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                           bnb_4bit_compute_dtype=torch.float32)
    model = AutoModelForCausalLM.from_pretrained(tiny_base, quantization_config=q, device_map={"": "cpu"})
    proj = model.model.layers[0].self_attn.q_proj
    assert isinstance(proj, bnb.nn.Linear4bit)
    assert proj.weight.quant_state.quant_type == "nf4"
    assert proj.weight.quant_state.nested, "double quantization should quantize the absmax statistics"
    assert proj.weight.dtype == torch.uint8
    ids = tiny_tokenizer("### Human: Hello\n### Assistant:", return_tensors="pt").input_ids
    out = model.generate(ids, max_new_tokens=8, do_sample=False, pad_token_id=tiny_tokenizer.eos_token_id)
    assert out.shape[1] > ids.shape[1]
    # The 4-bit model is close to, but not the same as, the full-precision one.
    full = AutoModelForCausalLM.from_pretrained(tiny_base)
    with torch.no_grad():
        a, b = model(ids).logits, full(ids).logits
    assert not torch.equal(a, b)
    assert torch.nn.functional.cosine_similarity(a.flatten(), b.flatten(), dim=0) > 0.9


def test_chat_template_round_trips(tiny_tokenizer):
    text = tiny_tokenizer.apply_chat_template(CONVERSATION, tokenize=False)
    ours, _ = render(ChatFormat("guanaco"), tiny_tokenizer, CONVERSATION)
    assert text == ours
    body = text.removeprefix(tiny_tokenizer.bos_token).replace(tiny_tokenizer.eos_token, "")
    assert parse_guanaco_text(body) == CONVERSATION
    # and through token ids: encode the rendering, decode it, parse it back
    ids = tiny_tokenizer(text, add_special_tokens=False).input_ids
    decoded = tiny_tokenizer.decode(ids, skip_special_tokens=True)
    assert parse_guanaco_text(decoded) == CONVERSATION


def test_tokenizer_handles_any_unicode_through_byte_fallback(tiny_tokenizer):
    s = "naïve café – 東京 🚀 \t tabs"
    ids = tiny_tokenizer(s, add_special_tokens=False).input_ids
    assert tiny_tokenizer.unk_token_id not in ids
    assert tiny_tokenizer.decode(ids) == s


@pytest.mark.integration
def test_build_is_deterministic_for_a_seed(tmp_path):
    from pipelines.tiny_base import TinyBaseSpec, build_tiny_base

    def digest(path):
        return hashlib.sha256((path / "model.safetensors").read_bytes()).hexdigest(), (path / "tokenizer.json").read_text()

    quiet = lambda *_: None  # noqa: E731
    a = build_tiny_base(tmp_path / "a", TinyBaseSpec(pretrain_steps=3, seed=7), log=quiet)
    b = build_tiny_base(tmp_path / "b", TinyBaseSpec(pretrain_steps=3, seed=7), log=quiet)
    c = build_tiny_base(tmp_path / "c", TinyBaseSpec(pretrain_steps=3, seed=8), log=quiet)
    assert digest(a) == digest(b)
    assert digest(a)[0] != digest(c)[0]
    assert digest(a)[1] == digest(c)[1]  # the tokenizer depends on the data, not the seed
