"""Upload a finished run to the Hugging Face Hub: `chatbuild push`.

    chatbuild push runs/my-run --repo me/my-chatbot                  # adapter + tokenizer + model card
    chatbuild push runs/my-run --repo me/my-chatbot-merged --merged  # merged into its base in 16 bits
    chatbuild push runs/my-run --repo me/my-chatbot --private --token-env MY_HF_TOKEN

What goes up is what a Hub user needs, laid out the Hub's way (the PEFT adapter at the repository's
root, so `PeftModel.from_pretrained(base, "me/my-chatbot")` finds it):

    adapter_config.json, adapter_model.safetensors    the adapter (or, with --merged, the merged
                                                      model's config.json, weights, generation_config.json)
    tokenizer files, chat_template.jinja              the tokenizer with the chat template trained on
    chat_format.json                                  chatbuild's chat format (stop strings, system prompt)
    loss.png                                          the loss curve the card shows
    README.md                                         the run's model card, loading from the repository

and nothing else: no checkpoints (optimizer state), no config.yaml (it holds this machine's paths),
no tracker folders. The files come from several folders plus a generated card, so they go up as one
commit of explicit operations (`HfApi.create_commit`, what `upload_folder` does underneath) instead
of a staged copy of the adapter.

The Hub is `huggingface_hub`'s endpoint (HF_ENDPOINT, default the public Hub). chatbuild's tests run
it against a local recording server; it has not been run against the live Hub.
"""

import argparse
import contextlib
import os
import sys
import tempfile
from pathlib import Path

from chatbuild import runs
from chatbuild.errors import UserError

DEFAULT_TOKEN_ENV = "HF_TOKEN"


def check_repo_id(repo_id: str) -> str:
    """`owner/name` as the Hub accepts it, else one line saying why."""
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    if repo_id.count("/") != 1:
        raise UserError(f'--repo "{repo_id}": a Hub repository id is owner/name, e.g. me/my-chatbot')
    try:
        validate_repo_id(repo_id)
    except HFValidationError as e:
        raise UserError(f'--repo "{repo_id}": {" ".join(str(e).split())}') from None
    return repo_id


def hub_token(env_name: str) -> str:
    """The access token from the environment variable `env_name`; one line when it is not set."""
    token = os.environ.get(env_name, "").strip()
    if not token:
        raise UserError(f"{env_name} is not set: put a Hub access token with write permission in it "
                        "(or name another variable with --token-env)")
    return token


@contextlib.contextmanager
def hub_errors(endpoint: str):
    """What the Hub refuses (a bad token, a repository that is someone else's) and offline mode, in one
    line naming the endpoint, instead of an HTTP library's traceback."""
    from huggingface_hub.errors import HfHubHTTPError, OfflineModeIsEnabled

    try:
        yield
    except OfflineModeIsEnabled:
        raise UserError(f"{endpoint}: huggingface_hub is in offline mode (HF_HUB_OFFLINE or TRANSFORMERS_OFFLINE "
                        "is set); unset it to push") from None
    except HfHubHTTPError as e:
        raise UserError(f"{endpoint}: {' '.join(str(e).split())}") from None


def upload_plan(run: runs.Run, repo_id: str, merged_dir: Path | None = None) -> dict[str, Path | bytes]:
    """What `push` uploads: path in the repository -> a local file, or the content (the card)."""
    plan: dict[str, Path | bytes] = dict(runs.hub_files(run, merged_dir))
    plan["README.md"] = runs.hub_card(run, repo_id, merged=merged_dir is not None).encode()
    return plan


def push(run_path: str | Path, repo_id: str, merged: bool = False, private: bool = False,
         token_env: str = DEFAULT_TOKEN_ENV) -> str:
    """Upload the run (or its 16-bit merge) to `repo_id`, creating the repository if needed; returns the
    commit's URL. Every check (the run, the repository id, the token) comes before any heavy work."""
    from huggingface_hub import CommitOperationAdd, HfApi

    run = runs.load_run(run_path)
    check_repo_id(repo_id)
    token = hub_token(token_env)
    with tempfile.TemporaryDirectory(prefix="chatbuild-push-") as tmp:
        merged_dir = None
        if merged:
            from pipelines.merge import merge_run

            merged_dir = merge_run(run.path, Path(tmp) / "merged")
        plan = upload_plan(run, repo_id, merged_dir)
        operations = [CommitOperationAdd(path_in_repo=name, path_or_fileobj=src if isinstance(src, bytes) else str(src))
                      for name, src in sorted(plan.items())]
        api = HfApi(token=token)
        with hub_errors(api.endpoint):
            # private=None without --private: the Hub's default visibility for the owner (an org may set one)
            repo = api.create_repo(repo_id, private=True if private else None, exist_ok=True)
            commit = api.create_commit(repo.repo_id, operations, commit_message=f"chatbuild push: run {run.name}"
                                       + (" merged in 16 bits" if merged else ""))
    print(f"push: {len(operations)} files to {repo}: {commit.commit_url}")
    return commit.commit_url


# ── command line ────────────────────────────────────────────────────────────────────────────────
def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("run", help="a finished run folder")
    p.add_argument("--repo", required=True, help="Hub repository id, owner/name (created if missing)")
    p.add_argument("--merged", action="store_true", help="upload the adapter merged into its base in 16 bits")
    p.add_argument("--private", action="store_true", help="create the repository private")
    p.add_argument("--token-env", default=DEFAULT_TOKEN_ENV,
                   help=f"environment variable holding the Hub access token (default {DEFAULT_TOKEN_ENV})")


def run(args: argparse.Namespace) -> int:
    push(args.run, args.repo, args.merged, args.private, args.token_env)
    return 0


if __name__ == "__main__":
    from chatbuild.cli import main

    raise SystemExit(main(["push", *sys.argv[1:]]))
