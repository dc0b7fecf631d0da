"""Run folders: the hand-off between fine-tuning and everything downstream, written and read here.

A training recipe writes `runs/<name>/` through this module, and serving, merging, evaluation and
the job manager read it back through it; no other module knows the file names below:

    config.yaml          the fully resolved configuration (chatbuild.config.RunConfig)
    adapter/             PEFT format: adapter_config.json, adapter_model.safetensors
    tokenizer/           the tokenizer, with its chat template
    chat_format.json     chatbuild.templates.ChatFormat: template name, stop strings, system prompt
    metrics.jsonl        one JSON object per logged step: {"step": N, ...}; training rows carry the
                         objective's metrics ("loss", "lr", "tokens_per_s", "memory_gb", ...), evaluation
                         rows the same names prefixed "eval_" ("eval_loss")
    loss.png             training and validation loss curves (and, for preference objectives, reward
                         accuracy and margin)
    checkpoints/         resumable states: step-N/ with adapter, optimizer, scheduler, RNG
    README.md            model card: Hub metadata (YAML front matter), base, objective, data,
                         hyperparameters, final metrics, how to load it with plain PEFT
    tensorboard/, mlruns/, wandb/
                         experiment trackers' own files, when `train.report_to` names them
                         (`TRACKING_DIRS`; chatbuild.tracking writes them)

The base model is referenced (id or path, plus revision) in config.yaml, never copied.

A run is *finished* when every file serving needs is there (`FINISHED_FILES`, `is_run`); the
recipe writes chat_format.json last (`save_final`), so a run killed while saving is not finished.
The API is objective-neutral: a second objective (e.g. preference tuning) prepares, checkpoints,
logs and saves its run folder with the same calls, naming its objective and metrics in the card.
"""

import contextlib
import json
import random
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from chatbuild.config import RunConfig, read_config, save_config, to_dict
from chatbuild.errors import UserError
from chatbuild.templates import ChatFormat

RUN_FILES = ("config.yaml", "adapter", "tokenizer", "chat_format.json", "metrics.jsonl", "loss.png", "checkpoints", "README.md")
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")
# What makes a run folder servable, so finished: the one definition every module uses (`is_run`).
FINISHED_FILES = ("config.yaml", "chat_format.json", "tokenizer", *(f"adapter/{a}" for a in ADAPTER_FILES))
# Where each experiment tracker of `train.report_to` keeps its files inside the run folder.
TRACKING_DIRS = {"tensorboard": "tensorboard", "mlflow": "mlruns", "wandb": "wandb"}
# Train settings a resumed run may change: how long it trains and how often it logs, evaluates and saves.
RESUMABLE_CHANGES = {"steps", "eval_every", "eval_batches", "save_every", "keep_checkpoints", "log_every", "chunked_loss",
                     "report_to"}


# ── reading a finished run ──────────────────────────────────────────────────────────────────────
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
        """What a loaded base must be for this run's adapter to be served on it: the same weights
        (base, one spelling of a local path, and revision) quantized the same way. Runs with equal
        keys share one loaded base. Double quantization and compute dtype are left out: they change
        how the frozen weights are stored and multiplied, not what the adapter was trained against,
        so the engine takes them from its first run."""
        m = self.config.model
        return (_normalized_base(m.base), m.revision, m.quant)


def _normalized_base(base: str) -> str:
    """A local base folder as one absolute path (so `./tiny` and `/abs/tiny` compare equal); a hub
    id as it is."""
    path = Path(base).expanduser()
    return str(path.resolve()) if path.exists() else base


def missing_files(path: str | Path) -> list[str]:
    """The files of `FINISHED_FILES` that the folder lacks (all of them when it does not exist)."""
    p = Path(path)
    return [f for f in FINISHED_FILES if not (p / f).exists()]


def is_run(path: str | Path) -> bool:
    """Whether `path` is a finished run folder (`FINISHED_FILES` all there)."""
    return not missing_files(path)


def load_run(path: str | Path) -> Run:
    """Read a finished run folder; a clear UserError says which file is missing or broken."""
    p = Path(path)
    if not p.is_dir():
        raise UserError(f"{p}: no such run folder")
    missing = missing_files(p)
    if missing:
        raise UserError(f"{p}: not a finished run folder (missing {', '.join(missing)})")
    return Run(path=p.resolve(), config=read_config(p / "config.yaml"), chat_format=ChatFormat.load(p / "chat_format.json"))


def read_run_config(path: str | Path) -> RunConfig | None:
    """A run folder's config.yaml, finished or not; None when there is none (yet) or it cannot be read."""
    file = Path(path) / "config.yaml"
    if not file.is_file():
        return None
    try:
        return read_config(file)
    except UserError:
        return None


# ── preparing the folder ────────────────────────────────────────────────────────────────────────
def prepare_run_dir(cfg: RunConfig, resume: bool, overwrite: bool) -> Path | None:
    """Check the output folder before any heavy work. Returns the checkpoint to resume from, if any.

    Writes nothing (every process of a data-parallel run may call it); `start_run_dir` then does."""
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
    old = to_dict(read_config(out / "config.yaml"))
    new = to_dict(cfg)
    if not resume:
        raise UserError(f"{out} already holds a run ({old['name']}); pass --resume to continue it or "
                        "--overwrite to start again")
    # Resuming may extend training or change logging cadence; everything else must match.
    diff = [f"{s}.{k}" for s in ("model", "lora", "data", "train") for k in new[s]
            if new[s][k] != old[s][k] and not (s == "train" and k in RESUMABLE_CHANGES)]
    if diff:
        raise UserError(f"{out}: cannot resume, the configuration differs in {', '.join(diff)}")
    ckpt = latest_checkpoint(out)
    if ckpt is None:
        raise UserError(f"{out}: no checkpoint to resume from (checkpoints/ is empty)")
    return ckpt


def start_run_dir(cfg: RunConfig, overwrite: bool) -> Path:
    """Create the run folder (emptied first with `overwrite`) and write config.yaml; returns it.
    Call after `prepare_run_dir`, from one process. A finished run that is resumed (to train longer)
    stops being finished until `save_final` writes its new adapter: its chat_format.json goes first,
    so nothing serves or merges a half-overwritten adapter as a finished run."""
    run_dir = cfg.run_dir
    if overwrite and run_dir.exists():
        shutil.rmtree(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "chat_format.json").unlink(missing_ok=True)
    save_config(cfg, run_dir / "config.yaml")
    return run_dir


def save_final(run_dir: Path, model, tokenizer, chat_format: ChatFormat) -> None:
    """The trained adapter, the tokenizer and, last, chat_format.json: the file that makes the folder
    a finished run (`is_run`), so a kill while saving leaves an unfinished one."""
    save_adapter(model, run_dir / "adapter")
    tokenizer.save_pretrained(run_dir / "tokenizer")
    chat_format.save(run_dir / "chat_format.json")


def save_adapter(model, folder: Path) -> None:
    """The trained adapter only, in PEFT's format: a model may also hold a frozen one (DPO's
    "reference", pipelines/objectives.py), which is not part of the result."""
    model.save_pretrained(folder, safe_serialization=True, selected_adapters=[model.active_adapter])


# ── checkpoints ─────────────────────────────────────────────────────────────────────────────────
def _checkpoints(run_dir: Path) -> list[tuple[int, Path]]:
    """checkpoints/step-N folders by step (whole or not)."""
    found = [(p.name.split("-", 1)[1], p) for p in (Path(run_dir) / "checkpoints").glob("step-*")]
    return sorted((int(n), p) for n, p in found if n.isdigit())


def latest_checkpoint(run_dir: Path) -> Path | None:
    """The whole checkpoint (one with its state.json) of the highest step, or None."""
    whole = [p for _, p in _checkpoints(run_dir) if (p / "state.json").is_file()]
    return whole[-1] if whole else None


def save_checkpoint(run_dir: Path, step: int, model, optimizer, scheduler, keep: int) -> Path:
    """checkpoints/step-N/: adapter, optimizer, scheduler and RNG states, written to a temporary
    folder and renamed, so a kill never leaves a half checkpoint that looks whole. `keep` > 0: only
    the newest `keep` checkpoints stay."""
    import numpy as np
    import torch

    root = Path(run_dir) / "checkpoints"
    final, tmp = root / f"step-{step}", root / f".step-{step}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_adapter(model, tmp / "adapter")
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
        prune_checkpoints(run_dir, keep)
    return final


def prune_checkpoints(run_dir: Path, keep: int) -> None:
    """Delete all but the newest `keep` whole checkpoints (a folder without state.json is none of them)."""
    whole = [p for _, p in _checkpoints(run_dir) if (p / "state.json").is_file()]
    for p in whole[:-keep]:
        shutil.rmtree(p, ignore_errors=True)


def load_checkpoint(path: Path, model, optimizer, scheduler, device: str) -> int:
    """Restore adapter, optimizer, scheduler and RNG states from checkpoints/step-N/; returns N.
    Raises UserError, naming the file, when one cannot be read or holds what chatbuild never writes."""
    import numpy as np
    import torch
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    path = Path(path)
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


# ── experiment trackers ─────────────────────────────────────────────────────────────────────────
def tracking_dir(run_dir: str | Path, tracker: str) -> Path:
    """The folder `tracker` (a `TRACKING_DIRS` name) writes in the run folder: tensorboard's event
    files, mlflow's local file store, wandb's offline runs."""
    return Path(run_dir) / TRACKING_DIRS[tracker]


# ── metrics ─────────────────────────────────────────────────────────────────────────────────────
def append_metrics(run_dir: Path, row: dict) -> None:
    """Add one row ({"step": N, ...}) to metrics.jsonl."""
    with open(Path(run_dir) / "metrics.jsonl", "a") as f:
        f.write(json.dumps(row) + "\n")


def read_metrics(run_dir: str | Path, upto: int | None = None) -> list[dict]:
    """The rows of metrics.jsonl in order (those with step <= `upto` when given); [] without the file.
    Safe while the run writes: a line being written right now (not yet valid JSON) is skipped."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(row, dict) and "step" in row:
            rows.append(row)
    return [r for r in rows if upto is None or r["step"] <= upto]


def rewind_metrics(run_dir: Path, step: int) -> list[dict]:
    """The metrics of a run (re)starting at `step`, with metrics.jsonl rewritten to hold only them: a
    resumed run drops the rows logged after its checkpoint (they will be logged again), a fresh start
    (step 0) drops them all. Call from one process."""
    path = Path(run_dir) / "metrics.jsonl"
    if step == 0:
        path.unlink(missing_ok=True)
        return []
    kept = read_metrics(run_dir, upto=step)
    if path.exists():
        path.write_text("".join(json.dumps(r) + "\n" for r in kept))
    return kept


# ── loss plot and model card ────────────────────────────────────────────────────────────────────
def plot_loss(run_dir: Path, history: list[dict], train: str = "loss", ylabel: str = "loss (per target token)") -> None:
    """loss.png: the training metric `train` and its evaluation (`eval_<train>`) over steps; when the
    rows carry preference metrics (`reward_accuracy`, `reward_margin`, train or eval_), a second panel
    shows them: accuracy on the left axis, margin on the right."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def series(name):
        return [(r["step"], r[name]) for r in history if name in r]

    points, val = series(train), series(f"eval_{train}")
    rewards = any(series(n) for n in ("reward_accuracy", "eval_reward_accuracy"))
    fig, axes = plt.subplots(1, 2 if rewards else 1, figsize=(11 if rewards else 6, 3.5), dpi=100, squeeze=False)
    ax = axes[0][0]
    if points:
        ax.plot(*zip(*points), label=f"train {train}")
    if val:
        ax.plot(*zip(*val), marker="o", label=f"validation {train}")
    ax.set_xlabel("step")
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    ax.legend()
    if rewards:
        acc, margin = axes[0][1], axes[0][1].twinx()
        for name, style in (("reward_accuracy", {}), ("eval_reward_accuracy", {"marker": "o"})):
            if series(name):
                acc.plot(*zip(*series(name)), label=name.replace("eval_", "validation ").replace("_", " "), **style)
        for name, style in (("reward_margin", {}), ("eval_reward_margin", {"marker": "o"})):
            if series(name):
                margin.plot(*zip(*series(name)), linestyle="--", label=name.replace("eval_", "validation ").replace("_", " "),
                            color="tab:red" if name.startswith("eval") else "tab:purple", **style)
        acc.set_ylim(-0.02, 1.02)
        acc.set_xlabel("step")
        acc.set_ylabel("reward accuracy (chosen > rejected)")
        margin.set_ylabel("reward margin (chosen − rejected)")
        acc.grid(alpha=0.3)
        lines = acc.get_legend_handles_labels(), margin.get_legend_handles_labels()
        acc.legend(lines[0][0] + lines[1][0], lines[0][1] + lines[1][1], fontsize="small")
    fig.tight_layout()
    path = Path(run_dir) / "loss.png"
    tmp = path.with_name(".loss.tmp.png")
    fig.savefig(tmp)
    plt.close(fig)
    tmp.replace(path)


# The model card's "how to load it" section sits between these markers, so `hub_card` can point it
# at a Hub repository instead of this machine's folders (HTML comments: the Hub renders nothing).
LOAD_START, LOAD_END = "<!-- chatbuild:load -->", "<!-- /chatbuild:load -->"
USE_HEADING = "## Use with chatbuild"  # the card's last section: commands on this machine's run folder


def card_metadata(cfg: RunConfig, merged: bool = False) -> dict:
    """The card's YAML front matter, in the Hub's model-card conventions: base_model and license where
    known (chatbuild.bases.hub_metadata; a local base gives neither), the adapter's library (peft) or,
    for a merged model, transformers; tags; datasets when the data is a hub dataset id."""
    from chatbuild.bases import hub_metadata, looks_like_hub_id

    base = hub_metadata(cfg.model.base)
    meta = {}
    if "base_model" in base:
        meta["base_model"] = base["base_model"]
        meta["base_model_relation"] = "finetune" if merged else "adapter"
    meta["library_name"] = "transformers" if merged else "peft"
    meta["pipeline_tag"] = "text-generation"
    quantized = cfg.model.quant in ("nf4", "fp4")
    meta["tags"] = ["chatbuild", *(["qlora"] if quantized else []), "lora", cfg.train.objective, *(["merged"] if merged else [])]
    if looks_like_hub_id(cfg.data.train) and not Path(cfg.data.train).exists():
        meta["datasets"] = [cfg.data.train]
    if "license" in base:
        meta["license"] = base["license"]
    return meta


def load_snippet(base: str, adapter: str, tokenizer: str, stop: Sequence[str]) -> str:
    """Python that loads the adapter on its base with plain transformers + PEFT and chats once, through
    the tokenizer's saved chat template (the one the adapter was trained with). `adapter` and
    `tokenizer` are folders or one Hub repository id."""
    return _chat_snippet([f"base = AutoModelForCausalLM.from_pretrained({base!r})",
                          f"model = PeftModel.from_pretrained(base, {adapter!r})"], tokenizer, stop, peft=True)


def merged_snippet(model: str, stop: Sequence[str]) -> str:
    """The same for a merged model (`chatbuild push --merged`): plain transformers, no PEFT."""
    return _chat_snippet([f"model = AutoModelForCausalLM.from_pretrained({model!r})"], model, stop, peft=False)


def _chat_snippet(load: list[str], tokenizer: str, stop: Sequence[str], peft: bool) -> str:
    return "\n".join([
        *(["from peft import PeftModel"] if peft else []),
        "from transformers import AutoModelForCausalLM, AutoTokenizer",
        "",
        *load,
        f"tokenizer = AutoTokenizer.from_pretrained({tokenizer!r})  # with the chat template it was trained on",
        "",
        'messages = [{"role": "user", "content": "What is a llama?"}]',
        "inputs = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors=\"pt\", return_dict=True)",
        "output = model.generate(**inputs, max_new_tokens=64"
        + (f", stop_strings={list(stop)!r}, tokenizer=tokenizer)" if stop else ")"),
        'reply = tokenizer.decode(output[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)',
        *(f"reply = reply.split({s!r})[0]" for s in stop),
        "print(reply)",
    ])


def _load_section(code: str, note: str) -> list[str]:
    return [LOAD_START, "## Load it with transformers and PEFT", "", note, "", "```python", code, "```", LOAD_END]


def _front_matter(meta: dict) -> str:
    import yaml

    return "---\n" + yaml.safe_dump(meta, sort_keys=False, allow_unicode=True) + "---\n"


def write_model_card(run_dir: Path, cfg: RunConfig, history: list[dict], *, objective: str,
                     data: Sequence[str] = (), metrics: Sequence[tuple[str, str]] = (("loss", "training loss"),),
                     report: str = "", stop: Sequence[str] = ()) -> None:
    """README.md: Hub metadata (`card_metadata`), what the run is (base, `objective`: e.g. "QLoRA
    recipe"), its data (`data`: the objective's own lines, after the source), hyperparameters and
    results: for each (name, label) of `metrics` the last training value and, when the run evaluated
    it (`eval_<name>` rows), the first and last evaluated values; then how to load and chat with it
    (`stop`: the chat format's stop strings) with plain PEFT, from this folder."""
    m = cfg.model
    run_dir = Path(run_dir).resolve()
    snippet = load_snippet(m.base, str(run_dir / "adapter"), str(run_dir / "tokenizer"), stop)
    lines = [
        _front_matter(card_metadata(cfg)),
        f"# {cfg.name}",
        "",
        f"A LoRA adapter for `{m.base}`" + (f" (revision `{m.revision}`)" if m.revision else "")
        + f", fine-tuned with chatbuild's {objective}: the base frozen in {m.quant}"
        + (" with double quantization" if m.double_quant else "") + ", LoRA adapters trained through it.",
        "",
        "## Data",
        f"- source: `{cfg.data.train}` (format {cfg.data.format}, OASST1 mode {cfg.data.mode}, languages {cfg.data.lang or 'all'})",
        *(f"- {line}" for line in data),
        f"- chat format: {cfg.data.chat_format}",
        "",
        "## Hyperparameters",
        f"- LoRA r={cfg.lora.r}, alpha={cfg.lora.alpha}, dropout={cfg.lora.dropout}, targets={cfg.lora.targets}",
        f"- {cfg.train.steps} steps × {cfg.train.batch_size} sequences, lr {cfg.train.lr} ({cfg.train.schedule}), "
        f"optimizer {cfg.train.optimizer}, max grad norm {cfg.train.max_grad_norm}, seed {cfg.train.seed}",
        "",
        "## Results",
    ]
    for name, label in metrics:
        last = next((r for r in reversed(history) if name in r), {})
        lines.append(f"- final {label}: {last.get(name, 'n/a')} at step {last.get('step', 'n/a')}")
    for name, _ in metrics:
        evals = [r for r in history if f"eval_{name}" in r]
        if evals:
            lines.append(f"- validation {name}: {evals[0][f'eval_{name}']} at step {evals[0]['step']} → "
                         f"{evals[-1][f'eval_{name}']} at step {evals[-1]['step']}")
    lines += ["", "![loss](loss.png)", "",
              *_load_section(snippet, "The adapter was trained on the base quantized to "
                             f"{m.quant}; this loads the base unquantized, which gives nearly the same replies."),
              "", USE_HEADING, "", "```bash", f"chatbuild chat {run_dir}",
              f"chatbuild serve {run_dir}", "```", "", "Full configuration: `config.yaml`. Data report: " + str(report), ""]
    (run_dir / "README.md").write_text("\n".join(lines))


def hub_card(run: Run, repo_id: str, merged: bool = False) -> str:
    """The run's README.md as it goes to the Hub repository `repo_id` (`chatbuild push`): front matter
    for an adapter or a `merged` model, and its load section loading from the repository (the base by
    its hub id where known) instead of from this machine's folders, and without the last section's
    commands on the local run folder."""
    text = (run.path / "README.md").read_text()
    if text.startswith("---\n"):  # replace the front matter
        text = text.split("\n---\n", 1)[1]
    stop, base = run.chat_format.stop, hub_metadata_base(run.config)
    if Path(base).is_absolute():  # a base only this machine has: named by its folder's name
        base = Path(base).name
    if merged:
        code = merged_snippet(repo_id, stop)
        note = f"The adapter merged into `{base}` in 16 bits: an ordinary transformers model."
    else:
        code = load_snippet(base, repo_id, repo_id, stop)
        note = f"The adapter was trained on `{base}` quantized to {run.config.model.quant}; this loads the base unquantized."
    if LOAD_START in text and LOAD_END in text:
        head, rest = text.split(LOAD_START, 1)
        text = head + "\n".join(_load_section(code, note)) + rest.split(LOAD_END, 1)[1]
    text = text.split(f"\n{USE_HEADING}\n", 1)[0] + "\n"  # local commands mean nothing on the Hub
    for local in {run.config.model.base, str(run.config.data.train)}:  # this machine's paths, by their names
        if Path(local).is_absolute():
            text = text.replace(f"`{local}`", f"`{base if local == run.config.model.base else Path(local).name}`")
    return _front_matter(card_metadata(run.config, merged)) + text


def hub_files(run: Run, merged_dir: Path | None = None) -> dict[str, Path]:
    """The run's files a Hub repository gets (`chatbuild push`), by their path in it: the adapter (or
    the files of `merged_dir`, a 16-bit merge, less its local provenance), the tokenizer, chat_format.json
    and loss.png, all at the repository's root. Never checkpoints, config.yaml (it holds this machine's
    paths) or tracker folders; the card is `hub_card`."""
    if merged_dir is None:
        files = {name: run.adapter_dir / name for name in ADAPTER_FILES}
        files.update({p.name: p for p in sorted(run.tokenizer_dir.iterdir()) if p.is_file()})
    else:
        files = {p.name: p for p in sorted(Path(merged_dir).iterdir())
                 if p.is_file() and p.name not in ("chatbuild_merge.json", "README.md")}
    files["chat_format.json"] = run.path / "chat_format.json"
    if (run.path / "loss.png").is_file():
        files["loss.png"] = run.path / "loss.png"
    return files


def hub_metadata_base(cfg: RunConfig) -> str:
    """The base as the Hub knows it (its hub id), else as the run names it."""
    from chatbuild.bases import hub_metadata

    return hub_metadata(cfg.model.base).get("base_model", cfg.model.base)
