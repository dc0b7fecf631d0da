"""`chatbuild eval run CONFIG.yaml [key=value ...]`: the whole evaluation loop, resumable.

    answers (every model, every question) → judge (every pair, both orders) → ratings → leaderboard

A config names the questions, the models and the judge; everything else has defaults (the
dataclasses below). Relative paths in it are relative to the config file. Example:

    questions: vicuna                       # demo | vicuna | a questions JSONL
    models:                                 # run folders, NAME@URL, or the runs' bare base by name
      - runs/guanaco-7b
      - gpt-4o@https://api.openai.com/v1
    judge: {url: "https://api.openai.com/v1", model: gpt-4o}
    ratings: {method: paper, permutations: 10000}
    out: eval/guanaco-vs-gpt4o

Everything lands in `out/`:

    config.yaml               the resolved configuration
    answers/<model>.jsonl     answers JSONL, one file per model (`eval.answers`)
    judge.sqlite              every judge reply, raw text included (`chatbuild.storage`)
    battles.jsonl             battles JSONL (`eval.judge`), and battles.report.json (biases, invalid, ...)
    leaderboard.json          the `chatbuild eval elo --json` shape
    leaderboard.md            the Markdown table; leaderboard.png the plot

Rerunning the same command resumes: answered questions and stored judgments are not asked again.
"""

import argparse
import os
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from chatbuild.errors import ConfigError, UserError
from chatbuild.ratings import DEFAULT_METHOD, METHODS, PERMUTATIONS, K, method_choices


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
    url: str | None = None  # OpenAI-compatible API of the judge
    model: str | None = None
    api_key_env: str = "CHATBUILD_JUDGE_API_KEY"  # falls back to $OPENAI_API_KEY
    concurrency: int = 8
    max_tokens: int = 1024
    timeout: float = 120.0
    retries: int = 4
    backoff: float = 1.0
    guided_choice: bool = False  # restrict replies to the verdict markers (small local judges)


@dataclass
class RatingSettings:
    method: str = DEFAULT_METHOD  # a chatbuild.ratings.METHODS name: paper | elo | bt
    permutations: int = PERMUTATIONS
    bootstrap: int | None = None  # default: the method's (100 for bt, 0 otherwise)
    k: float = K
    seed: int = 0


@dataclass
class EvalConfig:
    questions: str = "demo"
    models: list[str] = field(default_factory=list)
    out: str = "eval-out"
    generation: GenerationSettings = field(default_factory=GenerationSettings)
    judge: JudgeSettings = field(default_factory=JudgeSettings)
    ratings: RatingSettings = field(default_factory=RatingSettings)


def load_eval_config(path: str | Path, overrides: list[str] = ()) -> EvalConfig:
    """Read CONFIG.yaml plus dotted key=value overrides into an EvalConfig (typed, checked), with
    relative paths resolved against the config file's folder."""
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
    check(cfg, path)
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


def check(cfg: EvalConfig, path) -> None:
    if len(cfg.models) < 2:
        raise UserError(f"{path}: models: an evaluation needs at least two models, got {len(cfg.models)}")
    if not cfg.judge.url or not cfg.judge.model:
        raise UserError(f"{path}: judge.url and judge.model are required (an OpenAI-compatible judge)")
    if cfg.ratings.method not in METHODS:
        raise ConfigError("ratings.method", f'"{cfg.ratings.method}" is not one of {method_choices()}', str(path))
    from eval.answers import check_sampling

    g = cfg.generation
    check_sampling(g.temperature, g.top_p, g.max_tokens, g.concurrency)


def step(title: str) -> None:
    print(f"\n== {title}", flush=True)


def evaluate(cfg: EvalConfig) -> dict:
    """Run the loop; returns {"leaderboard": rows, "report": judge report, "out": folder}."""
    from chatbuild.config import save_config
    from eval.answers import answer_all, parse_model
    from eval.client import ChatClient
    from eval.elo import leaderboard_files, table
    from eval.judge import judge, judge_api_key, load_answer_files
    from eval.questions import load_questions

    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    save_config(cfg, out / "config.yaml")
    questions = load_questions(cfg.questions)
    specs = [parse_model(m) for m in cfg.models]

    step(f"1. answers: {len(specs)} models × {len(questions)} questions")
    g = cfg.generation
    params = {"temperature": g.temperature, "top_p": g.top_p, "max_tokens": g.max_tokens, "seed": g.seed}
    files = answer_all(questions, specs, out / "answers", params, g.concurrency, os.environ.get(g.api_key_env),
                       g.timeout, g.retries)

    step(f"2. judge: {cfg.judge.model} at {cfg.judge.url}, both orders")
    j = cfg.judge
    key = os.environ.get(j.api_key_env) or judge_api_key(None)
    client = ChatClient(j.url, key, timeout=j.timeout, retries=j.retries, backoff=j.backoff)
    try:
        report, failed = judge(load_answer_files(files), questions, client, j.model, out / "battles.jsonl",
                               out / "judge.sqlite", j.concurrency, j.max_tokens, guided=j.guided_choice)
    finally:
        client.close()
    if failed:
        raise UserError(f"{len(failed)} judge requests failed (see above); rerun the same command to resume")

    step(f"3. ratings: {cfg.ratings.method}")
    from chatbuild.battles import read_battles

    if not report["battles"]:
        # e.g. a small local judge that never ends with a verdict marker: nothing to rate, and that
        # is a finding to show, not a crash (the report above says why)
        print(f"no battles to rate: none of the {report['pairs']} pairs got a valid verdict in both orders "
              f"(see {out / 'battles.report.json'}; raw judge replies in {out / 'judge.sqlite'})")
        return {"leaderboard": None, "report": report, "out": out}
    r = cfg.ratings
    battles, _ = read_battles(out / "battles.jsonl")
    rows, title = leaderboard_files(battles, r.method, r.permutations, r.bootstrap, r.seed, r.k,
                                    plot_path=out / "leaderboard.png", markdown_path=out / "leaderboard.md",
                                    json_path=out / "leaderboard.json")
    print(title)
    print(table(rows))
    print(f"\nleaderboard: {out / 'leaderboard.md'}, {out / 'leaderboard.json'}, {out / 'leaderboard.png'}")
    return {"leaderboard": rows, "report": report, "out": out}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", metavar="CONFIG.yaml", help="the evaluation config (see `eval/run.py`)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="dotted overrides, e.g. judge.concurrency=4")


def run(args: argparse.Namespace) -> int:
    evaluate(load_eval_config(args.config, args.overrides))
    return 0
