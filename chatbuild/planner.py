"""Predict the peak GPU memory of a QLoRA training step, before loading anything.

The estimate adds up what the plain transformers + peft + bitsandbytes stack holds at its peak
(the stack `chatbuild finetune` runs today), term by term:

- frozen 4-bit linear weights: 0.5 byte per weight, plus the blockwise absmax statistics (one byte
  per 64 weights with double quantization, else one fp32 per 64) — the QLoRA paper's accounting;
- embeddings and LM head in the 16-bit load dtype;
- LoRA weights and gradients in fp32 (peft keeps adapters in fp32);
- the optimizer's states (AdamW 32-bit: two fp32 states; 8-bit: two bytes) — except for paged
  optimizers, whose states bitsandbytes keeps in CUDA unified memory outside PyTorch's allocator:
  they are reported on their own line and not counted in the peak PyTorch sees;
- activations: with gradient checkpointing, each layer keeps its fp32 input; the layer being
  recomputed holds its attention and MLP intermediates; the head materializes fp32 logits and their
  gradient;
- a small allowance for kernels' workspaces.

Shapes come from a model config (hub id or local folder, read with AutoConfig) or a named shape
(`chatbuild.shapes`). The constants were checked against measured peaks of the plain stack
(docs/performance.md, "GPU training baseline"); tests hold the planner to them.
"""

import math
from dataclasses import dataclass

GIB = 1e9  # results are in GB (10^9 bytes), like the measurements they are compared with


@dataclass
class Shape:
    """What memory depends on in a decoder-only transformer."""

    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    vocab: int
    tied_embeddings: bool = False

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads

    def linear_shapes(self) -> list[tuple[int, int]]:
        """(in, out) of every linear layer in one decoder block (Llama layout)."""
        kv = self.kv_heads * self.head_dim
        h, i = self.hidden, self.intermediate
        return [(h, h), (h, kv), (h, kv), (h, h), (h, i), (h, i), (i, h)]

    def linear_params(self) -> int:
        return self.layers * sum(a * b for a, b in self.linear_shapes())


@dataclass
class Plan:
    weights_gb: float
    lora_gb: float
    optimizer_gb: float  # counted in the peak only when not paged
    activations_gb: float
    logits_gb: float
    overhead_gb: float
    paged_gb: float = 0.0  # paged optimizer states, in unified memory

    @property
    def total_gb(self) -> float:
        return self.weights_gb + self.lora_gb + self.optimizer_gb + self.activations_gb + self.logits_gb + self.overhead_gb

    def rows(self) -> list[tuple[str, float]]:
        rows = [("frozen base weights", self.weights_gb), ("LoRA weights + gradients", self.lora_gb),
                ("optimizer states", self.optimizer_gb), ("activations", self.activations_gb),
                ("logits + loss", self.logits_gb), ("kernel workspaces", self.overhead_gb),
                ("peak (predicted)", self.total_gb)]
        if self.paged_gb:
            rows.append(("paged optimizer states (unified memory, outside the peak)", self.paged_gb))
        return rows


OPTIMIZER_BYTES = {"paged_adamw_32bit": 8, "adamw_32bit": 8, "adamw_torch": 8, "paged_adamw_8bit": 2, "adamw_8bit": 2, "sgd": 0}


def plan_memory(shape: Shape, batch: int = 1, seq: int = 512, r: int = 64, quant: str = "nf4", double_quant: bool = True,
                optimizer: str = "paged_adamw_32bit", gradient_checkpointing: bool = True) -> Plan:
    """Predicted peak memory of one training step (see the module docstring for the terms)."""
    n_linear = shape.linear_params()
    if quant in ("nf4", "fp4"):
        per_weight = 0.5 + (1 / 64 + 4 / (64 * 256) if double_quant else 4 / 64)
    elif quant == "int8":
        per_weight = 1.0 + 4 / shape.hidden  # one fp32 scale per row
    else:
        per_weight = 2.0  # bf16
    embed = shape.vocab * shape.hidden * (1 if shape.tied_embeddings else 2) * 2
    weights = n_linear * per_weight + embed

    lora_params = shape.layers * sum(r * (a + b) for a, b in shape.linear_shapes())
    lora = lora_params * 4 * 2  # fp32 weights and gradients
    optim = lora_params * OPTIMIZER_BYTES.get(optimizer, 8)
    paged = optim if optimizer.startswith("paged") else 0

    tokens = batch * seq
    h, i = shape.hidden, shape.intermediate
    if gradient_checkpointing:
        kept = shape.layers * tokens * h * 4  # each block's fp32 input
        # one block recomputed in backward: q/k/v/o, norms, the MLP's gate/up/act/product, in bf16
        # with fp32 LoRA paths, plus attention's softmax scores when sdpa falls back to math
        block = tokens * (8 * h + 4 * i) * 4
    else:
        kept = shape.layers * tokens * (8 * h + 4 * i) * 4
        block = 0
    logits = tokens * shape.vocab * 4 * 3  # fp32 logits, their softmax, and the gradient
    overhead = 0.05 * GIB
    return Plan(weights / GIB, lora / GIB, (optim - paged) / GIB, (kept + block) / GIB, logits / GIB, overhead / GIB,
                paged / GIB)


def advice(plan: Plan, gpu_gb: float, shape: Shape, batch: int, seq: int, r: int, optimizer: str) -> list[str]:
    """What to change when a plan does not fit a GPU, most effective first."""
    out = []
    if plan.total_gb <= gpu_gb:
        return out
    over = plan.total_gb - gpu_gb
    if batch > 1:
        out.append(f"micro_batch_size {batch} → {max(1, batch // 2)} (keep batch_size with gradient accumulation)")
    if plan.logits_gb > over / 2 and seq > 256:
        out.append(f"max_length {seq} → {seq // 2}: logits alone take {plan.logits_gb:.1f} GB")
    if plan.optimizer_gb:
        out.append(f"a paged optimizer (paged_adamw_32bit) moves {plan.optimizer_gb:.1f} GB of state to unified memory")
    if r > 16:
        out.append(f"lora.r {r} → 16 saves {(plan.lora_gb + plan.optimizer_gb) * (1 - 16 / r):.1f} GB")
    if plan.weights_gb > gpu_gb:
        out.append(f"the frozen weights alone ({plan.weights_gb:.1f} GB) exceed the GPU: use a larger GPU or several with FSDP")
    return out


def shape_from_config(config) -> Shape:
    """A Shape from a transformers config (Llama-like attribute names)."""
    heads = config.num_attention_heads
    return Shape(hidden=config.hidden_size, intermediate=config.intermediate_size, layers=config.num_hidden_layers,
                 heads=heads, kv_heads=getattr(config, "num_key_value_heads", None) or heads, vocab=config.vocab_size,
                 tied_embeddings=bool(getattr(config, "tie_word_embeddings", False)))


def human(gb: float) -> str:
    return f"{gb:.2f} GB" if gb < 10 else f"{gb:.1f} GB"


def fits(plan: Plan, gpu_gb: float) -> bool:
    return plan.total_gb <= gpu_gb and not math.isnan(plan.total_gb)
