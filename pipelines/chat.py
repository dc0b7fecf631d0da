"""Talk to a run in the terminal: `chatbuild chat RUN`.

    chatbuild chat runs/tiny-guanaco
    chatbuild chat runs/tiny-guanaco --temperature 0 --max-new-tokens 64
    echo "Hello" | chatbuild chat runs/tiny-guanaco          # one reply per input line, for scripts

The 4-bit base plus the run's adapter, through the same in-process engine `chatbuild serve` uses,
so the prompt, stop strings and sampling are exactly what the API and the UI get. Commands at the
prompt: /reset (forget the conversation), /quit. Ctrl-C stops the current reply.
"""

import argparse
import sys
import threading

from chatbuild.errors import UserError


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("run", help="a run folder")
    p.add_argument("--system", help="a system prompt (default: the run's)")
    p.add_argument("--temperature", type=float, default=0.7)
    p.add_argument("--top-p", type=float, default=0.9)
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--seed", type=int)


def run(args: argparse.Namespace) -> int:
    from chatbuild.engines import GenerationParams
    from chatbuild.engines.hf import HFEngine
    from chatbuild.runs import load_run

    if args.temperature < 0 or not 0 < args.top_p <= 1 or args.max_new_tokens < 1:
        raise UserError("--temperature must be >= 0, --top-p in (0, 1], --max-new-tokens >= 1")
    from chatbuild.bases import resolve_base

    run_ = load_run(args.run)
    engine = HFEngine.from_runs([run_.path], base=resolve_base(run_.base))  # a run naming "smollm2" or a .gguf
    params = GenerationParams(temperature=args.temperature, top_p=args.top_p, max_new_tokens=args.max_new_tokens,
                              seed=args.seed)
    interactive = sys.stdin.isatty()
    history: list[dict] = [{"role": "system", "content": args.system}] if args.system else []
    if interactive:
        print(f"chatting with {run_.name} (base {run_.base}); /reset to start over, /quit to leave")
    try:
        while True:
            try:
                line = input("you> " if interactive else "")
            except EOFError:
                break
            text = line.strip()
            if not text:
                continue
            if text == "/quit":
                break
            if text == "/reset":
                history = history[:1] if args.system else []
                continue
            history.append({"role": "user", "content": text})
            reply, cancel = [], threading.Event()
            if interactive:
                print(f"{run_.name}> ", end="", flush=True)
            try:
                for chunk in engine.stream(history, params, run_.name, cancel=cancel):
                    reply.append(chunk.text)
                    print(chunk.text, end="", flush=True)
            except KeyboardInterrupt:
                cancel.set()
                print(" [stopped]", end="")
            print(flush=True)
            history.append({"role": "assistant", "content": "".join(reply).strip()})
    finally:
        engine.close()
    return 0


if __name__ == "__main__":
    from chatbuild.cli import main

    raise SystemExit(main(["chat", *sys.argv[1:]]))
