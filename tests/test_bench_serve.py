"""The serving benchmark runs end to end on the tiny base (a few clients, a few tokens) and writes
a result file that says what ran where, with both engines' figures per concurrency."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


@pytest.mark.integration
def test_bench_serve_tiny_writes_its_figures(tmp_path):
    out = tmp_path / "serve.json"
    subprocess.run([sys.executable, str(REPO / "bench" / "serve.py"), "--tiny", "--clients", "1", "3",
                    "--max-tokens", "6", "--trials", "1", "--out", str(out)], check=True, cwd=REPO, timeout=600)
    result = json.loads(out.read_text())
    assert {"command", "machine", "versions", "plain_generate_batch1", "engine_batch1", "http"} <= result.keys()
    assert {"torch", "transformers", "peft", "bitsandbytes"} <= result["versions"].keys()
    assert result["machine"]["cpu"] and result["machine"]["cpus_usable"] >= 1
    for label in ("one_at_a_time", "continuous_batching"):
        rows = result["http"][label]["by_clients"]
        assert [r["clients"] for r in rows] == [1, 3]
        assert all(r["completion_tokens"] > 0 and r["aggregate_tok_s"] > 0 for r in rows)
    assert result["http"]["one_at_a_time"]["by_clients"][1]["mean_batch"] == 1
    assert result["http"]["continuous_batching"]["by_clients"][1]["mean_batch"] > 1
