"""The QLoRA fine-tune recipe: one program, read top to bottom.

    resolve config → load data → render and mask → load 4-bit base → attach LoRA
    → train (eval, log, checkpoint) → save the run folder

The objective (`train.objective`: sft, dpo, orpo) decides what the data is and what a step computes
(pipelines/objectives.py); this loop is the same for all of them.

Launch:

    chatbuild finetune tiny-cpu                                  # embedded tiny base, bundled data, CPU
    chatbuild finetune guanaco-7b model.base=huggyllama/llama-7b # the paper's Guanaco 7B recipe
    chatbuild finetune my.yaml train.lr=1e-4 lora.r=16           # a preset file plus dotted overrides
    chatbuild finetune tiny-cpu --resume                         # continue from the last checkpoint
    chatbuild finetune tiny-cpu-dpo                              # DPO on preference pairs (tiny base, CPU)
    chatbuild finetune guanaco-7b-dpo train.init_adapter=runs/guanaco-7b   # DPO from an SFT run
    python -m pipelines.finetune tiny-cpu                        # the same, without the console script
    torchrun --nproc_per_node 2 -m pipelines.finetune tiny-cpu   # data parallel, one process per device

The run folder is written through `chatbuild.runs`, its one owner (prepare, checkpoints, metrics,
plot, card, final files); this file only decides what goes into it.

Why an explicit loop rather than transformers' Trainer: it is shorter than the Trainer configuration
and callbacks it would replace, and it owns what this recipe promises — exact resume (adapter,
optimizer, scheduler, RNG and position in the data), token-weighted loss across accumulation steps
and processes, our collators (length-grouped padding or padding-free packing) and our metrics file.

Data parallel: every process holds its own 4-bit base on its own device (LOCAL_RANK) and takes every
world_size-th micro-batch of one shared, seeded batch order; LoRA gradients are summed across
processes once per optimizer step. Only LoRA weights are trainable, so this is plain data parallel
without DDP's bucketing machinery (nothing to gain for a few million parameters).
"""

import argparse
import math
import os
import random
import sys
import time
import warnings
from pathlib import Path

from chatbuild import presets, runs, tracking
from chatbuild.bases import resolve_base
from chatbuild.config import OBJECTIVES, RunConfig, load_config, to_dict
from chatbuild.errors import UserError
from pipelines.objectives import make_objective, resolve_init_adapter

SAMPLE_DATA = Path(__file__).resolve().parent.parent / "chatbuild" / "data" / "sample" / "oasst1_sample.jsonl"
OPTIMIZERS = ("paged_adamw_32bit", "paged_adamw_8bit", "adamw_32bit", "adamw_8bit", "adamw_torch", "sgd")


# bitsandbytes repeats this on every optimizer step on CPU; build_optimizer says it once instead.
warnings.filterwarnings("ignore", message="Paged optimizers are not supported on CPU")


class TrainingDiverged(UserError):
    """The loss stopped being a finite number."""


class TrainingStopped(Exception):
    """SIGTERM/SIGINT asked the run to stop; a checkpoint was saved, `--resume` continues it."""


# ── config ──────────────────────────────────────────────────────────────────────────────────────
def resolve_preset(name: str | None) -> Path | None:
    """A preset is a YAML path, or the name of a bundled one (`chatbuild.presets`, with or without .yaml)."""
    if name is None:
        return None
    path = Path(name)
    if path.is_file():
        return path
    if name.removesuffix(".yaml") in presets.names():
        return presets.path(name.removesuffix(".yaml"))
    raise UserError(f'preset "{name}" is neither a file nor a bundled preset ({", ".join(presets.names())})')


def resolve_config(preset: str | None, overrides: list[str]) -> RunConfig:
    cfg = load_config(resolve_preset(preset), overrides)
    if cfg.train.optimizer not in OPTIMIZERS:
        raise UserError(f'train.optimizer: "{cfg.train.optimizer}" is not one of {", ".join(OPTIMIZERS)}')
    if cfg.data.train == "sample":
        cfg.data.train = str(SAMPLE_DATA)
    return cfg


# ── the program ─────────────────────────────────────────────────────────────────────────────────
def finetune(cfg: RunConfig, resume: bool = False, overwrite: bool = False, progress: bool = True) -> Path:
    """Run the whole recipe; returns the run folder."""
    import torch

    from chatbuild.modeling import (
        attach_lora,
        check_causal_lm,
        default_device,
        load_base_model,
        load_tokenizer,
        start_from_adapter,
        vocab_mismatch,
    )
    from chatbuild.templates import make_format, saved_chat_template

    # ── processes ──
    world, rank = int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("RANK", 0))
    if world > 1 and not torch.distributed.is_initialized():
        torch.distributed.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    main_process = rank == 0
    say = print if main_process else (lambda *a, **k: None)
    micro, accum = cfg.train.micro_batch_size, cfg.train.batch_size // (cfg.train.micro_batch_size * world)
    if accum < 1 or accum * micro * world != cfg.train.batch_size:
        raise UserError(f"train.batch_size ({cfg.train.batch_size}) must be a multiple of "
                        f"micro_batch_size × processes ({micro} × {world})")

    # ── output folder and trackers (checked before anything heavy) ──
    tracking.check_installed(cfg.train.report_to)
    cfg.model.base = resolve_base(cfg.model.base)
    check_causal_lm(cfg.model.base, cfg.model.revision, cfg.model.trust_remote_code)  # reads config.json only
    init_run = resolve_init_adapter(cfg)  # before the folder check: it sets the LoRA settings
    resume_from = runs.prepare_run_dir(cfg, resume, overwrite)
    run_dir = cfg.run_dir
    if world > 1:  # every process has checked the folder before the first one writes to it
        torch.distributed.barrier()
    if main_process:
        runs.start_run_dir(cfg, overwrite)
    if world > 1:
        torch.distributed.barrier()
    seed_everything(cfg.train.seed)

    # ── load data, render and mask (the objective's: conversations or preference pairs) ──
    objective = make_objective(cfg)  # the registry: pipelines.objectives.OBJECTIVES
    tokenizer = load_tokenizer(cfg.model.base, cfg.model.revision, cfg.model.trust_remote_code)
    fmt = make_format(cfg.data.chat_format, cfg.data.system_prompt, tokenizer)  # the registry: templates.FORMATS
    # The saved tokenizer renders what we trained on.
    if (template := saved_chat_template(fmt, tokenizer)) is not None:
        tokenizer.chat_template = template
    objective.load(fmt, tokenizer, say)

    # ── load the 4-bit base and attach LoRA ──
    device = default_device()
    model = load_base_model(cfg.model.base, cfg.model.revision, cfg.model.quant, cfg.model.double_quant,
                            cfg.model.compute_dtype, device, cfg.model.trust_remote_code,
                            cfg.model.attn_implementation or ("sdpa" if cfg.data.batching == "grouped" else None),
                            cfg.model.quant_storage)
    extra_rows = vocab_mismatch(model, tokenizer)
    modules_to_save = None
    if extra_rows:
        # The tokenizer knows ids the embeddings don't: grow them and train/save them with the adapter
        # (vLLM cannot serve such adapters; the README says so).
        warnings.warn(f"tokenizer has {extra_rows} ids beyond the embedding matrix; resizing and saving "
                      "embed_tokens/lm_head with the adapter", stacklevel=1)
        model.resize_token_embeddings(len(tokenizer))
        modules_to_save = ["embed_tokens", "lm_head"]
    model = attach_lora(model, cfg.lora.r, cfg.lora.alpha, cfg.lora.dropout, cfg.lora.targets,
                        cfg.model.gradient_checkpointing, modules_to_save)
    if init_run is not None:  # start from a finished run's adapter (DPO keeps a frozen copy as its reference)
        start_from_adapter(model, init_run.adapter_dir, keep_reference=cfg.train.objective == "dpo")
    objective.prepare(model)
    trainable = [p for p in model.parameters() if p.requires_grad]
    if cfg.train.chunked_loss:
        from chatbuild.losses import decoder_and_head

        decoder_and_head(model)  # a model family it does not support fails here, before any step
    say(f"model: {cfg.model.base} ({cfg.model.quant}{' + double quant' if cfg.model.double_quant else ''}) "
        f"on {device}; LoRA r={cfg.lora.r} alpha={cfg.lora.alpha}: {sum(p.numel() for p in trainable) / 1e6:.2f}M trainable")

    optimizer = build_optimizer(cfg.train.optimizer, trainable, cfg.train.lr, cfg.train.weight_decay)
    scheduler = build_scheduler(optimizer, cfg.train.schedule, cfg.train.warmup_steps, cfg.train.steps)

    # ── resume ──
    start_step = 0
    if resume_from is not None:
        start_step = runs.load_checkpoint(resume_from, model, optimizer, scheduler, device)
        say(f"resume: continuing from {resume_from} (step {start_step})")

    # ── train ──
    lengths = [len(e) for e in objective.train]
    per_step = micro * accum * world
    history = runs.rewind_metrics(run_dir, start_step) if main_process else []  # only the main process logs
    trackers = tracking.start(cfg.train.report_to if main_process else [], run_dir, to_dict(cfg), start_step)

    def record(row: dict) -> None:
        """One metrics row: into the history (loss.png, the card) and, from the main process, into
        metrics.jsonl and the trackers of train.report_to."""
        history.append(row)
        if main_process:
            runs.append_metrics(run_dir, row)
            trackers.log(row)

    bar = make_progress(cfg.train.steps, start_step, enabled=progress and main_process)
    model.train()
    t_last, tokens_since = time.perf_counter(), 0
    stop = StopRequest()
    finished = False
    try:  # from here on the trackers are closed whatever happens (failed unless training finished)
        if objective.val and start_step == 0:  # the starting point, so the curve shows what training changed
            record({"step": 0, **objective.evaluate(model, device)})
        for step in range(start_step, cfg.train.steps):
            # The batch order for an epoch depends only on the seed and the epoch, so a resumed run sees
            # exactly the micro-batches an uninterrupted one would.
            micro_batches = micro_batches_for_step(step, per_step, micro, lengths, cfg.train.seed, cfg.data.batching)
            # The objective runs forward and backward over this process's micro-batches; its loss and
            # metrics come back the same on every process.
            step_loss, step_metrics, tokens = objective.step(model, micro_batches[rank::world], device, world)
            tokens_since += tokens
            if world > 1:
                for p in trainable:
                    if p.grad is not None:
                        torch.distributed.all_reduce(p.grad)
            if not math.isfinite(step_loss.item()):
                raise TrainingDiverged(f"the loss became {step_loss.item()} at step {step + 1}; lower train.lr or check "
                                       f"the data. Last checkpoint: {runs.latest_checkpoint(run_dir) or 'none'}")
            grad_norm = torch.nn.utils.clip_grad_norm_(trainable, cfg.train.max_grad_norm)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            done = step + 1

            if done % cfg.train.log_every == 0 or done == cfg.train.steps:
                elapsed = time.perf_counter() - t_last
                row = {"step": done, "loss": round(step_loss.item(), 5), **step_metrics, "lr": scheduler.get_last_lr()[0],
                       "grad_norm": round(float(grad_norm), 5), "tokens_per_s": round(tokens_since * world / elapsed, 1),
                       "memory_gb": round(memory_gb(device), 3), "time": round(time.time(), 1)}
                t_last, tokens_since = time.perf_counter(), 0
                record(row)
                bar.set_postfix(loss=f"{row['loss']:.3f}", tok_s=f"{row['tokens_per_s']:.0f}", mem=f"{row['memory_gb']:.2f}GB")
            if objective.val and ((cfg.train.eval_every and done % cfg.train.eval_every == 0) or done == cfg.train.steps):
                row = {"step": done, **objective.evaluate(model, device)}
                record(row)
                if main_process:
                    bar.write(f"step {done}: validation loss {row['eval_loss']:.4f}")
            if main_process and (done % cfg.train.log_every == 0 or done == cfg.train.steps):
                runs.plot_loss(run_dir, history, ylabel=objective.loss_label)
            if (cfg.train.save_every and done % cfg.train.save_every == 0) or done == cfg.train.steps:
                if main_process:
                    runs.save_checkpoint(run_dir, done, model, optimizer, scheduler, cfg.train.keep_checkpoints)
                if world > 1:
                    torch.distributed.barrier()
            bar.update(1)
            if stop.requested(world) and done < cfg.train.steps:
                if main_process:
                    ckpt = runs.save_checkpoint(run_dir, done, model, optimizer, scheduler, cfg.train.keep_checkpoints)
                    say(f"stopped at step {done}: checkpoint {ckpt}; continue with --resume")
                raise TrainingStopped(f"stopped at step {done}")
        finished = True
    finally:
        bar.close()
        stop.restore()
        trackers.close(failed=not finished)

    # ── save the run folder ──
    if main_process:
        runs.write_model_card(run_dir, cfg, history, report=objective.report, stop=fmt.stop, **objective.card())
        runs.save_final(run_dir, model, tokenizer, fmt)  # chat_format.json last: from here on the run is finished
        say(f"done: run folder {run_dir}")
    if world > 1:
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
    return run_dir


# ── pieces of the loop ────────────────────────────────────────────────────────────────────────
class StopRequest:
    """SIGTERM or SIGINT while training: finish the current step, save a checkpoint, stop.

    How the Builder cancels a job, and what Ctrl-C does, without losing more than one step. Signal
    handlers can only be set from the main thread; elsewhere this never fires."""

    def __init__(self):
        import signal
        import threading

        self._flag, self._old = False, {}
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                self._old[sig] = signal.signal(sig, self._set)

    def _set(self, *_):
        self._flag = True

    def requested(self, world: int) -> bool:
        if world > 1:  # every process stops at the same step
            import torch

            flag = torch.tensor(float(self._flag))
            torch.distributed.all_reduce(flag)
            return bool(flag.item())
        return self._flag

    def restore(self):
        import signal

        for sig, handler in self._old.items():
            signal.signal(sig, handler)
        self._old = {}


def seed_everything(seed: int) -> None:
    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def micro_batches_for_step(step: int, per_step: int, micro: int, lengths: list[int], seed: int, batching: str):
    """The micro-batches (lists of example indices) of one optimizer step, for all processes.

    Examples are visited in epochs; each epoch's order is a seeded function of (seed, epoch), with
    length grouping for padded batches (the official recipe's group_by_length)."""
    n = len(lengths)
    out, first = [], step * per_step
    for k in range(0, per_step, micro):
        idx = []
        for j in range(first + k, first + k + micro):
            epoch, pos = divmod(j, n)
            idx.append(_epoch_order(epoch, lengths, seed, batching, micro)[pos])
        out.append(idx)
    return out


_ORDER_CACHE: dict = {}


def _epoch_order(epoch: int, lengths: list[int], seed: int, batching: str, micro: int) -> list[int]:
    key = (epoch, len(lengths), seed, batching, micro)
    if key not in _ORDER_CACHE:
        from chatbuild.data.batching import group_by_length

        if batching == "grouped" and micro > 1:
            order = [i for batch in group_by_length(lengths, micro, seed + epoch) for i in batch]
        else:
            order = list(range(len(lengths)))
            random.Random(seed + epoch).shuffle(order)
        _ORDER_CACHE.clear()
        _ORDER_CACHE[key] = order
    return _ORDER_CACHE[key]


def build_optimizer(name: str, params, lr: float, weight_decay: float):
    import torch

    if name in ("adamw_torch", "sgd"):
        if name == "sgd":
            return torch.optim.SGD(params, lr=lr, weight_decay=weight_decay)
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    import bitsandbytes as bnb

    cls = {"paged_adamw_32bit": bnb.optim.PagedAdamW32bit, "paged_adamw_8bit": bnb.optim.PagedAdamW8bit,
           "adamw_32bit": bnb.optim.AdamW32bit, "adamw_8bit": bnb.optim.AdamW8bit}[name]
    if name.startswith("paged") and not torch.cuda.is_available():
        # bitsandbytes falls back to a non-paged optimizer on CPU; say it once, clearly.
        warnings.warn(f"{name}: paged optimizers need CUDA; running the non-paged equivalent on CPU", stacklevel=1)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*Paged optimizers are not supported on CPU.*")
        return cls(params, lr=lr, weight_decay=weight_decay)


def build_scheduler(optimizer, schedule: str, warmup: int, total: int):
    import torch

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total - warmup)
        if schedule == "linear":
            return max(0.0, 1 - progress)
        if schedule == "cosine":
            return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
        return 1.0

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def memory_gb(device: str) -> float:
    """Peak memory so far: CUDA allocated on GPU, the process's peak resident set on CPU."""
    import torch

    if device.startswith("cuda"):
        return torch.cuda.max_memory_allocated(device) / 1e9
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6  # KiB on Linux


def make_progress(total: int, start: int, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=start, desc="finetune", unit="step", disable=not enabled, dynamic_ncols=True,
                file=sys.stderr)


# ── command line ────────────────────────────────────────────────────────────────────────────────
def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("preset", nargs="?", help="a YAML preset file or a bundled preset name "
                   f"({', '.join(presets.names())})")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="dotted overrides, e.g. train.lr=1e-4 lora.r=16; "
                   "train.objective picks what is trained: " + "; ".join(f"{k}: {v}" for k, v in OBJECTIVES.items()))
    p.add_argument("--resume", action="store_true", help="continue the run in output_dir from its last checkpoint")
    p.add_argument("--overwrite", action="store_true", help="replace whatever output_dir holds")
    p.add_argument("--no-progress", action="store_true", help="no progress bar (logs only)")


def run(args: argparse.Namespace) -> int:
    preset, overrides = args.preset, list(args.overrides)
    if preset and "=" in preset:  # `chatbuild finetune key=value ...` without a preset
        preset, overrides = None, [preset, *overrides]
    cfg = resolve_config(preset, overrides)
    try:
        finetune(cfg, resume=args.resume, overwrite=args.overwrite, progress=not args.no_progress)
    except TrainingStopped as e:
        print(f"chatbuild finetune: {e}; continue with --resume", file=sys.stderr)
        return 143
    return 0


if __name__ == "__main__":
    from chatbuild.cli import main

    raise SystemExit(main(["finetune", *sys.argv[1:]]))
