"""`chatbuild eval`: the evaluation programs as sub-commands.

    chatbuild eval answers --questions vicuna --model RUN --model NAME@URL --out answers/
    chatbuild eval judge --answers answers/ --judge-url URL --judge-model NAME --out battles.jsonl
        [--mode pairwise|baseline --baseline M|single] [--reference refs.jsonl]   # no --judge-url: a local judge
    chatbuild eval elo battles.jsonl [--method paper|elo|bt] [--json] [--plot PNG] [--markdown MD]
    chatbuild eval agreement chatbuild.sqlite    # judge verdicts vs arena votes: agreement, kappa, biases
    chatbuild eval run eval.yaml                 # all of the above from one config, resumable

Each sub-command is the `add_arguments`/`run` pair of its module; they import their heavy
dependencies (numpy, httpx, matplotlib) only when they run.
"""

import argparse
import importlib

PROGRAMS = {
    "answers": ("eval.answers", "every model answers every question (paper sampling: top-p 0.9, temperature 0.7)"),
    "judge": ("eval.judge", "an LLM judge compares answers in both orders (every pair, or each model vs a baseline) "
              "or grades each one 1-10"),
    "elo": ("eval.elo", "ratings from battles: the paper's Elo, online Elo or Bradley-Terry"),
    "agreement": ("eval.agreement", "judge-human agreement (Cohen's kappa) and position/length bias side by side"),
    "run": ("eval.run", "the whole loop from a config: answers, judge, ratings, leaderboard"),
}


def add_arguments(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="eval_command", metavar="STEP", required=True)
    for name, (module, help_text) in PROGRAMS.items():
        program = importlib.import_module(module)
        sp = sub.add_parser(name, help=help_text, description=(program.__doc__ or help_text).split("\n\n")[0],
                            formatter_class=argparse.RawDescriptionHelpFormatter)
        program.add_arguments(sp)
        sp.set_defaults(_eval_run=program.run)


def run(args: argparse.Namespace) -> int:
    return args._eval_run(args)
