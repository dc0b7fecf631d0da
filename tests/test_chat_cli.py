"""`chatbuild chat RUN`: the terminal chat, driven through a pipe (one reply per input line)."""

import subprocess
import sys

import pytest

from tests.conftest import REPO

pytestmark = pytest.mark.integration


def chat(run, text, *args):
    return subprocess.run([sys.executable, "-m", "chatbuild.cli", "chat", str(run), "--temperature", "0",
                           "--max-new-tokens", "6", *args], input=text, capture_output=True, text=True, cwd=REPO,
                          timeout=300)


def test_replies_to_each_line_and_reset_forgets(tiny_run):
    """Greedy, so a reply is a function of the conversation: after /reset the same question gets
    the same reply again, and one input line gets exactly that reply."""
    once = chat(tiny_run, "Hello there\n")
    assert once.returncode == 0, once.stderr[-2000:]
    assert once.stdout.endswith("\n")
    twice = chat(tiny_run, "Hello there\n/reset\nHello there\n")
    assert twice.returncode == 0, twice.stderr[-2000:]
    assert twice.stdout == once.stdout * 2


def test_bad_arguments_and_missing_run(tiny_run, tmp_path):
    out = chat(tiny_run, "", "--top-p", "0")
    assert out.returncode == 2 and "--top-p" in out.stderr
    out = chat(tmp_path / "nope", "hi\n")
    assert out.returncode == 2 and "no such run folder" in out.stderr and "Traceback" not in out.stderr
