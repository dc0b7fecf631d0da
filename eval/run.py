"""`chatbuild eval run CONFIG.yaml [key=value ...]`: the whole evaluation loop, resumable.

    answers (every model, every question) → judge (every pair, both orders) → ratings → leaderboard

With `judge.mode: baseline` the judge pairs every model with `judge.baseline` only (and prints the
win rates against it); with `judge.mode: single` it grades each answer 1-10 and the loop ends with
the mean grades (grades.jsonl, grades.report.json) instead of ratings. Without `judge.url` the
judge runs in this process (`judge.model`: a run folder or a base).

A config names the questions, the models and the judge; everything else has defaults. Its schema,
with an example, is `chatbuild/evalconfig.py`; relative paths in it are relative to the config file.

Everything lands in `out/`:

    config.yaml               the resolved configuration
    answers/<model>.jsonl     answers JSONL, one file per model (`eval.answers`)
    judge.sqlite              every judge reply, raw text included (`chatbuild.storage`)
    battles.jsonl             battles JSONL (`eval.judge`), and battles.report.json (biases, invalid, ...)
    grades.jsonl              single mode instead: one grade per answer, and grades.report.json
    leaderboard.json          the `chatbuild eval elo --json` shape
    leaderboard.md            the Markdown table; leaderboard.png the plot

Rerunning the same command resumes: answered questions and stored judgments are not asked again.
"""

import argparse
import json
import os
from pathlib import Path

from chatbuild.errors import ConfigError, UserError
from chatbuild.evalconfig import EvalConfig, load_eval_config  # the schema's one owner is the core
from chatbuild.ratings import METHODS, method_choices


def check(cfg: EvalConfig, path) -> None:
    if len(cfg.models) < 2:
        raise UserError(f"{path}: models: an evaluation needs at least two models, got {len(cfg.models)}")
    from eval.judge import MODES

    j = cfg.judge
    if not j.model:
        raise UserError(f"{path}: judge.model is required (with judge.url, a model on an OpenAI-compatible "
                        "server; without, a run folder or base judged in-process)")
    if j.mode not in MODES:
        raise ConfigError("judge.mode", f'"{j.mode}" is not one of {", ".join(MODES)}', str(path))
    if (j.mode == "baseline") != (j.baseline is not None):
        raise ConfigError("judge.baseline", "is required with mode baseline" if j.baseline is None
                          else f"applies to mode baseline, not {j.mode}", str(path))
    if not j.reference_categories:
        raise ConfigError("judge.reference_categories", "give at least one category", str(path))
    if cfg.ratings.method not in METHODS:
        raise ConfigError("ratings.method", f'"{cfg.ratings.method}" is not one of {method_choices()}', str(path))
    if cfg.ratings.style_control and cfg.ratings.method != "bt":
        raise ConfigError("ratings.style_control", "is Bradley-Terry with style covariates; set ratings.method: bt",
                          str(path))
    from eval.answers import check_sampling

    g = cfg.generation
    check_sampling(g.temperature, g.top_p, g.max_tokens, g.concurrency)


def step(title: str) -> None:
    print(f"\n== {title}", flush=True)


def evaluate(cfg: EvalConfig) -> dict:
    """Run the loop; returns {"leaderboard": rows, "report": judge report, "out": folder}."""
    from chatbuild.config import save_config
    from eval.answers import answer_all, parse_model
    from eval.elo import leaderboard_files, table
    from eval.judge import judge, judge_api_key, load_answer_files, load_references, open_judge
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

    j = cfg.judge
    where_ = f"at {j.url}" if j.url else "in this process"
    step(f"2. judge ({j.mode}): {j.model} {where_}" + (", both orders" if j.mode != "single" else ""))
    key = os.environ.get(j.api_key_env) or judge_api_key(None)
    references = load_references(j.reference) if j.reference else None
    client, judge_model, local = open_judge(j.url, j.model, key, j.timeout, j.retries, j.backoff)
    result = out / ("grades.jsonl" if j.mode == "single" else "battles.jsonl")
    try:
        report, failed = judge(load_answer_files(files), questions, client, judge_model, result,
                               out / "judge.sqlite", j.concurrency, j.max_tokens, guided=j.guided_choice, mode=j.mode,
                               baseline=j.baseline, references=references, categories=tuple(j.reference_categories),
                               local=local)
    finally:
        client.close()
    if failed:
        raise UserError(f"{len(failed)} judge requests failed (see above); rerun the same command to resume")
    if j.mode == "single":
        step("3. ratings: mean grades (single mode; printed above)")
        print(f"grades: {result}, {out / 'grades.report.json'}")
        return {"leaderboard": None, "grades": report["mean_grades"], "report": report, "out": out}

    r = cfg.ratings
    step(f"3. ratings: {r.method}" + (", style control" if r.style_control else "")
         + (", by category" if r.by_category else ""))
    from chatbuild.battles import read_battles

    if not report["battles"]:
        # e.g. a small local judge that never ends with a verdict marker: nothing to rate, and that
        # is a finding to show, not a crash (the report above says why)
        print(f"no battles to rate: none of the {report['pairs']} pairs got a valid verdict in both orders "
              f"(see {out / 'battles.report.json'}; raw judge replies in {out / 'judge.sqlite'})")
        return {"leaderboard": None, "report": report, "out": out}
    battles, _ = read_battles(out / "battles.jsonl")
    if r.style_control or r.by_category:
        from eval.elo import describe_leaderboards, leaderboards, write_markdown

        flags = argparse.Namespace(method=r.method, style_control=r.style_control, by_category=r.by_category,
                                    bootstrap=r.bootstrap, seed=r.seed, permutations=r.permutations, k=r.k)
        groups, results, board = leaderboards(battles, flags)
        (out / "leaderboard.json").write_text(json.dumps(board, indent=2) + "\n")
        write_markdown(out / "leaderboard.md", results)
        print(describe_leaderboards(groups, results))
        print(f"\nleaderboard: {out / 'leaderboard.md'}, {out / 'leaderboard.json'}")
        return {"leaderboard": board, "report": report, "out": out}
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
