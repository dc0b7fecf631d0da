"""The QLoRA fine-tune recipe: one program, read top to bottom.

    resolve config → load conversations → render and mask → load 4-bit base → attach LoRA
    → train (eval, log, checkpoint) → save the run folder

Launch:

    chatbuild finetune tiny-cpu                                  # embedded tiny base, bundled data, CPU
    chatbuild finetune guanaco-7b model.base=huggyllama/llama-7b # the paper's Guanaco 7B recipe
    chatbuild finetune my.yaml train.lr=1e-4 lora.r=16           # a preset file plus dotted overrides
    chatbuild finetune tiny-cpu --resume                         # continue from the last checkpoint
    python -m pipelines.finetune tiny-cpu                        # the same, without the console script
    torchrun --nproc_per_node 2 -m pipelines.finetune tiny-cpu   # data parallel, one process per device

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
import contextlib
import json
import math
import os
import random
import shutil
import sys
import time
import warnings
from pathlib import Path

from chatbuild import presets
from chatbuild.bases import resolve_base
from chatbuild.config import RunConfig, load_config, save_config, to_dict
from chatbuild.errors import UserError
from chatbuild.runs import ADAPTER_FILES

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


def prepare_run_dir(cfg: RunConfig, resume: bool, overwrite: bool) -> Path | None:
    """Check the output folder before any heavy work. Returns the checkpoint to resume from, if any."""
    out = cfg.run_dir
    if resume and overwrite:
        raise UserError("--resume and --overwrite contradict each other; pick one")
    if not out.exists() or not any(out.iterdir()):
        if resume:
            raise UserError(f"{out}: nothing to resume (the folder is empty or missing)")
        return None
    if overwrite:
        return None
    if not (out / "config.yaml").is_file():
        raise UserError(f"{out} is not empty and holds no run; pass --overwrite to replace it, or set output_dir")
    from chatbuild.config import read_config

    old = to_dict(read_config(out / "config.yaml"))
    new = to_dict(cfg)
    if not resume:
        raise UserError(f"{out} already holds a run ({old['name']}); pass --resume to continue it or "
                        "--overwrite to start again")
    # Resuming may extend training or change logging cadence; everything else must match.
    free = {"steps", "eval_every", "eval_batches", "save_every", "keep_checkpoints", "log_every", "chunked_loss"}
    diff = [f"{s}.{k}" for s in ("model", "lora", "data", "train") for k in new[s]
            if new[s][k] != old[s][k] and not (s == "train" and k in free)]
    if diff:
        raise UserError(f"{out}: cannot resume, the configuration differs in {', '.join(diff)}")
    ckpt = latest_checkpoint(out)
    if ckpt is None:
        raise UserError(f"{out}: no checkpoint to resume from (checkpoints/ is empty)")
    return ckpt


def latest_checkpoint(run_dir: Path) -> Path | None:
    steps = sorted((int(p.name.split("-")[1]), p) for p in (run_dir / "checkpoints").glob("step-*")
                   if p.name.split("-")[1].isdigit() and (p / "state.json").is_file())
    return steps[-1][1] if steps else None


# ── the program ─────────────────────────────────────────────────────────────────────────────────
def finetune(cfg: RunConfig, resume: bool = False, overwrite: bool = False, progress: bool = True) -> Path:
    """Run the whole recipe; returns the run folder."""
    import torch

    from chatbuild import data as cb_data
    from chatbuild.data.batching import PackedCollator, PaddedCollator, tokenize_conversations
    from chatbuild.modeling import (
        attach_lora,
        check_causal_lm,
        default_device,
        load_base_model,
        load_tokenizer,
        vocab_mismatch,
    )
    from chatbuild.templates import guanaco_jinja_template, make_format

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

    # ── output folder (checked before anything heavy) ──
    cfg.model.base = resolve_base(cfg.model.base)
    check_causal_lm(cfg.model.base, cfg.model.revision, cfg.model.trust_remote_code)  # reads config.json only
    resume_from = prepare_run_dir(cfg, resume, overwrite)
    run_dir = cfg.run_dir
    if world > 1:  # every process has checked the folder before the first one writes to it
        torch.distributed.barrier()
    if main_process:
        if overwrite and run_dir.exists():
            shutil.rmtree(run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        save_config(cfg, run_dir / "config.yaml")
    if world > 1:
        torch.distributed.barrier()
    seed_everything(cfg.train.seed)

    # ── load conversations ──
    convs, report = cb_data.load_conversations(
        cfg.data.train, format=cfg.data.format, mode=cfg.data.mode, lang=cfg.data.lang,
        include_synthetic=cfg.data.include_synthetic, skip_invalid=cfg.data.skip_invalid)
    say(f"data: {cfg.data.train}: {report.summary() if hasattr(report, 'summary') else report}")
    if cfg.data.validation:
        train_convs = convs
        val_convs, _ = cb_data.load_conversations(cfg.data.validation, format=cfg.data.format, mode=cfg.data.mode,
                                                  lang=cfg.data.lang, include_synthetic=cfg.data.include_synthetic,
                                                  skip_invalid=cfg.data.skip_invalid)
    else:
        train_convs, val_convs = cb_data.split_conversations(convs, cfg.data.val_fraction, cfg.train.seed)
    if not train_convs:
        raise UserError(f"{cfg.data.train}: no training conversations left after filtering ({report})")

    # ── render and mask ──
    tokenizer = load_tokenizer(cfg.model.base, cfg.model.revision, cfg.model.trust_remote_code)
    fmt = make_format(cfg.data.chat_format, cfg.data.system_prompt, tokenizer)  # the registry: templates.FORMATS
    # The saved tokenizer renders what we trained on.
    if fmt.name == "guanaco" and not getattr(tokenizer, "chat_template", None):
        tokenizer.chat_template = guanaco_jinja_template()
    elif fmt.template is not None:
        tokenizer.chat_template = fmt.template
    train_set = tokenize_conversations(train_convs, fmt, tokenizer, cfg.data.max_length, cfg.data.train_on_prompts)
    val_set = tokenize_conversations(val_convs, fmt, tokenizer, cfg.data.max_length, cfg.data.train_on_prompts)
    train_set = [e for e in train_set if any(label != -100 for label in e.labels[1:])]
    if not train_set:
        raise UserError("no training example has a token to learn (every reply was cut by data.max_length?)")
    say(f"data: {len(train_set)} training / {len(val_set)} validation conversations, "
        f"{sum(len(e) for e in train_set):,} training tokens, chat format {fmt.name}")
    collate = PackedCollator() if cfg.data.batching == "packed" else PaddedCollator(tokenizer.pad_token_id)

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
        start_step = load_checkpoint(resume_from, model, optimizer, scheduler, device)
        say(f"resume: continuing from {resume_from} (step {start_step})")

    # ── train ──
    lengths = [len(e) for e in train_set]
    per_step = micro * accum * world
    metrics_path = run_dir / "metrics.jsonl"
    if main_process and start_step == 0 and metrics_path.exists():
        metrics_path.unlink()
    history = read_metrics(metrics_path, upto=start_step)
    if val_set and start_step == 0:  # the starting point, so the curve shows what training changed
        row = {"step": 0, "eval_loss": round(evaluate(model, val_set, collate, micro, device, cfg.train.eval_batches), 5)}
        history.append(row)
        if main_process:
            append_metrics(metrics_path, row)
    bar = make_progress(cfg.train.steps, start_step, enabled=progress and main_process)
    model.train()
    t_last, tokens_since = time.perf_counter(), 0
    stop = StopRequest()
    try:
        for step in range(start_step, cfg.train.steps):
            # The batch order for an epoch depends only on the seed and the epoch, so a resumed run sees
            # exactly the micro-batches an uninterrupted one would.
            micro_batches = micro_batches_for_step(step, per_step, micro, lengths, cfg.train.seed, cfg.data.batching)
            mine = micro_batches[rank::world]
            batches = [collate([train_set[i] for i in idx]) for idx in mine]
            n_items = torch.tensor(float(sum(count_targets(b["labels"]) for b in batches)))
            if world > 1:
                torch.distributed.all_reduce(n_items)
            step_loss, tokens = accumulate_gradients(model, batches, n_items, device, cfg.train.chunked_loss)
            tokens_since += tokens
            if world > 1:
                torch.distributed.all_reduce(step_loss)
                for p in trainable:
                    if p.grad is not None:
                        torch.distributed.all_reduce(p.grad)
            if not math.isfinite(step_loss.item()):
                raise TrainingDiverged(f"the loss became {step_loss.item()} at step {step + 1}; lower train.lr or check "
                                       f"the data. Last checkpoint: {latest_checkpoint(run_dir) or 'none'}")
            grad_norm = torch.nn.utils.clip_grad_norm_(trainable, cfg.train.max_grad_norm)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            done = step + 1

            if done % cfg.train.log_every == 0 or done == cfg.train.steps:
                elapsed = time.perf_counter() - t_last
                row = {"step": done, "loss": round(step_loss.item(), 5), "lr": scheduler.get_last_lr()[0],
                       "grad_norm": round(float(grad_norm), 5), "tokens_per_s": round(tokens_since * world / elapsed, 1),
                       "memory_gb": round(memory_gb(device), 3), "time": round(time.time(), 1)}
                t_last, tokens_since = time.perf_counter(), 0
                history.append(row)
                if main_process:
                    append_metrics(metrics_path, row)
                bar.set_postfix(loss=f"{row['loss']:.3f}", tok_s=f"{row['tokens_per_s']:.0f}", mem=f"{row['memory_gb']:.2f}GB")
            if val_set and ((cfg.train.eval_every and done % cfg.train.eval_every == 0) or done == cfg.train.steps):
                row = {"step": done, "eval_loss": round(evaluate(model, val_set, collate, micro, device, cfg.train.eval_batches), 5)}
                history.append(row)
                if main_process:
                    append_metrics(metrics_path, row)
                    bar.write(f"step {done}: validation loss {row['eval_loss']:.4f}")
            if main_process and (done % cfg.train.log_every == 0 or done == cfg.train.steps):
                plot_loss(history, run_dir / "loss.png")
            if (cfg.train.save_every and done % cfg.train.save_every == 0) or done == cfg.train.steps:
                if main_process:
                    save_checkpoint(run_dir, done, model, optimizer, scheduler, cfg.train.keep_checkpoints)
                if world > 1:
                    torch.distributed.barrier()
            bar.update(1)
            if stop.requested(world) and done < cfg.train.steps:
                if main_process:
                    ckpt = save_checkpoint(run_dir, done, model, optimizer, scheduler, cfg.train.keep_checkpoints)
                    say(f"stopped at step {done}: checkpoint {ckpt}; continue with --resume")
                raise TrainingStopped(f"stopped at step {done}")
    finally:
        bar.close()
        stop.restore()

    # ── save the run folder ──
    if main_process:
        model.save_pretrained(run_dir / "adapter", safe_serialization=True)
        tokenizer.save_pretrained(run_dir / "tokenizer")
        fmt.save(run_dir / "chat_format.json")
        write_model_card(run_dir, cfg, report, len(train_set), len(val_set), history)
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


def count_targets(labels) -> int:
    """Tokens that contribute to the loss: labels after the causal shift that are not -100."""
    return int((labels[..., 1:] != -100).sum())


def forward_loss(model, batch: dict, num_items_in_batch, chunked_loss: bool = False):
    """One micro-batch's loss: its summed token cross-entropy / `num_items_in_batch` (the target tokens
    of the whole optimizer step), so the micro-batches' losses add up to the step's token-weighted mean.

    chunked_loss: the decoder body runs alone and `chatbuild.losses` computes the head and the loss in
    chunks, never holding the full fp32 logits; the same number as the plain forward."""
    if not chunked_loss:
        return model(**batch, use_cache=False, num_items_in_batch=num_items_in_batch).loss
    from chatbuild.losses import chunked_causal_lm_loss, decoder_and_head

    body, head_weight = decoder_and_head(model)
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    hidden = body(**inputs, use_cache=False).last_hidden_state
    return chunked_causal_lm_loss(hidden, head_weight, batch["labels"], num_items_in_batch)


def accumulate_gradients(model, batches: list[dict], n_items, device: str, chunked_loss: bool = False):
    """Forward and backward over one optimizer step's micro-batches, summing LoRA gradients.

    n_items: target tokens of the whole step (`count_targets`, across processes). Returns the step's
    loss (a CPU fp32 scalar tensor) and the real (non-padding) tokens it computed."""
    import torch

    step_loss, tokens = torch.zeros(()), 0
    for b in batches:
        b = {k: v.to(device) for k, v in b.items()}
        loss = forward_loss(model, b, n_items.to(device), chunked_loss)
        loss.backward()
        step_loss += loss.detach().float().cpu()
        tokens += int(b["attention_mask"].sum()) if "attention_mask" in b else b["input_ids"].numel()
    return step_loss, tokens


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


def evaluate(model, examples, collate, micro: int, device: str, max_batches: int = 0) -> float:
    """Token-weighted mean loss over the validation examples (dropout off)."""
    import torch

    model.eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for i, start in enumerate(range(0, len(examples), micro)):
            if max_batches and i >= max_batches:
                break
            b = {k: v.to(device) for k, v in collate(examples[start:start + micro]).items()}
            n = count_targets(b["labels"])
            if n:
                total += model(**b, use_cache=False, num_items_in_batch=torch.tensor(1.0, device=device)).loss.item()
                count += n
    model.train()
    return total / max(count, 1)


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


# ── checkpoints ─────────────────────────────────────────────────────────────────────────────────
def save_checkpoint(run_dir: Path, step: int, model, optimizer, scheduler, keep: int) -> Path:
    """checkpoints/step-N/: adapter, optimizer, scheduler and RNG states, written to a temporary
    folder and renamed, so a kill never leaves a half checkpoint that looks whole."""
    import numpy as np
    import torch

    root = run_dir / "checkpoints"
    final, tmp = root / f"step-{step}", root / f".step-{step}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    model.save_pretrained(tmp / "adapter", safe_serialization=True)
    # Tensors and plain Python values only, so that resuming can load them with weights_only=True.
    torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
    torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
    kind, key, pos, has_gauss, gauss = np.random.get_state()
    rng = {"python": random.getstate(), "numpy": (kind, key.tolist(), pos, has_gauss, gauss),
           "torch": torch.get_rng_state(),
           "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}
    torch.save(rng, tmp / "rng.pt")
    (tmp / "state.json").write_text(json.dumps({"step": step}) + "\n")
    shutil.rmtree(final, ignore_errors=True)
    tmp.rename(final)
    if keep > 0:
        old = sorted((int(p.name.split("-")[1]), p) for p in root.glob("step-*") if p.name.split("-")[1].isdigit())
        for _, p in old[:-keep]:
            shutil.rmtree(p, ignore_errors=True)
    return final


def load_checkpoint(path: Path, model, optimizer, scheduler, device: str) -> int:
    """Restore adapter, optimizer, scheduler and RNG states from checkpoints/step-N/; returns N.
    Raises UserError, naming the file, when one cannot be read or holds what chatbuild never writes."""
    import numpy as np
    import torch
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    set_peft_model_state_dict(model, load_file(path / "adapter" / ADAPTER_FILES[1], device=device))
    with _restoring(path / "optimizer.pt"):
        optimizer.load_state_dict(load_state(path / "optimizer.pt", device))
    with _restoring(path / "scheduler.pt"):
        scheduler.load_state_dict(load_state(path / "scheduler.pt"))
    with _restoring(path / "rng.pt"):
        rng = load_state(path / "rng.pt")
        random.setstate(rng["python"])
        np.random.set_state(rng["numpy"])
        torch.set_rng_state(rng["torch"])
        if rng["cuda"] is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(rng["cuda"])
    return json.loads((path / "state.json").read_text())["step"]


def load_state(file: Path, device: str | None = None):
    """A checkpoint's torch file, loaded with weights_only=True: tensors and plain Python values are
    rebuilt, nothing else is, so a file that pickles an object (whose unpickling could run any code)
    is refused instead of executed. UserError, naming the file, when it is refused or unreadable."""
    import pickle
    import re

    import torch

    try:
        return torch.load(file, map_location=device, weights_only=True)
    except pickle.UnpicklingError as e:
        found = re.search(r"Unsupported global: GLOBAL (\S+)", str(e))
        what = f", it asks for {found.group(1)}" if found else ""
        raise UserError(f"{file}: refused: not only tensors and plain values as chatbuild writes them{what} "
                        "(tampered with, corrupt, or from an older chatbuild), so it was not unpickled; remove "
                        "this checkpoint folder to resume from an earlier one, or start again with --overwrite") from None
    except (OSError, RuntimeError, EOFError, ValueError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"{file}: cannot read this checkpoint file ({first})") from None


@contextlib.contextmanager
def _restoring(file: Path):
    """A state that loads but does not fit (another optimizer, a file edited by hand) fails in one line."""
    try:
        yield
    except UserError:
        raise
    except (KeyError, TypeError, ValueError, IndexError) as e:
        why = " ".join(str(e).split())
        raise UserError(f"{file}: not a state this run can resume from ({type(e).__name__}: {why})") from None


# ── metrics, plot, model card ───────────────────────────────────────────────────────────────────
def append_metrics(path: Path, row: dict) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(row) + "\n")


def read_metrics(path: Path, upto: int) -> list[dict]:
    """Metrics rows up to a step (a resumed run drops rows logged after its checkpoint)."""
    if not path.exists():
        return []
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    kept = [r for r in rows if r["step"] <= upto]
    if len(kept) != len(rows):
        path.write_text("".join(json.dumps(r) + "\n" for r in kept))
    return kept


def plot_loss(history: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train = [(r["step"], r["loss"]) for r in history if "loss" in r]
    val = [(r["step"], r["eval_loss"]) for r in history if "eval_loss" in r]
    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=100)
    if train:
        ax.plot(*zip(*train), label="train loss")
    if val:
        ax.plot(*zip(*val), marker="o", label="validation loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (per target token)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    tmp = path.with_name(".loss.tmp.png")
    fig.savefig(tmp)
    plt.close(fig)
    tmp.replace(path)


def write_model_card(run_dir: Path, cfg: RunConfig, report, n_train: int, n_val: int, history: list[dict]) -> None:
    last_train = next((r for r in reversed(history) if "loss" in r), {})
    evals = [r for r in history if "eval_loss" in r]
    lines = [
        f"# {cfg.name}",
        "",
        f"A LoRA adapter for `{cfg.model.base}`" + (f" (revision `{cfg.model.revision}`)" if cfg.model.revision else "")
        + f", fine-tuned with chatbuild's QLoRA recipe: the base frozen in {cfg.model.quant}"
        + (" with double quantization" if cfg.model.double_quant else "") + ", LoRA adapters trained through it.",
        "",
        "## Data",
        f"- source: `{cfg.data.train}` (format {cfg.data.format}, OASST1 mode {cfg.data.mode}, languages {cfg.data.lang or 'all'})",
        f"- {n_train} training and {n_val} validation conversations; max length {cfg.data.max_length} tokens; "
        f"{'whole-text loss' if cfg.data.train_on_prompts else 'loss on assistant turns only'}",
        f"- chat format: {cfg.data.chat_format}",
        "",
        "## Hyperparameters",
        f"- LoRA r={cfg.lora.r}, alpha={cfg.lora.alpha}, dropout={cfg.lora.dropout}, targets={cfg.lora.targets}",
        f"- {cfg.train.steps} steps × {cfg.train.batch_size} sequences, lr {cfg.train.lr} ({cfg.train.schedule}), "
        f"optimizer {cfg.train.optimizer}, max grad norm {cfg.train.max_grad_norm}, seed {cfg.train.seed}",
        "",
        "## Results",
        f"- final training loss: {last_train.get('loss', 'n/a')} at step {last_train.get('step', 'n/a')}",
    ]
    if evals:
        lines.append(f"- validation loss: {evals[0]['eval_loss']} at step {evals[0]['step']} → "
                     f"{evals[-1]['eval_loss']} at step {evals[-1]['step']}")
    lines += ["", "![loss](loss.png)", "", "## Use", "", "```bash", f"chatbuild chat {run_dir}",
              f"chatbuild serve {run_dir}", "```", "", "Full configuration: `config.yaml`. Data report: " + str(report), ""]
    (run_dir / "README.md").write_text("\n".join(lines))


# ── command line ────────────────────────────────────────────────────────────────────────────────
def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("preset", nargs="?", help="a YAML preset file or a bundled preset name "
                   f"({', '.join(presets.names())})")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="dotted overrides, e.g. train.lr=1e-4 lora.r=16")
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
