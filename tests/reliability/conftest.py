"""Fixtures of the reliability suite (load, faults, bad input, security); its helpers are in
reliability_helpers.py.

Every module here carries `pytestmark = pytest.mark.reliability`; `make test` runs them with the rest,
`make test PYTEST_ARGS="-m reliability"` alone.
"""

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def fast_run(tiny_base, tmp_path_factory) -> Path:
    """A run folder over the tiny base (tests/runfolders.py: random adapter, real format) that serves
    its base unquantized (`model.quant: none`). Why not NF4: bitsandbytes' 4-bit matmul on CPU costs
    tens of milliseconds a token even for this model, which would turn 1,280 requests into many
    minutes; what these tests measure is the server (admission, threads, memory, disconnects), which
    is the same code whatever the base's weights are stored in."""
    from runfolders import make_run

    from chatbuild.config import read_config, save_config

    run = make_run(tiny_base, tmp_path_factory.mktemp("reliability") / "fast", "fast", seed=5)
    cfg = read_config(run / "config.yaml")
    cfg.model.quant = "none"
    save_config(cfg, run / "config.yaml")
    return run
