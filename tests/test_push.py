"""`chatbuild push` up to the Hub and into a local stand-in for it: a small HTTP server that answers
the three calls an upload makes (create the repository, ask how to upload each file, commit) and
records them. huggingface_hub itself talks to it (HF_ENDPOINT), so what it would send to the Hub is
what the tests read: which files, with what content, under which token. No live Hub was involved."""

import base64
import json
import os
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from huggingface_hub import ModelCard

from tests.conftest import REPO


class RecordingHub(BaseHTTPRequestHandler):
    """Answers create_repo, validate-yaml (the card's metadata: accepted; the Hub's own rules are not
    known here), preupload (every file "regular": its content travels inside the commit, so no LFS or
    Xet storage is needed) and commit, the way the Hub's API does; records each request."""

    requests: list = []  # (method, path, headers with lower-case names, body) — set per server below

    def do_POST(self):  # noqa: N802 - http.server's name
        body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        self.requests.append((self.command, self.path, {k.lower(): v for k, v in self.headers.items()}, body))
        if self.path == "/api/repos/create":
            repo = json.loads(body)
            return self._json({"url": f"http://{self.headers['Host']}/{repo['organization']}/{repo['name']}"})
        if self.path == "/api/validate-yaml":
            return self._json({"errors": [], "warnings": []})
        if "/preupload/" in self.path:
            files = json.loads(body)["files"]
            return self._json({"files": [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False}
                                         for f in files]})
        if "/commit/" in self.path:
            repo = self.path.split("/api/models/", 1)[1].split("/commit/", 1)[0]
            return self._json({"commitUrl": f"http://{self.headers['Host']}/{repo}/commit/0123abcd",
                               "commitOid": "0123abcd" * 5, "pullRequestUrl": None})
        self.send_error(404)

    def _json(self, data):
        raw = json.dumps(data).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(raw)))
        self.end_headers()
        self.wfile.write(raw)

    def log_message(self, *args):
        pass


@pytest.fixture
def hub():
    """A recording hub on a free local port: yields (endpoint URL, its list of requests)."""
    handler = type("Hub", (RecordingHub,), {"requests": []})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}", handler.requests
    server.shutdown()
    server.server_close()


@pytest.fixture(scope="module")
def quick_run(tiny_base, tmp_path_factory) -> Path:
    """A finished run folder without training (tests/runfolders.py) and its card: enough for the
    checks, which fail before the upload."""
    from runfolders import make_run

    from chatbuild import runs
    from chatbuild.config import read_config

    out = make_run(tiny_base, tmp_path_factory.mktemp("runs") / "quick", "quick", seed=0)
    runs.write_model_card(out, read_config(out / "config.yaml"), [], objective="test")
    return out


def push(*args: str, endpoint: str, env: dict | None = None) -> subprocess.CompletedProcess:
    """`chatbuild push ...` in its own process, its Hub at `endpoint`, with no token or Hub cache of
    this machine's (HF_HOME is a fresh folder)."""
    import tempfile

    base_env = {k: v for k, v in os.environ.items() if not k.startswith("HF_") and k != "TRANSFORMERS_OFFLINE"}
    home = tempfile.mkdtemp(prefix="hf-home-")
    env = {**base_env, "PYTHONPATH": str(REPO), "HF_ENDPOINT": endpoint, "HF_HUB_DISABLE_TELEMETRY": "1",
           "HF_HOME": home, **(env or {})}
    return subprocess.run([sys.executable, "-m", "chatbuild.cli", "push", *args], capture_output=True, text=True,
                          env=env, timeout=600, cwd=REPO)


def committed_files(requests: list) -> dict[str, bytes]:
    """path -> content of the one commit the hub received (its NDJSON body)."""
    (commit,) = [r for r in requests if "/commit/" in r[1]]
    lines = [json.loads(line) for line in commit[3].decode().splitlines()]
    assert lines[0]["key"] == "header"
    return {x["value"]["path"]: base64.b64decode(x["value"]["content"]) for x in lines[1:] if x["key"] == "file"}


# ── bad input: one line each, before anything is uploaded ───────────────────────────────────────
@pytest.mark.parametrize("case", ["not-a-run", "bad-repo", "no-owner", "no-token", "offline"])
def test_bad_input_is_one_line_and_nothing_reaches_the_hub(case, quick_run, tmp_path, hub):
    endpoint, requests = hub
    run, repo, env = str(quick_run), "me/tiny", {"HF_TOKEN": "hf_test"}
    if case == "not-a-run":
        (tmp_path / "notes.txt").write_text("hello")
        run = str(tmp_path)
    elif case == "bad-repo":
        repo = "me/bad..name"
    elif case == "no-owner":
        repo = "tiny"
    elif case == "offline":
        env["HF_HUB_OFFLINE"] = "1"
    else:
        env = {}
    result = push(run, "--repo", repo, endpoint=endpoint, env=env)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("chatbuild push: error: ")
    expected = {"not-a-run": "not a finished run folder", "bad-repo": '--repo "me/bad..name"',
                "no-owner": "a Hub repository id is owner/name", "no-token": "HF_TOKEN is not set",
                "offline": "huggingface_hub is in offline mode"}[case]
    assert expected in lines[0]
    assert requests == []


# ── an adapter push ─────────────────────────────────────────────────────────────────────────────
@pytest.mark.integration
def test_push_uploads_the_adapter_tokenizer_and_card_and_nothing_else(tiny_run, hub):
    endpoint, requests = hub
    result = push(str(tiny_run), "--repo", "me/tiny-a", "--private", "--token-env", "MY_TOKEN",
                  endpoint=endpoint, env={"MY_TOKEN": "hf_secret"})
    assert result.returncode == 0, result.stderr
    assert [r[1].split("?")[0] for r in requests] == ["/api/repos/create", "/api/validate-yaml",
                                                      "/api/models/me/tiny-a/preupload/main",
                                                      "/api/models/me/tiny-a/commit/main"]
    assert all(r[2]["authorization"] == "Bearer hf_secret" for r in requests)
    created = json.loads(requests[0][3])
    assert created["name"] == "tiny-a" and created["organization"] == "me" and created["visibility"] == "private"

    files = committed_files(requests)
    assert json.loads(requests[1][3])["content"] == files["README.md"].decode()  # the card's metadata was checked
    tokenizer = sorted(p.name for p in (tiny_run / "tokenizer").iterdir())
    assert sorted(files) == sorted(["README.md", "adapter_config.json", "adapter_model.safetensors",
                                    "chat_format.json", "loss.png", *tokenizer])
    assert "tokenizer_config.json" in files
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        assert files[name] == (tiny_run / "adapter" / name).read_bytes()
    assert files["chat_format.json"] == (tiny_run / "chat_format.json").read_bytes()
    assert not any(n.startswith(("checkpoints", "optimizer")) or n.endswith(".pt") or n == "config.yaml" for n in files)
    card = ModelCard(files["README.md"].decode())
    assert card.data.library_name == "peft" and "PeftModel.from_pretrained(base, 'me/tiny-a')" in card.text
    assert "me/tiny-a" in result.stdout


@pytest.mark.integration
def test_push_merged_uploads_a_16_bit_model_that_loads_without_peft(tiny_run, hub, tmp_path):
    """The merged upload is a complete transformers model: written back to disk from what the hub
    received, it loads with AutoModelForCausalLM alone, and its weights are bfloat16."""
    import torch
    from transformers import AutoModelForCausalLM

    endpoint, requests = hub
    result = push(str(tiny_run), "--repo", "me/tiny-a-merged", "--merged", endpoint=endpoint, env={"HF_TOKEN": "hf_x"})
    assert result.returncode == 0, result.stderr
    files = committed_files(requests)
    assert {"config.json", "model.safetensors", "README.md", "chat_format.json", "tokenizer_config.json"} <= set(files)
    assert not any(n.startswith("adapter_") for n in files) and "chatbuild_merge.json" not in files
    assert ModelCard(files["README.md"].decode()).data.library_name == "transformers"
    for name, content in files.items():
        (tmp_path / name).write_bytes(content)
    model = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert next(model.parameters()).dtype == torch.bfloat16
