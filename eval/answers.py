"""`chatbuild eval answers`: every model answers every question, with the paper's sampling defaults.

    chatbuild eval answers --questions vicuna --model runs/guanaco-7b \\
        --model gpt-4o@https://api.openai.com/v1 --out answers/

A model is
- a run folder: answered in-process by the serving layer's engine (`chatbuild.engines`); several
  runs on one base share one loaded base;
- a bare NAME: another model of that in-process engine, i.e. the runs' bare base under its served
  name (`chatbuild eval answers --model runs/tiny-guanaco --model tiny-base ...`);
- `NAME@URL`: the model NAME on any OpenAI-compatible server (`chatbuild serve`, `vllm serve`, a
  hosted API; the key comes from --api-key or $OPENAI_API_KEY).
Sampling defaults are the QLoRA paper's evaluation settings: nucleus sampling with top-p 0.9 and
temperature 0.7.

Output: one file per model, DIR/<model>.jsonl (a "/" in the name becomes "__"), one line per question:

    {"question_id": 1, "model": "guanaco-7b", "answer": "...",
     "generation": {"temperature": 0.7, "top_p": 0.9, "max_tokens": 512, "engine": "openai", "url": "..."},
     "question": ["the user turns, so the judge needs no questions file"]}

A multi-turn question is answered turn by turn, each turn seeing the conversation so far; "answer"
is the reply to the last turn and "answers" lists the replies to all turns.

Resumable: answers already in DIR/<model>.jsonl are kept and their questions skipped; each new
answer is appended as soon as it exists, and at the end the file is rewritten in question order.
"""

import argparse
import json
import os
import re
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from chatbuild.data.sources import read_jsonl
from chatbuild.errors import UserError, where
from eval.client import run_concurrently
from eval.questions import Question, load_questions

PAPER_SAMPLING = {"temperature": 0.7, "top_p": 0.9}


@dataclass(frozen=True)
class ModelSpec:
    """A model to answer with. `name` labels its answers. `url`: a model on an OpenAI-compatible
    server; `run`: a run folder, served in-process; neither: another model of the in-process engine
    (the bare base of the runs, under its engine name, e.g. "tiny-base")."""

    name: str
    url: str | None = None
    run: Path | None = None

    @property
    def in_process(self) -> bool:
        return self.url is None


def parse_model(spec: str) -> ModelSpec:
    """'NAME@http(s)://...' → a served model; a run folder → that run; another bare NAME → a model of
    the in-process engine (checked once the engine is open)."""
    m = re.fullmatch(r"(.+?)@(https?://\S+)", spec)
    if m:
        return ModelSpec(m.group(1), url=m.group(2))
    from chatbuild.runs import is_run, load_run

    if is_run(spec):
        return ModelSpec(load_run(spec).name, run=Path(spec))
    if Path(spec).exists():
        raise UserError(f"{spec}: not a finished run folder (no config.yaml and adapter/)")
    if "/" in spec or spec.endswith((".jsonl", ".yaml")):
        raise UserError(f'--model "{spec}": no such run folder (expected a run folder, NAME@URL, or the name '
                        f"of a model the run folders' engine serves, such as their base)")
    return ModelSpec(spec)


def answers_path(out_dir: str | Path, model: str) -> Path:
    return Path(out_dir) / (model.replace("/", "__") + ".jsonl")


def read_answers(path: str | Path) -> list[dict]:
    """Read an answers JSONL file; each record needs question_id, model and answer. Errors name
    file:line, except a broken last line (a write cut short by an interrupted run), which is dropped."""
    path = Path(path)

    def not_json(n: int, detail: str, last: bool) -> None:
        if not last:
            raise UserError(f"{where(path, n)}: not valid JSON ({detail})")
        print(f"{where(path, n)}: dropping a cut-off last line", file=sys.stderr)

    out = []
    for n, rec in read_jsonl(path, "answers file", not_json):
        if not isinstance(rec, dict) or not all(k in rec for k in ("question_id", "model", "answer")):
            raise UserError(f'{where(path, n)}: an answer needs "question_id", "model" and "answer"')
        if not isinstance(rec["answer"], str) or not isinstance(rec["model"], str):
            raise UserError(f'{where(path, n)}: "answer" and "model" must be strings')
        out.append(rec)
    return out


# ── answering ──────────────────────────────────────────────────────────────────────────────────
Reply = Callable[[list[dict]], str]  # messages → the assistant's reply


@dataclass
class Answerer:
    """How one model answers: its reply function and the generation settings recorded with it."""

    name: str
    reply: Reply
    generation: dict


def remote_answerer(spec: ModelSpec, params: dict, api_key: str | None = None, timeout: float = 300.0,
                    retries: int = 4):
    """(Answerer, close) for a NAME@URL model, over `eval.client`."""
    from eval.client import ChatClient

    client = ChatClient(spec.url, api_key=api_key, timeout=timeout, retries=retries)
    body = {"temperature": params["temperature"], "top_p": params["top_p"], "max_tokens": params["max_tokens"]}
    if params.get("seed") is not None:
        body["seed"] = params["seed"]
    reply = lambda messages: client.complete(spec.name, messages, **body).text  # noqa: E731
    return Answerer(spec.name, reply, {**body, "engine": "openai", "url": spec.url}), client.close


def open_in_process_engine(specs: list[ModelSpec]):
    """The serving layer's in-process engine (`chatbuild.engines`, imported only here) over the run
    folders among `specs`: one quantized base, the runs' adapters, and the bare base."""
    runs = [s.run for s in specs if s.run is not None]
    names = [s.name for s in specs if s.run is None]
    try:
        from chatbuild.engines import open_engine
    except ImportError as e:
        where_ = runs[0] if runs else names[0]
        raise UserError(f"{where_}: answering in-process needs the serving layer's engine (chatbuild.engines: {e}). "
                        "Serve the run instead (`chatbuild serve RUN`) and pass --model NAME@URL") from None
    if not runs:
        raise UserError(f'--model "{names[0]}": not a run folder; a bare name means a model of the in-process '
                        "engine (such as the runs' base), which needs at least one run folder to open it; "
                        "for a model on a server write NAME@URL")
    engine = open_engine(runs)
    served = engine.models()
    for name in names:
        if name not in served:
            engine.close()
            raise UserError(f'--model "{name}": the in-process engine serves {", ".join(served)}; '
                            "for a model on a server write NAME@URL")
    return engine


def engine_answerer(engine, spec: ModelSpec, params: dict) -> Answerer:
    """An Answerer for a model of the in-process engine."""
    from chatbuild.engines import GenerationParams

    gp = GenerationParams(temperature=params["temperature"], top_p=params["top_p"],
                          max_new_tokens=params["max_tokens"], seed=params.get("seed"))

    def reply(messages: list[dict]) -> str:
        return "".join(chunk.text for chunk in engine.stream(messages, gp, spec.name))

    gen = {"temperature": gp.temperature, "top_p": gp.top_p, "max_tokens": gp.max_new_tokens, "engine": "hf"}
    if params.get("seed") is not None:
        gen["seed"] = params["seed"]
    gen["run" if spec.run else "model"] = str(spec.run) if spec.run else spec.name
    return Answerer(spec.name, reply, gen)


def answer(question: Question, reply: Reply) -> list[str]:
    """The model's replies to each turn of `question`, each turn seeing the conversation so far."""
    messages, replies = [], []
    for turn in question.turns:
        messages.append({"role": "user", "content": turn})
        replies.append(reply(list(messages)))
        messages.append({"role": "assistant", "content": replies[-1]})
    return replies


def existing_answers(path: Path, model: str) -> dict:
    """{question_id: record} already in `path` (empty if there is no file)."""
    have = {}
    if path.exists():
        for rec in read_answers(path):
            if rec["model"] != model:
                raise UserError(f'{path}: holds answers of "{rec["model"]}", not "{model}"')
            have[rec["question_id"]] = rec
    return have


def generate_answers(questions: list[Question], answerer: Answerer, out_dir: str | Path, concurrency: int = 4,
                     log=print) -> Path:
    """Answer every question not yet answered in DIR/<model>.jsonl; returns that path. Raises
    UserError if some questions could not be answered (the file keeps the rest; rerun to resume)."""
    from eval.client import ServerRefused

    path = answers_path(out_dir, answerer.name)
    path.parent.mkdir(parents=True, exist_ok=True)
    have = existing_answers(path, answerer.name)
    todo = [q for q in questions if q.question_id not in have]
    failed = []
    if todo:
        with open(path, "a", encoding="utf-8") as f:
            work = run_concurrently(lambda q: answer(q, answerer.reply), todo, concurrency)
            for done, (q, replies, error) in enumerate(work, start=1):
                if isinstance(error, ServerRefused) or (error is not None and not isinstance(error, Exception)):
                    raise error  # a wrong URL, key or model name: every other question would fail too
                if error is not None:  # one failed question (e.g. a prompt too long) must not lose the others
                    failed.append((q.question_id, f"{type(error).__name__}: {error}"))
                    continue
                rec = _record(q, answerer.name, replies, answerer.generation)
                f.write(json.dumps(rec, ensure_ascii=False) + "\n")
                f.flush()  # on disk now: an interrupted run keeps it
                have[q.question_id] = rec
                if done % 10 == 0 or done == len(todo):
                    log(f"{answerer.name}: {done}/{len(todo)}")
    _rewrite_in_order(path, questions, have)
    if failed:
        shown = "; ".join(f"question {qid}: {err}" for qid, err in failed[:3])
        raise UserError(f"{answerer.name}: {len(failed)} question(s) could not be answered ({shown}); "
                        f"{len(have)} answers are saved in {path}, rerun to retry the rest")
    return path


def answer_all(questions: list[Question], specs: list[ModelSpec], out_dir: str | Path, params: dict,
               concurrency: int = 4, api_key: str | None = None, timeout: float = 300.0, retries: int = 4,
               log=print) -> list[Path]:
    """Answers of every model to every question, resuming what DIR already holds. In-process models
    share one engine, opened only if one of them has questions left."""
    names = [s.name for s in specs]
    if len(set(names)) != len(names):
        raise UserError(f"two models have the same name: {', '.join(sorted({n for n in names if names.count(n) > 1}))}")
    pending = {}
    for s in specs:
        have = existing_answers(answers_path(out_dir, s.name), s.name)
        pending[s.name] = sum(q.question_id not in have for q in questions)
        log(f"{s.name}: {len(questions) - pending[s.name]} of {len(questions)} questions already answered, "
            f"{pending[s.name]} to go")
    engine = None
    local = [s for s in specs if s.in_process]
    if any(pending[s.name] for s in local):
        engine = open_in_process_engine(local)
    try:
        paths = []
        for s in specs:
            if s.in_process:
                if engine is None:  # all answered: only put the file in question order
                    paths.append(generate_answers(questions, Answerer(s.name, None, {}), out_dir, log=log))
                else:
                    paths.append(generate_answers(questions, engine_answerer(engine, s, params), out_dir,
                                                  concurrency, log))
                continue
            answerer, close = remote_answerer(s, params, api_key, timeout, retries)
            try:
                paths.append(generate_answers(questions, answerer, out_dir, concurrency, log))
            finally:
                close()  # on an interrupt this also stops the requests in flight
        return paths
    finally:
        if engine is not None:
            engine.close()


def _record(q: Question, model: str, replies: list[str], gen: dict) -> dict:
    rec = {"question_id": q.question_id, "model": model, "answer": replies[-1], "generation": gen,
           "question": list(q.turns)}
    if len(replies) > 1:
        rec["answers"] = replies
    return rec


def _rewrite_in_order(path: Path, questions: list[Question], have: dict) -> None:
    order = {q.question_id: i for i, q in enumerate(questions)}
    records = sorted(have.values(), key=lambda r: (order.get(r["question_id"], len(order)), str(r["question_id"])))
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    os.replace(tmp, path)


# ── command line ───────────────────────────────────────────────────────────────────────────────
def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--questions", default="demo", help='"demo", "vicuna" or a questions JSONL file (default: demo)')
    p.add_argument("--model", action="append", required=True, metavar="RUN|NAME|NAME@URL",
                   help="a run folder, the runs' base by name, or a model on an OpenAI-compatible server; "
                        "repeat for several")
    p.add_argument("--out", required=True, metavar="DIR", help="folder for the answers (one JSONL per model)")
    p.add_argument("--temperature", type=float, default=PAPER_SAMPLING["temperature"], help="default: 0.7 (the paper's)")
    p.add_argument("--top-p", type=float, default=PAPER_SAMPLING["top_p"], help="default: 0.9 (the paper's)")
    p.add_argument("--max-tokens", type=int, default=512, help="most new tokens per reply (default: 512)")
    p.add_argument("--seed", type=int, default=None, help="sampling seed, where the engine supports one")
    p.add_argument("--concurrency", type=int, default=4, help="questions answered at once (default: 4)")
    p.add_argument("--api-key", default=None, help="key for NAME@URL models (default: $OPENAI_API_KEY)")
    p.add_argument("--timeout", type=float, default=300.0, help="seconds per request (default: 300)")
    p.add_argument("--retries", type=int, default=4, help="retries per request after failures (default: 4)")


def check_sampling(temperature: float, top_p: float, max_tokens: int, concurrency: int) -> None:
    if temperature < 0:
        raise UserError(f"temperature must be >= 0, got {temperature}")
    if not 0 < top_p <= 1:
        raise UserError(f"top-p must be in (0, 1], got {top_p}")
    if max_tokens < 1 or concurrency < 1:
        raise UserError("max tokens and concurrency must be >= 1")


def run(args: argparse.Namespace) -> int:
    check_sampling(args.temperature, args.top_p, args.max_tokens, args.concurrency)
    questions = load_questions(args.questions)
    specs = [parse_model(m) for m in args.model]
    params = {"temperature": args.temperature, "top_p": args.top_p, "max_tokens": args.max_tokens, "seed": args.seed}
    api_key = args.api_key or os.environ.get("OPENAI_API_KEY")
    for path in answer_all(questions, specs, args.out, params, args.concurrency, api_key, args.timeout, args.retries):
        print(f"answers: {path}")
    return 0
