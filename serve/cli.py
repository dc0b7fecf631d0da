"""`chatbuild serve`: one process with the OpenAI-compatible API (/v1), the UI (/) and /healthz.

    chatbuild serve runs/tiny-a runs/tiny-b                # one 4-bit base + both adapters + the bare base
    chatbuild serve --base huggyllama/llama-7b             # a base alone
    chatbuild serve --base tiny --builder                  # the embedded tiny base (CPU), and the Build tab
    chatbuild serve --base smollm2                         # SmolLM2-135M-Instruct, in its own ChatML template
    chatbuild serve runs/a --quant nf4                     # serve the base in NF4 (default auto: fp32 on CPU if it fits)
    chatbuild serve --base model.gguf --chat-format chatml # a GGUF file (imported once), prompted in ChatML
    chatbuild serve runs/a --builder --host 0.0.0.0 --ui-auth alice:pw1,bob:pw2 --builder-users alice
    chatbuild serve runs/a --host 0.0.0.0 --port 8000 --api-key "$KEY"    # or env CHATBUILD_API_KEY
    chatbuild serve --engine openai --remote-url http://gpu-box:8000/v1 --remote-key "$KEY"
    chatbuild serve runs/a runs/b --engine vllm             # starts `vllm serve` (CUDA), stops it on exit
    python -m serve.cli runs/tiny-a                        # the same, without the console script

The models load first (a few seconds for the tiny base, minutes for a 65B one), then the server
listens; run folders are checked before anything heavy starts.
"""

import argparse
import os
import sys

from chatbuild.errors import UserError
from chatbuild.templates import check_format_name, format_choices


def add_arguments(p: argparse.ArgumentParser) -> None:
    from serve.settings import Settings

    d = Settings()
    p.add_argument("runs", nargs="*", metavar="RUN",
                   help="run folders to serve (hf engine); model names with --engine openai")
    p.add_argument("--base", help="base model id, path, .gguf file or smollm2: alone without RUNs, else instead "
                                  "of the base the runs name")
    p.add_argument("--base-name", help="the bare base's model name (default: its folder name or hub id)")
    p.add_argument("--chat-format", metavar="FORMAT",
                   help=f"how the bare base is prompted: {format_choices()} (default: the base's own chat "
                        "template, else guanaco; runs keep their own)")
    p.add_argument("--engine", choices=("hf", "openai", "vllm"), default="hf",
                   help="hf: load the models in this process (default); openai: forward to --remote-url; "
                        "vllm: start `vllm serve` for the runs (CUDA) and forward to it")
    p.add_argument("--remote-url", help="OpenAI-compatible server for --engine openai (e.g. http://host:8000/v1)")
    p.add_argument("--remote-key", default=os.environ.get("OPENAI_API_KEY"),
                   help="API key of the remote server (default: env OPENAI_API_KEY)")
    p.add_argument("--host", default="127.0.0.1", help="interface to listen on (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--api-key", default=os.environ.get("CHATBUILD_API_KEY"),
                   help="require 'Authorization: Bearer KEY' on /v1 (default: env CHATBUILD_API_KEY; unset = open)")
    p.add_argument("--no-ui", action="store_true", help="serve the API only")
    p.add_argument("--ui-auth", default=os.environ.get("CHATBUILD_UI_AUTH"), metavar="USER:PASS[,USER:PASS]",
                   help="require a login for the web UI, one or more user:password pairs (default: env "
                        "CHATBUILD_UI_AUTH; unset = open). /v1 is not affected: it has --api-key")
    p.add_argument("--builder", action="store_true",
                   help="add the Build tab: fine-tune and evaluate from the browser (runs jobs on this machine)")
    p.add_argument("--builder-dir", help="the Build tab's folder: uploads, runs, evaluations, job logs "
                                         "(default: builder/ beside the --db file)")
    p.add_argument("--builder-users", default=os.environ.get("CHATBUILD_BUILDER_USERS"), metavar="USER[,USER]",
                   help="the --ui-auth logins that may build (upload, preview, start, cancel, resume, evaluate); '*' for "
                        "all of them (default: env CHATBUILD_BUILDER_USERS; needed with --builder and --ui-auth)")
    p.add_argument("--builder-max-queued", type=int, default=d.builder_max_queued,
                   help=f"Build jobs queued or running at once (default {d.builder_max_queued})")
    p.add_argument("--builder-max-queued-per-user", type=int, default=d.builder_max_queued_per_user,
                   help=f"... of them per login (default {d.builder_max_queued_per_user})")
    p.add_argument("--builder-max-steps", type=int, default=d.builder_max_steps,
                   help=f"the largest train.steps the Build tab accepts (default {d.builder_max_steps})")
    p.add_argument("--judge-url", help="OpenAI-compatible /v1 URL of the judge for the Build tab's evaluations "
                                       "(key: env CHATBUILD_JUDGE_API_KEY)")
    p.add_argument("--judge-model", help="the judge's model name at --judge-url")
    p.add_argument("--db", help="the UI's SQLite store (arena votes, feedback); default $CHATBUILD_HOME/chatbuild.sqlite")
    p.add_argument("--max-new-tokens", type=int, default=d.max_new_tokens, help=f"largest max_tokens a request may ask (default {d.max_new_tokens})")
    p.add_argument("--max-prompt-tokens", type=int, default=d.max_prompt_tokens, help=f"default {d.max_prompt_tokens}")
    p.add_argument("--max-running", type=int, default=d.max_running, help=f"generations at once (default {d.max_running})")
    p.add_argument("--queue-size", type=int, default=d.queue_size,
                   help=f"requests waiting beyond those; more get 429 (default {d.queue_size})")
    p.add_argument("--device", help="device for the hf engine (default: cuda:LOCAL_RANK, else cpu)")
    p.add_argument("--quant", metavar="PRECISION",
                   help="how the hf engine holds the base while serving: nf4, bf16, fp32, q8 (fp32 weights "
                        "multiplied as int8 by a small C kernel, CPU only) or auto (default auto: on a CPU q8, else "
                        "fp32, when the base's weights take at most 1/4 of the available memory, else nf4; nf4 on "
                        "a GPU; runs' adapters apply at any precision)")
    p.add_argument("--decoder", choices=("auto", "fast", "hf"),
                   help="which forward pass the hf engine decodes with: fast (fixed KV slots, a lean Llama-family "
                        "layer loop), hf (transformers' own, any model and adapter) or auto (default: fast on a CPU "
                        "where it runs the model, else hf)")
    p.add_argument("--log-level", default="info", choices=("critical", "error", "warning", "info", "debug"))


def run(args: argparse.Namespace) -> int:
    from chatbuild.availability import require

    for module in ("fastapi", "uvicorn"):
        require(module, "chatbuild serve")
    import uvicorn

    from chatbuild.engines import open_engine
    from chatbuild.runs import load_run
    from serve.app import create_app
    from serve.settings import Settings

    # ── check what can be checked before anything heavy happens ──
    if args.engine in ("hf", "vllm"):
        if not args.runs and not args.base:
            raise UserError("nothing to serve: give one or more run folders, or --base")
        for r in args.runs:
            load_run(r)  # a missing or broken run folder fails here, with its path
    if args.quant is not None:
        if args.engine != "hf":
            raise UserError("--quant applies to the hf engine, which loads the base in this process")
        from chatbuild.engines.hf import check_precision

        check_precision(args.quant)
    if args.decoder is not None and args.engine != "hf":
        raise UserError("--decoder applies to the hf engine, which decodes in this process")
    if args.chat_format is not None:
        if args.engine != "hf":
            raise UserError("--chat-format applies to the hf engine's bare base")
        check_format_name(args.chat_format, "--chat-format")
    for name in ("max_new_tokens", "max_prompt_tokens", "max_running", "builder_max_queued",
                 "builder_max_queued_per_user", "builder_max_steps"):
        if getattr(args, name) < 1:
            raise UserError(f"--{name.replace('_', '-')} must be >= 1")
    if args.queue_size < 0:
        raise UserError("--queue-size must be >= 0")
    settings = Settings(api_key=args.api_key or None, max_new_tokens=args.max_new_tokens,
                        max_prompt_tokens=args.max_prompt_tokens, max_running=args.max_running,
                        queue_size=args.queue_size, db_path=args.db, builder=args.builder,
                        builder_dir=args.builder_dir, judge_url=args.judge_url, judge_model=args.judge_model,
                        self_url=f"http://{_loopback(args.host)}:{args.port}/v1", ui_auth=_ui_auth(args.ui_auth),
                        builder_users=_builder_users(args.builder_users), builder_max_queued=args.builder_max_queued,
                        builder_max_queued_per_user=args.builder_max_queued_per_user,
                        builder_max_steps=args.builder_max_steps)
    if bool(args.judge_url) != bool(args.judge_model):
        raise UserError("--judge-url and --judge-model go together")
    if args.builder and args.no_ui:
        raise UserError("--builder adds a tab to the web UI; it cannot go with --no-ui")
    if args.builder and not settings.ui_auth and args.host not in ("127.0.0.1", "localhost", "::1"):
        # The Build tab runs fine-tunes on this machine: never open to whoever can reach the port.
        raise UserError(f"--builder on {args.host} needs a login (--ui-auth USER:PASS or CHATBUILD_UI_AUTH); "
                        "without one, listen on 127.0.0.1")
    if args.builder:
        _check_builder_users(settings)
    if settings.api_key is None and args.host not in ("127.0.0.1", "localhost", "::1"):
        print(f"chatbuild serve: warning: listening on {args.host} without an API key; anyone who can reach "
              "it can use it (--api-key or CHATBUILD_API_KEY)", file=sys.stderr)

    if not args.no_ui:  # votes and feedback go there: a full disk or read-only folder fails now, not mid-vote
        from chatbuild import storage

        storage.check_writable(args.db or storage.default_path())

    # ── load, then serve ──
    if args.base and args.engine in ("hf", "vllm"):  # tiny, smollm2, a .gguf file: made a folder on first use
        from chatbuild.bases import resolve_base

        args.base = resolve_base(args.base)
    if args.engine == "vllm":  # chatbuild/engines/vllm.py: a `vllm serve` child behind the remote engine
        from chatbuild.engines.vllm import launch_vllm

        engine = launch_vllm(args.runs, base=args.base, base_name=args.base_name)
    else:
        engine = open_engine(args.runs, base=args.base, base_name=args.base_name, kind=args.engine,
                             url=args.remote_url, api_key=args.remote_key, device=args.device,
                             max_batch=args.max_running,  # every admitted generation decodes in the batch
                             chat_format=args.chat_format, precision=args.quant or "auto",
                             decoder=args.decoder or "auto")
    try:
        app = create_app(engine, settings, ui=not args.no_ui)
        how = ""
        if getattr(engine, "decoder", None):  # the hf engine: how it holds the base and decodes
            notes = "".join(f"; {n}" for n in (engine.precision_note, engine.decoder_note) if n)
            how = f" [{engine.precision}, {engine.decoder} decoder{notes}]"
        print(f"chatbuild serve: models {', '.join(engine.models())} on http://{args.host}:{args.port} "
              f"(API at /v1, docs at /docs){how}", file=sys.stderr, flush=True)
        uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level, timeout_graceful_shutdown=5)
    finally:
        engine.close()
    return 0


def _ui_auth(value: str | None) -> list[tuple[str, str]] | None:
    """--ui-auth "alice:pw1,bob:pw2" → [("alice", "pw1"), ("bob", "pw2")]; None when unset."""
    if not value:
        return None
    pairs = []
    for item in value.split(","):
        user, sep, password = item.strip().partition(":")
        if not (sep and user and password):
            raise UserError(f'--ui-auth / CHATBUILD_UI_AUTH: "{user}{sep}***" is not user:password '
                            "(pairs are separated by commas)")
        pairs.append((user, password))
    return pairs


def _builder_users(value: str | None) -> list[str] | None:
    """--builder-users "alice, bob" → ["alice", "bob"]; "*" → ["*"]; None when unset."""
    if not value:
        return None
    return [user.strip() for user in value.split(",") if user.strip()]


def _check_builder_users(settings) -> None:
    """Building is a permission of its own: with UI logins, the builders are named (or '*'), and
    each is one of the logins."""
    users, auth = settings.builder_users, settings.ui_auth
    if auth and not users:
        raise UserError("--builder with --ui-auth needs --builder-users USER[,USER] (or CHATBUILD_BUILDER_USERS): "
                        "the logins that may fine-tune on this machine; '*' for all of them")
    if users and not auth:
        raise UserError("--builder-users names --ui-auth logins; give --ui-auth too (or drop --builder-users)")
    logins = {user for user, _ in auth or []}
    unknown = [u for u in users or [] if u != "*" and u not in logins]
    if unknown:
        raise UserError(f'--builder-users: "{unknown[0]}" is not one of the --ui-auth logins')


def _loopback(host: str) -> str:
    """How this machine reaches a server listening on `host`."""
    if host in ("0.0.0.0", "", "::"):
        return "127.0.0.1"
    return f"[{host}]" if ":" in host else host


if __name__ == "__main__":
    from chatbuild.cli import main

    raise SystemExit(main(["serve", *sys.argv[1:]]))
