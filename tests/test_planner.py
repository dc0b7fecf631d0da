"""The memory planner against measured peaks, and the 4-bit random-weight model builder on CPU."""

import subprocess
import sys

import pytest
import torch

from chatbuild.errors import UserError
from chatbuild.planner import plan_memory
from chatbuild.shapes import SHAPES, build_random_4bit, get_shape

# Peak allocated GB of one training step of the plain HF QLoRA stack (NF4 + double quant, LoRA r=64
# on all linear layers, gradient checkpointing, paged AdamW 32-bit), H100, from
# docs/performance.md ("GPU training baseline").
MEASURED = [("llama-7b", 16, 512, 14.7), ("llama-7b", 1, 2048, 7.5), ("llama-33b", 1, 512, 23.0), ("llama-65b", 1, 512, 42.9)]


@pytest.mark.parametrize("shape, batch, seq, measured", MEASURED)
def test_planner_is_within_ten_percent_of_measured_peaks(shape, batch, seq, measured):
    predicted = plan_memory(SHAPES[shape], batch, seq).total_gb
    assert abs(predicted / measured - 1) <= 0.10, (predicted, measured)


def test_planner_terms_move_the_right_way():
    s = SHAPES["llama-7b"]
    base = plan_memory(s, 1, 512)
    assert plan_memory(s, 1, 1024).total_gb > base.total_gb
    assert plan_memory(s, 1, 512, r=8).lora_gb < base.lora_gb
    assert plan_memory(s, 1, 512, double_quant=False).weights_gb > base.weights_gb
    assert plan_memory(s, 1, 512, quant="none").weights_gb > 3 * base.weights_gb
    assert plan_memory(s, 1, 512, gradient_checkpointing=False).activations_gb > 5 * base.activations_gb
    unpaged = plan_memory(s, 1, 512, optimizer="adamw_torch")
    assert unpaged.optimizer_gb == pytest.approx(base.paged_gb) and base.optimizer_gb == 0


def test_plan_cli_says_whether_it_fits():
    ok = subprocess.run([sys.executable, "-m", "chatbuild.cli", "plan", "llama-7b", "--gpu-gb", "24"], capture_output=True, text=True)
    assert ok.returncode == 0 and "fits a 24 GB GPU" in ok.stdout
    no = subprocess.run([sys.executable, "-m", "chatbuild.cli", "plan", "llama-65b", "--gpu-gb", "24"], capture_output=True, text=True)
    assert no.returncode == 1 and "does NOT fit" in no.stdout and "FSDP" in no.stdout
    bad = subprocess.run([sys.executable, "-m", "chatbuild.cli", "plan", "llama-7b", "--seq", "0"], capture_output=True, text=True)
    assert bad.returncode == 2 and "--seq must be >= 1" in bad.stderr


def test_plan_reads_a_local_model_config(tiny_base):
    out = subprocess.run([sys.executable, "-m", "chatbuild.cli", "plan", str(tiny_base)], capture_output=True, text=True)
    assert out.returncode == 0 and "peak (predicted)" in out.stdout


def test_unknown_shape():
    with pytest.raises(UserError, match="unknown shape"):
        get_shape("llama-9000b")


def test_random_4bit_model_on_cpu():
    model = build_random_4bit("test-tiny", device="cpu")
    w = model.model.layers[0].mlp.down_proj.weight
    assert w.dtype == torch.uint8 and w.quant_state.quant_type == "nf4" and w.quant_state.nested
    x = torch.randint(0, 1000, (2, 16))
    loss = model(input_ids=x, labels=x).loss
    assert abs(loss.item() - torch.log(torch.tensor(1000.0)).item()) < 0.5  # random weights: about uniform
