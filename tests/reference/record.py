"""Record tests/reference/tiny-cpu-loss.json: the loss trajectory of the `tiny_run` fixture's
recipe (tiny-cpu, 12 steps, seed 1) on a tiny base built like the test session's."""

import json
import platform
import tempfile
from pathlib import Path

import bitsandbytes
import peft
import torch
import transformers

from pipelines.tiny_base import TinyBaseSpec, build_tiny_base
from tests.conftest import finetune_tiny
from tests.test_finetune import REFERENCE, trajectory

if __name__ == "__main__":
    with tempfile.TemporaryDirectory() as tmp:
        base = build_tiny_base(Path(tmp) / "tiny-base", TinyBaseSpec(pretrain_steps=40), log=lambda *_: None)
        run = finetune_tiny(base, Path(tmp) / "tiny-a", "train.steps=12", "train.seed=1", "train.eval_every=6",
                            "train.save_every=6")
        out = trajectory(run)
    out["versions"] = {"torch": torch.__version__, "transformers": transformers.__version__, "peft": peft.__version__,
                       "bitsandbytes": bitsandbytes.__version__, "python": platform.python_version(),
                       "machine": platform.machine()}
    REFERENCE.write_text(json.dumps(out, indent=1) + "\n")
    print(f"wrote {REFERENCE}")
