"""Realistically shaped models with random weights, built directly in 4-bit, layer by layer.

For benchmarks and the memory planner: a Llama-65B-shaped model needs no checkpoint download and
never exists in 16 bits anywhere; each linear layer is drawn at random (std 0.02) in bf16 on the
target device, quantized to NF4 at once, and the 16-bit copy freed before the next layer.
"""

from chatbuild.errors import UserError
from chatbuild.planner import Shape

# hidden, intermediate, layers, attention heads, key/value heads, vocabulary (public model configs)
SHAPES = {
    "llama-7b": Shape(4096, 11008, 32, 32, 32, 32000),
    "llama-13b": Shape(5120, 13824, 40, 40, 40, 32000),
    "llama-33b": Shape(6656, 17920, 60, 52, 52, 32000),
    "llama-65b": Shape(8192, 22016, 80, 64, 64, 32000),
    "llama-3-8b": Shape(4096, 14336, 32, 32, 8, 128256),  # grouped-query attention, 128k vocabulary
    "test-tiny": Shape(128, 384, 2, 4, 2, 1000),  # for tests on CPU
}


def get_shape(name: str) -> Shape:
    try:
        return SHAPES[name]
    except KeyError:
        raise UserError(f'unknown shape "{name}"; known: {", ".join(SHAPES)}') from None


def llama_config(shape: Shape, max_positions: int = 4096):
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=shape.vocab, hidden_size=shape.hidden, intermediate_size=shape.intermediate,
                       num_hidden_layers=shape.layers, num_attention_heads=shape.heads,
                       num_key_value_heads=shape.kv_heads, max_position_embeddings=max_positions,
                       tie_word_embeddings=shape.tied_embeddings)


def build_random_4bit(shape: Shape | str, device: str = "cuda", quant: str = "nf4", double_quant: bool = True,
                      compute_dtype=None, seed: int = 0):
    """A LlamaForCausalLM of `shape` with random NF4 linear layers on `device` (see module docstring)."""
    import bitsandbytes as bnb
    import torch
    from torch import nn
    from transformers import LlamaForCausalLM
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    shape = get_shape(shape) if isinstance(shape, str) else shape
    compute_dtype = compute_dtype or (torch.bfloat16 if device.startswith("cuda") else torch.float32)
    cfg = llama_config(shape)
    with torch.device("meta"):
        model = LlamaForCausalLM(cfg)
    g = torch.Generator(device=device).manual_seed(seed)

    def quantize_children(parent):
        for name, child in list(parent.named_children()):
            if isinstance(child, nn.Linear):
                q = bnb.nn.Linear4bit(child.in_features, child.out_features, bias=False, compute_dtype=compute_dtype,
                                      quant_type=quant, compress_statistics=double_quant, device="meta")
                w = torch.randn(child.out_features, child.in_features, dtype=torch.bfloat16, device=device, generator=g) * 0.02
                # Params4bit quantizes on its first move to a device; the bf16 draw is freed right after.
                q.weight = bnb.nn.Params4bit(w, requires_grad=False, quant_type=quant,
                                             compress_statistics=double_quant).to(device)
                del w
                setattr(parent, name, q)
            else:
                quantize_children(child)

    quantize_children(model.model)
    model.model.embed_tokens = nn.Embedding(shape.vocab, shape.hidden, device=device, dtype=compute_dtype)
    nn.init.normal_(model.model.embed_tokens.weight, std=0.02, generator=g)
    model.lm_head = nn.Linear(shape.hidden, shape.vocab, bias=False, device=device, dtype=compute_dtype)
    nn.init.normal_(model.lm_head.weight, std=0.02, generator=g)
    for module in model.modules():
        if module.__class__.__name__.endswith("RMSNorm"):
            module.weight = nn.Parameter(torch.ones(shape.hidden, device=device, dtype=compute_dtype))
    model.model.rotary_emb = LlamaRotaryEmbedding(config=cfg).to(device)
    model.is_loaded_in_4bit = True
    model.config.use_cache = False
    for p in model.parameters():
        p.requires_grad_(False)
    return model
