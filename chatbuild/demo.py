"""`chatbuild demo`: the main job on the embedded default, offline, from a fresh clone.

Part of the command line (like `chatbuild/cli.py`, it imports the program packages lazily inside
its steps). Everything lands under one folder, `demo/` by default:

    demo/tiny-base/            the tiny Llama-architecture base built from the bundled conversations
    demo/runs/tiny-guanaco/    a QLoRA fine-tune of it (preset tiny-cpu): the run folder
    demo/eval/                 base vs fine-tune on the bundled questions, judged by the served tiny
                               run (meaningless verdicts, real machinery): answers, battles, leaderboard
    demo/data/                 the server's SQLite store (arena votes, feedback, Build jobs)
    demo/data/builder/         what the Build tab makes: uploads, runs, evaluations, job logs

and it ends by serving the run with the UI (chat, arena, leaderboard, build) and the API until Ctrl-C.
Each step is skipped when its output is already there, so `make demo` is cheap to rerun.
"""

import argparse
import json
from pathlib import Path


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dir", default="demo", help="folder for everything the demo makes (default: demo/)")
    p.add_argument("--fresh", action="store_true", help="rebuild every step even if its output exists")
    p.add_argument("--no-serve", action="store_true", help="stop after the evaluation instead of serving the UI")
    p.add_argument("--port", type=int, default=7860, help="port for the UI and API (default 7860)")


def tiny_base_ready(path: Path) -> bool:
    return all((path / f).is_file() for f in ("config.json", "model.safetensors", "tokenizer.json"))


def step(title: str) -> None:
    print(f"\n== {title}", flush=True)


def run(args: argparse.Namespace) -> int:
    from chatbuild.runs import is_run
    from pipelines.finetune import finetune, resolve_config
    from pipelines.tiny_base import build_tiny_base

    root = Path(args.dir)
    base, run_dir = root / "tiny-base", root / "runs" / "tiny-guanaco"
    print(f"chatbuild demo: everything goes to {root.resolve()}")

    step("1. the embedded base model")
    if args.fresh or not tiny_base_ready(base):
        build_tiny_base(base, force=True)
    meta = json.loads((base / "chatbuild_tiny_base.json").read_text())
    print(f"tiny base: {meta['parameters'] / 1e6:.2f}M parameters at {base}")
    print(f"load it with: AutoModelForCausalLM.from_pretrained({str(base)!r})")

    step("2. QLoRA fine-tune (preset tiny-cpu: NF4 + double quant base, LoRA, paged AdamW)")
    if args.fresh or not is_run(run_dir):
        cfg = resolve_config("tiny-cpu", [f"model.base={base.resolve()}", f"output_dir={run_dir}"])
        finetune(cfg, overwrite=True)
    evals = [r for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines()) if "eval_loss" in r]
    if evals:
        print(f"validation loss {evals[0]['eval_loss']:.3f} (step {evals[0]['step']}) → "
              f"{evals[-1]['eval_loss']:.3f} (step {evals[-1]['step']})")
    print(f"run folder: {run_dir} (model card: {run_dir / 'README.md'}, curve: {run_dir / 'loss.png'})")

    step("3. evaluation: tiny base vs tiny fine-tune on the bundled questions, judged by the served tiny run")
    evaluate_demo(root, base, run_dir)

    if args.no_serve:
        return 0
    step(f"4. serving {run_dir.name} and the base: UI at http://127.0.0.1:{args.port}/ , API at /v1 (Ctrl-C stops)")
    from chatbuild.cli import main

    (root / "data").mkdir(exist_ok=True)
    return main(["serve", str(run_dir), "--port", str(args.port), "--db", str(root / "data" / "chatbuild.sqlite"),
                 "--builder"])


def evaluate_demo(root: Path, base: Path, run_dir: Path) -> None:
    """Answers from both models in-process, a judge served over real HTTP on loopback (the fine-tuned
    tiny run, restricted to verdict markers with guided_choice), ratings and leaderboard files."""
    import socket
    import threading
    import time

    import uvicorn
    import yaml

    from chatbuild.engines import open_engine
    from chatbuild.runs import load_run
    from eval.run import evaluate, load_eval_config
    from serve.app import create_app
    from serve.settings import Settings

    out = root / "eval"
    engine = open_engine([run_dir])
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(create_app(engine, Settings(), ui=False), log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    while not server.started and thread.is_alive():
        time.sleep(0.05)
    try:
        url = f"http://127.0.0.1:{sock.getsockname()[1]}/v1"
        cfg_path = root / "eval.yaml"
        cfg_path.write_text(yaml.safe_dump({
            "questions": "demo", "models": [str(run_dir.resolve()), base.name], "out": str(out.resolve()),
            "generation": {"max_tokens": 48, "seed": 0, "concurrency": 2},
            "judge": {"url": url, "model": load_run(run_dir).name, "guided_choice": True, "max_tokens": 8,
                      "concurrency": 2},
            "ratings": {"method": "bt", "bootstrap": 100},
        }, sort_keys=False))
        evaluate(load_eval_config(cfg_path))
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        sock.close()
        engine.close()
