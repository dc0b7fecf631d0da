"""Predict training memory before renting the GPU: `chatbuild plan MODEL`.

    chatbuild plan llama-65b --seq 512                     # a named shape
    chatbuild plan huggyllama/llama-7b --batch 16 --gpu-gb 24
    chatbuild plan demo/tiny-base --r 16                   # any local or hub config

MODEL is a named shape (chatbuild.shapes) or anything AutoConfig reads. The estimate is the peak
PyTorch allocates in one QLoRA training step (chatbuild.planner explains each term); with --gpu-gb
it says whether that fits and what to change if not.
"""

import argparse
import sys

from chatbuild.errors import UserError


def add_arguments(p: argparse.ArgumentParser) -> None:
    from chatbuild.shapes import SHAPES

    p.add_argument("model", help=f"a named shape ({', '.join(SHAPES)}), a hub id or a local model folder")
    p.add_argument("--seq", type=int, default=512, help="tokens per sequence (default 512)")
    p.add_argument("--batch", type=int, default=1, help="sequences per forward pass (micro-batch, default 1)")
    p.add_argument("--r", type=int, default=64, help="LoRA rank (default 64)")
    p.add_argument("--quant", default="nf4", choices=("nf4", "fp4", "int8", "none"))
    p.add_argument("--no-double-quant", action="store_true")
    p.add_argument("--optim", default="paged_adamw_32bit", help="optimizer name, as in train.optimizer")
    p.add_argument("--no-checkpointing", action="store_true", help="without gradient checkpointing")
    p.add_argument("--gpu-gb", type=float, help="GPU memory to check the plan against")


def run(args: argparse.Namespace) -> int:
    from chatbuild.planner import advice, human, plan_memory, shape_from_config
    from chatbuild.shapes import SHAPES

    for flag in ("seq", "batch", "r"):
        if getattr(args, flag) < 1:
            raise UserError(f"--{flag} must be >= 1, got {getattr(args, flag)}")
    if args.model in SHAPES:
        shape = SHAPES[args.model]
    else:
        from chatbuild.modeling import check_causal_lm

        shape = shape_from_config(check_causal_lm(args.model))
    plan = plan_memory(shape, args.batch, args.seq, args.r, args.quant, not args.no_double_quant, args.optim,
                       not args.no_checkpointing)
    print(f"{args.model}: {shape.linear_params() / 1e9:.2f}B linear weights, batch {args.batch} × {args.seq} tokens, "
          f"LoRA r={args.r}, {args.quant}, {args.optim}")
    for label, gb in plan.rows():
        print(f"  {label:<60} {human(gb):>10}")
    if args.gpu_gb:
        if plan.total_gb <= args.gpu_gb:
            print(f"fits a {args.gpu_gb:g} GB GPU with {human(args.gpu_gb - plan.total_gb)} to spare")
        else:
            print(f"does NOT fit a {args.gpu_gb:g} GB GPU (over by {human(plan.total_gb - args.gpu_gb)}); try:")
            for line in advice(plan, args.gpu_gb, shape, args.batch, args.seq, args.r, args.optim):
                print(f"  - {line}")
            return 1
    return 0


if __name__ == "__main__":
    from chatbuild.cli import main

    raise SystemExit(main(["plan", *sys.argv[1:]]))
