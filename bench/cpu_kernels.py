"""Benchmark: the CPU matrix-product kernels a decode step could use, on SmolLM2-135M's shapes.

    .venv/bin/python bench/cpu_kernels.py                  # ~3 min on 2 cores
    .venv/bin/python bench/cpu_kernels.py --agreement      # + dynamic int8 and q8 next-token agreement on SmolLM2

Writes bench/results/cpu-kernels-<date>.json with the machine, versions and command.

Why (issue 22): the fast decoder's step is bound by its matrix products, so the question is which
kernel multiplies a few activation rows by 30 layers of weights fastest. Each kernel runs the seven
projections of 30 Llama layers (576 hidden, 1536 MLP, 3 of 9 heads for keys/values: SmolLM2) with
distinct random weights, so the weights stream from memory as in a real step (one repeated matrix
would sit in the cache and flatter every kernel), plus the 49,152 × 576 head, at 1, 8 and 32 rows:

- `fp32 x@W^T`: `F.linear`, what transformers runs (the baseline);
- `fp32 W@x^T`: the same dot products as one wide weight times a few columns (the fast decoder's
  choice for 2..16 rows, `chatbuild.engines.decoder._linear`);
- `bf16`: weights and activations in bf16 (half the bytes; no native bf16 arithmetic on AVX2);
- `int8 weight-only`: `torch._weight_int8pack_mm` (per-channel int8 weights, fp32 activations);
- `int8 x int8`: `torch._int_mm` (both operands int8, int32 result), timings only;
- `dynamic int8`: `torch.ops.quantized.linear_dynamic` (fbgemm: per-channel int8 weights, activations
  quantized per tensor to 7 bits at each call);
- `q8 (chatbuild)`: `chatbuild.engines.q8` (`serve --quant q8`): GGML's Q8_0 blocks (int8 in blocks
  of 32 with a scale each, for weights and activations) in chatbuild's small AVX2 C kernel.
With `--agreement`, SmolLM2 with every projection and the head in dynamic int8, then in q8, is run
teacher-forced on fp32 greedy replies to six prompts: the share of positions where its top token is
fp32's (quality: the int8 kernels are the ones faster than fp32).
The median of `--trials` timings per kernel and width, in ms for all 30 layers (and for the head).
"""

import argparse
import datetime
import json
import statistics
import sys
import time
import warnings
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

HIDDEN, MLP, KV, LAYERS, VOCAB = 576, 1536, 192, 30, 49152
SHAPES = [(HIDDEN, HIDDEN), (KV, HIDDEN), (KV, HIDDEN), (HIDDEN, HIDDEN), (MLP, HIDDEN), (MLP, HIDDEN), (HIDDEN, MLP)]
PROMPTS = ["What is the capital of France?", "Write a haiku about the sea.", "Explain photosynthesis briefly.",
           "Give me three tips for learning to code.", "Who wrote Romeo and Juliet?", "What should I cook tonight?"]


def int8_rows(w):
    """Symmetric per-output-channel int8: (int8 weight, fp32 scales)."""
    import torch

    scale = (w.abs().amax(dim=1) / 127).clamp(min=1e-12)
    return torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8), scale


def dynamic_pack(w, bias=None):
    import torch

    q, scale = int8_rows(w)
    quantized = torch._make_per_channel_quantized_tensor(q, scale.double(), torch.zeros(w.shape[0], dtype=torch.long), 0)
    return torch.ops.quantized.linear_prepack(quantized, bias)


def kernels(weights: list, head):
    """{name: (prepared weights, function(x, prepared) -> y)} for `weights` (a list of [out, in]) and the head."""
    import torch
    import torch.nn.functional as F

    from chatbuild.engines import q8

    return {
        "fp32 x@W^T": (weights + [head], lambda x, w: F.linear(x, w)),
        "fp32 W@x^T": (weights + [head], lambda x, w: (w @ x.T).T),
        "bf16": ([w.bfloat16() for w in weights + [head]], lambda x, w: F.linear(x.bfloat16(), w)),
        "int8 weight-only": ([int8_rows(w) for w in weights + [head]],
                             lambda x, w: torch._weight_int8pack_mm(x, w[0], w[1])),
        "int8 x int8": ([int8_rows(w)[0].T.contiguous() for w in weights + [head]],
                        lambda x, w: torch._int_mm(torch.ones(max(x.shape[0], 17), x.shape[1], dtype=torch.int8), w)),
        "dynamic int8": ([dynamic_pack(w) for w in weights + [head]],
                         lambda x, w: torch.ops.quantized.linear_dynamic(x, w, True)),
        "q8 (chatbuild)": ([q8.pack(w) for w in weights + [head]], q8.matmul),
    }


def timed(fn, trials: int) -> float:
    fn()
    times = []
    for _ in range(trials):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return round(statistics.median(times) * 1e3, 2)


def measure(rows_list: list[int], trials: int, log) -> dict:
    import torch

    torch.manual_seed(0)
    weights = [torch.randn(o, i) * 0.02 for _ in range(LAYERS) for o, i in SHAPES]
    head = torch.randn(VOCAB, HIDDEN) * 0.02
    out = {}
    for name, (prepared, fn) in kernels(weights, head).items():
        layers, last = prepared[:-1], prepared[-1]
        out[name] = {}
        for rows in rows_list:
            xs = {HIDDEN: torch.randn(rows, HIDDEN), MLP: torch.randn(rows, MLP)}
            inputs = [xs[i] for _ in range(LAYERS) for _, i in SHAPES]

            def step(layers=layers, fn=fn, inputs=inputs):
                for x, w in zip(inputs, layers, strict=True):
                    fn(x, w)

            def project(fn=fn, x=xs[HIDDEN], w=last):
                fn(x, w)

            out[name][rows] = {"layers_ms": timed(step, trials), "head_ms": timed(project, trials)}
            log(f"{name:18s} {rows:3d} rows: {out[name][rows]}")
    return out


def agreement(log) -> dict:
    """SmolLM2 with its projections and head in dynamic int8, and in chatbuild's q8, against fp32,
    teacher-forced on fp32's greedy replies: the share of positions with the same top token."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from chatbuild.bases import resolve_base
    from chatbuild.engines import q8

    class Dynamic(torch.nn.Module):
        def __init__(self, linear):
            super().__init__()
            self.packed = dynamic_pack(linear.weight.detach(), linear.bias)

        def forward(self, x):
            y = torch.ops.quantized.linear_dynamic(x.reshape(-1, x.shape[-1]), self.packed, True)
            return y.view(*x.shape[:-1], -1)

    class Q8(torch.nn.Module):
        def __init__(self, linear):
            super().__init__()
            self.packed = q8.pack(linear.weight, linear.bias)

        def forward(self, x):
            return q8.matmul(x.reshape(-1, x.shape[-1]), self.packed).view(*x.shape[:-1], -1)

    path = resolve_base("smollm2")
    tokenizer = AutoTokenizer.from_pretrained(path)
    reference = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    out = {}
    for kernel, wrapper in (("dynamic int8", Dynamic), ("q8 (chatbuild)", Q8)):
        quantized = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
        for layer in quantized.model.layers:
            for part in (layer.self_attn, layer.mlp):
                for name, module in list(part.named_children()):
                    if isinstance(module, torch.nn.Linear):
                        setattr(part, name, wrapper(module))
        quantized.lm_head = wrapper(quantized.lm_head)
        same = total = 0
        with torch.inference_mode():
            for prompt in PROMPTS:
                ids = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                                    return_tensors="pt", return_dict=True)["input_ids"]
                reply = reference.generate(input_ids=ids, do_sample=False, max_new_tokens=40)[0, ids.shape[1]:]
                full = torch.cat([ids[0], reply])[None]
                a = reference(full).logits[0, ids.shape[1] - 1:-1].argmax(-1)
                b = quantized(full).logits[0, ids.shape[1] - 1:-1].argmax(-1)
                same, total = same + int((a == b).sum()), total + len(a)
        log(f"{kernel} vs fp32, teacher-forced top-1 agreement: {same}/{total}")
        out[kernel] = {"positions": total, "same_top_token": same, "share": round(same / total, 3)}
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rows", type=int, nargs="+", default=[1, 8, 32])
    p.add_argument("--trials", type=int, default=5)
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's)")
    p.add_argument("--agreement", action="store_true", help="also SmolLM2's next-token agreement in dynamic int8 and q8")
    p.add_argument("--out", type=Path, help="result file (default bench/results/cpu-kernels-<date>.json)")
    args = p.parse_args()

    import torch

    sys.path.insert(0, str(REPO / "bench"))
    from serve import machine, versions

    if args.threads:
        torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore", message=".*quantize.*deprecated")
    log = lambda *a: print(*a, flush=True)  # noqa: E731
    started = time.perf_counter()
    result = {"command": " ".join([Path(sys.executable).name, *sys.argv]), "machine": machine(),
              "versions": versions(), "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
              "shape": {"hidden": HIDDEN, "mlp": MLP, "kv": KV, "layers": LAYERS, "vocab": VOCAB},
              "by_kernel": measure(args.rows, args.trials, log)}
    if args.agreement:
        result["agreement"] = agreement(log)
    result["total_s"] = round(time.perf_counter() - started, 1)
    out = args.out or REPO / "bench" / "results" / f"cpu-kernels-{datetime.date.today().isoformat()}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    log(f"wrote {out} in {result['total_s']} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
