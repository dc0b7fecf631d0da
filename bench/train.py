"""Benchmark: QLoRA training speed and memory, the plain HF stack against chatbuild's training path.

    .venv/bin/python bench/train.py                                   # GPU: llama-7b, every scenario
    .venv/bin/python bench/train.py --scenarios oasst --variants baseline,chunked,packed+chunked
    .venv/bin/python bench/train.py --attn flash_attention_2          # packing with a varlen kernel
    .venv/bin/python bench/train.py --device cpu --shape test-tiny --steps 3 --warmup 1 --length-scale 0.25
                                                                      # the CPU smoke test (tests/test_bench_train.py)

Writes bench/results/train-<gpu>-<date>.json (or --out) with the command, versions and device.

One run, one model shape, one data set and seed. The model is built directly in 4-bit with random
weights (`chatbuild.shapes.build_random_4bit`), once for the baseline and once for chatbuild's
variants (never both in memory), so the peaks are comparable with the plain HF stack's figures.

- baseline: the plain HF stack configured like the official QLoRA recipe: peft's `prepare_model_for_kbit_training` +
  `get_peft_model` (LoRA on all linear layers), paged AdamW 32-bit, `model(**batch).loss` on a
  right-padded batch of the step's sequences, no gradient accumulation, no clipping;
- chatbuild's variants run the real step functions of pipelines/objectives.py (`accumulate_gradients`,
  `count_targets`, `build_optimizer`, the collators of chatbuild.data.batching, `attach_lora`), with
  the recipe's gradient clipping: `plain` (length-grouped padding, the default), `chunked` (the
  `train.chunked_loss` setting), `packed` (`data.batching=packed`), `packed+chunked`.
  LoRA weights are reset to the same initial values and the RNG reseeded before every variant.

Scenarios (sequences per optimizer step, token lengths):
- oasst: 16 sequences of OASST-like lengths (lognormal, median 230, capped at 1024), grouped by
  length into steps with `chatbuild.data.batching.group_by_length`;
- fixed16x512: 16 × 512; fixed1x2048: 1 × 2048.
Tokens are random; every token is a target (whole-text loss, as in the anchors).

Reported per variant: real (non-padding) tokens/s and computed tokens/s over the timed steps (after
--warmup steps), peak allocated and reserved CUDA memory (null on CPU), and the loss of every step.
Every variant sees the same sequences in the same steps, so the first step's loss (LoRA's B is zero:
the base model's loss) must agree across variants to numerical precision, and the next ones closely
(dropout masks differ between batch layouts); `loss_check` records the largest deviations.
"""

import argparse
import datetime
import gc
import json
import math
import platform
import random
import re
import subprocess
import sys
import time
import warnings
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

SCENARIOS = {"oasst": 16, "fixed16x512": 16, "fixed1x2048": 1}  # name -> sequences per step
VARIANTS = ("baseline", "plain", "chunked", "packed", "packed+chunked")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda", help="cuda (default) or cpu (smoke test with --shape test-tiny)")
    p.add_argument("--shape", default="llama-7b", help="a named shape from chatbuild.shapes")
    p.add_argument("--scenarios", default=",".join(SCENARIOS), help=f"comma-separated, of {', '.join(SCENARIOS)}")
    p.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated, of {', '.join(VARIANTS)}")
    p.add_argument("--steps", type=int, default=12, help="optimizer steps per variant (default 12)")
    p.add_argument("--warmup", type=int, default=3, help="first steps left out of the timing (default 3)")
    p.add_argument("--micro", type=int, default=0,
                   help="sequences per forward pass in chatbuild's variants (default 0: the whole step at once, like the baseline)")
    p.add_argument("--r", type=int, default=64)
    p.add_argument("--alpha", type=int, default=16)
    p.add_argument("--dropout", type=float, default=0.1)
    p.add_argument("--lr", type=float, default=2e-4)
    p.add_argument("--optimizer", default="paged_adamw_32bit")
    p.add_argument("--attn", default="sdpa", help="attention implementation (sdpa, eager, flash_attention_2, ...)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--length-scale", type=float, default=1.0,
                   help="multiply every sequence length (and the 1024 cap) by this; < 1 for the CPU smoke test")
    p.add_argument("--out", type=Path, help="result file (default bench/results/train-<gpu>-<date>.json)")
    args = p.parse_args(argv)
    args.scenarios = [s for s in args.scenarios.split(",") if s]
    args.variants = [v for v in args.variants.split(",") if v]
    for s in args.scenarios:
        if s not in SCENARIOS:
            p.error(f"unknown scenario {s!r}; known: {', '.join(SCENARIOS)}")
    for v in args.variants:
        if v not in VARIANTS:
            p.error(f"unknown variant {v!r}; known: {', '.join(VARIANTS)}")
    if args.warmup >= args.steps:
        p.error("--warmup must be smaller than --steps")
    return args


# ── data ────────────────────────────────────────────────────────────────────────────────────────
def scenario_steps(name: str, steps: int, vocab: int, seed: int, scale: float = 1.0) -> list[list]:
    """The sequences (chatbuild `Encoded`, labels = ids) of every optimizer step of a scenario, with
    every length multiplied by `scale`."""
    import torch

    from chatbuild.data.batching import group_by_length
    from chatbuild.templates import Encoded

    per_step = SCENARIOS[name]
    rng = random.Random(seed)
    if name == "oasst":
        lengths = [min(1024, max(16, int(rng.lognormvariate(math.log(230), 0.8)))) for _ in range(per_step * steps)]
        lengths = [max(4, int(n * scale)) for n in lengths]
        groups = group_by_length(lengths, per_step, seed)
    else:
        lengths = [max(4, int((512 if name == "fixed16x512" else 2048) * scale))] * (per_step * steps)
        groups = [list(range(i, i + per_step)) for i in range(0, len(lengths), per_step)]
    g = torch.Generator().manual_seed(seed)
    examples = []
    for n in lengths:
        ids = torch.randint(0, vocab, (n,), generator=g).tolist()
        examples.append(Encoded(ids, list(ids)))
    return [[examples[i] for i in group] for group in groups]


# ── models ──────────────────────────────────────────────────────────────────────────────────────
def build_model(args, chatbuild_path: bool):
    """The 4-bit random base with fresh LoRA: peft's recipe for the baseline, `attach_lora` for ours."""
    import torch

    from chatbuild.shapes import build_random_4bit

    model = build_random_4bit(args.shape, device=args.device, seed=args.seed)
    model.set_attn_implementation(args.attn)
    torch.manual_seed(args.seed)  # the same LoRA initialization in both stacks
    if chatbuild_path:
        from chatbuild.modeling import attach_lora

        return attach_lora(model, args.r, args.alpha, args.dropout, "all-linear", gradient_checkpointing=True)
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=FutureWarning)
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=True)
    return get_peft_model(model, LoraConfig(r=args.r, lora_alpha=args.alpha, lora_dropout=args.dropout,
                                            target_modules="all-linear", task_type="CAUSAL_LM"))


# ── timing one variant ──────────────────────────────────────────────────────────────────────────
def run_variant(name: str, model, steps: list[list], args) -> dict:
    import torch

    from chatbuild.data.batching import PackedCollator, PaddedCollator
    from pipelines.finetune import build_optimizer
    from pipelines.objectives import accumulate_gradients, count_targets

    cuda = args.device.startswith("cuda")
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = build_optimizer(args.optimizer, trainable, args.lr, 0.0)
    packed, chunked = name.startswith("packed"), name.endswith("chunked")
    collate = PackedCollator() if packed else PaddedCollator(0)
    torch.manual_seed(args.seed)  # the same dropout stream for every variant
    model.train()
    if cuda:
        gc.collect()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    losses, real, computed, targets, t0 = [], 0, 0, 0, None
    for i, seqs in enumerate(steps):
        if i == args.warmup:
            if cuda:
                torch.cuda.synchronize()
            t0, real, computed, targets = time.perf_counter(), 0, 0, 0
        if name == "baseline":  # the anchors' loop, verbatim in effect
            batch = {k: v.to(args.device) for k, v in collate(seqs).items()}
            loss = model(**batch).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            loss, tokens, n_computed, n_targets = loss.item(), int(batch["attention_mask"].sum()), batch["input_ids"].numel(), count_targets(batch["labels"])
        else:  # pipelines/finetune.py's step
            micro = args.micro or len(seqs)
            batches = [collate(seqs[j:j + micro]) for j in range(0, len(seqs), micro)]
            n_targets = sum(count_targets(b["labels"]) for b in batches)
            step_loss, tokens = accumulate_gradients(model, batches, torch.tensor(float(n_targets)), args.device, chunked)
            torch.nn.utils.clip_grad_norm_(trainable, 0.3)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            loss, n_computed = step_loss.item(), sum(b["input_ids"].numel() for b in batches)
        losses.append(round(loss, 5))
        real, computed, targets = real + tokens, computed + n_computed, targets + n_targets
    if cuda:
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    row = {"variant": name, "timed_steps": len(steps) - args.warmup, "seconds": round(seconds, 3),
           "real_tokens": real, "computed_tokens": computed, "target_tokens": targets,
           "real_tok_per_s": round(real / seconds, 1), "computed_tok_per_s": round(computed / seconds, 1),
           "pad_waste": round(1 - real / computed, 4),
           "peak_alloc_gb": round(torch.cuda.max_memory_allocated() / 1e9, 3) if cuda else None,
           "peak_reserved_gb": round(torch.cuda.max_memory_reserved() / 1e9, 3) if cuda else None,
           "losses": losses}
    del optimizer
    return row


def loss_check(rows: list[dict]) -> dict:
    """Largest relative deviation from the first variant's losses: at step 1 and over all steps."""
    ref = rows[0]["losses"]

    def rel(a, b):
        return abs(a - b) / max(abs(b), 1e-12)

    first = max(rel(r["losses"][0], ref[0]) for r in rows)
    every = max(rel(a, b) for r in rows for a, b in zip(r["losses"], ref))
    return {"reference_variant": rows[0]["variant"], "step1_max_rel_diff": first, "all_steps_max_rel_diff": every}


# ── the program ─────────────────────────────────────────────────────────────────────────────────
def environment(args) -> dict:
    import bitsandbytes
    import peft
    import torch
    import transformers

    import chatbuild

    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True).stdout.strip() or None
    except OSError:
        commit = None
    gpu = torch.cuda.get_device_name(0) if args.device.startswith("cuda") else None
    return {"device": gpu or f"cpu ({platform.processor() or platform.machine()})", "gpu": gpu,
            "versions": {"python": platform.python_version(), "torch": torch.__version__,
                         "transformers": transformers.__version__, "peft": peft.__version__,
                         "bitsandbytes": bitsandbytes.__version__, "chatbuild": getattr(chatbuild, "__version__", None)},
            "git_commit": commit}


def main(argv=None) -> int:
    args = parse_args(argv)
    import torch

    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("bench/train.py: no CUDA device here; run on a GPU machine, or use --device cpu --shape test-tiny "
              "for the smoke test", file=sys.stderr)
        return 2
    from chatbuild.shapes import get_shape

    shape = get_shape(args.shape)
    env = environment(args)
    slug = re.sub(r"[^a-z0-9]+", "-", (env["gpu"] or "cpu").lower()).strip("-")
    out = args.out or REPO / "bench" / "results" / f"train-{slug}-{datetime.date.today().isoformat()}.json"
    result = {"command": " ".join(["python", "bench/train.py", *(sys.argv[1:] if argv is None else argv)]),
              "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"), **env,
              "shape": args.shape, "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
              "scenarios": {}}
    data = {s: scenario_steps(s, args.steps, shape.vocab, args.seed, args.length_scale) for s in args.scenarios}
    rows = {s: [] for s in args.scenarios}
    stacks = [(False, [v for v in args.variants if v == "baseline"]), (True, [v for v in args.variants if v != "baseline"])]
    for chatbuild_path, variants in stacks:
        if not variants:
            continue
        t = time.perf_counter()
        model = build_model(args, chatbuild_path)
        print(f"{'chatbuild' if chatbuild_path else 'baseline'} model: {args.shape} built in {time.perf_counter() - t:.1f}s",
              file=sys.stderr)
        initial = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
        for s in args.scenarios:
            for v in variants:
                with torch.no_grad():  # every variant starts from the same LoRA weights
                    for n, p in model.named_parameters():
                        if n in initial:
                            p.copy_(initial[n])
                row = run_variant(v, model, data[s], args)
                rows[s].append(row)
                print(json.dumps({"scenario": s, **{k: row[k] for k in ("variant", "real_tok_per_s", "peak_alloc_gb", "losses")}}),
                      file=sys.stderr)
        del model, initial
        gc.collect()
        if args.device.startswith("cuda"):
            torch.cuda.empty_cache()
    for s in args.scenarios:
        ordered = sorted(rows[s], key=lambda r: VARIANTS.index(r["variant"]))
        base = next((r for r in ordered if r["variant"] == "baseline"), None)
        result["scenarios"][s] = {
            "sequences_per_step": SCENARIOS[s], "variants": ordered, "loss_check": loss_check(ordered),
            "speedup_vs_baseline": {r["variant"]: round(r["real_tok_per_s"] / base["real_tok_per_s"], 3) for r in ordered} if base else None,
        }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
