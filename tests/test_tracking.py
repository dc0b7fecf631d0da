"""train.report_to: a tiny run tracked in tensorboard, mlflow and wandb (offline) holds, read back
with each library's own reader, exactly the rows of metrics.jsonl, plus the configuration and the run
folder's path; bad names and missing packages fail in one line before training."""

import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from chatbuild import runs, tracking
from chatbuild.config import load_config
from chatbuild.errors import ConfigError, UserError
from tests.conftest import finetune_tiny


def expected_series(run_dir: Path) -> dict[str, dict[int, float]]:
    """metrics.jsonl as {key: {step: value}}: what every tracker must hold."""
    out: dict[str, dict[int, float]] = {}
    for row in runs.read_metrics(run_dir):
        for key, value in tracking.scalars(row).items():
            out.setdefault(key, {})[row["step"]] = value
    return out


@pytest.fixture(scope="module")
def tracked_run(tiny_base, tmp_path_factory) -> Path:
    """6 steps of the tiny recipe, logging every 2 and evaluating every 3 steps, into all three trackers."""
    return finetune_tiny(tiny_base, tmp_path_factory.mktemp("runs") / "tracked", "train.steps=6", "train.log_every=2",
                         "train.eval_every=3", "train.eval_batches=1", "train.save_every=0",
                         "train.report_to=[tensorboard,mlflow,wandb]")


# ── configuration ───────────────────────────────────────────────────────────────────────────────
def test_report_to_takes_a_list_or_a_comma_string_and_defaults_to_none():
    assert load_config().train.report_to == []
    assert load_config(overrides=["train.report_to=[tensorboard, wandb]"]).train.report_to == ["tensorboard", "wandb"]
    assert load_config(overrides=["train.report_to=mlflow,tensorboard"]).train.report_to == ["mlflow", "tensorboard"]


def test_an_unknown_tracker_is_one_line_naming_the_key_and_the_choices():
    with pytest.raises(ConfigError) as e:
        load_config(overrides=["train.report_to=[tensorboard,comet]"])
    assert str(e.value) == 'train.report_to: "comet" is not one of tensorboard, mlflow, wandb'


def test_a_missing_tracker_package_names_the_extra_before_the_run_folder_exists(tiny_base, tmp_path, monkeypatch):
    """The packages are installed here (the dev extra), so their absence is simulated by the one
    availability check chatbuild makes."""
    monkeypatch.setattr(tracking, "available", lambda module: module != "wandb")
    out = tmp_path / "never"
    with pytest.raises(UserError) as e:
        finetune_tiny(tiny_base, out, "train.steps=2", "train.report_to=[tensorboard,wandb]")
    assert str(e.value) == 'train.report_to: wandb not installed; pip install "chatbuild[tracking]" (or set train.report_to=[])'
    assert "\n" not in str(e.value) and not out.exists()


# ── what each tracker holds ─────────────────────────────────────────────────────────────────────
@pytest.mark.integration
def test_tensorboard_events_hold_every_metrics_row_and_the_config(tracked_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(runs.tracking_dir(tracked_run, "tensorboard")), size_guidance={"scalars": 0, "tensors": 0})
    acc.Reload()
    want = expected_series(tracked_run)
    assert {"loss", "eval_loss", "lr", "tokens_per_s"} <= set(want)
    assert set(acc.Tags()["scalars"]) == set(want)
    for key, series in want.items():
        got = {e.step: e.value for e in acc.Scalars(key)}
        assert got == pytest.approx(series, rel=1e-6), key  # tensorboard stores float32
    texts = {tag: acc.Tensors(tag)[0].tensor_proto.string_val[0].decode() for tag in acc.Tags()["tensors"]}
    assert texts["run_dir/text_summary"] == str(tracked_run.resolve())
    assert "train.report_to: ['tensorboard', 'mlflow', 'wandb']" in texts["config/text_summary"]


@pytest.mark.integration
def test_mlflow_file_store_holds_every_metrics_row_the_params_and_the_run_folder(tracked_run, monkeypatch):
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    from mlflow.tracking import MlflowClient

    client = MlflowClient(runs.tracking_dir(tracked_run, "mlflow").resolve().as_uri())
    experiment = client.get_experiment_by_name("chatbuild")
    (run,) = client.search_runs([experiment.experiment_id])
    assert run.info.status == "FINISHED" and run.info.run_name == "tracked"
    assert run.data.tags["run_dir"] == str(tracked_run.resolve())
    assert run.data.params["train.steps"] == "6" and run.data.params["lora.r"] == "16"
    for key, series in expected_series(tracked_run).items():
        got = {m.step: m.value for m in client.get_metric_history(run.info.run_id, key)}
        assert got == series, key


@pytest.mark.integration
def test_wandb_offline_run_holds_every_metrics_row_and_the_config(tracked_run):
    """Read with wandb's own reader of .wandb files, `wandb leet inspect --json` (its Python
    datastore reader is gone in wandb 0.2x+; the Go core reads the file now)."""
    (run_file,) = (runs.tracking_dir(tracked_run, "wandb")).glob("offline-run-*/run-*.wandb")
    wandb_cli = Path(sys.executable).with_name("wandb")
    out = subprocess.run([str(wandb_cli), "leet", "inspect", "--json", str(run_file)], capture_output=True, text=True,
                         timeout=120, env={**os.environ, "WANDB_MODE": "offline"}, check=True).stdout
    records = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    got: dict[str, dict[int, float]] = {}
    for r in records:
        if r["type"] == "history":
            step = int(r["history"]["step"].get("num", 0))
            for key, value in r["history"]["item"].items():
                if not key.startswith("_"):  # wandb's own _runtime, _step, _timestamp
                    got.setdefault(key, {})[step] = value
    assert got == expected_series(tracked_run)
    config = next(r["run"]["config"]["update"] for r in records if r["type"] == "run")
    assert config["run_dir"] == str(tracked_run.resolve()) and config["train.steps"] == 6


def test_the_build_tab_names_a_jobs_tensorboard_folder_only_when_it_has_one(tmp_path):
    pytest.importorskip("gradio")
    from serve.jobs import Job
    from serve.ui_build import _job_view

    job = Job(id=1, name="t", preset=None, overrides=[], run_dir=str(tmp_path), device="cpu", status="done", pid=None,
              resume=False, cancel=False, log_path=str(tmp_path / "log"), error=None, created=0, started=0, finished=0)
    # the view asks the builder only whether the login may read the job (a server without logins: yes)
    builder = SimpleNamespace(may_read=lambda job, login: True, evals_dir=tmp_path / "evals")
    board = runs.tracking_dir(tmp_path, "tensorboard")
    assert "tensorboard" not in _job_view(builder, 1, [job], None)[1]
    board.mkdir()
    assert f"tensorboard: `tensorboard --logdir {board}`" in _job_view(builder, 1, [job], None)[1]
