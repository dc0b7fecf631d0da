"""Benchmark: peak GPU memory of one QLoRA training step for big shapes, against the planner.

    .venv/bin/python bench/memory.py                                  # llama-33b and llama-65b, 1×512 and 1×2048
    .venv/bin/python bench/memory.py --shapes llama-65b --seqs 2048   # one case
    .venv/bin/python bench/memory.py --shapes llama-7b --seqs 512,2048 --variants plain,chunked

Writes bench/results/memory-<gpu>-<date>.json (or --out). CUDA only: without a GPU it says so in
one line and exits with status 2 (peaks of PyTorch's CUDA allocator are what is measured).

Each shape is built directly in 4-bit with random weights (`chatbuild.shapes.build_random_4bit`: the
layers created on the meta device and their weights quantized one at a time, never held in 16 bits), LoRA attached with `attach_lora`
(r=64 on all linear layers, gradient checkpointing), paged AdamW 32-bit, micro-batch 1. Per sequence
length and variant, three full steps run (`pipelines.objectives.accumulate_gradients`, clipping,
optimizer step) after the peak counters are reset:
- plain: the model computes its loss (`model(..., labels=...)`), as the anchors do;
- chunked: `train.chunked_loss` (chatbuild.losses), no full fp32 logits.
Beside each measurement: `chatbuild.planner.plan_memory`'s prediction for the same case (the planner
models the plain path, so its "logits + loss" term is expected to overshoot for `chunked`).
"""

import argparse
import datetime
import gc
import json
import platform
import re
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shapes", default="llama-33b,llama-65b", help="named shapes, comma-separated")
    p.add_argument("--seqs", default="512,2048", help="sequence lengths (batch 1), comma-separated")
    p.add_argument("--variants", default="plain,chunked", help="plain and/or chunked")
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--r", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, help="result file (default bench/results/memory-<gpu>-<date>.json)")
    args = p.parse_args(argv)
    args.shapes = [s for s in args.shapes.split(",") if s]
    args.seqs = [int(s) for s in args.seqs.split(",") if s]
    args.variants = [v for v in args.variants.split(",") if v]
    if not set(args.variants) <= {"plain", "chunked"}:
        p.error("--variants: plain and/or chunked")
    return args


def measure(model, trainable, optimizer, seq: int, vocab: int, chunked: bool, steps: int) -> dict:
    import torch

    from pipelines.objectives import accumulate_gradients, count_targets

    gc.collect()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    times, loss = [], None
    for _ in range(steps):
        x = torch.randint(0, vocab, (1, seq))
        batch = {"input_ids": x, "attention_mask": torch.ones_like(x), "labels": x}
        torch.cuda.synchronize()
        t = time.perf_counter()
        loss, _ = accumulate_gradients(model, [batch], torch.tensor(float(count_targets(x))), "cuda", chunked)
        torch.nn.utils.clip_grad_norm_(trainable, 0.3)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    return {"step_s": round(min(times), 3), "tok_per_s": round(seq / min(times)), "loss": round(loss.item(), 4),
            "peak_alloc_gb": round(torch.cuda.max_memory_allocated() / 1e9, 3),
            "peak_reserved_gb": round(torch.cuda.max_memory_reserved() / 1e9, 3)}


def main(argv=None) -> int:
    args = parse_args(argv)
    import torch

    if not torch.cuda.is_available():
        print("bench/memory.py needs a CUDA GPU (it measures the CUDA allocator's peaks); none here", file=sys.stderr)
        return 2
    import bitsandbytes
    import peft
    import transformers

    from chatbuild.modeling import attach_lora
    from chatbuild.planner import plan_memory
    from chatbuild.shapes import build_random_4bit, get_shape
    from pipelines.finetune import build_optimizer

    gpu = torch.cuda.get_device_name(0)
    slug = re.sub(r"[^a-z0-9]+", "-", gpu.lower()).strip("-")
    out = args.out or REPO / "bench" / "results" / f"memory-{slug}-{datetime.date.today().isoformat()}.json"
    result = {"command": " ".join(["python", "bench/memory.py", *(sys.argv[1:] if argv is None else argv)]),
              "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"), "gpu": gpu,
              "gpu_total_gb": round(torch.cuda.get_device_properties(0).total_memory / 1e9, 2),
              "versions": {"python": platform.python_version(), "torch": torch.__version__,
                           "transformers": transformers.__version__, "peft": peft.__version__,
                           "bitsandbytes": bitsandbytes.__version__},
              "cases": []}
    for name in args.shapes:
        shape = get_shape(name)
        torch.cuda.reset_peak_memory_stats()
        t = time.perf_counter()
        model = build_random_4bit(shape, device="cuda", seed=args.seed)
        torch.manual_seed(args.seed)
        model = attach_lora(model, args.r, 16, 0.05, "all-linear", gradient_checkpointing=True)
        model.train()
        build = {"build_s": round(time.perf_counter() - t, 1), "weights_and_lora_gb": round(torch.cuda.memory_allocated() / 1e9, 3)}
        trainable = [p for p in model.parameters() if p.requires_grad]
        optimizer = build_optimizer("paged_adamw_32bit", trainable, 1e-4, 0.0)
        for seq in args.seqs:
            plan = plan_memory(shape, 1, seq, args.r)
            for variant in args.variants:
                try:
                    row = measure(model, trainable, optimizer, seq, shape.vocab, variant == "chunked", args.steps)
                except torch.cuda.OutOfMemoryError as e:
                    row = {"error": f"out of memory: {str(e).splitlines()[0][:200]}"}
                    optimizer.zero_grad(set_to_none=True)
                row = {"shape": name, "batch": 1, "seq": seq, "variant": variant, **build, **row,
                       "planned_gb": round(plan.total_gb, 3), "planned_terms_gb": {k: round(v, 3) for k, v in plan.rows()}}
                if "peak_alloc_gb" in row:
                    row["planned_over_measured"] = round(plan.total_gb / row["peak_alloc_gb"], 3)
                result["cases"].append(row)
                print(json.dumps({k: row.get(k) for k in ("shape", "seq", "variant", "peak_alloc_gb", "planned_gb", "tok_per_s", "error")}),
                      file=sys.stderr)
        del model, trainable, optimizer
        gc.collect()
        torch.cuda.empty_cache()
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
