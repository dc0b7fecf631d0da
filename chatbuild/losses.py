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
