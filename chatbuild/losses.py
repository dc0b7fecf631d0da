"""The causal-LM loss without the full fp32 logits: the LM head and cross-entropy, chunk by chunk.

The plain path (`model(..., labels=...)`) materializes logits for every position, upcasts them to fp32
and keeps them, their softmax and their gradient alive across the backward pass: for 16 × 1024 tokens
and a 32k vocabulary that is 16k × 32k × 4 bytes = 2.1 GB per copy, the largest single term of a 7B
QLoRA step (`chatbuild.planner`'s "logits + loss"). Here the head runs on `chunk_size` rows at a time:
each chunk's logits are computed, upcast, turned into a loss *and its gradient* at once, and freed
before the next chunk, so the peak holds one chunk's logits, whatever the sequence length. Computing
the gradient in the forward pass (as Liger's fused linear cross-entropy does) costs the same two
matmuls as the plain path, where recomputing the logits in the backward pass would cost a third.
Rows whose label is -100 (prompt tokens, padding, packed-sequence starts) never reach the head at all.

Numerics are the plain path's, which is transformers' `ForCausalLMLoss`: labels are shifted by one
inside (position t predicts token t+1; the last position predicts nothing), logits are upcast to fp32
before the cross-entropy, and the token sum is divided by `num_items_in_batch` when given, else
averaged over the target tokens. tests/test_losses.py holds the two paths to each other.
"""

import torch
import torch.nn.functional as F

from chatbuild.errors import UserError

IGNORE_INDEX = -100
CHUNK_ROWS = 1024  # 1024 × 32k vocabulary × 4 bytes = 131 MB of fp32 logits per chunk

# Model families whose causal-LM head is exactly `lm_head(last_hidden_state)` followed by
# `ForCausalLMLoss` (no logit soft-capping or scaling), so the chunked path computes the same loss.
PLAIN_HEAD_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")


def chunked_causal_lm_loss(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                           num_items_in_batch: torch.Tensor | int | None = None,
                           chunk_size: int | None = None) -> torch.Tensor:
    """The loss `LlamaForCausalLM(..., labels=labels, num_items_in_batch=n).loss` would return.

    hidden: (batch, seq, hidden), the decoder's last hidden states (after the final norm), any dtype;
    weight: (vocab, hidden), the LM head's weight; labels: (batch, seq) int64, *unshifted*, -100 where
    nothing is learned. Returns an fp32 scalar: the summed token cross-entropy divided by
    `num_items_in_batch` (the target tokens of the whole optimizer step, so micro-batches add up to a
    token-weighted mean), or the mean over this batch's target tokens when it is None. chunk_size:
    rows per chunk (default CHUNK_ROWS)."""
    chunk_size = chunk_size or CHUNK_ROWS
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    targets = F.pad(labels, (0, 1), value=IGNORE_INDEX)[..., 1:].reshape(-1).to(hidden.device)
    rows = (targets != IGNORE_INDEX).nonzero().squeeze(1)
    h = hidden.reshape(-1, hidden.shape[-1]).index_select(0, rows)
    total = _LinearCrossEntropySum.apply(h, weight, targets.index_select(0, rows), chunk_size)
    if num_items_in_batch is None:
        return total / rows.numel()  # F.cross_entropy's "mean": 0 / 0 = nan when nothing is learned
    if torch.is_tensor(num_items_in_batch):
        num_items_in_batch = num_items_in_batch.to(total.device)
    return total / num_items_in_batch


class _LinearCrossEntropySum(torch.autograd.Function):
    """sum_i CE(h_i @ W^T, y_i) over the rows of h, in chunks; gradients computed in forward."""

    @staticmethod
    def forward(ctx, h, weight, y, chunk_size):
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        total = torch.zeros((), dtype=torch.float32, device=h.device)
        grad_h = torch.empty_like(h) if need_h else None
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_w else None
        for start in range(0, h.shape[0], chunk_size):
            hc, yc = h[start:start + chunk_size], y[start:start + chunk_size]
            if not (need_h or need_w):
                total += F.cross_entropy(F.linear(hc, weight).float(), yc, reduction="sum")
                continue
            with torch.enable_grad():
                hc = hc.detach().requires_grad_(need_h)
                w = weight.detach().requires_grad_(need_w)
                loss = F.cross_entropy(F.linear(hc, w).float(), yc, reduction="sum")  # upcast as ForCausalLMLoss
                grads = torch.autograd.grad(loss, [t for t, need in ((hc, need_h), (w, need_w)) if need])
            if need_h:
                grad_h[start:start + chunk_size] = grads[0]
            if need_w:
                grad_w += grads[-1].float()  # fp32 accumulation across chunks, cast once at the end
            total += loss.detach()
        ctx.save_for_backward(grad_h, None if grad_w is None else grad_w.to(weight.dtype))
        return total

    @staticmethod
    def backward(ctx, grad_total):
        grad_h, grad_w = ctx.saved_tensors
        return (None if grad_h is None else grad_h * grad_total,
                None if grad_w is None else grad_w * grad_total, None, None)


def decoder_and_head(model):
    """(decoder body, LM head weight) of a causal LM, possibly wrapped by peft.

    The body is the model without its head (`LlamaModel` inside `LlamaForCausalLM`), with any LoRA
    layers peft injected still active; calling it returns `last_hidden_state` after the final norm.
    The head weight is the one the plain forward multiplies with (a `modules_to_save` copy if the
    adapter trains its own head)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    kind = getattr(base.config, "model_type", None)
    if kind not in PLAIN_HEAD_MODEL_TYPES:
        raise UserError(f'train.chunked_loss: not supported for "{kind}" models (supported: '
                        f'{", ".join(PLAIN_HEAD_MODEL_TYPES)}); set train.chunked_loss=false')
    head = base.get_output_embeddings()
    if hasattr(head, "modules_to_save") and not head.disable_adapters and head.active_adapters:
        head = head.modules_to_save[head.active_adapters[0]]
    return base.get_decoder(), head.weight


# ── preference objectives ───────────────────────────────────────────────────────────────────────
# Pure tensor functions over per-sequence log-probabilities; pipelines/objectives.py runs the model.
# Every function returns per-pair tensors, so the caller decides how pairs are averaged across
# micro-batches and processes (the recipe: the mean over an optimizer step's pairs).

def sequence_logps(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed log-probability of each sequence's labels, and how many labels it has.

    logits: (batch, seq, vocab), any dtype (upcast to fp32 here); labels: (batch, seq) int64, *unshifted*
    as for the causal-LM loss (position t predicts label t+1), -100 where nothing is learned. Returns
    (logps, counts), each (batch,) fp32: sum over target tokens of log p(label), and the number of
    target tokens (0 gives logps 0)."""
    targets = labels[:, 1:]
    mask = targets != IGNORE_INDEX
    logits = logits[:, :-1].float()
    picked = logits.gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    token_logps = picked - torch.logsumexp(logits, dim=-1)
    return (token_logps * mask).sum(-1), mask.sum(-1).float()


def dpo_loss(chosen_logps: torch.Tensor, rejected_logps: torch.Tensor, ref_chosen_logps: torch.Tensor,
             ref_rejected_logps: torch.Tensor, beta: float, label_smoothing: float = 0.0):
    """Direct Preference Optimization (Rafailov et al. 2023, eq. 7), sigmoid form, per pair.

    Inputs: (pairs,) summed log-probs of the chosen and rejected replies under the policy and the
    reference. With Δ = (logπ_c − logπref_c) − (logπ_r − logπref_r):

        loss = −(1−ε)·logσ(βΔ) − ε·logσ(−βΔ)

    ε = label_smoothing > 0 is conservative DPO (Mitchell 2023, "cDPO"): the labels are taken to be
    flipped with probability ε. Returns (losses, chosen_rewards, rejected_rewards), each (pairs,); the
    implicit rewards β(logπ − logπref) are detached (metrics, not part of the graph)."""
    chosen_ratio = chosen_logps - ref_chosen_logps
    rejected_ratio = rejected_logps - ref_rejected_logps
    logits = beta * (chosen_ratio - rejected_ratio)
    losses = -(1 - label_smoothing) * F.logsigmoid(logits) - label_smoothing * F.logsigmoid(-logits)
    return losses, beta * chosen_ratio.detach(), beta * rejected_ratio.detach()


def orpo_loss(chosen_mean_logps: torch.Tensor, rejected_mean_logps: torch.Tensor, beta: float):
    """Odds Ratio Preference Optimization (Hong et al. 2024, eqs. 6–8), per pair, no reference model.

    Inputs: (pairs,) *mean per-token* log-probs of the chosen and rejected replies (log p of a reply is
    its length-normalized likelihood). With log odds(p) = log p − log(1 − p):

        loss = −log p_c  (the NLL of the chosen reply, per token)  +  β·(−logσ(log odds_c − log odds_r))

    β is the paper's λ. Returns (losses, chosen_rewards, rejected_rewards, nll), each (pairs,): the
    rewards β·log p per side and the NLL term are detached metrics."""
    log_odds = (chosen_mean_logps - rejected_mean_logps) - (_log1m_exp(chosen_mean_logps) - _log1m_exp(rejected_mean_logps))
    nll = -chosen_mean_logps
    losses = nll - beta * F.logsigmoid(log_odds)
    return losses, beta * chosen_mean_logps.detach(), beta * rejected_mean_logps.detach(), nll.detach()


def _log1m_exp(logp: torch.Tensor) -> torch.Tensor:
    """log(1 − exp(logp)) for logp < 0, as log(−expm1(logp)): accurate when p is close to 1, where
    log1p(−exp(logp)) would round exp(logp) to 1 first."""
    return torch.log(-torch.expm1(logp))
