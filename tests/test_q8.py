"""`--quant q8` (chatbuild.engines.q8, issue 22): the kernel computes GGML's Q8_0 block products
exactly (against a plain-torch reference), a row's result does not depend on the other rows, what
cannot be packed or built is said in one line; served through the fast decoder, replies in a mixed
batch equal each reply alone, and on SmolLM2 its next tokens agree with fp32's."""

import pytest

from chatbuild.engines import GenerationParams
from chatbuild.errors import UserError
from tests.test_decoder import PROMPTS, biased_run, together

GREEDY = GenerationParams(temperature=0, max_new_tokens=16)


def reference(x, w):
    """Q8_0 in plain torch, in float64: blocks of 32, scale absmax/127, round half away from zero."""
    import torch

    def quantize(a):
        blocks = a.double().reshape(a.shape[0], -1, 32)
        scale = blocks.abs().amax(-1, keepdim=True) / 127
        scaled = torch.where(scale > 0, blocks / scale, torch.zeros_like(blocks))
        return torch.sign(scaled) * torch.floor(scaled.abs() + 0.5), scale[..., 0]

    qw, dw = quantize(w)
    qx, dx = quantize(x)
    return torch.einsum("nbj,mbj,nb,mb->mn", qw, qx, dw, dx), qw.reshape(w.shape)


@pytest.mark.parametrize("rows,out,size", [(1, 7, 64), (3, 5, 96), (5, 33, 64), (9, 2, 32), (4, 40, 1536)])
def test_the_kernel_computes_q8_0_blocks_exactly(rows, out, size):
    import torch

    from chatbuild.engines import q8

    torch.manual_seed(rows * out)
    w, x = torch.randn(out, size) * 0.05, torch.randn(rows, size)
    w[0, :32] = 0  # an all-zero block: scale 0, no division by zero
    packed = q8.pack(w)
    expected, values = reference(x, w)
    assert torch.equal(packed.unpacked()[0].double(), values)
    got = q8.matmul(x, packed)
    assert got.shape == (rows, out) and got.dtype == torch.float32
    assert torch.allclose(got.double(), expected, rtol=1e-5, atol=1e-5)
    exact = x @ w.T  # and q8 is close to the fp32 product
    assert float((got - exact).norm() / exact.norm()) < 0.02


def test_a_rows_result_does_not_depend_on_the_other_rows():
    """Each row's activations are quantized on their own and each output is its own sum, so a batch
    computes every row exactly as it would alone (an fp32 BLAS product need not)."""
    import torch

    from chatbuild.engines import q8

    torch.manual_seed(1)
    w, x = torch.randn(300, 192), torch.randn(11, 192)
    packed = q8.pack(w, bias=torch.randn(300))
    batch = q8.matmul(x, packed)
    for i in (0, 5, 10):
        assert torch.equal(q8.matmul(x[i:i + 1], packed)[0], batch[i])
    assert torch.equal(q8.matmul(x[:0], packed), torch.empty(0, 300))


def test_what_cannot_be_packed_is_said():
    import torch

    from chatbuild.engines import q8

    assert "multiple of 32" in q8.pack_reason(torch.zeros(8, 48))
    assert "bfloat16" in q8.pack_reason(torch.zeros(8, 64, dtype=torch.bfloat16))
    assert q8.pack(torch.zeros(8, 48)) is None
    assert q8.pack_reason(torch.zeros(8, 64)) is None
    with pytest.raises(ValueError, match="64 features"):
        q8.matmul(torch.zeros(2, 64), q8.pack(torch.zeros(8, 96)))


@pytest.mark.parametrize("compiler,message", [("/nonexistent/cc", "needs a C compiler"), ("false", "failed")])
def test_a_kernel_that_cannot_be_built_is_one_clear_line(tmp_path, monkeypatch, compiler, message):
    from chatbuild.engines import q8

    monkeypatch.setenv("CC", compiler)
    with pytest.raises(UserError, match=message) as e:
        q8.build(cache=tmp_path)
    assert "--quant q8" in str(e.value) and compiler in str(e.value) and "\n" not in str(e.value)
    assert not list(tmp_path.rglob("*.so"))  # nothing half-built left behind


def test_the_kernel_is_built_once_per_source_and_flags(tmp_path):
    from chatbuild.engines import q8

    first = q8.build(cache=tmp_path)
    stamp = first.stat().st_mtime_ns
    assert q8.build(cache=tmp_path) == first and first.stat().st_mtime_ns == stamp
    assert [p.name for p in tmp_path.iterdir()] == [first.name]  # the temporary build folder is gone


def test_q8_is_refused_where_it_cannot_run(runs, tmp_path):
    """On a GPU, with --decoder hf, on a 4-bit base, or with a run the fast decoder cannot serve:
    a UserError saying why, before (or instead of) serving anything else."""
    from chatbuild.engines.decoder import SlotDecoder, Unsupported
    from chatbuild.engines.hf import HFEngine, _check_q8

    with pytest.raises(UserError, match="CPU kernel"):
        _check_q8("cuda:0", "auto")
    with pytest.raises(UserError, match="transformers. forward \\(--decoder hf\\)"):
        HFEngine.from_runs([runs["run-a"]], precision="q8", decoder="hf")
    with pytest.raises(UserError, match="cannot serve run run-biased.*--quant fp32"):
        HFEngine.from_runs([biased_run(runs["run-a"], tmp_path)], precision="q8")
    engine = HFEngine.from_runs([runs["run-a"]])  # NF4, as trained
    try:
        with pytest.raises(Unsupported, match="fp32 base on a CPU, and this one has Linear4bit"):
            SlotDecoder.for_model(engine.model, slots=2, q8=True)
    finally:
        engine.close()


@pytest.mark.integration
def test_q8_replies_in_a_mixed_batch_equal_each_reply_alone(runs):
    """The tiny runs served in q8: nine concurrent greedy replies over run-a, run-b and the bare base
    equal the same requests one at a time, and the adapters change the replies."""
    from chatbuild.engines.hf import HFEngine

    engine = HFEngine.from_runs([runs["run-a"], runs["run-b"]], precision="q8")
    try:
        assert (engine.precision, engine.decoder) == ("q8", "fast")
        requests = [(m, p, GREEDY) for m in engine.models() for p in PROMPTS]
        batched = together(engine, requests)
        assert max(engine.batch_sizes) > 1
        alone = ["".join(c.text for c in engine.stream(p, params, m)) for m, p, params in requests]
    finally:
        engine.close()
    assert batched == alone
    assert len(set(batched)) > 3


@pytest.mark.integration
def test_q8_on_smollm2_agrees_with_fp32(smollm2_base):
    """SmolLM2-135M: with the fp32 decoder's greedy reply as the text, q8 as served (the prompt
    prefilled in q8, then one token a step, each step one q8.decode call) predicts the same next
    token at >= 90% of the reply's positions (teacher forcing), and its own greedy reply still
    answers."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from chatbuild.engines.decoder import SlotDecoder
    from tests.test_decoder import fast_greedy

    tokenizer = AutoTokenizer.from_pretrained(smollm2_base)
    model = AutoModelForCausalLM.from_pretrained(smollm2_base, dtype=torch.float32).eval()
    question = [{"role": "user", "content": "What is the capital of France? Answer in one sentence."}]
    prompt = tokenizer.apply_chat_template(question, add_generation_prompt=True, return_dict=True)["input_ids"]
    fp32, q8 = SlotDecoder.for_model(model, slots=1), SlotDecoder.for_model(model, slots=1, q8=True)
    with torch.inference_mode():
        answer = fast_greedy(fp32, [prompt], ["__base__"], steps=24)[0][0]
        answer = answer[:answer.index(tokenizer.eos_token_id) + 1]  # up to its end: what is after is noise
        assert q8.native is not None
        first = q8.forward(torch.tensor([prompt]), [0], [0], [len(prompt) - 1], ["__base__"])
        predicted = [int(first[0].argmax())] + [
            int(q8.forward(torch.tensor([[token]]), [0], [len(prompt) + i], [0], ["__base__"])[0].argmax())
            for i, token in enumerate(answer[:-1])]
        own = fast_greedy(q8, [prompt], ["__base__"], steps=24)[0][0]
    agreement = sum(p == t for p, t in zip(predicted, answer, strict=True)) / len(predicted)
    assert agreement >= 0.9, (agreement, tokenizer.decode(answer))
    assert "Paris" in tokenizer.decode(own), tokenizer.decode(own)


@pytest.mark.integration
def test_auto_serves_q8_on_a_cpu_and_fp32_where_q8_cannot_run(runs, tmp_path, monkeypatch):
    """`auto` (serve's default) on this CPU: q8. Where q8 cannot run it serves fp32 and says why: no C
    compiler to build the kernel (CC pointed at nothing, with an empty kernel cache), or a run the fast
    decoder does not serve. An explicit `q8` without a compiler is refused instead."""
    from chatbuild.engines import q8
    from chatbuild.engines.hf import HFEngine

    monkeypatch.setattr("chatbuild.engines.hf.available_memory", lambda: 1 << 40)
    engine = HFEngine.from_runs([runs["run-a"]], precision="auto")
    try:
        assert (engine.precision, engine.decoder, engine.precision_note) == ("q8", "fast", "")
    finally:
        engine.close()
    engine = HFEngine.from_runs([biased_run(runs["run-a"], tmp_path)], precision="auto")
    try:
        assert (engine.precision, engine.decoder) == ("fp32", "hf")
        assert "not q8" in engine.precision_note and "lora_bias" in engine.decoder_note
    finally:
        engine.close()
    monkeypatch.setattr(q8, "_library", None)
    monkeypatch.setenv("CHATBUILD_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("CC", "/nonexistent/cc")
    engine = HFEngine.from_runs([runs["run-a"]], precision="auto")
    try:
        assert (engine.precision, engine.decoder) == ("fp32", "fast")
        assert "fp32, not q8" in engine.precision_note and "needs a C compiler" in engine.precision_note
    finally:
        engine.close()
    with pytest.raises(UserError, match="needs a C compiler"):
        HFEngine.from_runs([runs["run-a"]], precision="q8")


def test_a_q8_decoder_multiplies_prompts_in_q8_too(tiny_base):
    """A q8 decoder's prompt pass multiplies in q8 (its kernel beats fp32's BLAS at many rows): close to
    the fp32 decoder's logits, not equal; and the fp32 decoder is untouched by q8's existence."""
    import torch
    from transformers import AutoModelForCausalLM

    from chatbuild.engines.decoder import SlotDecoder

    model = AutoModelForCausalLM.from_pretrained(tiny_base, dtype=torch.float32).eval()
    fp32, q8 = SlotDecoder.for_model(model, slots=1), SlotDecoder.for_model(model, slots=1, q8=True)
    ids = torch.tensor([[1, 5, 9, 13, 17, 21]])
    with torch.inference_mode():
        exact = fp32.forward(ids, [0], [0], [5], ["__base__"])
        prefilled = q8.forward(ids, [0], [0], [5], ["__base__"])
        plain = model(input_ids=ids).logits[0, -1].float()
    assert torch.allclose(exact[0], plain, atol=1e-4)
    assert not torch.equal(prefilled, exact)
    assert float((prefilled - exact).norm() / exact.norm()) < 0.05


def test_stacked_lora_terms_are_each_rows_own_adapter():
    """The kernel's low-rank terms: row i gets x_i A[lo:hi]^T B[:, lo:hi]^T for its own columns (none
    for lo == hi), as plain torch computes them, and a row alone gets the same bits as in the batch."""
    import torch

    from chatbuild.engines import q8

    torch.manual_seed(3)
    for out in (40, 13):  # 13: the last block of 8 outputs is partial
        w, x = torch.randn(out, 96), torch.randn(4, 96)
        packed = q8.pack(w, bias=torch.randn(out))
        a, b = torch.randn(12, 96), torch.randn(out, 12)
        columns = torch.tensor([[0, 4], [4, 12], [0, 0], [0, 12]]).T.contiguous()
        got = q8.matmul(x, packed, q8.pack_lora(a, b), columns)
        plain = q8.matmul(x, packed)
        for i, (lo, hi) in enumerate(columns.T.tolist()):
            expected = plain[i] + (x[i] @ a[lo:hi].T) @ b[:, lo:hi].T
            assert torch.allclose(got[i], expected, rtol=1e-5, atol=1e-4)
            alone = q8.matmul(x[i:i + 1], packed, q8.pack_lora(a, b), columns[:, i:i + 1].contiguous())
            assert torch.equal(alone[0], got[i])
        assert torch.equal(got[2], plain[2])
    with pytest.raises(ValueError, match="LoRA of"):
        q8.matmul(x, packed, q8.pack_lora(a, b), columns[:, :2].contiguous())


@pytest.mark.integration
def test_a_q8_decode_step_is_one_kernel_call_close_to_the_layer_by_layer_step(tiny_base):
    """A q8 decode step (one token a row) runs every layer in one kernel call (`q8.decode`): on the
    tiny base with adapters a and b in one batch, its logits are as close to the fp32 decoder's as
    the layer-by-layer q8 path's (both multiply in q8; a one-ulp difference in a norm can move an
    int8 rounding, so they are close, not equal), and a row computes the same bits alone as batched."""
    import torch
    from transformers import AutoModelForCausalLM

    from chatbuild.engines.decoder import SlotDecoder
    from tests.test_decoder import with_two_adapters

    model = with_two_adapters(AutoModelForCausalLM.from_pretrained(tiny_base, dtype=torch.float32))
    q8, fp32 = SlotDecoder.for_model(model, slots=4, q8=True), SlotDecoder.for_model(model, slots=4)
    assert q8.native is not None and fp32.native is None
    adapters, rows = ["a", "b", "__base__", "a"], list(range(4))
    torch.manual_seed(0)
    prompts, step = torch.randint(3, 200, (4, 9)), torch.randint(3, 200, (4, 1))
    with torch.inference_mode():
        for decoder in (q8, fp32):
            decoder.forward(prompts, rows, [0] * 4, [8] * 4, adapters)
        exact = fp32.forward(step, rows, [9] * 4, [0] * 4, adapters)
        native = q8.forward(step, rows, [9] * 4, [0] * 4, adapters)
        alone = q8.forward(step[1:2], [1], [9], [0], adapters[1:2])
        table, q8.native = q8.native, None  # the layer-by-layer q8 path, same step again
        layered = q8.forward(step, rows, [9] * 4, [0] * 4, adapters)
        q8.native = table

    def error(logits):
        return float((logits - exact).norm() / exact.norm())

    assert error(native) < 0.05 and error(layered) < 0.05
    assert error(native) < 2 * error(layered) + 0.005, (error(native), error(layered))
    assert float((native - layered).norm() / layered.norm()) < 0.05
    assert torch.equal(alone[0], native[1])


def test_a_layer_the_one_call_step_does_not_compute_keeps_the_layer_by_layer_path(tiny_base):
    """A model whose MLP is not SiLU (here GELU) is not one q8.decode computes: the q8 decoder keeps
    its layer-by-layer steps, which still run (and use the model's own activation)."""
    import torch
    from transformers import AutoModelForCausalLM

    from chatbuild.engines.decoder import SlotDecoder

    model = AutoModelForCausalLM.from_pretrained(tiny_base, dtype=torch.float32).eval()
    model.config.hidden_act = "gelu"
    for layer in model.model.layers:
        layer.mlp.act_fn = torch.nn.GELU()
    q8 = SlotDecoder.for_model(model, slots=1, q8=True)
    assert q8.native is None
    with torch.inference_mode():
        q8.forward(torch.tensor([[5, 6, 7]]), [0], [0], [2], ["__base__"])
        logits = q8.forward(torch.tensor([[8]]), [0], [3], [0], ["__base__"])
    assert logits.shape == (1, model.config.vocab_size) and torch.isfinite(logits).all()


def test_the_kernel_without_avx2_computes_the_same(tmp_path, monkeypatch):
    """Built without AVX2 (a CPU that lacks it), the kernel's plain loops quantize exactly as the AVX2
    build does and give the same products, bias and LoRA terms up to the order of float additions."""
    import ctypes

    import torch

    from chatbuild.engines import q8

    torch.manual_seed(5)
    w, x = torch.randn(37, 96), torch.randn(6, 96)
    a, b, bias = torch.randn(8, 96), torch.randn(37, 8), torch.randn(37)
    columns = torch.tensor([[0, 4], [4, 8], [0, 0], [0, 8], [0, 4], [4, 8]]).T.contiguous()
    fast = q8.pack(w, bias)
    expected = q8.matmul(x, fast, q8.pack_lora(a, b), columns)
    monkeypatch.setattr(q8, "compile_flags", lambda: ["-O2", "-std=c11", "-shared", "-fPIC", "-fopenmp"])
    plain = q8._declare(ctypes.CDLL(str(q8.build(cache=tmp_path))))
    monkeypatch.setattr(q8, "_library", plain)
    slow = q8.pack(w, bias)
    assert torch.equal(slow.values, fast.values) and torch.equal(slow.scales, fast.scales)
    got = q8.matmul(x, slow, q8.pack_lora(a, b), columns)
    assert torch.allclose(got, expected, rtol=1e-5, atol=1e-4)
