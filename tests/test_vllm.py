"""The vLLM launcher (chatbuild/engines/vllm.py) without vLLM or a GPU.

What can be checked here is checked for real: the `vllm serve` command line built from real run
folders (short fine-tunes), the adapter files against vLLM's documented constraints, and the child
process's whole life — start, health wait, failure with the log's tail, stop, escalation to SIGKILL,
death with its parent — driven through a stand-in `vllm` executable that speaks the same HTTP.
What needs vLLM itself and a CUDA GPU is in the `gpu` test at the end.
"""

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
import urllib.request
from pathlib import Path

import pytest

from chatbuild.engines import vllm as launcher
from chatbuild.engines.vllm import (
    VLLMProcess,
    check_adapter_for_vllm,
    plan_vllm,
    safetensors_shapes,
    vllm_max_lora_rank,
    vllm_serve_args,
)
from chatbuild.errors import UserError

LLAMA_PROJECTIONS = ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"]


def flag_values(args: list[str], flag: str) -> list[str]:
    """The values after `flag` up to the next flag."""
    i = args.index(flag) + 1
    out = []
    while i < len(args) and not args[i].startswith("--"):
        out.append(args[i])
        i += 1
    return out


# ── unit: rank rounding, versions, safetensors headers ──────────────────────────────────────────
@pytest.mark.parametrize(("rank", "expected"), [(1, 1), (2, 8), (8, 8), (16, 16), (48, 64), (64, 64), (65, 128),
                                                 (300, 320), (321, 512), (512, 512)])
def test_rank_is_rounded_up_to_a_value_vllm_accepts(rank, expected):
    assert vllm_max_lora_rank(rank) == expected
    assert expected in launcher.VLLM_MAX_LORA_RANKS


def test_rank_above_vllm_maximum_is_refused():
    with pytest.raises(UserError, match="above vLLM's largest --max-lora-rank"):
        vllm_max_lora_rank(513)


@pytest.mark.parametrize(("text", "expected"), [("0.28.0", (0, 28, 0)), ("0.27.1", (0, 27, 1)),
                                                 ("0.33.0+cu129", (0, 33, 0)), ("0.28.1rc1", (0, 28, 1)),
                                                 ("1.0", (1, 0))])
def test_version_parsing(text, expected):
    assert launcher._version_tuple(text) == expected


def test_safetensors_header_is_read_without_the_tensors(tmp_path):
    import torch
    from safetensors.torch import save_file

    save_file({"a.lora_A.weight": torch.zeros(4, 6), "b": torch.zeros(3)}, tmp_path / "x.safetensors")
    assert safetensors_shapes(tmp_path / "x.safetensors") == {"a.lora_A.weight": [4, 6], "b": [3]}
    (tmp_path / "bad.safetensors").write_bytes(b"nope")
    with pytest.raises(UserError, match="not a readable safetensors file"):
        safetensors_shapes(tmp_path / "bad.safetensors")


# ── the command line from real run folders ──────────────────────────────────────────────────────
@pytest.mark.integration
def test_command_line_from_two_real_runs(tiny_run, tiny_run_b, tiny_base):
    args = vllm_serve_args(plan_vllm([tiny_run, tiny_run_b]), host="127.0.0.1", port=8123)
    assert args[0] == str(tiny_base)  # config.yaml model.base, resolved by the fine-tune
    assert flag_values(args, "--served-model-name") == ["tiny-base"]  # as the in-process engine names it
    assert flag_values(args, "--quantization") == ["bitsandbytes"]
    assert "--enable-lora" in args
    assert flag_values(args, "--lora-modules") == [f"tiny-a={tiny_run.resolve()}/adapter",
                                                    f"tiny-b={tiny_run_b.resolve()}/adapter"]
    assert flag_values(args, "--max-lora-rank") == ["16"]  # tiny-cpu trains r=16
    assert flag_values(args, "--max-loras") == ["2"]
    assert flag_values(args, "--tokenizer") == [str(tiny_run.resolve() / "tokenizer")]
    assert flag_values(args, "--host") == ["127.0.0.1"] and flag_values(args, "--port") == ["8123"]
    assert "--revision" not in args and "--dtype" not in args  # none set in the runs' config
    assert "--api-key" not in args  # the key travels in the environment, not on the command line


@pytest.mark.integration
def test_real_run_adapter_passes_the_vllm_checks(tiny_run):
    info = check_adapter_for_vllm(tiny_run)
    assert info.name == "tiny-a" and info.rank == 16
    assert info.modules == LLAMA_PROJECTIONS  # LoRA on every linear projection, nothing else
    assert info.path == tiny_run.resolve() / "adapter"


@pytest.mark.integration
def test_module_prints_the_command_and_reads_runs_from_the_environment(tiny_run):
    env = {**os.environ, "CHATBUILD_RUNS": str(tiny_run), "CHATBUILD_VLLM_ARGS": "--max-model-len 512"}
    out = subprocess.run([sys.executable, "-m", "chatbuild.engines.vllm", "--print", "--port", "9000",
                          "--", "--gpu-memory-utilization", "0.5"], capture_output=True, text=True, env=env, check=True)
    line = out.stdout.strip()
    assert line.startswith("vllm serve ")
    assert f"--lora-modules tiny-a={tiny_run.resolve()}/adapter" in line
    assert line.endswith("--port 9000 --max-model-len 512 --gpu-memory-utilization 0.5")


# ── adapters vLLM can't serve ───────────────────────────────────────────────────────────────────
@pytest.fixture
def run_copy(tiny_base, tmp_path):
    """A run folder with a real PEFT adapter (random weights, r=8), free to be broken."""
    from runfolders import make_run

    return make_run(tiny_base, tmp_path / "victim", "victim", seed=0)


def edit_json(path: Path, **changes):
    data = json.loads(path.read_text())
    data.update(changes)
    path.write_text(json.dumps(data))


def test_made_run_passes_and_rank_comes_from_the_weights(run_copy):
    info = check_adapter_for_vllm(run_copy)
    assert info.rank == 8 and info.modules == LLAMA_PROJECTIONS


def test_new_tokens_adapter_is_refused_with_the_reason(tiny_base, tmp_path):
    """What pipelines/finetune.py writes when the tokenizer knows ids the base lacks: embeddings grown
    and saved whole with the adapter (modules_to_save). vLLM can't serve that; the message says why
    and what to do instead."""
    import torch
    from peft import LoraConfig, get_peft_model
    from runfolders import make_run
    from transformers import AutoModelForCausalLM

    run = make_run(tiny_base, tmp_path / "new-tokens", "new-tokens", seed=1)
    model = AutoModelForCausalLM.from_pretrained(tiny_base, dtype=torch.float32)
    model.resize_token_embeddings(model.config.vocab_size + 4)
    config = LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", task_type="CAUSAL_LM",
                        modules_to_save=["embed_tokens", "lm_head"])
    shutil.rmtree(run / "adapter")
    get_peft_model(model, config).save_pretrained(run / "adapter", safe_serialization=True)

    with pytest.raises(UserError) as e:
        check_adapter_for_vllm(run)
    msg = str(e.value)
    assert "vLLM can't serve this adapter" in msg
    assert "added 4 new tokens" in msg and "modules_to_save" in msg
    assert "chatbuild merge" in msg and "--engine hf" in msg
    with pytest.raises(UserError, match="added 4 new tokens"):
        plan_vllm([run])  # the command line is never built for it


def test_dora_and_bias_are_refused(run_copy):
    edit_json(run_copy / "adapter" / "adapter_config.json", use_dora=True, bias="lora_only")
    with pytest.raises(UserError) as e:
        check_adapter_for_vllm(run_copy)
    assert "DoRA" in str(e.value) and 'bias="none"' in str(e.value)


def rewrite_weights(run: Path, change):
    """Load the adapter's tensors, let `change` edit the dict, save them back."""
    from safetensors.torch import load_file, save_file

    path = run / "adapter" / "adapter_model.safetensors"
    tensors = load_file(path)
    change(tensors)
    save_file(tensors, path)


def test_lora_on_embeddings_is_refused(run_copy):
    import torch

    def add_embedding_lora(t):
        t["base_model.model.model.embed_tokens.lora_A.weight"] = torch.zeros(8, 2048)
        t["base_model.model.model.embed_tokens.lora_B.weight"] = torch.zeros(192, 8)

    rewrite_weights(run_copy, add_embedding_lora)
    with pytest.raises(UserError, match="LoRA on embed_tokens; vLLM applies LoRA to linear projections only"):
        check_adapter_for_vllm(run_copy)


def test_unsupported_projection_is_refused(run_copy):
    import torch

    def add_router(t):
        t["base_model.model.model.layers.0.mlp.router.lora_A.weight"] = torch.zeros(8, 192)
        t["base_model.model.model.layers.0.mlp.router.lora_B.weight"] = torch.zeros(4, 8)

    rewrite_weights(run_copy, add_router)
    with pytest.raises(UserError, match="it adapts router, which vLLM does not take LoRA on"):
        check_adapter_for_vllm(run_copy)


def test_rank_above_512_is_refused(run_copy):
    import torch

    def grow(t):
        t["base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"] = torch.zeros(600, 192)
        t["base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"] = torch.zeros(192, 600)

    rewrite_weights(run_copy, grow)
    with pytest.raises(UserError, match="rank 600 is above vLLM's largest"):
        check_adapter_for_vllm(run_copy)


def test_runs_on_different_bases_or_int8_are_refused(run_copy, tiny_base, tmp_path):
    from runfolders import make_run

    other = make_run(tiny_base, tmp_path / "other", "other", seed=2)
    text = (other / "config.yaml").read_text().replace(str(tiny_base), str(tmp_path / "elsewhere"))
    (other / "config.yaml").write_text(text)
    with pytest.raises(UserError, match="one base model per process"):
        plan_vllm([run_copy, other])
    (run_copy / "config.yaml").write_text((run_copy / "config.yaml").read_text().replace("quant: nf4", "quant: int8"))
    with pytest.raises(UserError, match="not to 8 bits"):
        plan_vllm([run_copy])


def test_names_are_made_unique_like_the_in_process_engine(run_copy, tmp_path):
    plan = plan_vllm([run_copy, run_copy], base_name="victim")
    assert [a.name for a in plan.adapters] == ["victim-2", "victim-3"] and plan.base_name == "victim"
    args = vllm_serve_args(plan)
    assert flag_values(args, "--lora-modules") == [f"victim-2={run_copy.resolve()}/adapter",
                                                   f"victim-3={run_copy.resolve()}/adapter"]
    with pytest.raises(UserError, match="no such run folder"):
        plan_vllm([tmp_path / "missing"])
    with pytest.raises(UserError, match="nothing to serve"):
        plan_vllm([])


def test_base_alone_and_settings_that_become_flags(run_copy):
    args = vllm_serve_args(plan_vllm(base="huggyllama/llama-7b"), port=9001)
    assert args[:3] == ["huggyllama/llama-7b", "--served-model-name", "huggyllama/llama-7b"]
    assert "--enable-lora" not in args and flag_values(args, "--quantization") == ["bitsandbytes"]
    text = (run_copy / "config.yaml").read_text()
    text = text.replace("revision: null", "revision: abc123").replace("compute_dtype: float32", "compute_dtype: bfloat16")
    (run_copy / "config.yaml").write_text(text.replace("quant: nf4", "quant: none"))
    args = vllm_serve_args(plan_vllm([run_copy]))
    assert flag_values(args, "--revision") == ["abc123"] and flag_values(args, "--dtype") == ["bfloat16"]
    assert "--quantization" not in args  # a 16-bit run is served in 16 bits


# ── preflight: what is missing says what to install ─────────────────────────────────────────────
def test_missing_vllm_names_the_extra(monkeypatch):
    monkeypatch.setattr(launcher, "installed_version", lambda dist: None)
    with pytest.raises(UserError, match=r'pip install "chatbuild\[vllm\]"'):
        launcher.check_can_launch()


def test_missing_bnb_plugin_on_new_vllm(monkeypatch):
    monkeypatch.setattr(launcher, "installed_version", lambda dist: "0.33.0")
    monkeypatch.setattr(launcher, "bnb_plugin_installed", lambda: False)
    with pytest.raises(UserError, match="pip install vllm-bnb-plugin"):
        launcher.check_can_launch()
    monkeypatch.setattr(launcher, "installed_version", lambda dist: "0.27.1")  # still in tree there
    monkeypatch.setattr(launcher, "cuda_available", lambda: True)
    launcher.check_can_launch()


def test_no_gpu(monkeypatch):
    monkeypatch.setattr(launcher, "installed_version", lambda dist: "0.33.0")
    monkeypatch.setattr(launcher, "bnb_plugin_installed", lambda: True)
    monkeypatch.setattr(launcher, "cuda_available", lambda: False)
    with pytest.raises(UserError, match="needs a CUDA GPU.*--engine hf"):
        launcher.check_can_launch()


@pytest.mark.skipif(launcher.installed_version("vllm") is not None, reason="vLLM is installed here")
def test_serve_engine_vllm_without_vllm_says_what_to_install(run_copy):
    """`chatbuild serve RUN --engine vllm` on a machine without vLLM: one line, exit code 2."""
    out = subprocess.run([sys.executable, "-m", "chatbuild.cli", "serve", str(run_copy), "--engine", "vllm"],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 2, out.stderr
    assert "Traceback" not in out.stderr and 'pip install "chatbuild[vllm]"' in out.stderr


def test_vllm_plugins_allow_list_keeps_bitsandbytes(monkeypatch):
    monkeypatch.setenv("VLLM_PLUGINS", "lora_filesystem_resolver")
    env = launcher.vllm_env("k")
    assert env["VLLM_PLUGINS"] == "lora_filesystem_resolver,bitsandbytes" and env["VLLM_API_KEY"] == "k"
    monkeypatch.delenv("VLLM_PLUGINS")
    assert "VLLM_PLUGINS" not in launcher.vllm_env(None)  # unset means every plugin loads


def test_importing_the_launcher_does_not_import_vllm():
    code = "import sys, chatbuild.engines.vllm; print(' '.join(sys.modules))"
    loaded = set(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split())
    assert not loaded & {"vllm", "torch", "transformers"}


# ── the child process, with a stand-in for `vllm` ───────────────────────────────────────────────
FAKE_VLLM = textwrap.dedent('''
    """Stands in for `vllm serve`: records how it was started, answers /health and an OpenAI-style
    API checking the bearer key. FAKE_VLLM_MODE: ok | crash | never-ready | stubborn."""
    import json, os, signal, sys, time
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    argv = sys.argv[1:]
    assert argv[0] == "serve", argv
    mode = os.environ.get("FAKE_VLLM_MODE", "ok")
    key = os.environ.get("VLLM_API_KEY")
    port = int(argv[argv.index("--port") + 1])
    names = [argv[argv.index("--served-model-name") + 1]]
    if "--lora-modules" in argv:
        i = argv.index("--lora-modules") + 1
        while i < len(argv) and not argv[i].startswith("--"):
            names.append(argv[i].split("=")[0])
            i += 1
    with open(os.environ["FAKE_VLLM_RECORD"], "w") as f:
        json.dump({"argv": argv, "api_key": key, "pid": os.getpid()}, f)
    print("INFO fake vllm: loading", flush=True)
    if mode == "crash":
        print("ERROR fake vllm: CUDA out of memory", flush=True)
        sys.exit(3)
    if mode == "never-ready":
        time.sleep(3600)
    if mode == "stubborn":
        signal.signal(signal.SIGTERM, signal.SIG_IGN)

    class Handler(BaseHTTPRequestHandler):
        def send(self, code, body=b"", ctype="application/json"):
            self.send_response(code)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def authorized(self):
            if key and self.headers.get("Authorization") != f"Bearer {key}":
                self.send(401, b'{"error": {"message": "bad key"}}')
                return False
            return True

        def do_GET(self):
            if self.path == "/health":
                return self.send(200)
            if self.path == "/v1/models" and self.authorized():
                data = [{"id": n, "object": "model", "owned_by": "vllm", "created": 0} for n in names]
                return self.send(200, json.dumps({"object": "list", "data": data}).encode())
            self.send(404)

        def do_POST(self):
            if not self.authorized():
                return
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            with open(os.environ["FAKE_VLLM_RECORD"] + ".requests", "a") as f:
                f.write(json.dumps(body) + "\\n")
            text = f"hello from {body['model']}"
            if not body.get("stream"):
                reply = {"id": "x", "object": "chat.completion", "created": 0, "model": body["model"],
                         "choices": [{"index": 0, "finish_reason": "stop",
                                      "message": {"role": "assistant", "content": text}}],
                         "usage": {"prompt_tokens": 3, "completion_tokens": 3, "total_tokens": 6}}
                return self.send(200, json.dumps(reply).encode())
            self.send_response(200)
            self.send_header("Content-Type", "text/event-stream")
            self.end_headers()
            for i, piece in enumerate(text.split(" ")):
                delta = {"content": piece if i == 0 else " " + piece}
                chunk = {"id": "x", "object": "chat.completion.chunk", "created": 0, "model": body["model"],
                         "choices": [{"index": 0, "delta": delta, "finish_reason": None}]}
                self.wfile.write(f"data: {json.dumps(chunk)}\\n\\n".encode())
            last = {"id": "x", "object": "chat.completion.chunk", "created": 0, "model": body["model"],
                    "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}],
                    "usage": {"prompt_tokens": 3, "completion_tokens": 3, "total_tokens": 6}}
            self.wfile.write(f"data: {json.dumps(last)}\\n\\ndata: [DONE]\\n\\n".encode())

        def log_message(self, *args):
            pass

    ThreadingHTTPServer(("127.0.0.1", port), Handler).serve_forever()
''')


@pytest.fixture
def fake_vllm(tmp_path, monkeypatch):
    script = tmp_path / "fake_vllm.py"
    script.write_text(FAKE_VLLM)
    record = tmp_path / "record.json"
    monkeypatch.setenv("FAKE_VLLM_RECORD", str(record))
    return [sys.executable, str(script)], record


def fake_argv(command, port, *names):
    args = ["serve", "--served-model-name", "base", "--port", str(port)]
    if names:
        args += ["--lora-modules", *(f"{n}=/x/{n}" for n in names)]
    return [*command, *args]


def is_dead(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        return True
    return "\nState:\tZ" in state  # a zombie has stopped running; only its exit status is left


def wait_until(check, timeout: float = 15.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return True
        time.sleep(0.1)
    return False


def test_process_becomes_healthy_and_stops(fake_vllm, tmp_path):
    command, record = fake_vllm
    port = launcher.free_port()
    proc = VLLMProcess(fake_argv(command, port), launcher.vllm_env("secret"), tmp_path / "logs" / "vllm.log",
                       echo=False)
    proc.wait_healthy(f"http://127.0.0.1:{port}/health", timeout=30, poll=0.1)
    assert json.loads(record.read_text())["api_key"] == "secret"
    assert "fake vllm: loading" in (tmp_path / "logs" / "vllm.log").read_text()
    proc.stop(grace=5)
    assert proc.proc.returncode is not None and is_dead(proc.proc.pid)
    proc.stop()  # twice is fine


def test_crash_reports_exit_code_and_log_tail(fake_vllm, tmp_path, monkeypatch):
    command, _ = fake_vllm
    monkeypatch.setenv("FAKE_VLLM_MODE", "crash")
    port = launcher.free_port()
    proc = VLLMProcess(fake_argv(command, port), launcher.vllm_env(None), tmp_path / "vllm.log", echo=False)
    with pytest.raises(UserError) as e:
        proc.wait_healthy(f"http://127.0.0.1:{port}/health", timeout=30, poll=0.1)
    assert "exited with code 3 before it was ready" in str(e.value)
    assert "CUDA out of memory" in str(e.value) and str(tmp_path / "vllm.log") in str(e.value)


def test_timeout_stops_the_child_and_reports(fake_vllm, tmp_path, monkeypatch):
    command, record = fake_vllm
    monkeypatch.setenv("FAKE_VLLM_MODE", "never-ready")
    port = launcher.free_port()
    proc = VLLMProcess(fake_argv(command, port), launcher.vllm_env(None), tmp_path / "vllm.log", echo=False)
    with pytest.raises(UserError, match=r"not ready within 2 s(.|\n)*fake vllm: loading"):
        proc.wait_healthy(f"http://127.0.0.1:{port}/health", timeout=2, poll=0.1)
    assert is_dead(proc.proc.pid)


def test_stop_escalates_to_sigkill(fake_vllm, tmp_path, monkeypatch):
    command, _ = fake_vllm
    monkeypatch.setenv("FAKE_VLLM_MODE", "stubborn")
    port = launcher.free_port()
    proc = VLLMProcess(fake_argv(command, port), launcher.vllm_env(None), tmp_path / "vllm.log", echo=False)
    proc.wait_healthy(f"http://127.0.0.1:{port}/health", timeout=30, poll=0.1)
    start = time.monotonic()
    proc.stop(grace=1)
    assert proc.proc.returncode == -signal.SIGKILL
    assert time.monotonic() - start < 10


def test_launch_serves_through_the_engine_and_close_stops_vllm(fake_vllm, run_copy, tmp_path):
    """launch_vllm end to end with the stand-in: flags from the run folder, the key in the child's
    environment (and on every request), the run's stop strings and system prompt added to requests."""
    from chatbuild.engines import GenerationParams

    command, record = fake_vllm
    fmt = json.loads((run_copy / "chat_format.json").read_text())
    (run_copy / "chat_format.json").write_text(json.dumps({**fmt, "system_prompt": "Be brief."}))
    engine = launcher.launch_vllm([run_copy], command=command, log_path=tmp_path / "vllm.log", timeout=30)
    try:
        started = json.loads(record.read_text())
        assert f"victim={run_copy.resolve()}/adapter" in started["argv"]
        assert started["api_key"] and started["api_key"] not in started["argv"]
        assert engine.models() == ["victim", "tiny-base"]
        chunks = list(engine.stream([{"role": "user", "content": "hi"}], GenerationParams(temperature=0, stop=["END"]),
                                    "victim"))
        assert "".join(c.text for c in chunks) == "hello from victim"
        assert chunks[-1].finish_reason == "stop"
        sent = json.loads(Path(str(record) + ".requests").read_text().splitlines()[-1])
        assert sent["stop"] == ["END", "### Human:"]  # the caller's, then the run's chat format's
        assert sent["messages"][0] == {"role": "system", "content": "Be brief."}
    finally:
        engine.close()
    assert is_dead(started["pid"])


@pytest.mark.skipif(sys.platform != "linux", reason="PR_SET_PDEATHSIG is Linux only")
def test_child_dies_with_its_parent(fake_vllm, tmp_path):
    """chatbuild killed with SIGKILL (no chance to clean up) must not leave vLLM holding the GPU."""
    command, record = fake_vllm
    port = launcher.free_port()
    parent = textwrap.dedent(f"""
        import sys, time
        from chatbuild.engines.vllm import VLLMProcess, vllm_env
        p = VLLMProcess({fake_argv(command, port)!r}, vllm_env(None), {str(tmp_path / "vllm.log")!r}, echo=False)
        p.wait_healthy("http://127.0.0.1:{port}/health", timeout=30, poll=0.1)
        print(p.proc.pid, flush=True)
        time.sleep(3600)
    """)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    holder = subprocess.Popen([sys.executable, "-c", parent], stdout=subprocess.PIPE, text=True, env=env)
    child = int(holder.stdout.readline())
    assert not is_dead(child)
    holder.kill()
    holder.wait()
    assert wait_until(lambda: is_dead(child)), "the vLLM child outlived its parent"


# ── the whole launcher on a real GPU ────────────────────────────────────────────────────────────
@pytest.mark.gpu
@pytest.mark.skipif(launcher.installed_version("vllm") is None, reason="vLLM is not installed")
def test_real_vllm_serves_two_tiny_adapters(tiny_run, tiny_run_b):
    """`vllm serve` for real: the 4-bit tiny base with both adapters, reached through the engine."""
    engine = launcher.launch_vllm([tiny_run, tiny_run_b], timeout=600)
    try:
        assert {"base", "tiny-a", "tiny-b"} <= set(engine.models())
        port = engine.process.argv[engine.process.argv.index("--port") + 1]
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5) as r:
            assert r.status == 200
    finally:
        engine.close()
    assert engine.process.proc.returncode is not None
