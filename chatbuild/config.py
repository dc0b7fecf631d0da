"""Typed configuration: the dataclasses are the single source of truth.

A run's configuration is resolved in three layers, later ones winning:

    defaults (the dataclasses below: the QLoRA paper's Guanaco recipe)
      ◀ a YAML preset, holding only what differs from the defaults
      ◀ `key=value` overrides from the command line, dotted (`lora.r=16`, `train.lr=1e-4`)

and the fully resolved result is saved as `config.yaml` in the run folder. Unknown keys are errors
with a did-you-mean; values are checked against the field's type before any heavy work starts.
"""

import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from chatbuild.errors import ConfigError, UserError
from chatbuild.templates import DEFAULT_FORMAT, check_format_name


@dataclass
class ModelSettings:
    base: str = "tiny"  # hub id or local path; "tiny" = the embedded tiny base (built offline on first use)
    revision: str | None = None
    quant: str = "nf4"  # nf4 | fp4 | int8 | none
    double_quant: bool = True
    quant_storage: str = "uint8"  # dtype 4-bit weights are packed in; bfloat16 lets FSDP shard them
    compute_dtype: str = "auto"  # auto (bf16 where supported, else fp32) | bfloat16 | float16 | float32
    gradient_checkpointing: bool = True
    trust_remote_code: bool = False
    attn_implementation: str | None = None  # None: transformers' default (sdpa)


@dataclass
class LoraSettings:
    r: int = 64
    alpha: int = 16
    dropout: float = 0.1
    targets: str | list[str] = "all-linear"  # "all-linear" or a list of module names


@dataclass
class DataSettings:
    train: str = "sample"  # a file, a hub dataset id, or "sample" (the bundled OASST1-format sample)
    format: str = "auto"
    mode: str = "top1"  # OASST1 thread extraction: top1 | all
    lang: list[str] | None = None
    include_synthetic: bool = False
    skip_invalid: bool = False
    validation: str | None = None  # a separate validation file; else split from train
    val_fraction: float = 0.05
    max_length: int = 512
    train_on_prompts: bool = False  # True: the paper's whole-text loss; False: assistant turns only
    batching: str = "grouped"  # grouped (length-grouped padding) | packed (padding-free)
    chat_format: str = DEFAULT_FORMAT  # a chatbuild.templates.FORMATS name (guanaco, tokenizer, ...) or a .jinja file
    system_prompt: str | None = None


@dataclass
class TrainSettings:
    steps: int = 1875
    batch_size: int = 16  # sequences per optimizer step, across gradient accumulation and processes
    micro_batch_size: int = 1  # sequences per forward pass and process
    lr: float = 2e-4
    schedule: str = "constant"  # constant | linear | cosine
    warmup_steps: int = 0
    optimizer: str = "paged_adamw_32bit"
    weight_decay: float = 0.0
    max_grad_norm: float = 0.3
    eval_every: int = 200  # steps; 0 = only at the end
    eval_batches: int = 0  # 0 = the whole validation split
    save_every: int = 250  # steps between resumable checkpoints; 0 = only at the end
    keep_checkpoints: int = 2
    log_every: int = 10
    seed: int = 42
    # True: run the decoder body and compute the LM head + cross-entropy in row chunks
    # (chatbuild.losses), never holding the full fp32 logits; the same loss, less memory. Llama-family
    # bases only.
    chunked_loss: bool = False
    # What a step optimizes (OBJECTIVES): supervised fine-tuning on conversations, or preference tuning
    # on (prompt, chosen, rejected) pairs. pipelines/objectives.py holds what each one computes.
    objective: str = "sft"
    beta: float = 0.1  # DPO's β (strength of the pull towards the reference) / ORPO's λ (odds-ratio weight)
    label_smoothing: float = 0.0  # DPO only: conservative DPO's ε, the assumed rate of flipped preferences
    init_adapter: str | None = None  # a finished run folder whose adapter (and LoRA settings) training starts from
    # Experiment trackers that get every metrics.jsonl row too (TRACKERS; chatbuild.tracking), offline,
    # into the run folder. Empty: metrics.jsonl and loss.png only.
    report_to: list[str] = field(default_factory=list)


# The training objectives, name -> what it trains on: the one list the config check, the CLI help and
# the Build tab use (pipelines/objectives.py maps each name to its implementation).
OBJECTIVES = {
    "sft": "supervised fine-tuning: next-token loss on the assistant turns of conversations",
    "dpo": "Direct Preference Optimization on chosen/rejected pairs, against a frozen reference",
    "orpo": "Odds Ratio Preference Optimization on chosen/rejected pairs: SFT loss + odds-ratio term, no reference",
}
PREFERENCE_OBJECTIVES = ("dpo", "orpo")

# The experiment trackers `train.report_to` may name (chatbuild.tracking writes to them).
TRACKERS = ("tensorboard", "mlflow", "wandb")


@dataclass
class RunConfig:
    name: str = "guanaco"
    output_dir: str | None = None  # default: runs/<name>
    model: ModelSettings = field(default_factory=ModelSettings)
    lora: LoraSettings = field(default_factory=LoraSettings)
    data: DataSettings = field(default_factory=DataSettings)
    train: TrainSettings = field(default_factory=TrainSettings)

    @property
    def run_dir(self) -> Path:
        return Path(self.output_dir or Path("runs") / self.name)


# ── validation of individual values ─────────────────────────────────────────────────────────────
CHOICES = {
    "model.quant": ("nf4", "fp4", "int8", "none"),
    "model.compute_dtype": ("auto", "bfloat16", "float16", "float32"),
    "model.quant_storage": ("uint8", "bfloat16", "float16", "float32"),
    "data.mode": ("top1", "all"),
    "data.batching": ("grouped", "packed"),
    "train.schedule": ("constant", "linear", "cosine"),
    "train.objective": tuple(OBJECTIVES),
}
POSITIVE = ("lora.r", "lora.alpha", "data.max_length", "train.steps", "train.batch_size", "train.micro_batch_size", "train.lr")


def check(cfg: RunConfig) -> RunConfig:
    """Value checks that types alone don't express. Raises ConfigError naming the key."""
    flat = to_dict(cfg)
    for key, allowed in CHOICES.items():
        value = _get(flat, key)
        if value not in allowed:
            raise ConfigError(key, f'"{value}" is not one of {", ".join(allowed)}')
    check_format_name(cfg.data.chat_format, "data.chat_format")  # the registry's names, or a .jinja file
    for key in POSITIVE:
        if not _get(flat, key) > 0:
            raise ConfigError(key, f"must be > 0, got {_get(flat, key)}")
    if not 0 <= cfg.lora.dropout < 1:
        raise ConfigError("lora.dropout", f"must be in [0, 1), got {cfg.lora.dropout}")
    if not 0 <= cfg.data.val_fraction < 1:
        raise ConfigError("data.val_fraction", f"must be in [0, 1), got {cfg.data.val_fraction}")
    if cfg.train.batch_size % cfg.train.micro_batch_size:
        raise ConfigError("train.batch_size", f"must be a multiple of train.micro_batch_size "
                                              f"({cfg.train.micro_batch_size}), got {cfg.train.batch_size}")
    check_objective(cfg)
    for name in cfg.train.report_to:
        if name not in TRACKERS:
            raise ConfigError("train.report_to", f'"{name}" is not one of {", ".join(TRACKERS)}')
    if cfg.model.double_quant and cfg.model.quant not in ("nf4", "fp4"):
        # Double quantization is a 4-bit feature; with int8/none it is simply not applied.
        cfg.model.double_quant = False
    return cfg


def check_objective(cfg: RunConfig) -> None:
    """The objective's own settings (train.init_adapter, which needs the resolved base, is checked by
    the recipe: pipelines/objectives.py `resolve_init_adapter`)."""
    t = cfg.train
    if not t.beta > 0:
        raise ConfigError("train.beta", f"must be > 0, got {t.beta}")
    if not 0 <= t.label_smoothing < 0.5:
        # ε = 0.5 makes the loss symmetric in chosen and rejected: nothing left to learn.
        raise ConfigError("train.label_smoothing", f"must be in [0, 0.5), got {t.label_smoothing}")
    if t.label_smoothing and t.objective != "dpo":
        raise ConfigError("train.label_smoothing", f"is a DPO setting; train.objective is {t.objective}")
    if t.objective in PREFERENCE_OBJECTIVES:
        if cfg.data.batching != "grouped":
            raise ConfigError("data.batching", f'{t.objective} runs chosen and rejected as one padded batch; '
                                               f'use "grouped", got "{cfg.data.batching}"')
        if t.chunked_loss:
            raise ConfigError("train.chunked_loss", f"is an SFT setting; train.objective is {t.objective}")


def _get(d: dict, dotted: str):
    for part in dotted.split("."):
        d = d[part]
    return d


# ── loading: defaults ◀ preset ◀ overrides ─────────────────────────────────────────────────────
def load_config(preset: str | Path | None = None, overrides: list[str] = (), base: type = RunConfig):
    """Resolve a configuration (see the module docstring). Raises UserError for unknown keys,
    wrong types and bad values, naming the key and where it came from."""
    data: dict = {}
    if preset is not None:
        path = Path(preset)
        if not path.is_file():
            raise UserError(f"{path}: preset file not found")
        try:
            loaded = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as e:
            raise UserError(f"{path}: not valid YAML ({e})") from None
        if not isinstance(loaded, dict):
            raise UserError(f"{path}: a preset must be a mapping of settings")
        data = loaded
    for item in overrides:
        if "=" not in item:
            raise UserError(f'override "{item}" must look like key=value (e.g. train.lr=1e-4)')
        key, raw = item.split("=", 1)
        try:
            value = yaml.safe_load(raw) if raw.strip() else None
        except yaml.YAMLError:
            value = raw
        set_dotted(data, key.strip(), value, source=f'override "{item}"')
    cfg = build(base, data, prefix="", source=f"{preset} + command line" if preset else "command line")
    return check(cfg) if isinstance(cfg, RunConfig) else cfg


def set_dotted(data: dict, key: str, value, source: str) -> None:
    """data["a"]["b"] = value for key "a.b", creating sections as needed."""
    parts = key.split(".")
    for p in parts[:-1]:
        nxt = data.setdefault(p, {})
        if not isinstance(nxt, dict):
            raise UserError(f"{source}: {p} is not a section")
        data = nxt
    data[parts[-1]] = value


def build(cls, data: dict, prefix: str, source: str):
    """A dataclass `cls` from nested dicts, with unknown keys and wrong types reported as UserError
    (used for run configs here and for eval configs in eval/run.py)."""
    if not isinstance(data, dict):
        raise UserError(f"{source}: {prefix.rstrip('.') or 'config'} must be a mapping, got {data!r}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for key, value in data.items():
        if key not in fields:
            close = difflib.get_close_matches(key, fields, n=1)
            hint = f"; did you mean {prefix}{close[0]}?" if close else f"; known keys: {', '.join(fields)}"
            raise UserError(f"{source}: unknown setting {prefix}{key}{hint}")
        hint = hints[key]
        if dataclasses.is_dataclass(hint):
            kwargs[key] = build(hint, value or {}, f"{prefix}{key}.", source)
        else:
            kwargs[key] = _coerce(value, hint, f"{prefix}{key}", source)
    return cls(**kwargs)


def _coerce(value, hint, key: str, source: str):
    """Check `value` against a field type (str, int, float, bool, list[str], Optional, unions)."""
    options = typing.get_args(hint) if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union else (hint,)
    for opt in options:
        if opt is type(None) and value is None:
            return None
        if opt is bool and isinstance(value, bool):
            return value
        if opt is int and isinstance(value, int) and not isinstance(value, bool):
            return value
        if opt is float and isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if opt is float and isinstance(value, str):  # YAML 1.1 reads "1e-4" as a string
            try:
                return float(value)
            except ValueError:
                pass
        if opt is str and isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        if typing.get_origin(opt) is list:
            if isinstance(value, str):
                value = [v.strip() for v in value.split(",") if v.strip()]
            if isinstance(value, list) and all(isinstance(v, str) for v in value):
                return value
    names = " or ".join(getattr(o, "__name__", str(o)).replace("NoneType", "null") for o in options)
    raise ConfigError(key, f"must be {names}, got {value!r}", source)


# ── saving ─────────────────────────────────────────────────────────────────────────────────────
def to_dict(cfg) -> dict:
    return dataclasses.asdict(cfg)


def save_config(cfg, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False, allow_unicode=True))


def read_config(path: str | Path) -> RunConfig:
    """Read a resolved `config.yaml` back (from a run folder)."""
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except (OSError, yaml.YAMLError) as e:
        raise UserError(f"{path}: cannot read the run configuration ({e})") from None
    return build(RunConfig, data, prefix="", source=str(path))
