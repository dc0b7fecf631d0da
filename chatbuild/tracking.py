"""Experiment trackers: every metrics.jsonl row, also in tensorboard, mlflow or wandb.

    train.report_to: [tensorboard, mlflow, wandb]     # any of them; default none

The recipe hands each row it appends to metrics.jsonl to `Trackers.log` as well (main process only),
so the trackers hold the same keys at the same steps; each one also gets the resolved configuration
and the run folder's path. Everything stays offline and inside the run folder (`runs.tracking_dir`):

    tensorboard   torch.utils.tensorboard's SummaryWriter: event files in tensorboard/
    mlflow        MlflowClient on a local file store, mlruns/ (experiment "chatbuild", run = run name)
    wandb         wandb.init(mode="offline"): wandb/offline-run-*/, uploadable later with `wandb sync`

The files are each library's own: nothing here writes a tracker format by hand.

Why mlflow's file store: the `mlflow-skinny` package (a tenth of `mlflow`'s install, no web server)
has no SQL store; mlflow 3 keeps the file store working but refuses it unless MLFLOW_ALLOW_FILE_STORE
is set, which `MlflowTracker` sets for its own process. `mlflow ui` (the full `mlflow` package) reads it.

A resumed run continues the tensorboard log (events past the checkpoint are dropped, as metrics.jsonl
drops its rows) and starts a new mlflow and wandb run from the checkpoint's step.
"""

import os
import time
from pathlib import Path

from chatbuild import runs
from chatbuild.availability import available
from chatbuild.errors import UserError

EXTRA = "chatbuild[tracking]"


def check_installed(names: list[str]) -> None:
    """Raise UserError naming the extra to install when a tracker's package is missing: called before
    any training, so a run never fails at its first logged step."""
    missing = [n for n in names if not available(n)]  # the module names equal the tracker names
    if missing:
        raise UserError(f"train.report_to: {', '.join(missing)} not installed; "
                        f'pip install "{EXTRA}" (or set train.report_to=[])')


def flat_config(config: dict, prefix: str = "") -> dict:
    """{"train": {"lr": 2e-4}} -> {"train.lr": 2e-4}: the dotted names the config's overrides use."""
    out = {}
    for key, value in config.items():
        if isinstance(value, dict):
            out.update(flat_config(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def scalars(row: dict) -> dict[str, float]:
    """The logged values of a metrics row: every number but the step itself."""
    return {k: float(v) for k, v in row.items()
            if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool)}


class TensorBoardTracker:
    def __init__(self, run_dir: Path, config: dict, start_step: int):
        from torch.utils.tensorboard import SummaryWriter

        # purge_step: a resumed run drops the events logged after its checkpoint (they come again).
        self.writer = SummaryWriter(str(runs.tracking_dir(run_dir, "tensorboard")),
                                    purge_step=start_step + 1 if start_step else None)
        self.writer.add_text("run_dir", str(run_dir))
        self.writer.add_text("config", "\n".join(f"    {k}: {v}" for k, v in flat_config(config).items()))

    def log(self, row: dict) -> None:
        for key, value in scalars(row).items():
            self.writer.add_scalar(key, value, row["step"])

    def close(self, failed: bool) -> None:
        self.writer.close()


class MlflowTracker:
    def __init__(self, run_dir: Path, config: dict, start_step: int):
        os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")  # see the module docstring
        from mlflow.entities import Param
        from mlflow.tracking import MlflowClient

        self.uri = runs.tracking_dir(run_dir, "mlflow").resolve().as_uri()
        self.client = MlflowClient(self.uri)
        experiment = self.client.get_experiment_by_name("chatbuild")
        experiment_id = experiment.experiment_id if experiment else self.client.create_experiment("chatbuild")
        self.run_id = self.client.create_run(experiment_id, run_name=config.get("name"),
                                             tags={"run_dir": str(run_dir), "start_step": str(start_step)}).info.run_id
        params = [Param(k, str(v)) for k, v in flat_config(config).items()]
        for i in range(0, len(params), 100):  # mlflow takes at most 100 params per batch
            self.client.log_batch(self.run_id, params=params[i:i + 100])
        self.client.log_dict(self.run_id, config, "config.yaml")

    def log(self, row: dict) -> None:
        from mlflow.entities import Metric

        stamp = int(row.get("time", time.time()) * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(k, v, stamp, row["step"]) for k, v in scalars(row).items()])

    def close(self, failed: bool) -> None:
        self.client.set_terminated(self.run_id, "FAILED" if failed else "FINISHED")


class WandbTracker:
    def __init__(self, run_dir: Path, config: dict, start_step: int):
        # Offline and quiet whatever the environment says: nothing here may reach the network.
        os.environ["WANDB_MODE"], os.environ["WANDB_SILENT"] = "offline", "true"
        import wandb

        # wandb.init(dir=D) writes D/wandb/, which is runs.tracking_dir(run_dir, "wandb").
        self.run = wandb.init(project="chatbuild", name=config.get("name"), mode="offline",
                              dir=str(runs.tracking_dir(run_dir, "wandb").parent),
                              config={**flat_config(config), "run_dir": str(run_dir), "start_step": start_step},
                              settings=wandb.Settings(silent=True), reinit="create_new")

    def log(self, row: dict) -> None:
        self.run.log(scalars(row), step=row["step"])

    def close(self, failed: bool) -> None:
        self.run.finish(exit_code=1 if failed else 0)


TRACKER_CLASSES = {"tensorboard": TensorBoardTracker, "mlflow": MlflowTracker, "wandb": WandbTracker}


class Trackers:
    """The trackers of one run (possibly none): `log` every metrics row, `close` once at the end."""

    def __init__(self, trackers: list):
        self.trackers = trackers

    def log(self, row: dict) -> None:
        for t in self.trackers:
            t.log(row)

    def close(self, failed: bool = False) -> None:
        for t in self.trackers:
            t.close(failed)
        self.trackers = []


def start(names: list[str], run_dir: str | Path, config: dict, start_step: int = 0) -> Trackers:
    """Open the trackers `names` (train.report_to) for the run folder `run_dir`; `config` is the
    resolved configuration as a dict (chatbuild.config.to_dict), `start_step` where a resumed run
    continues (0 for a fresh one)."""
    check_installed(names)
    run_dir = Path(run_dir).resolve()
    return Trackers([TRACKER_CLASSES[n](run_dir, config, start_step) for n in dict.fromkeys(names)])
