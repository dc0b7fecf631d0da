"""The evaluation config: one schema, read by `chatbuild eval run` (eval/run.py) and written by whoever
starts an evaluation (the Build tab's eval jobs, `chatbuild demo`).

A config names the questions, the models and the judge; everything else has defaults (the
dataclasses below). Relative paths in it are relative to the config file. Example:

    questions: vicuna                       # demo | vicuna | a questions JSONL
    models:                                 # run folders, NAME@URL, or the runs' bare base by name
      - runs/guanaco-7b
      - gpt-4o@https://api.openai.com/v1
    judge: {url: "https://api.openai.com/v1", model: gpt-4o}
    ratings: {method: paper, permutations: 10000}
    out: eval/guanaco-vs-gpt4o

The judge's mode (`chatbuild eval judge --mode`): pairwise (default), baseline with
`judge.baseline: MODEL`, or single (1-10 grades, no ratings step); `judge.reference: refs.jsonl`
adds reference answers for the questions of `judge.reference_categories`. Without `judge.url`,
`judge.model` is a run folder or a base judged in-process (offline; a small judge is a weak one).
`ratings.style_control` rates with style covariates (needs `method: bt`), `ratings.by_category`
rates each question category alone.

    load_eval_config(path, overrides)     CONFIG.yaml + key=value → EvalConfig (typed, paths resolved)
    write_eval_config(path, models=..., out=..., judge=..., ...)   the sections given, checked against
                                          the schema first; like a preset, only what differs from the defaults
"""

import copy
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from chatbuild.errors import UserError
from chatbuild.ratings import DEFAULT_METHOD, PERMUTATIONS, K


@dataclass
class GenerationSettings:
    temperature: float = 0.7  # the QLoRA paper's evaluation sampling
    top_p: float = 0.9
    max_tokens: int = 512
    seed: int | None = None
    concurrency: int = 4
    api_key_env: str = "OPENAI_API_KEY"  # environment variable with the key for NAME@URL models
    timeout: float = 300.0
    retries: int = 4


@dataclass
class JudgeSettings:
    url: str | None = None  # OpenAI-compatible API of the judge; none: `model` runs in-process
    model: str | None = None  # the model's name at `url`, or without one a run folder or base ("tiny", "smollm2")
    api_key_env: str = "CHATBUILD_JUDGE_API_KEY"  # falls back to $OPENAI_API_KEY
    concurrency: int = 8
    max_tokens: int = 1024
    timeout: float = 120.0
    retries: int = 4
    backoff: float = 1.0
    guided_choice: bool = False  # restrict replies to the verdict markers (small local judges)
    mode: str = "pairwise"  # pairwise | baseline | single (eval.judge.MODES)
    baseline: str | None = None  # the model every other one meets, with mode baseline
    reference: str | None = None  # reference answers JSONL (question_id, answer)
    reference_categories: list[str] = field(default_factory=lambda: ["math", "coding", "reasoning"])


@dataclass
class RatingSettings:
    method: str = DEFAULT_METHOD  # a chatbuild.ratings.METHODS name: paper | elo | bt
    permutations: int = PERMUTATIONS
    bootstrap: int | None = None  # default: the method's (100 for bt, 0 otherwise)
    k: float = K
    seed: int = 0
    style_control: bool = False  # Bradley-Terry with style covariates (method bt), as `eval elo --style-control`
    by_category: bool = False  # one leaderboard per question category, as `eval elo --by-category`


@dataclass
class EvalConfig:
    questions: str = "demo"
    models: list[str] = field(default_factory=list)
    out: str = "eval-out"
    generation: GenerationSettings = field(default_factory=GenerationSettings)
    judge: JudgeSettings = field(default_factory=JudgeSettings)
    ratings: RatingSettings = field(default_factory=RatingSettings)


def load_eval_config(path: str | Path, overrides: list[str] = ()) -> EvalConfig:
    """Read CONFIG.yaml plus dotted key=value overrides into an EvalConfig (typed: unknown keys and
    wrong types are refused), with relative paths resolved against the config file's folder. What a
    run needs beyond the schema (two models, a judge, a known rating method) `eval.run.check` checks."""
    from chatbuild.config import build, set_dotted  # the same typed loading as run configs

    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except FileNotFoundError:
        raise UserError(f"{path}: no such config file") from None
    except (OSError, yaml.YAMLError) as e:
        raise UserError(f"{path}: not a readable YAML file ({e})") from None
    if not isinstance(data, dict):
        raise UserError(f"{path}: an eval config must be a mapping of settings")
    for item in overrides:
        if "=" not in item:
            raise UserError(f'override "{item}" must look like key=value (e.g. judge.concurrency=4)')
        key, raw = item.split("=", 1)
        set_dotted(data, key.strip(), yaml.safe_load(raw) if raw.strip() else None, source=f'override "{item}"')
    cfg = build(EvalConfig, data, prefix="", source=str(path))
    here = path.resolve().parent

    def local(p: str) -> str:
        return p if Path(p).is_absolute() else str(here / p)

    if cfg.questions not in ("demo", "vicuna"):
        cfg.questions = local(cfg.questions)
    # run folders are paths; NAME@URL and bare engine model names (the runs' base) are not
    cfg.models = [_model_spec(m, here, local) for m in cfg.models]
    cfg.out = local(cfg.out)
    if cfg.judge.reference:
        cfg.judge.reference = local(cfg.judge.reference)
    if cfg.judge.model and not cfg.judge.url:  # a local judge: a run folder is a path like a model's
        cfg.judge.model = _model_spec(cfg.judge.model, here, local)
    return cfg


def _model_spec(m: str, here: Path, local) -> str:
    """A config's model entry: NAME@URL as it is; a run folder (or any path with a "/") relative to
    the config file; anything else a model name of the engine — also when a folder of that name
    happens to sit beside the config (the demo's eval.yaml sits beside its base, "tiny-base")."""
    from chatbuild.runs import is_run

    if "@" in m and "://" in m:
        return m
    if is_run(here / m) or ("/" in m and (here / m).exists()):
        return local(m)
    return m


def write_eval_config(path: str | Path, *, models: list[str], out: str | Path, judge: dict,
                      questions: str = "demo", generation: dict | None = None, ratings: dict | None = None) -> Path:
    """Write an eval config to `path` and return it: `questions`, `models`, `out`, then the
    `generation`, `judge` and `ratings` sections given (dicts of their settings). Unknown keys and
    wrong types are refused here (`UserError`), before any job starts, not when the evaluation reads it."""
    from chatbuild.config import build

    data = {"questions": questions, "models": list(models), "out": str(out)}
    if generation:
        data["generation"] = dict(generation)
    data["judge"] = dict(judge)
    if ratings:
        data["ratings"] = dict(ratings)
    build(EvalConfig, copy.deepcopy(data), prefix="", source="eval config")
    path = Path(path)
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path
