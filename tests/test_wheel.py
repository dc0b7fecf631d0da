"""What `pip install chatbuild` gets: the wheel built from this tree holds the bundled presets, the
sample data and the q8 kernel's C source inside the `chatbuild` package, so no command needs the
source tree to find them."""

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


@pytest.mark.timeout(300)
def test_the_wheel_ships_the_presets_and_the_sample_data(tmp_path):
    src = tmp_path / "src"  # a copy, so the build's egg-info and build/ folders stay out of the checkout
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, src / name)
    for package in ("chatbuild", "pipelines", "serve", "eval"):
        shutil.copytree(REPO / package, src / package, ignore=shutil.ignore_patterns("__pycache__"))
    out = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                          "-w", str(tmp_path / "dist"), str(src)], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr
    (wheel,) = (tmp_path / "dist").glob("chatbuild-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())

    presets = sorted(p.name for p in (REPO / "chatbuild" / "presets").glob("*.yaml"))
    samples = sorted(p.name for p in (REPO / "chatbuild" / "data" / "sample").glob("*.jsonl"))
    assert presets and samples
    missing = [f"chatbuild/presets/{n}" for n in presets if f"chatbuild/presets/{n}" not in names]
    missing += [f"chatbuild/data/sample/{n}" for n in samples if f"chatbuild/data/sample/{n}" not in names]
    assert not missing, f"not in {wheel.name}: {', '.join(missing)}"
    assert "chatbuild/presets/__init__.py" in names and "chatbuild/evalconfig.py" in names
    assert "chatbuild/engines/kernels/q8.c" in names  # --quant q8 compiles it where it is installed
    assert not [n for n in names if n.startswith("pipelines/presets/")]
