"""Merging in 16 bits reproduces base + adapter; merging twice is a no-op; combining adapters with
weights (1, 0) reproduces the first one."""

import json

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer

from chatbuild.errors import UserError
from chatbuild.runs import load_run
from pipelines.merge import combine_adapters, merge_run

pytestmark = pytest.mark.integration
PROMPT = "### Human: What should I cook tonight?\n### Assistant:"


def logits_of(model, tokenizer):
    ids = tokenizer(PROMPT, return_tensors="pt").input_ids
    with torch.no_grad():
        return model.eval()(ids).logits.float()


def base_plus_adapter(run_dir, dtype=torch.float32, adapter_dir=None):
    run = load_run(run_dir)
    base = AutoModelForCausalLM.from_pretrained(run.base, dtype=dtype)
    return PeftModel.from_pretrained(base, adapter_dir or run.adapter_dir)


def test_merge_equals_base_plus_adapter_and_is_idempotent(tiny_run, tmp_path, capsys):
    out = merge_run(tiny_run, tmp_path / "merged", dtype="float32")
    tok = AutoTokenizer.from_pretrained(out)
    merged = AutoModelForCausalLM.from_pretrained(out)
    expected = logits_of(base_plus_adapter(tiny_run), tok)
    torch.testing.assert_close(logits_of(merged, tok), expected, rtol=1e-4, atol=1e-4)
    # merging changed the weights
    base = AutoModelForCausalLM.from_pretrained(load_run(tiny_run).base)
    name = "model.layers.0.self_attn.q_proj.weight"
    assert not torch.equal(dict(merged.named_parameters())[name], dict(base.named_parameters())[name])
    assert (out / "chat_format.json").is_file() and json.loads((out / "chatbuild_merge.json").read_text())["kind"] == "merge"
    stamp = (out / "model.safetensors").stat().st_mtime_ns
    merge_run(tiny_run, out, dtype="float32")
    assert "nothing to do" in capsys.readouterr().out
    assert (out / "model.safetensors").stat().st_mtime_ns == stamp
    with pytest.raises(UserError, match="holds a different result"):
        merge_run(tiny_run, out, dtype="bfloat16")


def test_bf16_merge_is_close(tiny_run, tmp_path):
    out = merge_run(tiny_run, tmp_path / "merged16")
    merged = AutoModelForCausalLM.from_pretrained(out)
    assert merged.dtype == torch.bfloat16
    tok = AutoTokenizer.from_pretrained(out)
    a, b = logits_of(merged, tok), logits_of(base_plus_adapter(tiny_run), tok)
    assert torch.nn.functional.cosine_similarity(a.flatten(), b.flatten(), dim=0) > 0.999


def test_requantize_writes_a_loadable_nf4_checkpoint(tiny_run, tmp_path):
    import bitsandbytes as bnb

    out = merge_run(tiny_run, tmp_path / "nf4", dtype="float32", requantize="nf4")
    model = AutoModelForCausalLM.from_pretrained(out)
    assert isinstance(model.model.layers[0].mlp.down_proj, bnb.nn.Linear4bit)
    tok = AutoTokenizer.from_pretrained(out)
    a, b = logits_of(model, tok), logits_of(base_plus_adapter(tiny_run), tok)
    assert torch.nn.functional.cosine_similarity(a.flatten(), b.flatten(), dim=0) > 0.95
    assert not (tmp_path / "nf4.16bit-tmp").exists()


def test_combination_with_weights_one_zero_reproduces_the_first(tiny_run, tiny_run_b, tmp_path):
    out = combine_adapters([str(tiny_run), str(tiny_run_b)], [1.0, 0.0], tmp_path / "combo", dtype="float32")
    combo = load_run(out)  # a run folder, servable like any other
    tok = AutoTokenizer.from_pretrained(combo.tokenizer_dir)
    first = logits_of(base_plus_adapter(tiny_run), tok)
    second = logits_of(base_plus_adapter(tiny_run_b), tok)
    got = logits_of(base_plus_adapter(tiny_run, adapter_dir=combo.adapter_dir), tok)
    torch.testing.assert_close(got, first, rtol=1e-4, atol=1e-4)
    assert (first - second).abs().max() > 1e-3, "the two adapters should differ"
    half = combine_adapters([str(tiny_run), str(tiny_run_b)], [0.5, 0.5], tmp_path / "half", dtype="float32")
    mid = logits_of(base_plus_adapter(tiny_run, adapter_dir=load_run(half).adapter_dir), tok)
    assert (mid - first).abs().max() > 1e-4


def test_combination_input_errors(tiny_run, tmp_path):
    with pytest.raises(UserError, match="at least two"):
        combine_adapters([str(tiny_run)], [1.0], tmp_path / "x")
    with pytest.raises(UserError, match="2 values for 3"):
        combine_adapters([str(tiny_run)] * 3, [1.0, 0.0], tmp_path / "x")
    with pytest.raises(UserError, match="no such run folder"):
        combine_adapters([str(tiny_run), str(tmp_path / "nope")], [1.0, 0.0], tmp_path / "x")
