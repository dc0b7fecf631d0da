"""bench/train.py's logic on CPU with a tiny shape (the GPU figures need a GPU session), and
bench/memory.py's clean refusal without CUDA."""

import json
import subprocess
import sys

import pytest
import torch

from tests.conftest import REPO

pytestmark = pytest.mark.integration


def test_train_bench_smoke_run_on_cpu(tmp_path):
    out = tmp_path / "train.json"
    cmd = [sys.executable, "bench/train.py", "--device", "cpu", "--shape", "test-tiny", "--steps", "3", "--warmup", "1",
           "--length-scale", "0.25", "--out", str(out)]
    done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["command"].startswith("python bench/train.py --device cpu")
    assert result["gpu"] is None and result["versions"]["torch"] and result["shape"] == "test-tiny"
    assert set(result["scenarios"]) == {"oasst", "fixed16x512", "fixed1x2048"}
    for name, s in result["scenarios"].items():
        rows = {r["variant"]: r for r in s["variants"]}
        assert list(rows) == ["baseline", "plain", "chunked", "packed", "packed+chunked"], name
        # every variant saw the same sequences: the same real and target tokens
        assert len({r["real_tokens"] for r in rows.values()}) == 1, name
        assert len({r["target_tokens"] for r in rows.values()}) == 1, name
        for r in rows.values():
            assert len(r["losses"]) == 3 and r["timed_steps"] == 2 and r["real_tok_per_s"] > 0
            assert r["computed_tokens"] >= r["real_tokens"] and r["peak_alloc_gb"] is None  # no CUDA peaks on CPU
        assert rows["packed"]["pad_waste"] == 0 and rows["packed"]["computed_tokens"] == rows["packed"]["real_tokens"]
        if name == "oasst":
            assert rows["plain"]["pad_waste"] > 0  # variable lengths: padding computed and not counted as real
        # step 1 is the base model's loss (LoRA B = 0): equal up to fp32 rounding; later steps close
        check = s["loss_check"]
        assert check["reference_variant"] == "baseline"
        assert check["step1_max_rel_diff"] < 1e-5 and check["all_steps_max_rel_diff"] < 1e-3, (name, check)
        assert set(s["speedup_vs_baseline"]) == set(rows)


def test_train_bench_says_it_needs_cuda():
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    done = subprocess.run([sys.executable, "bench/train.py"], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "no CUDA device" in done.stderr and "Traceback" not in done.stderr


def test_memory_bench_refuses_cleanly_without_cuda(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    done = subprocess.run([sys.executable, "bench/memory.py", "--out", str(tmp_path / "m.json")], cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2, done.stderr
    assert done.stderr.strip().count("\n") == 0 and "needs a CUDA GPU" in done.stderr
    assert not (tmp_path / "m.json").exists()
