"""The vLLM launcher: `chatbuild serve RUN [RUN ...] --engine vllm`.

vLLM serves one base model with many LoRA adapters at once, batched on the GPU. This module turns run
folders into the `vllm serve` command line, starts it as a child process, waits for its `/health`,
and hands back the OpenAI-compatible remote engine pointed at it; closing the engine stops vLLM.

    # what `chatbuild serve runs/a runs/b --engine vllm` starts (and what this prints):
    python -m chatbuild.engines.vllm runs/a runs/b --print
    vllm serve /models/llama-7b --served-model-name llama-7b --tokenizer runs/a/tokenizer \\
        --quantization bitsandbytes --enable-lora --lora-modules a=runs/a/adapter b=runs/b/adapter \\
        --max-lora-rank 64 --max-loras 2 --host 127.0.0.1 --port 8000

    # the compose file's vllm service runs the same thing in the vLLM image, replacing itself by vLLM
    # (flags after `--` go to `vllm serve` as they are):
    python -m chatbuild.engines.vllm --host 0.0.0.0 --port 8000 /data/runs/tiny-guanaco -- --max-model-len 4096

How run folders map to flags:
- the base (`config.yaml` `model.base` / `model.revision`) is loaded 4-bit by vLLM itself
  (`--quantization bitsandbytes`: in-flight quantization while loading, no pre-quantized copy);
  from vLLM 0.28 on bitsandbytes lives in the `vllm-bnb-plugin` package, which registers itself
  through the `vllm.general_plugins` entry point and keeps the flag's name;
- each adapter is `--lora-modules RUN_NAME=RUN/adapter`, so API clients ask for runs by name;
- `--max-lora-rank` is the largest adapter rank rounded up to a value vLLM accepts;
- the tokenizer comes from the first run folder, because it carries the chat template we trained on.

What vLLM cannot serve is refused before anything starts (`check_adapter_for_vllm`): vLLM applies
LoRA to the linear projections only and rejects `modules_to_save`, DoRA and bias terms, so an adapter
must hold nothing but `lora_A`/`lora_B` matrices of those projections.

Nothing here imports vllm: the child process does. `EXTRA_VLLM_ARGS_ENV` passes further flags
(`--gpu-memory-utilization 0.8 --max-model-len 4096`) through to `vllm serve`.
"""

import argparse
import collections
import dataclasses
import json
import os
import secrets
import shlex
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from chatbuild.availability import cuda_available
from chatbuild.config import ModelSettings
from chatbuild.engines.remote import FormattedEngine
from chatbuild.errors import UserError
from chatbuild.templates import ChatFormat

# vLLM's `MaxLoRARanks` (vllm/config/lora.py: so since v0.14, and on main in August 2026):
# `--max-lora-rank` must be one of these, so an adapter of rank 48 needs 64.
VLLM_MAX_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)

# The linear projections vLLM takes LoRA on, by architecture (`packed_modules_mapping` in vLLM's
# model files: q/k/v are packed into qkv_proj, gate/up into gate_up_proj; adapters name the parts).
# Architectures not listed are checked only for what no vLLM model accepts.
LLAMA_PROJECTIONS = frozenset({"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"})
VLLM_LORA_TARGETS = {t: LLAMA_PROJECTIONS for t in ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2")}
EMBEDDING_MODULES = frozenset({"embed_tokens", "lm_head", "wte", "embed_in", "embed_out", "word_embeddings"})

# from vLLM 0.28 on, bitsandbytes is an out-of-tree plugin (vllm-project/vllm#43529)
BNB_PLUGIN_FROM = (0, 28)
BNB_PLUGIN = "bitsandbytes"  # its name in the `vllm.general_plugins` entry-point group

EXTRA_VLLM_ARGS_ENV = "CHATBUILD_VLLM_ARGS"
HEALTH_TIMEOUT_S = 900  # a 65B base is read and quantized to 4 bits while loading: minutes
STOP_GRACE_S = 30


# ── what vLLM can serve ─────────────────────────────────────────────────────────────────────────
@dataclass
class AdapterInfo:
    """An adapter that passed `check_adapter_for_vllm`."""

    name: str  # the run's name: the model name API clients use
    path: Path  # the adapter folder (PEFT format)
    rank: int  # the largest rank among its LoRA matrices
    modules: list[str]  # the projections it adapts


def check_adapter_for_vllm(run_dir: str | Path) -> AdapterInfo:
    """Check a run's adapter against what vLLM can load; raise UserError listing every problem.

    vLLM (vllm/lora/peft_helper.py, vllm/lora/lora_model.py) loads a PEFT LoRA adapter only if it
    holds `lora_A` / `lora_B` weights of linear projections the architecture supports, rank at most
    512 (`VLLM_MAX_LORA_RANKS`), `bias="none"`, no DoRA and no `modules_to_save` (full copies of
    other layers). Adapters share the base model's vocabulary: vLLM dropped per-adapter extra
    vocabulary (vllm-project/vllm#28382), so a run that added tokens can't be served by it."""
    from chatbuild.runs import load_run

    run = load_run(run_dir)
    adapter = run.adapter_dir
    try:
        config = json.loads((adapter / "adapter_config.json").read_text())
    except (OSError, ValueError) as e:
        raise UserError(f"{adapter / 'adapter_config.json'}: cannot read the adapter configuration ({e})") from None
    weights = safetensors_shapes(adapter / "adapter_model.safetensors")

    problems: list[str] = []
    if config.get("peft_type", "LORA") != "LORA":
        problems.append(f'it is a {config.get("peft_type")} adapter; vLLM serves LoRA only')
    if config.get("use_dora"):
        problems.append("it uses DoRA, which vLLM does not support")
    if config.get("bias", "none") != "none" or config.get("lora_bias"):
        problems.append('it trains bias terms; vLLM needs bias="none"')

    ranks, modules, extra = [], set(), []
    for key, shape in weights.items():
        parts = key.split(".")
        if len(parts) >= 3 and parts[-2] in ("lora_A", "lora_B") and parts[-1] == "weight":
            modules.add(parts[-3])
            ranks.append(shape[0] if parts[-2] == "lora_A" else shape[-1])
        else:
            extra.append(key)

    saved = list(config.get("modules_to_save") or [])
    if saved or extra:
        problems.append(_extra_weights_problem(run, saved, extra, weights))
    embedding_targets = sorted(modules & EMBEDDING_MODULES)
    if embedding_targets:
        problems.append(f"it puts LoRA on {', '.join(embedding_targets)}; vLLM applies LoRA to linear "
                        "projections only")
    supported = VLLM_LORA_TARGETS.get(base_model_type(run.base, run.config.model.revision) or "")
    unsupported = sorted(modules - (supported or modules) - EMBEDDING_MODULES)
    if unsupported:
        problems.append(f"it adapts {', '.join(unsupported)}, which vLLM does not take LoRA on for this "
                        f"architecture (it does: {', '.join(sorted(supported))})")
    if not ranks:
        problems.append("its weights file holds no lora_A/lora_B matrices")
    rank = max(ranks, default=0)
    if rank > VLLM_MAX_LORA_RANKS[-1]:
        problems.append(f"its rank {rank} is above vLLM's largest --max-lora-rank ({VLLM_MAX_LORA_RANKS[-1]})")

    if problems:
        raise UserError(f"{run.path}: vLLM can't serve this adapter: " + "; ".join(problems)
                        + ". Serve it with --engine hf instead.")
    return AdapterInfo(name=run.name, path=adapter, rank=rank, modules=sorted(modules))


def _extra_weights_problem(run, saved: list[str], extra: list[str], weights: dict) -> str:
    """Explain full-layer weights in an adapter. chatbuild writes them for one reason only: the
    tokenizer knew ids the base's embeddings lacked, so fine-tuning grew and trained
    embed_tokens/lm_head and saved them whole (pipelines/finetune.py)."""
    names = sorted(set(saved) | {k.split(".")[-2] for k in extra if "." in k})
    base_vocab = _base_vocab_size(run)
    rows = max((weights[k][0] for k in extra if k.split(".")[-2] in EMBEDDING_MODULES), default=None)
    if set(names) & EMBEDDING_MODULES:
        added = f"{rows - base_vocab} " if rows and base_vocab and rows > base_vocab else ""
        return (f"the run added {added}new tokens to the vocabulary, so its adapter carries whole "
                f"{'/'.join(n for n in names if n in EMBEDDING_MODULES)} matrices (modules_to_save); vLLM "
                "serves adapters over the base model's own vocabulary and rejects modules_to_save. Merge it "
                "(chatbuild merge RUN --out DIR) and serve the merged model, or fine-tune without new tokens")
    return (f"its adapter carries whole copies of {', '.join(names)} (modules_to_save), which vLLM rejects; "
            "only lora_A/lora_B matrices can be served")


def _base_vocab_size(run) -> int | None:
    path = _base_config_path(run.base, run.config.model.revision)
    try:
        return int(json.loads(path.read_text())["vocab_size"]) if path else None
    except (OSError, ValueError, KeyError, TypeError):
        return None


def base_model_type(base: str, revision: str | None = None) -> str | None:
    """`model_type` from the base's config.json, read from a local folder or the Hugging Face cache
    (never the network); None when it isn't on disk."""
    path = _base_config_path(base, revision)
    try:
        return json.loads(path.read_text()).get("model_type") if path else None
    except (OSError, ValueError):
        return None


def _base_config_path(base: str, revision: str | None) -> Path | None:
    local = Path(base) / "config.json"
    if local.is_file():
        return local
    try:
        from huggingface_hub import try_to_load_from_cache

        cached = try_to_load_from_cache(base, "config.json", revision=revision)
    except Exception:  # not a valid repo id, or no cache: nothing to read
        return None
    return Path(cached) if isinstance(cached, str) else None


def safetensors_shapes(path: Path) -> dict[str, list[int]]:
    """Tensor names and shapes from a .safetensors header, without reading the tensors.
    (The format: 8 bytes little-endian header length, then a JSON header.)"""
    try:
        with open(path, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(n))
    except (OSError, ValueError, struct.error) as e:
        raise UserError(f"{path}: not a readable safetensors file ({e})") from None
    return {k: v["shape"] for k, v in header.items() if k != "__metadata__"}


def vllm_max_lora_rank(rank: int) -> int:
    """The smallest `--max-lora-rank` vLLM accepts that holds `rank`."""
    for allowed in VLLM_MAX_LORA_RANKS:
        if allowed >= rank:
            return allowed
    raise UserError(f"LoRA rank {rank} is above vLLM's largest --max-lora-rank ({VLLM_MAX_LORA_RANKS[-1]})")


# ── the command line ───────────────────────────────────────────────────────────────────────────
@dataclass
class VLLMPlan:
    """What one `vllm serve` process will serve: run folders checked, model names settled."""

    base: str  # id or path vLLM loads
    base_name: str  # the bare base's model name
    model: ModelSettings  # the runs' model settings (revision, quantization, dtype, ...)
    tokenizer: Path | None  # the first run's tokenizer: it carries the chat template we trained with
    adapters: list[AdapterInfo]  # named as API clients ask for them
    chat_formats: dict[str, ChatFormat]  # by model name: stop strings and system prompt at request time


def plan_vllm(runs: list[str | Path] = (), base: str | None = None, base_name: str | None = None) -> VLLMPlan:
    """Check run folders (all on one base) for vLLM and name what it will serve, the way the in-process
    engine names it: runs by `config.name` (made unique with -2, -3, ...), the bare base by its folder
    name or hub id. `base` replaces the runs' base path (a local copy of it), or with no runs is the
    base to serve alone. Raises UserError for anything vLLM can't serve."""
    from chatbuild.runs import load_run

    loaded = [load_run(r) for r in runs]
    if not loaded and not base:
        raise UserError("nothing to serve: give one or more run folders, or a base model")
    keys = {(r.base, r.config.model.revision, r.config.model.quant) for r in loaded}
    if len(keys) > 1:
        listing = ", ".join(f"{r.name} ({r.base}, {r.config.model.quant})" for r in loaded)
        raise UserError(f"vLLM serves one base model per process, and these runs differ in theirs: {listing}. "
                        "Serve each base separately.")
    if len({_chat_template(r.tokenizer_dir) for r in loaded}) > 1:
        raise UserError("these runs use different chat templates, and vLLM applies one per process: "
                        f"{', '.join(r.name for r in loaded)}. Serve them separately, or with --engine hf.")
    model = loaded[0].config.model if loaded else ModelSettings(base=base)
    if model.quant == "int8":
        raise UserError("vLLM can quantize a base to 4 bits while loading it, not to 8 bits; these runs use "
                        "model.quant=int8. Serve them with --engine hf.")
    base = base or model.base
    base_name = base_name or (Path(base).resolve().name if Path(base).exists() else base)
    names, adapters, formats = {base_name}, [], {base_name: loaded[0].chat_format if loaded else ChatFormat()}
    for run in loaded:
        name, n = run.name, 1
        while name in names:
            n += 1
            name = f"{run.name}-{n}"
        names.add(name)
        adapters.append(dataclasses.replace(check_adapter_for_vllm(run.path), name=name))
        formats[name] = run.chat_format
    return VLLMPlan(base=base, base_name=base_name, model=model,
                    tokenizer=loaded[0].tokenizer_dir if loaded else None, adapters=adapters, chat_formats=formats)


def vllm_serve_args(plan: VLLMPlan, host: str = "127.0.0.1", port: int = 8000,
                    extra_args: list[str] = ()) -> list[str]:
    """The arguments after `vllm serve` for a plan. The API key is not among them: it goes to the
    child in the VLLM_API_KEY environment variable, so it never shows in `ps`."""
    m = plan.model
    args = [plan.base, "--served-model-name", plan.base_name]
    if m.revision:
        args += ["--revision", m.revision]
    if m.trust_remote_code:
        args += ["--trust-remote-code"]
    if plan.tokenizer:
        args += ["--tokenizer", str(plan.tokenizer)]
    if m.quant in ("nf4", "fp4"):
        # vLLM quantizes in flight to NF4 with double quantization (its bitsandbytes loader's fixed
        # settings, the QLoRA recipe), whichever 4-bit type the run trained with
        args += ["--quantization", "bitsandbytes"]
    if m.compute_dtype != "auto":
        args += ["--dtype", m.compute_dtype]
    if plan.adapters:
        args += ["--enable-lora", "--lora-modules", *(f"{a.name}={a.path}" for a in plan.adapters),
                 "--max-lora-rank", str(vllm_max_lora_rank(max(a.rank for a in plan.adapters))),
                 "--max-loras", str(len(plan.adapters))]
    return [*args, "--host", host, "--port", str(port), *extra_args]


def _chat_template(tokenizer_dir: Path) -> str | None:
    for name, key in (("chat_template.jinja", None), ("tokenizer_config.json", "chat_template")):
        path = tokenizer_dir / name
        if path.is_file():
            text = path.read_text()
            return text if key is None else json.loads(text).get(key)
    return None


def extra_args_from_env() -> list[str]:
    return shlex.split(os.environ.get(EXTRA_VLLM_ARGS_ENV, ""))


def vllm_executable() -> list[str]:
    """How to run `vllm`: its console script beside this Python (a venv), else on PATH."""
    beside = Path(sys.executable).parent / "vllm"
    if beside.is_file():
        return [str(beside)]
    from chatbuild.availability import executable

    found = executable("vllm")
    return [found] if found else [sys.executable, "-m", "vllm.entrypoints.cli.main"]


def vllm_env(api_key: str | None) -> dict[str, str]:
    """The child's environment: ours, the API key, and the bitsandbytes plugin kept enabled when a
    VLLM_PLUGINS allow-list is set (vLLM loads only the plugins it names)."""
    env = dict(os.environ)
    if api_key:
        env["VLLM_API_KEY"] = api_key
    allowed = [p for p in env.get("VLLM_PLUGINS", "").split(",") if p]
    if "VLLM_PLUGINS" in env and BNB_PLUGIN not in allowed:
        env["VLLM_PLUGINS"] = ",".join([*allowed, BNB_PLUGIN])
    return env


# ── before launching ────────────────────────────────────────────────────────────────────────────
def check_can_launch(quantized: bool = True) -> None:
    """vLLM installed (with the bitsandbytes plugin where it needs one) and a CUDA GPU present;
    else a UserError that says what to install or use instead."""
    version = installed_version("vllm")
    if version is None:
        raise UserError('--engine vllm needs vLLM, which is not installed: pip install "chatbuild[vllm]" '
                        "(vLLM runs on CUDA GPUs only; without one use --engine hf)")
    if quantized and _version_tuple(version) >= BNB_PLUGIN_FROM and not bnb_plugin_installed():
        raise UserError(f"vLLM {version} keeps bitsandbytes (for the 4-bit base) in a plugin that is not "
                        'installed: pip install vllm-bnb-plugin (or pip install "chatbuild[vllm]")')
    if not cuda_available():
        raise UserError("--engine vllm needs a CUDA GPU, and torch sees none here; on CPU use --engine hf")


def installed_version(distribution: str) -> str | None:
    from importlib import metadata

    try:
        return metadata.version(distribution)
    except metadata.PackageNotFoundError:
        return None


def bnb_plugin_installed() -> bool:
    from importlib import metadata

    return any(ep.name == BNB_PLUGIN for ep in metadata.entry_points(group="vllm.general_plugins"))


def _version_tuple(version: str) -> tuple[int, ...]:
    """(0, 28, 1) from "0.28.1rc1+cu129"."""
    out = []
    for part in version.split("+")[0].split(".")[:3]:
        digits = ""
        for c in part:
            if not c.isdigit():
                break
            digits += c
        out.append(int(digits or 0))
    return tuple(out)


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


# ── the child process ───────────────────────────────────────────────────────────────────────────
class VLLMProcess:
    """A `vllm serve` child: started in its own process group (vLLM starts workers of its own, and
    stopping must reach them all), its output copied to our stderr and a log file, the last lines
    kept for error messages."""

    def __init__(self, argv: list[str], env: dict[str, str], log_path: Path, echo: bool = True):
        self.argv, self.log_path = argv, Path(log_path)
        self.tail: collections.deque[str] = collections.deque(maxlen=40)
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self.proc = subprocess.Popen(argv, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, start_new_session=True,
                                     preexec_fn=_die_with_parent if sys.platform == "linux" else None)
        self._pump = threading.Thread(target=self._copy_output, args=(echo,), daemon=True)
        self._pump.start()

    def _copy_output(self, echo: bool) -> None:
        with open(self.log_path, "ab") as log:
            for line in self.proc.stdout:
                log.write(line)
                log.flush()
                text = line.decode(errors="replace").rstrip()
                self.tail.append(text)
                if echo:
                    print(f"[vllm] {text}", file=sys.stderr, flush=True)

    def log_tail(self, n: int = 20) -> str:
        self._pump.join(timeout=1)  # after an exit, let the last lines arrive
        return "\n".join(list(self.tail)[-n:]) or "(no output)"

    def wait_healthy(self, url: str, timeout: float = HEALTH_TIMEOUT_S, poll: float = 1.0) -> None:
        """Block until GET `url` answers 200. UserError with the log tail if the child exits or the
        time runs out (the child is stopped then)."""
        deadline = time.monotonic() + timeout
        while True:
            code = self.proc.poll()
            if code is not None:
                raise UserError(f"vllm serve exited with code {code} before it was ready; the last lines of "
                                f"its log ({self.log_path}):\n{self.log_tail()}")
            try:
                with urllib.request.urlopen(url, timeout=5) as r:
                    if r.status == 200:
                        return
            except (urllib.error.URLError, OSError):
                pass
            if time.monotonic() > deadline:
                self.stop()
                raise UserError(f"vllm serve was not ready within {timeout:.0f} s ({url}); the last lines of "
                                f"its log ({self.log_path}):\n{self.log_tail()}")
            time.sleep(poll)

    def stop(self, grace: float = STOP_GRACE_S) -> None:
        """SIGTERM to the whole group, SIGKILL after `grace` seconds. Safe to call twice."""
        if self.proc.poll() is None:
            _signal_group(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                _signal_group(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        _signal_group(self.proc.pid, signal.SIGKILL)  # workers that outlived their parent
        self._pump.join(timeout=5)


def _signal_group(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def _die_with_parent() -> None:
    """In the child before exec (Linux): get SIGTERM when chatbuild dies, even by SIGKILL, so no
    orphaned vLLM keeps the GPU. prctl(PR_SET_PDEATHSIG = 1, SIGTERM)."""
    import ctypes

    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)


# ── the engine ─────────────────────────────────────────────────────────────────────────────────
class VLLMEngine(FormattedEngine):
    """A ChatEngine over our vLLM child, through the remote engine. vLLM applies the chat template
    from the run's tokenizer; the run's stop strings and default system prompt are added per request
    (`FormattedEngine`). `close()` also stops the child."""

    def __init__(self, remote, process: VLLMProcess, chat_formats: dict[str, ChatFormat]):
        super().__init__(remote, chat_formats)
        self.process = process

    def close(self) -> None:
        try:
            self.remote.close()
        finally:
            self.process.stop()


def launch_vllm(runs: list[str | Path] = (), base: str | None = None, base_name: str | None = None,
                port: int | None = None, log_path: str | Path | None = None,
                timeout: float = HEALTH_TIMEOUT_S, command: list[str] | None = None) -> VLLMEngine:
    """Start `vllm serve` for these runs on a loopback port, wait until it is healthy, and return the
    engine that talks to it. Arguments as `plan_vllm`; `command` replaces the `vllm` executable
    (tests use a stand-in). The log goes to `log_path` (default: $CHATBUILD_HOME/vllm.log)."""
    from chatbuild.engines.remote import RemoteEngine

    plan = plan_vllm(runs, base=base, base_name=base_name)
    port = port or free_port()
    args = vllm_serve_args(plan, host="127.0.0.1", port=port, extra_args=extra_args_from_env())
    if command is None:
        check_can_launch(quantized="--quantization" in args)
        command = vllm_executable()
    api_key = secrets.token_urlsafe(24)  # only we talk to this server; other local users can't
    home = Path(os.environ.get("CHATBUILD_HOME", Path.home() / ".cache" / "chatbuild"))
    log_path = Path(log_path) if log_path else home / "vllm.log"
    print(f"chatbuild: starting {shlex.join([*command, 'serve', *args])} (log: {log_path})", file=sys.stderr,
          flush=True)
    process = VLLMProcess([*command, "serve", *args], vllm_env(api_key), log_path)
    try:
        process.wait_healthy(f"http://127.0.0.1:{port}/health", timeout=timeout)
        remote = RemoteEngine(f"http://127.0.0.1:{port}/v1", api_key=api_key,
                              models=[*(a.name for a in plan.adapters), plan.base_name])
    except BaseException:
        process.stop()
        raise
    return VLLMEngine(remote, process, plan.chat_formats)


# ── python -m chatbuild.engines.vllm: the command line, printed or run in place ─────────────────
def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m chatbuild.engines.vllm",
                                description="Run `vllm serve` for chatbuild run folders (all on one base). "
                                            "Flags after `--` go to `vllm serve` as they are.")
    p.add_argument("runs", nargs="*", help="run folders; their names become the adapters' model names "
                   "(default: the space-separated list in CHATBUILD_RUNS)")
    p.add_argument("--base", help="the base alone (no runs), or a local copy of the runs' base")
    p.add_argument("--base-name", help="the bare base's model name (default: its folder name or hub id)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--print", action="store_true", help="print the command line instead of running it")
    argv = list(sys.argv[1:] if argv is None else argv)
    extra = argv[argv.index("--") + 1:] if "--" in argv else []
    args = p.parse_args(argv[:argv.index("--")] if "--" in argv else argv)
    runs = args.runs or shlex.split(os.environ.get("CHATBUILD_RUNS", ""))
    try:
        plan = plan_vllm(runs, base=args.base, base_name=args.base_name)
        serve_args = vllm_serve_args(plan, host=args.host, port=args.port,
                                     extra_args=[*extra_args_from_env(), *extra])
        if args.print:
            print(shlex.join(["vllm", "serve", *serve_args]))
            return 0
        check_can_launch(quantized="--quantization" in serve_args)
    except UserError as e:
        print(f"chatbuild vllm: error: {e}", file=sys.stderr)
        return 2
    command = vllm_executable()
    # vLLM takes this process's place (PID 1 in the container: it gets `docker stop`'s SIGTERM);
    # VLLM_API_KEY, if set, is already in the environment it inherits.
    os.execvpe(command[0], [*command, "serve", *serve_args], vllm_env(None))


if __name__ == "__main__":
    raise SystemExit(main())
