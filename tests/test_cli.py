"""The console script: help, version, and clear one-line errors for user mistakes."""

import subprocess
import sys

import chatbuild


def cli(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "chatbuild.cli", *args], capture_output=True, text=True, cwd=cwd)


def test_help_lists_every_command():
    from chatbuild.cli import COMMANDS

    out = cli("--help")
    assert out.returncode == 0
    for name in COMMANDS:
        assert name in out.stdout


def test_version():
    out = cli("--version")
    assert out.returncode == 0 and out.stdout.strip() == f"chatbuild {chatbuild.__version__}"


def test_unknown_command_is_a_usage_error():
    out = cli("no-such-command")
    assert out.returncode == 2 and "invalid choice" in out.stderr


def test_tiny_base_refuses_a_non_empty_folder(tmp_path):
    (tmp_path / "keep.txt").write_text("precious")
    out = cli("tiny-base", str(tmp_path), "--pretrain-steps", "0")
    assert out.returncode == 2
    assert "not empty" in out.stderr and "--force" in out.stderr
    assert "Traceback" not in out.stderr
    assert (tmp_path / "keep.txt").read_text() == "precious"


def test_tiny_base_rejects_bad_numbers(tmp_path):
    out = cli("tiny-base", str(tmp_path / "m"), "--pretrain-steps", "-3")
    assert out.returncode == 2 and "--pretrain-steps must be >= 0" in out.stderr
    out = cli("tiny-base", str(tmp_path / "m"), "--vocab-size", "10")
    assert out.returncode == 2 and "--vocab-size" in out.stderr


def test_tiny_base_reports_a_broken_data_file(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"message_id": "a", "text": "hi"}\n{not json\n')
    out = cli("tiny-base", str(tmp_path / "m"), "--data", str(bad))
    assert out.returncode == 2
    assert f"{bad}:2" in out.stderr and "Traceback" not in out.stderr
