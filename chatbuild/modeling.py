"""Loading the base model and tokenizer, and attaching LoRA.

`load_base_model` is the only place a `BitsAndBytesConfig` is built and `attach_lora` the only place
a `peft.LoraConfig` is: QLoRA is LoRA with `quant="nf4"`, not a second code path.

Settings arrive as plain arguments (from `chatbuild.config`, a run folder's `config.yaml`, or a
caller), so the same functions serve fine-tuning, merging, serving and benchmarks.
"""

import os
import warnings
from pathlib import Path

from chatbuild.errors import UserError

TINY_BASE = "tiny"  # the embedded default base's name in configs (see pipelines/tiny_base.py)


def tiny_base_dir() -> Path:
    """Where the embedded tiny base is built on first use: $CHATBUILD_HOME/tiny-base."""
    from chatbuild.bases import chatbuild_home

    return chatbuild_home() / "tiny-base"


def default_device() -> str:
    """The device this process should use: its own GPU under torchrun/accelerate, else cuda:0, else CPU."""
    import torch

    if torch.cuda.is_available():
        return f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}"
    return "cpu"


def resolve_dtype(name: str, device: str | None = None):
    """torch dtype for a setting name; "auto" = bf16 where the GPU has it, fp16 on older GPUs,
    fp32 on CPU (bitsandbytes' CPU kernels and CPU matmuls are fastest and exact there)."""
    import torch

    if name == "auto":
        device = device or default_device()
        if device.startswith("cuda"):
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float32
    try:
        return {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}[name]
    except KeyError:
        raise UserError(f'compute dtype "{name}" is unknown; use auto, bfloat16, float16 or float32') from None


def quantization_config(quant: str, double_quant: bool, compute_dtype, quant_storage: str = "uint8"):
    """The BitsAndBytesConfig for a quantization setting (None for quant="none").

    `quant_storage` is the dtype the packed 4-bit weights are stored in: uint8 normally; bfloat16
    (the compute dtype) when FSDP must shard them along with the rest of the model."""
    import torch
    from transformers import BitsAndBytesConfig

    if quant == "none":
        return None
    if quant == "int8":
        return BitsAndBytesConfig(load_in_8bit=True)
    if quant in ("nf4", "fp4"):
        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=quant, bnb_4bit_use_double_quant=double_quant,
                                  bnb_4bit_compute_dtype=compute_dtype, bnb_4bit_quant_storage=getattr(torch, quant_storage))
    raise UserError(f'quantization "{quant}" is unknown; use nf4, fp4, int8 or none')


def check_causal_lm(name: str, revision: str | None = None, trust_remote_code: bool = False):
    """Read a model's config and make sure it is a causal language model; returns the config.
    Fails before any weights are read, with a message that says what was found."""
    from transformers import AutoConfig
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    try:
        config = AutoConfig.from_pretrained(name, revision=revision, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f'base model "{name}" could not be read: {first}') from None
    if config.model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES and not trust_remote_code:
        raise UserError(f'base model "{name}" is a "{config.model_type}" model, not a causal language model')
    check_not_prequantized(name, config)
    return config


def check_not_prequantized(name: str, config) -> None:
    """A base whose config.json carries another library's `quantization_config` (GGUF, GPTQ, AWQ, ...)
    cannot be loaded with our BitsAndBytesConfig (transformers fails deep inside with "The model is
    quantized with GgufConfig but you are passing a BitsAndBytesConfig"), nor trained with LoRA as a
    16-bit model: say what to use instead. A bitsandbytes config (a `merge --requantize` result) is
    our own kind and loads."""
    q = getattr(config, "quantization_config", None)
    if q is None:
        return
    method = str(q.get("quant_method") if isinstance(q, dict) else getattr(q, "quant_method", "unknown"))
    method = method.split(".")[-1].lower()  # a QuantizationMethod enum prints as QuantizationMethod.GGUF
    if method == "bitsandbytes":
        return
    if method == "gguf":
        raise UserError(f'base model "{name}" is a GGUF conversion whose config.json still carries the GGUF '
                        "quantization_config; give the .gguf file itself as the base (chatbuild converts it "
                        'once), or delete "quantization_config" from its config.json')
    raise UserError(f'base model "{name}" is already quantized with {method} (config.json has a '
                    "quantization_config); chatbuild quantizes bases itself with bitsandbytes: use the "
                    "unquantized 16-bit model instead")


def load_base_model(name: str, revision: str | None = None, quant: str = "nf4", double_quant: bool = True,
                    compute_dtype: str = "auto", device: str | None = None, trust_remote_code: bool = False,
                    attn_implementation: str | None = None, quant_storage: str = "uint8"):
    """Load a base model for training or serving, frozen, quantized as asked, on one device."""
    from transformers import AutoModelForCausalLM

    check_causal_lm(name, revision, trust_remote_code)
    device = device or default_device()
    dtype = resolve_dtype(compute_dtype, device)
    q = quantization_config(quant, double_quant, dtype, quant_storage)
    kwargs = {}
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    # use_safetensors: weights only from .safetensors files, never from pickles (a .bin checkpoint can
    # run code when unpickled); trust_remote_code stays off unless the config turns it on.
    try:
        model = AutoModelForCausalLM.from_pretrained(
            name, revision=revision, quantization_config=q, dtype=dtype, device_map={"": device},
            trust_remote_code=trust_remote_code, use_safetensors=True, **kwargs,
        )
    except OSError as e:  # e.g. only pickled .bin weights: say so in one line
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f'base model "{name}": no safetensors weights could be read ({first}); '
                        "convert the checkpoint to safetensors") from None
    for p in model.parameters():
        p.requires_grad_(False)
    model.config.use_cache = False
    if quant in ("nf4", "fp4"):
        use_one_4bit_kernel(model)
    return model


def load_tokenizer(name: str, revision: str | None = None, trust_remote_code: bool = False):
    """The base's tokenizer, made ready for batching.

    A tokenizer without a pad token (Llama's, ours) gets its UNK token (else EOS) as pad token. We never
    add a token for padding: padded positions are masked out of attention and loss anyway, and an
    unchanged vocabulary keeps adapters free of embedding weights (so vLLM can serve them)."""
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(name, revision=revision, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f'tokenizer of "{name}" could not be read: {first}') from None
    if tok.pad_token is None:
        tok.pad_token = tok.unk_token if tok.unk_token is not None else tok.eos_token
    if tok.eos_token is None:
        raise UserError(f'tokenizer of "{name}" has no EOS token; chatbuild needs one to end replies')
    return tok


def attach_lora(model, r: int, alpha: int, dropout: float, targets="all-linear", gradient_checkpointing: bool = True,
                modules_to_save: list[str] | None = None):
    """Wrap a (frozen, possibly quantized) base model with fresh LoRA adapters (peft).

    Returns the PeftModel. For quantized bases peft's `prepare_model_for_kbit_training` casts norms
    and the head to fp32 and enables input gradients so checkpointing works through frozen layers."""
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    quantized = getattr(model, "is_loaded_in_4bit", False) or getattr(model, "is_loaded_in_8bit", False)
    with warnings.catch_warnings():
        # peft still calls transformers' gradient_checkpointing_* names, deprecated in transformers 5
        warnings.filterwarnings("ignore", category=FutureWarning, message=".*gradient_checkpointing.*")
        if quantized:
            model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=gradient_checkpointing,
                                                    gradient_checkpointing_kwargs={"use_reentrant": False})
        elif gradient_checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            model.enable_input_require_grads()
    if quantized:
        use_one_4bit_kernel(model)  # a model loaded elsewhere may have been evaluated already
    config = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=targets, bias="none",
                        task_type="CAUSAL_LM", modules_to_save=modules_to_save)
    return get_peft_model(model, config)


def start_from_adapter(model, adapter_dir: str | Path, keep_reference: bool = False) -> None:
    """Load a finished run's adapter into `model` (a PeftModel from `attach_lora` with the same LoRA
    settings) as the trainable "default" adapter's starting weights.

    keep_reference: also load it, frozen, as a second adapter named "reference" (DPO's reference policy
    without a second copy of the base: the reference forward switches to it with `set_adapter`). Only
    "default" is ever saved (`chatbuild.runs` saves the active adapter)."""
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    adapter_dir = Path(adapter_dir)
    device = next(p.device for p in model.parameters() if p.requires_grad)
    result = set_peft_model_state_dict(model, load_file(adapter_dir / "adapter_model.safetensors", device=str(device)))
    if getattr(result, "unexpected_keys", None):
        raise UserError(f"{adapter_dir}: the adapter does not fit this model (unexpected weights "
                        f"{', '.join(result.unexpected_keys[:3])})")
    if keep_reference:
        model.load_adapter(str(adapter_dir), adapter_name="reference", is_trainable=False)
        model.set_adapter("default")
        for name, p in model.named_parameters():
            if ".reference." in name:
                p.requires_grad_(False)


def use_one_4bit_kernel(model) -> None:
    """Stop bitsandbytes switching 4-bit layers to its packed CPU inference kernel.

    On CPUs with AVX512-BF16 (bitsandbytes >= 0.48), a 4-bit layer's first forward in eval mode without
    gradients converts its weight, for good, to a packed layout served by another kernel, one with no
    autograd formula. In training, the steps after the recipe's step-0 validation then backpropagated
    through that kernel (torch warns the gradient may be wrong; measured: the tiny-cpu loss curve moved by
    0.02 and resume stopped being exact, since a resumed run had not validated first). In serving, the
    same seeded request sampled alone and in a batch of other rows diverged on such a CPU
    (tests/test_engine_batching.py), and agree without it. So every 4-bit model chatbuild loads stays on
    the one kernel, set before the first forward (`load_base_model` does it): a weight already packed is
    unpacked, with a warning, as the round trip is not exact. The packed kernel also rounds differently:
    on the tiny base its logits differed from the one kernel's by up to 0.024 (of 9). What it would save
    when serving on CPU is for the CPU serving work to measure."""
    from bitsandbytes.functional import _convert_weight_packed_for_cpu_inverse
    from bitsandbytes.nn import Linear4bit

    unpacked = 0
    for module in model.modules():
        if isinstance(module, Linear4bit):
            module.support_avx512bf16_for_cpu = False
            state = module.weight.quant_state
            if state is not None and getattr(state, "packing_format_for_cpu", False):
                module.weight.data, module.weight.quant_state = _convert_weight_packed_for_cpu_inverse(
                    module.weight.data, state)
                unpacked += 1
    if unpacked:  # measured on the tiny base: logits moved by up to 0.01 against a never-packed load
        warnings.warn(f"{unpacked} 4-bit layers had been packed for bitsandbytes' CPU kernel and were unpacked; "
                      "that round trip is not exact: call use_one_4bit_kernel before the first forward", stacklevel=2)


def vocab_mismatch(model, tokenizer) -> int:
    """How many tokenizer ids have no embedding row (> 0 means the embeddings must grow)."""
    return max(0, len(tokenizer) - model.get_input_embeddings().weight.shape[0])
