"""`chatbuild eval run CONFIG.yaml [key=value ...]`: the whole evaluation loop, resumable.

    answers (every model, every question) → judge (every pair, both orders) → ratings → leaderboard

A config names the questions, the models and the judge; everything else has defaults. Its schema,
with an example, is `chatbuild/evalconfig.py`; relative paths in it are relative to the config file.

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
from pathlib import Path

from chatbuild.errors import ConfigError, UserError
from chatbuild.evalconfig import EvalConfig, load_eval_config  # the schema's one owner is the core
from chatbuild.ratings import METHODS, method_choices


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
    p.add_argument("config", metavar="CONFIG.yaml", help="the evaluation config (see `chatbuild/evalconfig.py`)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="dotted overrides, e.g. judge.concurrency=4")


def run(args: argparse.Namespace) -> int:
    cfg = load_eval_config(args.config, args.overrides)
    check(cfg, args.config)
    evaluate(cfg)
    return 0
