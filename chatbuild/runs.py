"""Run folders: the hand-off between fine-tuning and everything downstream.

A fine-tune writes `runs/<name>/` with these files (DESIGN.md, "Run folder"); serving, merging and
evaluation read only this folder:

    config.yaml          the fully resolved configuration (chatbuild.config.RunConfig)
    adapter/             PEFT format: adapter_config.json, adapter_model.safetensors
    tokenizer/           the tokenizer, with its chat template
    chat_format.json     chatbuild.templates.ChatFormat: template name, stop strings, system prompt
    metrics.jsonl        one JSON object per logged step (step, loss, lr, tokens/s, memory)
    loss.png             training and validation loss curves
    checkpoints/         resumable states: step-N/ with adapter, optimizer, scheduler, RNG
    README.md            model card: base, data, hyperparameters, final metrics

The base model is referenced (id or path, plus revision) in config.yaml, never copied.
"""

from dataclasses import dataclass
from pathlib import Path

from chatbuild.config import RunConfig, read_config
from chatbuild.errors import UserError
from chatbuild.templates import ChatFormat

RUN_FILES = ("config.yaml", "adapter", "tokenizer", "chat_format.json", "metrics.jsonl", "loss.png", "checkpoints", "README.md")
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")


@dataclass
class Run:
    """A finished run folder, read back."""

    path: Path
    config: RunConfig
    chat_format: ChatFormat

    @property
    def name(self) -> str:
        return self.config.name

    @property
    def adapter_dir(self) -> Path:
        return self.path / "adapter"

    @property
    def tokenizer_dir(self) -> Path:
        return self.path / "tokenizer"

    @property
    def base(self) -> str:
        return self.config.model.base

    def base_key(self) -> tuple:
        """Runs with equal keys can share one loaded base model."""
        m = self.config.model
        return (m.base, m.revision, m.quant, m.double_quant, m.compute_dtype)


def is_run(path: str | Path) -> bool:
    p = Path(path)
    return (p / "config.yaml").is_file() and (p / "adapter" / "adapter_config.json").is_file()


def load_run(path: str | Path) -> Run:
    """Read a run folder; a clear UserError says which file is missing or broken."""
    p = Path(path)
    if not p.is_dir():
        raise UserError(f"{p}: no such run folder")
    missing = [f for f in ("config.yaml", "chat_format.json", "tokenizer", *(f"adapter/{a}" for a in ADAPTER_FILES))
               if not (p / f).exists()]
    if missing:
        raise UserError(f"{p}: not a finished run folder (missing {', '.join(missing)})")
    return Run(path=p.resolve(), config=read_config(p / "config.yaml"), chat_format=ChatFormat.load(p / "chat_format.json"))
