"""Run folders for serving tests, made without training.

`make_run` writes the documented run-folder layout (chatbuild.runs) exactly as a fine-tune does:
`config.yaml`, `adapter/` in PEFT format, `tokenizer/`, `chat_format.json`. What it fakes is the
training: the LoRA weights are random (seeded), not learned, so each run's adapter changes the base
model's outputs in its own way, which is all serving tests need. The file format is the real one.
"""

from pathlib import Path

from chatbuild.config import ModelSettings, RunConfig, save_config
from chatbuild.templates import ChatFormat


def make_run(tiny_base: Path, out: Path, name: str, seed: int) -> Path:
    """Write a run folder for `tiny_base` with a random LoRA adapter (r=8, all linear layers) drawn
    from `seed`; returns `out`. The base is the 16-bit checkpoint: adapter weights do not depend on
    whether the base they are later served on is quantized."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    cfg = RunConfig(name=name, output_dir=str(out),
                    model=ModelSettings(base=str(tiny_base), quant="nf4", compute_dtype="float32"))
    save_config(cfg, out / "config.yaml")

    base = AutoModelForCausalLM.from_pretrained(tiny_base, dtype=torch.float32)
    torch.manual_seed(seed)  # init_lora_weights=False: A and B both random, so the adapter is not a no-op
    lora = LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", init_lora_weights=False, task_type="CAUSAL_LM")
    model = get_peft_model(base, lora)
    with torch.no_grad():
        # PEFT's random B is small; scaled up, each seed's adapter visibly changes greedy replies
        # (so tests can tell which adapter answered), not just their logits.
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.mul_(3.0)
    model.save_pretrained(out / "adapter", safe_serialization=True)

    AutoTokenizer.from_pretrained(tiny_base).save_pretrained(out / "tokenizer")
    ChatFormat().save(out / "chat_format.json")
    return out
