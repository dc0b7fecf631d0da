"""Serving precision (`chatbuild serve --quant`): the base is held in NF4, bf16 or fp32 apart from how
the run was trained; the run's adapter applies at each precision (a reply equals plain PEFT on a base
loaded that way); `auto` follows its documented rule; a bad value is one line."""

import subprocess
import sys
from pathlib import Path

import pytest

from chatbuild.engines import GenerationParams
from chatbuild.errors import UserError

REPO = Path(__file__).resolve().parent.parent
HELLO = [{"role": "user", "content": "What should I cook tonight?"}]
GREEDY = GenerationParams(temperature=0, max_new_tokens=8)


def reply(engine, model) -> str:
    return "".join(c.text for c in engine.stream(HELLO, GREEDY, model))


# ── unit ────────────────────────────────────────────────────────────────────────────────────
def test_check_precision_names_the_flag_and_the_choices():
    from chatbuild.engines.hf import check_precision

    assert [check_precision(p) for p in ("nf4", "bf16", "fp32", "q8", "auto")] == ["nf4", "bf16", "fp32", "q8", "auto"]
    with pytest.raises(UserError) as e:
        check_precision("int3")
    assert str(e.value) == '--quant: "int3" is not a serving precision; use nf4, bf16, fp32, q8 or auto'


def test_auto_is_q8_or_fp32_on_cpu_when_a_quarter_of_the_memory_holds_it(tiny_base, monkeypatch):
    """The rule: q8 when 4 x (its bytes: fp32 + the int8 copy) fits in the available memory, else
    fp32 when 4 x fp32 does, else nf4; nf4 on a GPU and for a base whose size cannot be read. The
    machine's memory is what it is, so the test sets `available_memory` (a monkeypatch: the only way
    to see every side of the rule here)."""
    from chatbuild.engines import hf

    params = hf.parameter_count(str(tiny_base))
    assert params and params > 1000
    monkeypatch.setattr(hf, "available_memory", lambda: 4 * 5.125 * params)
    assert hf.choose_precision("auto", str(tiny_base), "cpu") == "q8"
    monkeypatch.setattr(hf, "available_memory", lambda: 4 * 5.125 * params - 1)
    assert hf.choose_precision("auto", str(tiny_base), "cpu") == "fp32"
    monkeypatch.setattr(hf, "available_memory", lambda: 4 * 4 * params)
    assert hf.choose_precision("auto", str(tiny_base), "cpu") == "fp32"
    monkeypatch.setattr(hf, "available_memory", lambda: 4 * 4 * params - 1)
    assert hf.choose_precision("auto", str(tiny_base), "cpu") == "nf4"
    assert hf.choose_precision("auto", str(tiny_base), "cuda:0") == "nf4"
    assert hf.choose_precision("auto", "some-org/some-model", "cpu") == "nf4"
    assert hf.choose_precision("bf16", str(tiny_base), "cpu") == "bf16"  # an explicit choice is kept


@pytest.mark.parametrize("args, message", [
    (["--base", "tiny", "--quant", "int3"], '--quant: "int3" is not a serving precision'),
    (["--engine", "openai", "--remote-url", "http://127.0.0.1:9/v1", "--quant", "fp32"],
     "--quant applies to the hf engine"),
    (["--engine", "openai", "--remote-url", "http://127.0.0.1:9/v1", "--decoder", "fast"],
     "--decoder applies to the hf engine"),
])
def test_serve_refuses_a_bad_quant_in_one_line_before_loading(args, message):
    out = subprocess.run([sys.executable, "-m", "chatbuild.cli", "serve", *args, "--no-ui"], capture_output=True,
                         text=True, cwd=REPO, timeout=120)
    assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr
    assert message in out.stderr and len(out.stderr.strip().splitlines()) == 1, out.stderr


# ── integration: a run trained on the NF4 tiny base, served at each precision ──────────────────
@pytest.mark.integration
@pytest.mark.parametrize("precision, dtype, atol", [("fp32", "float32", 1e-4), ("nf4", None, 1e-4),
                                                    ("bf16", "bfloat16", 0.1)])
def test_the_engine_serves_at_the_chosen_precision_with_the_runs_adapter(tiny_base, runs, precision, dtype, atol):
    """The engine holds the base as asked (no 4-bit layers and weights of that dtype, or NF4 layers), and
    the run's adapter applies on it: the engine's next-token logits equal plain PEFT's on a base loaded
    at that precision, and in fp32 and NF4 so does the greedy reply. In bf16, PEFT's mixed-adapter path
    (`adapter_names`) rounds differently from its plain one (measured: logits 0.04 apart, the adapter
    moves them by ~4), so on the tiny base's flat logits the greedy tokens may differ: bf16 replies are
    their own."""
    import torch
    from bitsandbytes.nn import Linear4bit
    from peft import PeftModel

    from chatbuild.engines.hf import PRECISIONS, HFEngine
    from chatbuild.modeling import load_base_model, load_tokenizer
    from chatbuild.runs import load_run
    from chatbuild.templates import prompt_ids

    run = load_run(runs["run-a"])
    assert run.config.model.quant == "nf4"  # trained in QLoRA, whatever it is served in
    tokenizer = load_tokenizer(str(run.tokenizer_dir))
    ids = torch.tensor([prompt_ids(run.chat_format, tokenizer, HELLO)])
    quant, compute = PRECISIONS[precision]
    reference = PeftModel.from_pretrained(load_base_model(str(tiny_base), quant=quant, compute_dtype=compute,
                                                          device="cpu"), run.adapter_dir).eval()
    engine = HFEngine.from_runs([runs["run-a"]], precision=precision)
    try:
        assert engine.precision == precision
        layers = [m for m in engine.model.modules() if isinstance(m, Linear4bit)]
        if dtype is None:
            assert layers and all(m.weight.quant_type == "nf4" for m in layers)
        else:
            assert not layers
            base_weight = engine.model.get_base_model().model.layers[0].self_attn.q_proj.base_layer.weight
            assert base_weight.dtype == getattr(torch, dtype)
        with torch.inference_mode():
            served_logits = engine._forward(ids, torch.ones_like(ids), None, None, ["adapter0"]).logits[0, -1].float()
            bare_logits = engine._forward(ids, torch.ones_like(ids), None, None, ["__base__"]).logits[0, -1].float()
            expected_logits = reference(input_ids=ids).logits[0, -1].float()
        assert torch.allclose(served_logits, expected_logits, atol=atol), (served_logits - expected_logits).abs().max()
        assert (bare_logits - expected_logits).abs().max() > 10 * atol, "the adapter should move the logits"
        served = reply(engine, run.name)
    finally:
        engine.close()
    if precision != "bf16":
        out = reference.generate(input_ids=ids, do_sample=False, max_new_tokens=GREEDY.max_new_tokens)
        expected = tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
        for stop in run.chat_format.stop:
            expected = expected.split(stop)[0]
        assert served == expected.strip()


def test_a_containers_memory_limit_lowers_what_auto_counts_on(tmp_path):
    """In a container on a large host /proc/meminfo shows the host; the cgroup v2 limit is what the
    server may use. The files are written here: this machine's own cgroup may have no limit."""
    from chatbuild.engines.hf import _cgroup_memory_left

    (tmp_path / "memory.max").write_text("2147483648\n")
    (tmp_path / "memory.current").write_text("536870912\n")
    assert _cgroup_memory_left(tmp_path) == 2147483648 - 536870912
    (tmp_path / "memory.max").write_text("max\n")
    assert _cgroup_memory_left(tmp_path) is None
    assert _cgroup_memory_left(tmp_path / "missing") is None
