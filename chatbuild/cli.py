"""The `chatbuild` console script.

Each subcommand lives in the program that does the work (`pipelines/`, `serve/`, `eval/`, or a
`chatbuild` module) as two functions, `add_arguments(parser)` and `run(args) -> int`. This file only
knows their names: it imports the one program the command line asks for, so `chatbuild --help` and
every subcommand start without importing the others (this is the one place `chatbuild` may import
the program packages, always lazily).

A `UserError` (bad input the user can fix) is printed as one line without a traceback, exit code 2.
"""

import argparse
import importlib
import sys

import chatbuild
from chatbuild.errors import UserError

# name -> (module with add_arguments/run, one-line help). Order is the order `--help` lists them.
COMMANDS = {
    "demo": ("chatbuild.demo", "set everything up on the embedded tiny model and run the main job"),
    "tiny-base": ("pipelines.tiny_base", "build the embedded tiny base model offline"),
    "data": ("chatbuild.data.cli", "prepare or inspect conversation data (OASST1 trees, chat, ShareGPT, Alpaca, Guanaco) or preference pairs"),
    "finetune": ("pipelines.finetune", "QLoRA fine-tune: a preset plus key=value overrides -> a run folder"),
    "merge": ("pipelines.merge", "merge a run's adapter into its 16-bit base, or combine adapters"),
    "export": ("pipelines.export", "export a run as a GGUF file (f16 or q8_0) with an Ollama Modelfile"),
    "push": ("pipelines.push", "upload a run to the Hugging Face Hub: adapter, tokenizer and model card, or --merged"),
    "chat": ("pipelines.chat", "chat with a run in the terminal (4-bit base + adapter, streaming)"),
    "serve": ("serve.cli", "serve runs: OpenAI-compatible API at /v1 and the chat UI, one 4-bit base + adapters"),
    "arena": ("chatbuild.arena", "export stored arena/judge battles to battles JSONL, or import such a file"),
    "eval": ("eval.cli", "evaluate models: answers, pairwise LLM judge, Elo/Bradley-Terry leaderboard"),
    "plan": ("pipelines.plan", "predict a fine-tune's peak GPU memory and whether it fits"),
}


def _command_name(argv: list[str]) -> str | None:
    for a in argv:
        if not a.startswith("-"):
            return a
    return None


def build_parser(argv: list[str]) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="chatbuild",
        description="Build a chatbot the way QLoRA built Guanaco: fine-tune, serve, evaluate.",
    )
    parser.add_argument("--version", action="version", version=f"chatbuild {chatbuild.__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    wanted = _command_name(argv)
    for name, (module, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        if name == wanted:
            program = importlib.import_module(module)
            program.add_arguments(p)
            p.set_defaults(_run=program.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser(argv)
    args = parser.parse_args(argv)
    if not getattr(args, "_run", None):
        parser.print_help()
        return 0 if not argv else 2
    try:
        return int(args._run(args) or 0)
    except UserError as e:
        print(f"chatbuild {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"chatbuild {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
