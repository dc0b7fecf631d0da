"""`import chatbuild` and the CLI's --help stay light: no heavy or optional library at import time."""

import subprocess
import sys

HEAVY = ("gradio", "vllm", "fastapi", "bitsandbytes", "torch", "transformers", "uvicorn")


def _modules_after(code: str) -> set[str]:
    out = subprocess.run([sys.executable, "-c", code + "\nimport sys; print(' '.join(sys.modules))"],
                         capture_output=True, text=True, check=True)
    return set(out.stdout.split())


def test_import_chatbuild_pulls_in_nothing_heavy():
    loaded = _modules_after("import chatbuild, chatbuild.cli, chatbuild.errors, chatbuild.templates, chatbuild.availability")
    assert not loaded & set(HEAVY), f"heavy modules imported: {sorted(loaded & set(HEAVY))}"


def test_cli_help_pulls_in_nothing_heavy():
    loaded = _modules_after(
        "from chatbuild.cli import main\n"
        "try:\n    main(['--help'])\nexcept SystemExit:\n    pass"
    )
    assert not loaded & set(HEAVY), f"heavy modules imported: {sorted(loaded & set(HEAVY))}"
