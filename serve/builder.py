"""The Builder: what the UI's Build tab does, without the UI.

    data (bundled sample, a file in the data folder, an upload, a hub id) → preview
    settings (a preset, then base, quantization, LoRA, training length) → checks per field, memory estimate
    start → a fine-tune job (`serve.jobs`: a separate process, tracked in SQLite)
    done → the run is hot-loaded into the server's engine (Chat and Arena pick it up), and
    "evaluate against …" runs `chatbuild eval run` as another job, whose battles land in the
    server's database (the Leaderboard tab shows them)

Everything the Builder writes lives in one folder (`Builder.root`):

    data/    uploaded datasets (nothing outside this folder can be picked as a local file)
    runs/    run folders of the fine-tunes, runs/<name>
    evals/   evaluation folders, evals/<name> (eval.yaml, answers/, battles.jsonl, leaderboard.*)
    logs/    one log per job

The job table lives in the server's SQLite database, next to the arena's tables.

Who may build: `builders`, a set of logins (`chatbuild serve --builder-users`); None opens the
Build tab to everyone who reaches the UI (a server without logins, on loopback: the demo). A login
may cancel and resume only its own jobs. Every numeric field has bounds (BOUNDS), and the queue has
a size (`max_active` jobs queued or running, `max_active_per_login` of them per login).
"""

import json
import math
import os
import re
import shutil
import sys
import time
from collections.abc import Callable, Collection
from dataclasses import dataclass
from pathlib import Path

from chatbuild import presets as bundled_presets
from chatbuild.engines import LoadsAdapters
from chatbuild.errors import UserError
from serve.jobs import Job, JobManager, job_kind

DATA_SUFFIXES = (".jsonl", ".json", ".jsonl.gz", ".parquet")
NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
HUB_ID_RE = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+(:[\w.-]+)?")
_ABSOLUTE_PATH = re.compile(r"(?<![\w.:/~-])/(?:[^\s/'\"`()\[\],:]+/)+([^\s/'\"`()\[\],:]+)")  # /a/b/c → c
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
    "train.objective": "Objective",
    "train.beta": "β (DPO/ORPO)",
}


@dataclass(frozen=True)
class Bound:
    """A closed interval [low, high]; `low_open` / `high_open` leave out that end."""

    low: float
    high: float
    low_open: bool = False
    high_open: bool = False

    def refuse(self, value) -> str | None:
        """None when `value` lies inside, else what to tell the user."""
        above = value > self.low if self.low_open else value >= self.low
        below = value < self.high if self.high_open else value <= self.high
        if above and below:
            return None
        return (f"must be in {'(' if self.low_open else '['}{_number(self.low)}, {_number(self.high)}"
                f"{')' if self.high_open else ']'}, got {_number(value)}")


# What the Build form accepts, by field: wide enough for every preset (guanaco-65b: r=64, 1875 steps,
# batch 16, max length 512) and the QLoRA paper's sweeps, narrow enough that no request can ask for a
# job that cannot finish or cannot be allocated. A server raises the steps with `max_steps`.
BOUNDS = {
    "lora.r": Bound(1, 512),
    "lora.alpha": Bound(1, 4096),
    "lora.dropout": Bound(0, 1, high_open=True),
    "train.steps": Bound(1, 100_000),
    "train.batch_size": Bound(1, 1024),
    "train.micro_batch_size": Bound(1, 1024),
    "train.lr": Bound(0, 1, low_open=True),
    "data.max_length": Bound(16, 32_768),
    "train.beta": Bound(0, 100, low_open=True),
}
MAX_TEXT = 512  # characters of any one form value (a base's hub id or folder, a choice)
# The hub's credentials: the one secret a fine-tune needs (gated bases and datasets); no job gets
# the server's other keys (serve.jobs.job_environment).
HUB_TOKENS = ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN")


def presets() -> list[str]:
    return bundled_presets.names()


def preset_path(name: str) -> Path:
    return bundled_presets.path(name)


def preset_values(name: str) -> dict:
    """The form's values for a preset: its settings over the defaults, for every field in FIELDS."""
    flat = bundled_presets.values(name)
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
                 max_upload_bytes: int = DEFAULT_MAX_UPLOAD, python: str = sys.executable,
                 builders: Collection[str] | None = None, max_steps: int = BOUNDS["train.steps"].high,
                 max_active: int = 8, max_active_per_login: int = 2):
        """`builders`: the logins that may build (None: everyone, for a server without logins).
        `max_steps`: the largest train.steps; `max_active` / `max_active_per_login`: jobs queued or
        running at once, in all and per login."""
        self.root = Path(root).resolve()
        self.data_dir, self.runs_dir, self.evals_dir = self.root / "data", self.root / "runs", self.root / "evals"
        for d in (self.data_dir, self.runs_dir, self.evals_dir):
            d.mkdir(parents=True, exist_ok=True)
        self.db_path = Path(db_path)
        self.engine = engine
        self.self_url = self_url
        self.judge_url, self.judge_model = judge_url, judge_model
        self.max_upload_bytes = max_upload_bytes
        self.builders = None if builders is None else frozenset(builders)
        self.bounds = {**BOUNDS, "train.steps": Bound(1, max_steps)}
        # Keys reach the jobs through their environment only (never the database, configs or logs),
        # and each kind gets only its own: an eval the keys of this server and the judge, a fine-tune
        # the hub's token.
        evals = {}
        if api_key:
            evals["OPENAI_API_KEY"] = api_key  # the eval's answers come from this server
        judge = judge_key if judge_url else api_key  # without a judge of its own, the eval asks this server
        if judge:
            evals["CHATBUILD_JUDGE_API_KEY"] = judge
        finetunes = {k: os.environ[k] for k in HUB_TOKENS if os.environ.get(k)}
        self.jobs = JobManager(self.db_path, self.root / "logs", python=python,
                               env={"eval": evals, "finetune": finetunes}, on_finish=self._after,
                               max_active=max_active, max_active_per_owner=max_active_per_login)

    def start(self, interval: float = 1.0) -> None:
        """Serve the runs earlier jobs finished (a restarted server), then run the queue."""
        for job in self.jobs.jobs():
            if job_kind(job.kind).makes_run and job.status == "done":
                self._serve(job)
        self.jobs.start(interval)

    def stop(self) -> None:
        self.jobs.stop()

    # ── who may build ──
    def refusal(self, login: str | None) -> str | None:
        """None when `login` (None: no login) may start, cancel, resume and evaluate; else why not."""
        if self.builders is None:
            return None
        if login is None:
            return "building needs a login on this server"
        if login not in self.builders:
            return f"{login} may not build on this server (ask its operator to add you to --builder-users)"
        return None

    def _allow(self, login: str | None) -> None:
        refusal = self.refusal(login)
        if refusal:
            raise UserError(refusal)

    def may_read(self, job: Job, login: str | None) -> bool:
        """Whether `login` may read `job`'s log, error and note (they name files and data): its owner
        may, and anyone on a server without a builder list. Everyone sees the queue's rows and progress."""
        return self.builders is None or job.owner == login

    def _own(self, job_id: int, login: str | None) -> Job:
        """The job, if `login` may act on it: its own (anyone's on a server without logins)."""
        self._allow(login)
        job = self.jobs.get(job_id)
        if self.builders is not None and job.owner != login:
            raise UserError(f"job {job_id} is not yours; you can cancel and resume only your own jobs")
        return job

    def cancel(self, job_id: int, login: str | None = None) -> Job:
        self._own(job_id, login)
        return self.jobs.cancel(job_id)

    def resume(self, job_id: int, login: str | None = None) -> Job:
        self._own(job_id, login)
        return self.jobs.resume(job_id)

    # ── data ──
    def data_files(self) -> list[str]:
        """Files in the data folder a fine-tune can read, by name."""
        return sorted(p.name for p in self.data_dir.iterdir() if p.is_file() and p.name.endswith(DATA_SUFFIXES))

    def save_upload(self, path: str | Path, name: str | None = None) -> str:
        """Copy an uploaded file into the data folder under a safe name (never outside it, never
        over another file, even one saved at the same moment); returns the name. The file is only
        ever parsed, never run. Errors name the file, never the server's folders."""
        src = Path(path)
        name = Path(name or src.name).name  # the last part only: "../../x.jsonl" → "x.jsonl"
        if not name.endswith(DATA_SUFFIXES):
            raise UserError(f'{name}: not a dataset file; upload {", ".join(DATA_SUFFIXES)}')
        suffix = next(s for s in sorted(DATA_SUFFIXES, key=len, reverse=True) if name.endswith(s))
        stem = re.sub(r"[^A-Za-z0-9._-]+", "_", name[: -len(suffix)]).strip("._") or "upload"
        dest, n = self.data_dir / f"{stem}{suffix}", 1
        try:
            with open(src, "rb") as f:
                size = os.fstat(f.fileno()).st_size
                if size > self.max_upload_bytes:
                    raise UserError(f"{name}: {size / 1e6:.1f} MB is over the upload limit of "
                                    f"{self.max_upload_bytes / 1e6:.0f} MB")
                while True:
                    try:
                        out = open(dest, "xb")  # exclusive: a name taken meanwhile is never overwritten
                        break
                    except FileExistsError:
                        n += 1
                        dest = self.data_dir / f"{stem}-{n}{suffix}"
                try:
                    with out:
                        shutil.copyfileobj(f, out, 1 << 20)
                except OSError:
                    dest.unlink(missing_ok=True)  # no half-copied dataset in the picker
                    raise
        except OSError as e:  # its strerror only: the full message names the server's folders
            raise UserError(f"{name}: cannot copy it into the data folder ({e.strerror})") from None
        return dest.name

    def data_source(self, choice: DataChoice) -> str:
        """The `data.train` value for a choice; UserError says what is wrong with it. A hub id becomes
        `hub:OWNER/NAME`, which the data readers take from the hub only (`chatbuild.data.sources`):
        the id is the client's text, and a local path of that shape is never read."""
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
            from chatbuild.data.sources import HUB_PREFIX, hub_id

            return HUB_PREFIX + hub_id(choice.value.strip())
        raise UserError(f'data source "{choice.kind}" is not one of sample, file, hub')

    def preview(self, choice: DataChoice, objective: str = "sft") -> tuple[str, list[int]]:
        """What the data pipeline makes of a choice for `objective`: (report as Markdown, conversation
        lengths in words — for preference objectives, the chosen replies' lengths). Bad records are
        skipped and counted here, so the report shows them. The report and its errors name files by
        name: never the server's folders."""
        from chatbuild.config import PREFERENCE_OBJECTIVES
        from chatbuild.data import load_conversations, load_pairs
        from chatbuild.data.stats import conversation_lengths, describe, describe_pairs, reply_lengths

        source = self.data_source(choice)
        try:
            if objective in PREFERENCE_OBJECTIVES:  # what the recipe will read: pairs (chatbuild.data.load_pairs)
                pairs, report = load_pairs(source, format=choice.format, lang=choice.lang or None, skip_invalid=True)
                chosen, rejected, unit = reply_lengths(pairs)
                described, lengths = describe_pairs(pairs, chosen, rejected, unit), chosen
            else:
                convs, report = load_conversations(source, format=choice.format, mode=choice.mode,
                                                   lang=choice.lang or None, skip_invalid=True)
                lengths, unit = conversation_lengths(convs)
                described = describe(convs, lengths, unit)
        except UserError as e:
            raise UserError(self._without_folders(str(e))) from None
        shown = {"sample": "sample (bundled)", "file": Path(source).name}.get(choice.kind, choice.value.strip())
        lines = [f"source: {shown}"] + [line for line in report.lines() if not line.startswith("source:")]
        lines += described
        return "```\n" + self._without_folders("\n".join(lines)) + "\n```", lengths

    def _without_folders(self, text: str) -> str:
        """`text` with the data folder and the bundled sample named by file name, and any other
        absolute path (a cache folder in a library's message) cut to its last part."""
        from chatbuild.data import SAMPLE

        text = text.replace(str(SAMPLE), "sample").replace(f"{self.data_dir}{os.sep}", "")
        return _ABSOLUTE_PATH.sub(r"\1", text)

    # ── settings ──
    def check(self, preset: str, values: dict, name: str, data: DataChoice) -> dict[str, str]:
        """Errors by field ("name", "data" or a FIELDS key); {} when the job can start. Every value
        is checked against its type, BOUNDS and the rules across fields before anything starts."""
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
        from chatbuild.config import PREFERENCE_OBJECTIVES
        from chatbuild.data import PAIR_FORMATS

        if values.get("train.objective") in PREFERENCE_OBJECTIVES and data.format not in PAIR_FORMATS:
            errors.setdefault("data", f'{values["train.objective"]} trains on preference pairs: read the data as '
                                      f'{", ".join(PAIR_FORMATS)}, not "{data.format}"')
        try:
            preset_path(preset)
        except UserError as e:
            errors["preset"] = str(e)
            return errors
        parsed = {}
        for key in FIELDS:  # each value on its own, so the message lands next to its field
            text = _yaml(values.get(key))
            if len(text) > MAX_TEXT:  # before parsing: a long value would be echoed in the error
                errors[key] = f"{len(text)} characters; at most {MAX_TEXT}"
                continue
            try:
                cfg = load_config(preset_path(preset), [f"{key}={text}"])
            except UserError as e:
                errors[key] = _field_error(e, key)[1]
                continue
            section, field = key.split(".")
            parsed[key] = getattr(getattr(cfg, section), field)
            if key in self.bounds and (refusal := self.bounds[key].refuse(parsed[key])):
                errors[key] = refusal
        base = str(values.get("model.base") or "")
        if parsed.get("model.base") and "data.max_length" in parsed and "data.max_length" not in errors:
            window = _context_window(parsed["model.base"])
            if window and parsed["data.max_length"] > window:
                errors["data.max_length"] = (f"must be at most {window}, the context window of {parsed['model.base']}, "
                                             f"got {parsed['data.max_length']}")
        if not errors:
            try:
                load_config(preset_path(preset), self.overrides(values, data))
            except UserError as e:  # a rule across fields (batch size vs micro-batch, ...)
                field, message = _field_error(e)
                errors[field] = message
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
    def submit_finetune(self, preset: str, values: dict, name: str, data: DataChoice, login: str | None = None) -> Job:
        """Queue a fine-tune for `login` after `check`; UserError says what is wrong (the permission,
        a field, the queue's size)."""
        self._allow(login)
        errors = self.check(preset, values, name, data)
        if errors:
            raise UserError("; ".join(f"{FIELDS.get(k, k)}: {v}" for k, v in errors.items()))
        overrides = self.overrides(values, data)
        from chatbuild.config import load_config

        cfg = load_config(preset_path(preset), overrides)
        # The tab's progress bar and loss curve read the metrics log: log often enough for ~20 updates.
        log_every = min(cfg.train.log_every, max(1, cfg.train.steps // 20))
        return self.jobs.submit(name, self.runs_dir / name, preset=str(preset_path(preset)),
                                overrides=[*overrides, f"train.log_every={log_every}"], owner=login)

    def submit_eval(self, model: str, against: str, questions: str = "demo", max_tokens: int = 128,
                    login: str | None = None) -> Job:
        """Evaluate `model` against `against` (both served by this server) on the demo or Vicuna
        questions, judged by the configured judge (else by `model` itself, restricted to the verdict
        markers — a smoke test, not a verdict to trust; the tab says so), as a job of `login`."""
        from chatbuild.evalconfig import write_eval_config

        self._allow(login)
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
        write_eval_config(out / "eval.yaml", questions=questions, out=out,
                          models=[f"{m}@{self.self_url}" for m in (model, against)],
                          generation={"max_tokens": int(max_tokens), "seed": 0, "concurrency": 2},
                          judge={**judge, "concurrency": 2}, ratings={"method": "bt", "bootstrap": 100})
        try:
            return self.jobs.submit(name, out, overrides=[str(out / "eval.yaml")], kind="eval", owner=login)
        except UserError:  # the queue is full: keep no folder of a job that does not exist
            shutil.rmtree(out)
            raise

    def judge_description(self) -> str:
        if self.judge_url and self.judge_model:
            return f"judge: `{self.judge_model}` at {self.judge_url}"
        return ("judge: none configured (`chatbuild serve --judge-url URL --judge-model NAME`), so the evaluated "
                "model judges itself, restricted to the verdict markers — a smoke test, not a verdict to trust")

    def _after(self, job: Job) -> str | None:
        """After a job settles: serve a finished run; store an evaluation's battles."""
        if job.status != "done":
            return None
        if job_kind(job.kind).makes_run:
            return self._serve(job)
        from chatbuild import storage

        battles = Path(job.run_dir) / "battles.jsonl"
        if not battles.is_file():
            return "no battles to store (no pair got a verdict in both orders)"
        added, known, _ = storage.import_battles(self.db_path, battles, source="judge")
        return f"{added} battles stored for the Leaderboard" + (f" ({known} were already there)" if known else "")

    def _serve(self, job: Job) -> str:
        engine = self.engine()
        if engine is None or not isinstance(engine, LoadsAdapters):
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
    p = job.progress()  # what the job's kind reports (serve.jobs.JOB_KINDS)
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


def _number(value) -> str:
    """1.0 → "1", 1e9 → "1000000000", 2e-4 → "0.0002": a number as the form shows it."""
    if isinstance(value, float) and value.is_integer() and not math.isinf(value):
        return str(int(value))
    return str(value)


def _context_window(base: str) -> int | None:
    """The base's context window (max_position_embeddings) when its config is on this machine: a
    model folder, the tiny base, the hub's cache. None when not known; never the network."""
    from chatbuild.modeling import TINY_BASE, tiny_base_dir

    config = (tiny_base_dir() if base == TINY_BASE else Path(base)) / "config.json"
    if not config.is_file() and HUB_ID_RE.fullmatch(base):
        from huggingface_hub import try_to_load_from_cache

        try:
            cached = try_to_load_from_cache(base, "config.json")
        except ValueError:  # not a valid repo id after all (owner/name:split)
            cached = None
        config = Path(cached) if isinstance(cached, str) else config
    try:
        return int(json.loads(config.read_text())["max_position_embeddings"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _field_error(e: UserError, field: str | None = None) -> tuple[str, str]:
    """(form field, message) for a configuration error: a `ConfigError` about `field` (with `field`
    None: about any field of the form) lands there as just its problem ("must be > 0, got 0"); any
    other error as a whole sentence, on `field` or else on "settings"."""
    key = getattr(e, "key", None)
    if key is not None and (key == field or (field is None and key in FIELDS)):
        return key, e.problem
    return field or "settings", f"{key}: {e.problem}" if key is not None else str(e)


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
