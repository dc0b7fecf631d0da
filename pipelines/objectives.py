"""Training objectives: what the fine-tune recipe's data is and what one optimizer step computes.

pipelines/finetune.py owns the one training loop (resume, checkpoints, SIGTERM, divergence check,
logging, the run folder); an objective supplies the parts that differ, looked up by
`train.objective` in `OBJECTIVES` (its names are `chatbuild.config.OBJECTIVES`):

    load(fmt, tokenizer, say)           the training and validation examples (self.train, self.val)
    prepare(model)                      anything the model needs before the first step
    step(model, micro_batches, device, world)
                                        forward + backward over one optimizer step's micro-batches (lists
                                        of indices into self.train); returns the step's loss (a CPU fp32
                                        scalar, the same on every process), its other metrics and the
                                        real tokens computed
    evaluate(model, device)             validation metrics, named "eval_<metric>"
    card()                              what the model card says about the objective, data and metrics

- sft: next-token loss on the assistant turns of conversations, token-weighted across micro-batches
  and processes (the QLoRA recipe).
- dpo: Direct Preference Optimization (Rafailov et al. 2023) on (prompt, chosen, rejected) pairs.
  The reference policy is not a second model: with no `train.init_adapter` it is the base with the
  adapter switched off (LoRA's B starts at zero, so the policy starts equal to it); with one, the
  starting run's adapter is loaded twice into the one PeftModel, a frozen "reference" and the trainable
  "default", and the reference forward switches adapters. Reference log-probs are constants, computed
  once per example and kept in memory.
- orpo: Odds Ratio Preference Optimization (Hong et al. 2024): the NLL of the chosen reply plus λ·the
  odds-ratio term; no reference model.

Both preference objectives run a pair's chosen and rejected replies as one padded batch (one forward).
"""

import contextlib

from chatbuild import runs
from chatbuild.config import OBJECTIVES as OBJECTIVE_NAMES
from chatbuild.config import RunConfig
from chatbuild.errors import ConfigError, UserError


# ── shared pieces ────────────────────────────────────────────────────────────────────────────────
def has_target(example) -> bool:
    """Whether a tokenized example has a label to learn after the causal shift."""
    return any(label != -100 for label in example.labels[1:])


def resolve_init_adapter(cfg: RunConfig) -> runs.Run | None:
    """Check `train.init_adapter` (call with the base already resolved): a finished run on the same
    base, quantized the same way. Its LoRA settings become this run's (the adapter's shape is fixed).
    Returns the run, or None without one. ConfigError naming the key otherwise."""
    if not cfg.train.init_adapter:
        return None
    try:
        start = runs.load_run(cfg.train.init_adapter)
    except UserError as e:
        raise ConfigError("train.init_adapter", str(e)) from None
    mine = runs.Run(path=cfg.run_dir, config=cfg, chat_format=start.chat_format).base_key()
    if start.base_key() != mine:
        raise ConfigError("train.init_adapter", f"{start.path} was trained on {start.base_key()}, this run's base "
                                                f"is {mine}")
    cfg.train.init_adapter = str(start.path)
    cfg.lora = start.config.lora
    return start


# ── supervised fine-tuning ───────────────────────────────────────────────────────────────────────
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


class SFT:
    """Supervised fine-tuning on conversations: the QLoRA recipe's token-weighted next-token loss."""

    name = "sft"
    loss_label = "loss (per target token)"  # loss.png's axis

    def __init__(self, cfg: RunConfig):
        self.cfg, self.train, self.val, self.report = cfg, [], [], ""

    def load(self, fmt, tokenizer, say) -> None:
        from chatbuild import data as cb_data
        from chatbuild.data.batching import PackedCollator, PaddedCollator, tokenize_conversations

        d, seed = self.cfg.data, self.cfg.train.seed
        options = dict(format=d.format, mode=d.mode, lang=d.lang, include_synthetic=d.include_synthetic,
                       skip_invalid=d.skip_invalid)
        convs, report = cb_data.load_conversations(d.train, **options)
        say(f"data: {d.train}: {report.summary() if hasattr(report, 'summary') else report}")
        if d.validation:
            train_convs, (val_convs, _) = convs, cb_data.load_conversations(d.validation, **options)
        else:
            train_convs, val_convs = cb_data.split_conversations(convs, d.val_fraction, seed)
        if not train_convs:
            raise UserError(f"{d.train}: no training conversations left after filtering ({report})")
        train = tokenize_conversations(train_convs, fmt, tokenizer, d.max_length, d.train_on_prompts)
        self.val = tokenize_conversations(val_convs, fmt, tokenizer, d.max_length, d.train_on_prompts)
        self.train = [e for e in train if has_target(e)]
        if not self.train:
            raise UserError("no training example has a token to learn (every reply was cut by data.max_length?)")
        self.report = str(report)
        say(f"data: {len(self.train)} training / {len(self.val)} validation conversations, "
            f"{sum(len(e) for e in self.train):,} training tokens, chat format {fmt.name}")
        self.collate = PackedCollator() if d.batching == "packed" else PaddedCollator(tokenizer.pad_token_id)

    def prepare(self, model) -> None:
        pass

    def step(self, model, micro_batches: list[list[int]], device: str, world: int):
        import torch

        batches = [self.collate([self.train[i] for i in idx]) for idx in micro_batches]
        n_items = torch.tensor(float(sum(count_targets(b["labels"]) for b in batches)))
        if world > 1:
            torch.distributed.all_reduce(n_items)
        step_loss, tokens = accumulate_gradients(model, batches, n_items, device, self.cfg.train.chunked_loss)
        if world > 1:
            torch.distributed.all_reduce(step_loss)
        return step_loss, {}, tokens

    def evaluate(self, model, device: str) -> dict:
        t = self.cfg.train
        return {"eval_loss": round(evaluate(model, self.val, self.collate, t.micro_batch_size, device, t.eval_batches), 5)}

    def card(self) -> dict:
        d = self.cfg.data
        return {"objective": "QLoRA recipe",
                "data": [f"{len(self.train)} training and {len(self.val)} validation conversations; max length "
                         f"{d.max_length} tokens; "
                         f"{'whole-text loss' if d.train_on_prompts else 'loss on assistant turns only'}"],
                "metrics": [("loss", "training loss")]}


# ── preference tuning: DPO and ORPO ─────────────────────────────────────────────────────────────
PAIR_METRICS = ("reward_accuracy", "reward_margin", "logps_chosen", "logps_rejected")


class Preference:
    """DPO or ORPO (`train.objective`) on preference pairs (`chatbuild.data.pairs`).

    Metrics, means over the step's (or the validation) pairs: loss; reward_accuracy (the share of pairs
    whose chosen reply has the higher implicit reward; ties count as wrong, so it starts at 0 for DPO,
    whose rewards start at 0); reward_margin (chosen − rejected reward); logps_chosen/logps_rejected (the
    log-probs the loss uses: DPO sums over a reply's tokens, ORPO means per token); ORPO adds nll_loss.
    Rewards: DPO β(logπ − logπref) per reply, ORPO β·(mean log-prob)."""

    def __init__(self, cfg: RunConfig):
        self.cfg, self.name = cfg, cfg.train.objective
        self.loss_label = {"dpo": "DPO loss (per pair)", "orpo": "ORPO loss (per pair)"}[self.name]
        self.train, self.val, self.report, self.dropped = [], [], "", 0
        self._reference: dict[str, dict[int, tuple[float, float]]] = {"train": {}, "val": {}}
        self._model_has_reference_adapter = False

    def load(self, fmt, tokenizer, say) -> None:
        from chatbuild.data import load_pairs, split_pairs
        from chatbuild.data.batching import PaddedCollator, tokenize_pairs

        d, seed = self.cfg.data, self.cfg.train.seed
        options = dict(format=d.format, lang=d.lang, include_synthetic=d.include_synthetic, skip_invalid=d.skip_invalid)
        pairs, report = load_pairs(d.train, **options)
        say(f"data: {d.train}: {report.summary() if hasattr(report, 'summary') else report}")
        if d.validation:
            train_pairs, (val_pairs, _) = pairs, load_pairs(d.validation, **options)
        else:
            train_pairs, val_pairs = split_pairs(pairs, d.val_fraction, seed)
        if not train_pairs:
            raise UserError(f"{d.train}: no training pairs left after filtering ({report})")
        # A pair teaches nothing when either reply lost all its tokens to data.max_length.
        train = tokenize_pairs(train_pairs, fmt, tokenizer, d.max_length)
        val = tokenize_pairs(val_pairs, fmt, tokenizer, d.max_length)
        self.train = [p for p in train if has_target(p.chosen) and has_target(p.rejected)]
        self.val = [p for p in val if has_target(p.chosen) and has_target(p.rejected)]
        self.dropped = len(train) - len(self.train) + len(val) - len(self.val)
        if not self.train:
            raise UserError("no training pair has a reply to learn on both sides (every prompt filled data.max_length?)")
        self.report = str(report)
        say(f"data: {len(self.train)} training / {len(self.val)} validation pairs ({self.dropped} dropped: a reply cut "
            f"to nothing by data.max_length), chat format {fmt.name}, objective {self.name} β={self.cfg.train.beta}")
        self.collate = PaddedCollator(tokenizer.pad_token_id)

    def prepare(self, model) -> None:
        # With train.init_adapter, DPO's reference is the starting run's adapter, loaded as "reference"
        # (chatbuild.modeling.start_from_adapter); without, the base with the adapter off.
        self._model_has_reference_adapter = "reference" in getattr(model, "peft_config", {})

    # ── the forward passes ──
    def _logps(self, model, examples, device: str):
        """Summed log-probs and target counts of both replies of `examples`: one forward, chosen rows
        first. Returns (chosen_logps, rejected_logps, chosen_counts, rejected_counts, real tokens)."""
        from chatbuild.losses import sequence_logps

        batch = self.collate([p.chosen for p in examples] + [p.rejected for p in examples])
        batch = {k: v.to(device) for k, v in batch.items()}
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False).logits
        logps, counts = sequence_logps(logits, batch["labels"])
        n = len(examples)
        return logps[:n], logps[n:], counts[:n], counts[n:], int(batch["attention_mask"].sum())

    @contextlib.contextmanager
    def _as_reference(self, model):
        """The model as the frozen reference policy: dropout off, no gradients, and the reference
        adapter active or the adapter switched off (peft's `disable_adapter`)."""
        import torch

        was_training = model.training
        model.eval()
        try:
            with torch.no_grad():
                if self._model_has_reference_adapter:
                    model.set_adapter("reference")
                    try:
                        yield
                    finally:
                        model.set_adapter("default")  # makes "default" trainable again, "reference" frozen
                else:
                    with model.disable_adapter():
                        yield
        finally:
            model.train(was_training)

    def _reference_logps(self, model, split: str, indices: list[int], device: str):
        """Reference log-probs (chosen, rejected) of examples `indices` of `split`, each computed once.

        An uncached example is computed with its whole chunk (`micro_batch_size` consecutive indices),
        so every example's value comes from the same batch whatever order the steps ask in: a resumed
        run gets bit-identical references to an uninterrupted one."""
        import torch

        cache, examples = self._reference[split], self.train if split == "train" else self.val
        micro = self.cfg.train.micro_batch_size
        for start in sorted({i // micro * micro for i in indices if i not in cache}):
            chunk = list(range(start, min(start + micro, len(examples))))
            with self._as_reference(model):
                c, r, *_ = self._logps(model, [examples[i] for i in chunk], device)
            cache.update({i: (float(a), float(b)) for i, a, b in zip(chunk, c.cpu().tolist(), r.cpu().tolist())})
        values = torch.tensor([cache[i] for i in indices], dtype=torch.float32, device=device)
        return values[:, 0], values[:, 1]

    def _pair_terms(self, model, split: str, indices: list[int], device: str):
        """Per-pair losses (with their graph) and per-pair metrics of examples `indices` of `split`."""
        from chatbuild.losses import dpo_loss, orpo_loss

        examples = [(self.train if split == "train" else self.val)[i] for i in indices]
        t = self.cfg.train
        chosen, rejected, n_chosen, n_rejected, tokens = self._logps(model, examples, device)
        if self.name == "dpo":
            ref_chosen, ref_rejected = self._reference_logps(model, split, indices, device)
            losses, r_chosen, r_rejected = dpo_loss(chosen, rejected, ref_chosen, ref_rejected, t.beta, t.label_smoothing)
            extra = {}
        else:
            chosen, rejected = chosen / n_chosen, rejected / n_rejected  # ORPO's log p: mean per token
            losses, r_chosen, r_rejected, nll = orpo_loss(chosen, rejected, t.beta)
            extra = {"nll_loss": nll}
        metrics = {"reward_accuracy": (r_chosen > r_rejected).float(), "reward_margin": r_chosen - r_rejected,
                   "logps_chosen": chosen.detach(), "logps_rejected": rejected.detach(), **extra}
        return losses, metrics, tokens

    # ── the objective's interface ──
    def step(self, model, micro_batches: list[list[int]], device: str, world: int):
        """Loss = mean over the step's pairs (across micro-batches and processes, which all hold the
        same number of pairs); metrics likewise, all-reduced like the loss."""
        import torch

        n_pairs = sum(len(idx) for idx in micro_batches) * world
        sums, names, tokens = None, None, 0
        for idx in micro_batches:
            losses, metrics, n = self._pair_terms(model, "train", idx, device)
            (losses.sum() / n_pairs).backward()
            tokens += n
            names = ["loss", *metrics]
            row = torch.stack([losses.detach().sum(), *(v.sum() for v in metrics.values())]).float().cpu()
            sums = row if sums is None else sums + row
        if world > 1:
            torch.distributed.all_reduce(sums)
        means = sums / n_pairs
        return means[0], {k: round(float(v), 5) for k, v in zip(names[1:], means[1:])}, tokens

    def evaluate(self, model, device: str) -> dict:
        """Means over the validation pairs (the first `train.eval_batches` micro-batches when set)."""
        import torch

        t = self.cfg.train
        model.eval()
        sums, count, names = None, 0, None
        with torch.no_grad():
            for b, start in enumerate(range(0, len(self.val), t.micro_batch_size)):
                if t.eval_batches and b >= t.eval_batches:
                    break
                idx = list(range(start, min(start + t.micro_batch_size, len(self.val))))
                losses, metrics, _ = self._pair_terms(model, "val", idx, device)
                names = ["loss", *metrics]
                row = torch.stack([losses.sum(), *(v.sum() for v in metrics.values())]).float().cpu()
                sums, count = (row if sums is None else sums + row), count + len(idx)
        model.train()
        if sums is None:
            return {}
        return {f"eval_{k}": round(float(v), 5) for k, v in zip(names, sums / count)}

    def card(self) -> dict:
        t, d = self.cfg.train, self.cfg.data
        if self.name == "dpo":
            reference = (f"the starting run's adapter ({t.init_adapter})" if t.init_adapter
                         else "the base model with the adapter switched off")
            objective = (f"QLoRA recipe with the DPO objective (Rafailov et al. 2023), β={t.beta}"
                         + (f", label smoothing ε={t.label_smoothing} (conservative DPO)" if t.label_smoothing else "")
                         + f"; reference policy: {reference}")
        else:
            objective = f"QLoRA recipe with the ORPO objective (Hong et al. 2024), λ={t.beta}, no reference model"
        start = [f"training started from the adapter of {t.init_adapter}"] if t.init_adapter else []
        return {"objective": objective,
                "data": [f"{len(self.train)} training and {len(self.val)} validation preference pairs "
                         f"({self.dropped} dropped: a reply cut to nothing); max length {d.max_length} tokens",
                         *start],
                "metrics": [("loss", "training loss"), ("reward_accuracy", "reward accuracy"),
                            ("reward_margin", "reward margin")]}


OBJECTIVES = {"sft": SFT, "dpo": Preference, "orpo": Preference}
assert set(OBJECTIVES) == set(OBJECTIVE_NAMES), "chatbuild.config.OBJECTIVES and this registry must name the same objectives"


def make_objective(cfg: RunConfig):
    return OBJECTIVES[cfg.train.objective](cfg)
