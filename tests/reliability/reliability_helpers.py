"""Helpers of the reliability suite: `chatbuild serve` as a child process on a free loopback port,
/proc readings, polling, and the figures file.

Measured figures go to tests/artifacts/reliability.json (one entry per scenario, rewritten on each
run) and are printed (visible with `pytest -s`); the README's "Reliability" table quotes them.
"""

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

REPO = Path(__file__).resolve().parents[2]
FIGURES = REPO / "tests" / "artifacts" / "reliability.json"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    """`python -m serve.cli ARGS --port P` as a child process (its own session, so a kill reaches it
    alone); stdout and stderr go to `log`."""

    def __init__(self, args: list[str], log: Path, env: dict | None = None):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = log
        full_env = {**os.environ, "PYTHONPATH": str(REPO), **(env or {})}
        with open(log, "ab") as out:
            self.proc = subprocess.Popen([sys.executable, "-m", "serve.cli", *args, "--port", str(self.port)],
                                         cwd=REPO, env=full_env, stdout=out, stderr=subprocess.STDOUT,
                                         start_new_session=True)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def wait_ready(self, timeout: float = 180) -> "ServerProcess":
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                pytest.fail(f"chatbuild serve exited with {self.proc.returncode}:\n{self.log.read_text()[-3000:]}")
            try:
                if httpx.get(f"{self.url}/healthz", timeout=2).status_code == 200:
                    return self
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        self.kill()
        pytest.fail(f"chatbuild serve did not become healthy in {timeout:.0f} s:\n{self.log.read_text()[-3000:]}")

    def kill(self) -> None:
        """SIGKILL, as a crash or the OOM killer would: no cleanup of any kind runs."""
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait(timeout=30)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.kill()


def proc_status(pid: int) -> dict[str, int]:
    """Resident memory (bytes) and thread count of a process, from /proc/PID/status."""
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        fields[key] = value.strip()
    return {"rss": int(fields["VmRSS"].split()[0]) * 1024, "threads": int(fields["Threads"])}


def record(scenario: str, **figures) -> None:
    """Keep one scenario's figures in tests/artifacts/reliability.json and print them."""
    FIGURES.parent.mkdir(parents=True, exist_ok=True)
    try:
        data = json.loads(FIGURES.read_text())
    except (OSError, ValueError):
        data = {}
    data[scenario] = {**figures, "recorded": time.strftime("%Y-%m-%dT%H:%M:%S")}
    FIGURES.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    print(f"\nreliability {scenario}: {json.dumps(figures, sort_keys=True)}")


def wait_until(condition, what: str, timeout: float = 30.0, every: float = 0.05) -> float:
    """Poll `condition` until it holds; returns the seconds it took (fails after `timeout`)."""
    start = time.monotonic()
    while not condition():
        assert time.monotonic() - start < timeout, f"timed out after {timeout:.0f} s waiting until {what}"
        time.sleep(every)
    return time.monotonic() - start
