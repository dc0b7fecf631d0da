"""Attacks through files and bodies on the web UI (issue 17, items 1, 3, 5 and 6), each performed for
real against the serving app with the Build tab (a ScriptedEngine: what is attacked is the web layer):

- a forged FileData naming a server file (outside Gradio's upload folder, by `..`, or by a symlink
  planted in it) sent to /import_chat and /build_upload: refused, never opened, nothing copied;
- a relative or absolute local path as the Build tab's "hub dataset id": refused, never opened, and
  the fine-tune job's loader never reads a hub id from disk either;
- uploads over the limit through /gradio_api/upload (just over, far over, without a length):
  refused, and Gradio's upload folder holds nothing afterwards; a chat import over its own limit:
  refused and deleted;
- a 10 MB body to a Gradio route: 413 before it is read, and other users' chats carry on;
- Preview of a broken upload: the error names the file, never the server's folders.

"Never opened" is observed, not assumed: a Python audit hook (`sys.addaudithook`) sees every file
the process opens, the in-process server's threads included.
"""

import json
import os
import re
import sys
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from reliability_helpers import record
from test_ui_helpers import ScriptedEngine, gradio_client, serving, text_of, ui_app

from chatbuild.errors import UserError
from serve.builder import DataChoice

pytestmark = pytest.mark.reliability

pytest.importorskip("gradio")
from gradio_client import handle_file  # noqa: E402

CANARY = "CANARY-7f1c0e-not-for-clients"
UPLOAD_LIMIT = 6_000_000  # the Build tab's max_upload_bytes here; the chat import's is max_ui_body_bytes (4 MB)
CHAT = ("hi", [], "alpha", "", 0.7, 1.0, 3, 0, 1.0, None)  # /chat's inputs (tests/test_ui.py chat_args)


class _Opens:
    """The files this process opens while `on` (the "open" audit event: open(), io.open, os.open)."""

    def __init__(self):
        self.on, self.paths = False, []

    def __call__(self, event, args):
        if self.on and event == "open" and isinstance(args[0], (str, bytes, os.PathLike)):
            self.paths.append(os.path.abspath(os.fsdecode(args[0])))


OPENS = _Opens()
sys.addaudithook(OPENS)  # audit hooks stay for the life of the process; this one records only while watching


@contextmanager
def watching_opens():
    OPENS.paths.clear()
    OPENS.on = True
    try:
        yield OPENS.paths
    finally:
        OPENS.on = False


def opened_under(paths: list[str], folder: Path) -> list[str]:
    return [p for p in paths if Path(p).resolve().is_relative_to(folder.resolve())]


@dataclass
class Site:
    url: str
    app: object
    root: Path  # the test's folder: database, builder/, gradio/ (Gradio's upload folder), secret/
    builder: object

    @property
    def uploads(self) -> Path:
        return self.root / "gradio"

    @property
    def secret(self) -> Path:
        return self.root / "secret"


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    """The app with the Build tab, Gradio's upload folder a fresh one of its own (GRADIO_TEMP_DIR),
    and files no client may read in secret/: a conversation and a dataset holding CANARY."""
    root = tmp_path_factory.mktemp("attacks")
    secret = root / "secret"
    secret.mkdir()
    (secret / "creds.json").write_text(json.dumps({"messages": [{"role": "user", "content": CANARY}],
                                                   "api_key": CANARY}))
    (secret / "creds.jsonl").write_text(json.dumps({"messages": [{"role": CANARY, "content": CANARY}]}) + "\n")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("GRADIO_TEMP_DIR", str(root / "gradio"))
        app = ui_app(ScriptedEngine(delay=0.001), root / "chatbuild.sqlite", builder=True,
                     builder_dir=str(root / "builder"), max_upload_bytes=UPLOAD_LIMIT)
        with serving(app) as url:
            yield Site(url, app, root, app.state.serve.builder)


def call(url: str, api: str, *data) -> tuple[str, str]:
    """Call a UI event over raw HTTP (Gradio's /call API) with `data` exactly as given, as any client
    could; (event, data) of the last message of its reply stream ("complete" or "error"), or
    (status, body) when the call itself is refused."""
    with httpx.Client(timeout=60) as http:
        r = http.post(f"{url}gradio_api/call/{api}", json={"data": list(data)})
        if r.status_code != 200:
            return str(r.status_code), r.text
        stream = http.get(f"{url}gradio_api/call/{api}/{r.json()['event_id']}").text
    return re.findall(r"^event: (\w+)\ndata: (.*)$", stream, re.M)[-1]


def forged(path) -> dict:
    """A FileData naming a file the client never uploaded."""
    return {"path": str(path), "meta": {"_type": "gradio.FileData"}}


def files_in(folder: Path) -> set[str]:
    return {str(p) for p in folder.rglob("*") if p.is_file()} if folder.exists() else set()


def blocks_of(app):
    from starlette.routing import Mount

    return next(r.app for r in app.routes if isinstance(r, Mount)).get_blocks()


# ── item 1: any server file posted as an "upload" ──────────────────────────────────────────────
@pytest.mark.parametrize("layer", ["as-served", "gradio-alone", "middleware-alone"])
def test_a_forged_upload_path_is_refused_and_never_opened(site, layer, monkeypatch):
    """The secret file named directly, through `..` out of the upload folder, and by a symlink planted
    inside it: the chat import and the Build upload refuse all three; the file is never opened and
    nothing lands in the data folder. Each of the two checks that stop a path before Gradio copies
    it must hold alone: "gradio-alone" switches off the app's FileData check (serve/app.py);
    "middleware-alone" switches off Gradio's own, as `mount_gradio_app` left it before the fix."""
    import serve.uploads

    site.uploads.mkdir(exist_ok=True)
    planted = site.uploads / "planted"
    planted.mkdir(exist_ok=True)
    for name in ("creds.json", "creds.jsonl"):
        if not (planted / name).is_symlink():
            (planted / name).symlink_to(site.secret / name)
    data_before = set(site.builder.data_files())
    blocks = blocks_of(site.app)
    if layer == "gradio-alone":
        monkeypatch.setattr(serve.uploads, "foreign_files", lambda data: [])
    if layer == "middleware-alone":
        monkeypatch.setattr(blocks, "has_launched", False)
    replies = []
    with watching_opens() as opened:
        for name in ("creds.json", "creds.jsonl"):
            for path in (site.secret / name, f"{site.uploads}/../secret/{name}", planted / name):
                replies += [(path, api, *call(site.url, api, forged(path))) for api in ("import_chat", "build_upload")]
    for path, api, event, data in replies:
        assert CANARY not in data, (layer, api, path, data)
        if layer == "gradio-alone":
            assert event == "error", (api, path, event, data)  # Gradio's refusal, in the event's reply
        else:
            assert event == "400" and "not a file uploaded to this server" in data, (api, path, event, data)
            assert "\\n" not in data and str(site.root) not in data.replace(str(path), ""), data
    assert opened_under(opened, site.secret) == [], "a forged path was opened"
    assert set(site.builder.data_files()) == data_before, "a forged path was copied into the data folder"
    record(f"forged_upload_paths_{layer}", attempts=len(replies), refused=len(replies), secret_files_opened=0,
           files_copied=0)


# ── item 3: the hub id that is a local path ────────────────────────────────────────────────────
def test_a_hub_id_never_reads_a_local_file(site, monkeypatch):
    """Relative and absolute local paths, `..`, and a local folder shaped like owner/name, given as
    the Build tab's hub dataset id: Preview refuses each in one line, echoes nothing from the files,
    and never opens them; the fine-tune job's loader (which runs in another folder) refuses them too."""
    monkeypatch.chdir(site.root)  # the server resolves relative paths from here
    (site.secret / "folder").mkdir(exist_ok=True)
    (site.secret / "folder" / "train.jsonl").write_text((site.secret / "creds.jsonl").read_text())
    values = ["secret/creds.jsonl", "secret/..", "secret/folder", "./secret/creds.jsonl", "secret/../secret/creds.jsonl",
              str(site.secret / "creds.jsonl"), ".secret/x", "secret/.hidden"]
    with watching_opens() as opened, gradio_client(site.url) as client:
        reports = {v: client.predict("Hub dataset id", None, v, "auto", "top1", "", api_name="/build_preview")
                   for v in values}
        hub = client.predict("Hub dataset id", None, "OpenAssistant/oasst1", "auto", "top1", "",
                             api_name="/build_preview")
    for v, report in reports.items():
        assert report.startswith("⚠️") and "\n" not in report.strip(), (v, report)
        assert CANARY not in report and str(site.root) not in report.replace(v, ""), (v, report)
    assert opened_under(opened, site.secret) == [], "a hub id opened a local file"
    for v in values:
        with pytest.raises(UserError):
            site.builder.data_source(DataChoice("hub", v))
    # a real hub id still goes to the hub (offline here, so it fails there, not as a local path)
    assert "OpenAssistant/oasst1" in hub and "hub" in hub.lower() and "local" not in hub, hub
    # The fine-tune job gets the hub id marked as one, and its loader (run in another folder, where
    # other local paths exist) never reads a marked hub id from disk.
    from chatbuild.data import load_conversations

    assert site.builder.data_source(DataChoice("hub", "OpenAssistant/oasst1")) == "hub:OpenAssistant/oasst1"
    with watching_opens() as opened_by_job:
        for v in ("secret/creds.jsonl", "secret/folder", "secret/..", str(site.secret / "creds.jsonl")):
            with pytest.raises(UserError, match="hub"):
                load_conversations("hub:" + v)
    assert opened_under(opened_by_job, site.secret) == []
    record("hub_id_local_paths", values=len(values), refused=len(values), files_opened=0)


# ── item 6: no size cap on uploads ─────────────────────────────────────────────────────────────
def upload(url: str, name: str, content) -> httpx.Response:
    with httpx.Client(timeout=120) as http:
        return http.post(f"{url}gradio_api/upload", files={"files": (name, content)})


def test_oversize_uploads_are_refused_and_leave_nothing_on_disk(site, tmp_path):
    """Through /gradio_api/upload: a file just over the limit (Gradio's own cap: 413 while reading),
    one far over (413 on its Content-Length, before reading), a body without a length (411: Gradio
    writes uploads to disk as they arrive). A chat import under the upload limit but over the
    import's: refused in one line and deleted. Gradio's upload folder is as before; a normal import
    still works."""
    site.uploads.mkdir(exist_ok=True)
    before = files_in(site.uploads)
    cap = blocks_of(site.app).max_file_size
    assert cap == UPLOAD_LIMIT
    just_over = upload(site.url, "just-over.jsonl", b"x" * (cap + 1))
    far_over = upload(site.url, "far-over.jsonl", b"x" * (3 * cap))

    def chunks():
        boundary = b"--b0undary"
        yield boundary + b'\r\nContent-Disposition: form-data; name="files"; filename="nolength.jsonl"\r\n\r\n'
        for _ in range(20):
            yield b"x" * 1_000_000
        yield b"\r\n" + boundary + b"--\r\n"

    with httpx.Client(timeout=120) as http:
        no_length = http.post(f"{site.url}gradio_api/upload", content=chunks(),
                              headers={"Content-Type": "multipart/form-data; boundary=b0undary"})
    assert just_over.status_code == 413 and far_over.status_code == 413, (just_over.text, far_over.text)
    assert no_length.status_code == 411, no_length.text
    for r in (just_over, far_over, no_length):
        assert "\n" not in r.text.strip() and re.search(r"limit|maximum|length", r.text), r.text
    assert files_in(site.uploads) == before, "a refused upload left files in Gradio's upload folder"

    big_chat = tmp_path / "big.json"
    big_chat.write_text(json.dumps({"messages": [{"role": "user", "content": "y" * 5_000_000}]}))
    small_chat = tmp_path / "small.json"
    small_chat.write_text(json.dumps({"messages": [{"role": "user", "content": "hello"}]}))
    with gradio_client(site.url) as client:
        with pytest.raises(Exception, match=r"big\.json: 5\.0 MB is over the upload limit of 4\.0 MB \(max_ui_body_bytes\)"):
            client.predict(handle_file(str(big_chat)), api_name="/import_chat")
        restored, _, _ = client.predict(handle_file(str(small_chat)), api_name="/import_chat")
    assert [text_of(m) for m in restored] == ["hello"]
    leftover = [p for p in files_in(site.uploads) - before if Path(p).name == "big.json"]
    assert leftover == [], "a refused import stayed in Gradio's upload folder"
    record("oversize_uploads", limit_bytes=cap, just_over=just_over.status_code, far_over=far_over.status_code,
           no_length=no_length.status_code, files_left=0, chat_import_over_limit="refused and deleted")


# ── item 5 (part): no body limit on the Gradio routes ──────────────────────────────────────────
def test_a_10_mb_body_to_a_gradio_route_is_413_and_others_carry_on(site):
    """10 MB to /queue/join, /call/chat and /run/chat, with a Content-Length and streamed without
    one: 413 with a one-line reason; then another user's chat gets the model's usual reply."""
    big = json.dumps({"data": ["x" * 10_000_000, *CHAT[1:]], "fn_index": 0, "session_hash": "attacker"}).encode()
    statuses = {}
    with httpx.Client(timeout=120) as http:
        for route in ("gradio_api/queue/join", "gradio_api/call/chat", "gradio_api/run/chat"):
            for how, content in (("length", big), ("stream", (big[i:i + 65536] for i in range(0, len(big), 65536)))):
                r = http.post(site.url + route, content=content, headers={"Content-Type": "application/json"})
                statuses[f"{route} {how}"] = r.status_code
                assert r.status_code == 413, (route, how, r.status_code, r.text[:200])
                assert "max_ui_body_bytes" in r.text and "\n" not in r.text.strip(), r.text
    with gradio_client(site.url) as client:
        history, _, _ = client.predict(*CHAT, api_name="/chat")
    assert text_of(history[-1]) == "alpha says: w1 w2"
    record("ui_body_limit", body_bytes=len(big), statuses=sorted(set(statuses.values())), requests=len(statuses),
           other_users_chat="normal reply")


# ── Preview never shows the server's paths ─────────────────────────────────────────────────────
def test_preview_errors_name_the_file_never_the_servers_folders(site, tmp_path):
    """A broken parquet file (an error) and a JSONL file with bad records (skipped and listed by
    location), both uploaded: Preview names them by file name and shows no folder of the server."""
    broken = tmp_path / "broken.parquet"
    broken.write_bytes(b"PAR1 this is not parquet")
    mixed = tmp_path / "mixed.jsonl"
    good = {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]}
    mixed.write_text(json.dumps(good) + "\n{not json\n" + json.dumps({"messages": [{"role": "robot"}]}) + "\n")
    with gradio_client(site.url) as client:
        reports = {}
        for path in (broken, mixed):
            picker, _ = client.predict(handle_file(str(path)), api_name="/build_upload")
            reports[path.name] = client.predict("File in the data folder", picker["value"], "", "auto", "top1", "",
                                                api_name="/build_preview")
    for name, report in reports.items():
        assert name.split(".")[0] in report, report
        assert str(site.root) not in report and str(site.builder.root) not in report, report
