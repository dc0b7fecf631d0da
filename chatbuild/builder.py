"""The Builder: what the UI's Build tab does, without the UI.

    data (bundled sample, a file in the data folder, an upload, a hub id) → preview
    settings (a preset, then base, quantization, LoRA, training length) → checks per field, memory estimate
    start → a fine-tune job (`chatbuild.jobs`: a separate process, tracked in SQLite)
    done → the run is hot-loaded into the server's engine (Chat and Arena pick it up), and
    "evaluate against …" runs `chatbuild eval run` as another job, whose battles land in the
    server's database (the Leaderboard tab shows them)

Everything the Builder writes lives in one folder (`Builder.root`):

    data/    uploaded datasets (nothing outside this folder can be picked as a local file)
    runs/    run folders of the fine-tunes, runs/<name>
    evals/   evaluation folders, evals/<name> (eval.yaml, answers/, battles.jsonl, leaderboard.*)
    logs/    one log per job

The job table lives in the server's SQLite database, next to the arena's tables.
"""

import math
import re
import shutil
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from chatbuild.errors import UserError
from chatbuild.jobs import Job, JobManager

PRESETS_DIR = Path(__file__).resolve().parent.parent / "pipelines" / "presets"
DATA_SUFFIXES = (".jsonl", ".json", ".jsonl.gz", ".parquet")
NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
HUB_ID_RE = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+(:[\w.-]+)?")
DEFAULT_MAX_UPLOAD = 200 * 1024 * 1024

# The fields of the Build form, by configuration key (`chatbuild.config`), with their labels.
FIELDS = {
    "model.base": "Base model",
    "model.quant": "Quantization",
    "model.double_quant": "Double quantization",
    "lora.r": "LoRA rank",
    "lora.alpha": "LoRA alpha",
    "lora.dropout": "LoRA dropout",
    "train.steps": "Steps",
    "train.batch_size": "Batch size",
    "train.micro_batch_size": "Micro-batch size",
    "train.lr": "Learning rate",
    "data.max_length": "Max length (tokens)",
}


def presets() -> list[str]:
    return sorted(p.stem for p in PRESETS_DIR.glob("*.yaml"))


def preset_path(name: str) -> Path:
    if name not in presets():
        raise UserError(f'preset "{name}" is unknown; pick one of {", ".join(presets())}')
    return PRESETS_DIR / f"{name}.yaml"


def preset_values(name: str) -> dict:
    """The form's values for a preset: its settings over the defaults, for every field in FIELDS."""
    from chatbuild.config import load_config, to_dict

    flat = to_dict(load_config(preset_path(name)))
    out = {}
    for key in FIELDS:
        section, field = key.split(".")
        out[key] = flat[section][field]
    return out


@dataclass
class DataChoice:
    """Where the training data comes from. kind: sample | file (in the data folder) | hub."""

    kind: str
    value: str = ""  # the file's name in the data folder, or the hub id
    format: str = "auto"
    mode: str = "top1"
    lang: str = ""  # comma-separated language codes; empty = all


class Builder:
    """The Build tab's backend over one folder and one job queue. `engine()` returns the server's
    engine (or None while it loads); finished fine-tunes are hot-loaded into it when it can
    (`load_adapter`, the in-process HF engine) and their base is the one it serves."""

    def __init__(self, root: str | Path, db_path: str | Path, engine: Callable[[], object],
                 self_url: str | None = None, api_key: str | None = None, judge_url: str | None = None,
                 judge_model: str | None = None, judge_key: str | None = None,
                 max_upload_bytes: int = DEFAULT_MAX_UPLOAD, python: str = sys.executable):
        self.root = Path(root).resolve()
        self.data_dir, self.runs_dir, self.evals_dir = self.root / "data", self.root / "runs", self.root / "evals"
        for d in (self.data_dir, self.runs_dir, self.evals_dir):
            d.mkdir(parents=True, exist_ok=True)
        self.db_path = Path(db_path)
        self.engine = engine
        self.self_url = self_url
        self.judge_url, self.judge_model = judge_url, judge_model
        self.max_upload_bytes = max_upload_bytes
        # Keys reach the eval jobs through their environment only: never the database, configs or logs.
        env = {}
        if api_key:
            env["OPENAI_API_KEY"] = api_key  # the eval's answers come from this server
        if judge_key or (api_key and not judge_url):
            env["CHATBUILD_JUDGE_API_KEY"] = judge_key or api_key
        self.jobs = JobManager(self.db_path, self.root / "logs", python=python, env=env, on_finish=self._after)

    def start(self, interval: float = 1.0) -> None:
        """Serve the runs earlier jobs finished (a restarted server), then run the queue."""
        for job in self.jobs.jobs():
            if job.kind == "finetune" and job.status == "done":
                self._serve(job)
        self.jobs.start(interval)

    def stop(self) -> None:
        self.jobs.stop()

    # ── data ──
    def data_files(self) -> list[str]:
        """Files in the data folder a fine-tune can read, by name."""
        return sorted(p.name for p in self.data_dir.iterdir() if p.is_file() and p.name.endswith(DATA_SUFFIXES))

    def save_upload(self, path: str | Path, name: str | None = None) -> str:
        """Copy an uploaded file into the data folder under a safe name (never outside it, never
        over another file); returns the name. The file is only ever parsed, never run."""
        src = Path(path)
        name = Path(name or src.name).name  # the last part only: "../../x.jsonl" → "x.jsonl"
        if not name.endswith(DATA_SUFFIXES):
            raise UserError(f'{name}: not a dataset file; upload {", ".join(DATA_SUFFIXES)}')
        size = src.stat().st_size
        if size > self.max_upload_bytes:
            raise UserError(f"{name}: {size / 1e6:.1f} MB is over the upload limit of "
                            f"{self.max_upload_bytes / 1e6:.0f} MB")
        suffix = next(s for s in sorted(DATA_SUFFIXES, key=len, reverse=True) if name.endswith(s))
        stem = re.sub(r"[^A-Za-z0-9._-]+", "_", name[: -len(suffix)]).strip("._") or "upload"
        dest = self.data_dir / f"{stem}{suffix}"
        n = 1
        while dest.exists():
            n += 1
            dest = self.data_dir / f"{stem}-{n}{suffix}"
        shutil.copyfile(src, dest)
        return dest.name

    def data_source(self, choice: DataChoice) -> str:
        """The `data.train` value for a choice; UserError says what is wrong with it."""
        if choice.kind == "sample":
            return "sample"
        if choice.kind == "file":
            if not choice.value:
                raise UserError("pick a file from the data folder, or upload one")
            path = (self.data_dir / choice.value).resolve()
            if not path.is_relative_to(self.data_dir) or path.parent != self.data_dir:
                raise UserError(f'"{choice.value}": only files in the data folder can be used')
            if not path.is_file():
                raise UserError(f'"{choice.value}": no such file in the data folder')
            return str(path)
        if choice.kind == "hub":
            value = choice.value.strip()
            if not HUB_ID_RE.fullmatch(value):
                raise UserError(f'"{value}": a hub dataset id looks like owner/name (optionally owner/name:split)')
            return value
        raise UserError(f'data source "{choice.kind}" is not one of sample, file, hub')

    def preview(self, choice: DataChoice) -> tuple[str, list[int]]:
        """What the data pipeline makes of a choice: (report as Markdown, conversation lengths in
        words). Bad records are skipped and counted here, so the report shows them."""
        from chatbuild.data import InvalidRecord, load_conversations
        from chatbuild.data.stats import conversation_lengths, describe

        source = self.data_source(choice)
        try:
            convs, report = load_conversations(source, format=choice.format, mode=choice.mode,
                                               lang=choice.lang or None, skip_invalid=True)
        except InvalidRecord as e:
            raise UserError(str(e)) from None
        lengths, unit = conversation_lengths(convs)
        shown = "sample (bundled)" if source == "sample" else Path(source).name if choice.kind == "file" else source
        lines = [f"source: {shown}"] + [line for line in report.lines() if not line.startswith("source:")]
        lines += describe(convs, lengths, unit)
        return "```\n" + "\n".join(lines) + "\n```", lengths

    # ── settings ──
    def check(self, preset: str, values: dict, name: str, data: DataChoice) -> dict[str, str]:
        """Errors by field ("name", "data" or a FIELDS key); {} when the job can start."""
        from chatbuild.config import load_config

        errors = {}
        if not NAME_RE.fullmatch(name or ""):
            errors["name"] = "a name of letters, digits, '.', '_' or '-' (up to 64), starting with a letter or digit"
        elif (self.runs_dir / name).exists():
            errors["name"] = f'a run named "{name}" exists already; choose another name'
        elif self.engine() is not None and name in self.engine().models():
            errors["name"] = f'"{name}" is already a served model; choose another name'
        try:
            self.data_source(data)
        except UserError as e:
            errors["data"] = str(e)
        try:
            preset_path(preset)
        except UserError as e:
            errors["preset"] = str(e)
            return errors
        for key in FIELDS:  # each value on its own, so the message lands next to its field
            try:
                load_config(preset_path(preset), [f"{key}={_yaml(values.get(key))}"])
            except UserError as e:
                errors[key] = _without_source(str(e), key)
        if not errors:
            try:
                load_config(preset_path(preset), self.overrides(values, data))
            except UserError as e:  # a rule across fields (batch size vs micro-batch, ...)
                message = str(e)
                key = next((k for k in FIELDS if message.startswith(k) or f"({k}" in message or f"{k} (" in message), None)
                errors[key or "settings"] = _without_source(message, key)
        base = str(values.get("model.base") or "")
        if "model.base" not in errors and (base.startswith(("/", ".")) or Path(base).exists()) \
                and not (Path(base) / "config.json").is_file() \
                and not (base.lower().endswith(".gguf") and Path(base).is_file()):  # imported when the job starts
            errors["model.base"] = f"{base}: no model folder there (no config.json) and no .gguf file"
        return errors

    def overrides(self, values: dict, data: DataChoice) -> list[str]:
        out = [f"{key}={_yaml(values[key])}" for key in FIELDS if key in values]
        out += [f"data.train={self.data_source(data)}", f"data.format={data.format}", f"data.mode={data.mode}"]
        if data.lang.strip():
            out.append(f"data.lang=[{', '.join(x.strip() for x in data.lang.split(',') if x.strip())}]")
        return out

    def estimate(self, values: dict) -> str:
        """A memory estimate for the settings (`chatbuild.planner`), as one Markdown paragraph."""
        from chatbuild.config import load_config
        from chatbuild.planner import human, plan_memory

        try:
            cfg = load_config(None, [f"{k}={_yaml(values.get(k))}" for k in FIELDS])
        except UserError as e:
            return f"Memory estimate: fix the settings first ({e})."
        try:
            shape = _shape_of(cfg.model.base)
        except UserError as e:
            return f"Memory estimate: not available ({e})."
        plan = plan_memory(shape, cfg.train.micro_batch_size, cfg.data.max_length, cfg.lora.r, cfg.model.quant,
                           cfg.model.double_quant, cfg.train.optimizer, cfg.model.gradient_checkpointing)
        where = _gpu_memory_gb()
        fit = ("" if where is None else
               f" — fits this machine's GPU ({where:.0f} GB)" if plan.total_gb <= where else
               f" — **does not fit** this machine's GPU ({where:.0f} GB); lower the micro-batch size, "
               "max length or LoRA rank")
        return (f"Memory estimate: **{human(plan.total_gb)}** peak GPU memory for one training step "
                f"(micro-batch {cfg.train.micro_batch_size} × {cfg.data.max_length} tokens, LoRA r={cfg.lora.r}, "
                f"{cfg.model.quant}){fit}. Weights {human(plan.weights_gb)}, activations {human(plan.activations_gb)}.")

    # ── jobs ──
    def submit_finetune(self, preset: str, values: dict, name: str, data: DataChoice) -> Job:
        errors = self.check(preset, values, name, data)
        if errors:
            raise UserError("; ".join(f"{FIELDS.get(k, k)}: {v}" for k, v in errors.items()))
        overrides = self.overrides(values, data)
        from chatbuild.config import load_config

        cfg = load_config(preset_path(preset), overrides)
        # The tab's progress bar and loss curve read the metrics log: log often enough for ~20 updates.
        log_every = min(cfg.train.log_every, max(1, cfg.train.steps // 20))
        return self.jobs.submit(name, self.runs_dir / name, preset=str(preset_path(preset)),
                                overrides=[*overrides, f"train.log_every={log_every}"])

    def submit_eval(self, model: str, against: str, questions: str = "demo", max_tokens: int = 128) -> Job:
        """Evaluate `model` against `against` (both served by this server) on the demo or Vicuna
        questions, judged by the configured judge (else by `model` itself, restricted to the verdict
        markers — a smoke test, not a verdict to trust; the tab says so)."""
        import yaml

        engine = self.engine()
        served = engine.models() if engine is not None else []
        for m in (model, against):
            if m not in served:
                raise UserError(f'"{m}" is not a served model; pick one of {", ".join(served) or "(none yet)"}')
        if model == against:
            raise UserError("pick two different models")
        if questions not in ("demo", "vicuna"):
            raise UserError(f'questions "{questions}" is not one of demo, vicuna')
        if not 1 <= int(max_tokens) <= 4096:
            raise UserError(f"answer length must be between 1 and 4096 tokens, got {max_tokens}")
        if not self.self_url:
            raise UserError("this server does not know its own address, so it cannot evaluate its models")
        name = re.sub(r"[^A-Za-z0-9._-]+", "_", f"{model}-vs-{against}-{time.strftime('%Y%m%d-%H%M%S')}")
        out = self.evals_dir / name
        out.mkdir(parents=True)
        judge = ({"url": self.judge_url, "model": self.judge_model} if self.judge_url and self.judge_model else
                 {"url": self.self_url, "model": model, "guided_choice": True, "max_tokens": 8})
        cfg = {"questions": questions, "models": [f"{m}@{self.self_url}" for m in (model, against)], "out": str(out),
               "generation": {"max_tokens": int(max_tokens), "seed": 0, "concurrency": 2},
               "judge": {**judge, "concurrency": 2}, "ratings": {"method": "bt", "bootstrap": 100}}
        (out / "eval.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
        return self.jobs.submit(name, out, overrides=[str(out / "eval.yaml")], kind="eval")

    def judge_description(self) -> str:
        if self.judge_url and self.judge_model:
            return f"judge: `{self.judge_model}` at {self.judge_url}"
        return ("judge: none configured (`chatbuild serve --judge-url URL --judge-model NAME`), so the evaluated "
                "model judges itself, restricted to the verdict markers — a smoke test, not a verdict to trust")

    def _after(self, job: Job) -> str | None:
        """After a job settles: serve a finished run; store an evaluation's battles."""
        if job.status != "done":
            return None
        if job.kind == "finetune":
            return self._serve(job)
        from chatbuild import storage

        battles = Path(job.run_dir) / "battles.jsonl"
        if not battles.is_file():
            return "no battles to store (no pair got a verdict in both orders)"
        added, known, _ = storage.import_battles(self.db_path, battles, source="judge")
        return f"{added} battles stored for the Leaderboard" + (f" ({known} were already there)" if known else "")

    def _serve(self, job: Job) -> str:
        engine = self.engine()
        if engine is None or not hasattr(engine, "load_adapter"):
            return f"not served here (this server's engine cannot load adapters); serve it with `chatbuild serve {job.run_dir}`"
        if job.name in engine.models():
            return f"served as {job.name}"
        try:
            engine.load_adapter(job.name, job.run_dir)
        except UserError as e:
            return f"not served: {e}"
        return f"served as {job.name}"


def progress_of(job: Job) -> dict:
    """A job's progress for the tab: fraction done, step/steps, loss, tokens/s, memory, curves."""
    p = job.progress() if job.kind == "finetune" else {"step": 0, "steps": None, "train": [], "eval": []}
    if job.status == "done":
        fraction = 1.0
    elif p.get("steps"):
        fraction = min(1.0, p["step"] / p["steps"])
    else:
        fraction = 0.0
    return {**p, "fraction": fraction}


def _yaml(value) -> str:
    """A form value as it reads in a key=value override."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float) and value.is_integer() and not math.isinf(value):
        return str(int(value)) if abs(value) >= 1 else repr(value)
    return "" if value is None else str(value)


def _without_source(message: str, key: str | None) -> str:
    """'lora.r: must be > 0, got 0' or 'PRESET + command line: lora.r must be int, got 'x'' →
    'must be ...', for display next to the field."""
    message = re.sub(r"^.*?command line: ", "", message)
    if key:
        for lead in (key + ":", key + " must"):
            if message.startswith(lead):
                message = ("must" if lead.endswith("must") else "") + message[len(lead):]
                message = message.strip()
    return message


def _shape_of(base: str):
    from chatbuild.modeling import TINY_BASE, tiny_base_dir
    from chatbuild.planner import shape_from_config
    from chatbuild.shapes import SHAPES

    if base in SHAPES:
        return SHAPES[base]
    path = tiny_base_dir() if base == TINY_BASE else Path(base)
    if not (path / "config.json").is_file():
        if base == TINY_BASE:
            raise UserError("the tiny base is built on first use")
        if not HUB_ID_RE.fullmatch(base):
            raise UserError(f"{base}: no model folder there")
    from transformers import AutoConfig

    try:  # only what is on disk: the estimate must never wait on the network
        config = AutoConfig.from_pretrained(str(path) if path.is_dir() else base, local_files_only=True)
    except (OSError, ValueError):
        raise UserError(f"{base}: its config is not on this machine (download the model first, or pick a "
                        f"named shape such as llama-7b)") from None
    return shape_from_config(config)


def _gpu_memory_gb() -> float | None:
    try:
        import torch

        if torch.cuda.is_available():
            return torch.cuda.get_device_properties(0).total_memory / 1e9
    except Exception:  # noqa: BLE001 — no usable GPU means no fit check, not an error
        return None
    return None
