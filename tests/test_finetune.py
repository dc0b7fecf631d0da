"""The QLoRA recipe on the tiny base, on CPU, with real bitsandbytes NF4: it learns, touches only
LoRA weights, writes exactly the documented run folder, resumes exactly, runs data parallel."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from chatbuild.errors import UserError
from chatbuild.runs import RUN_FILES, load_run
from tests.conftest import REPO, finetune_tiny

pytestmark = pytest.mark.integration


def adapter_weights(run_dir: Path) -> dict:
    return load_file(run_dir / "adapter" / "adapter_model.safetensors")


def test_run_folder_holds_exactly_the_documented_files(tiny_run):
    assert sorted(p.name for p in tiny_run.iterdir()) == sorted(RUN_FILES)
    assert sorted(p.name for p in (tiny_run / "adapter").iterdir()) == ["README.md", "adapter_config.json", "adapter_model.safetensors"]
    assert sorted(p.name for p in (tiny_run / "checkpoints").iterdir()) == ["step-12", "step-6"]
    ckpt = tiny_run / "checkpoints" / "step-12"
    assert sorted(p.name for p in ckpt.iterdir()) == ["adapter", "optimizer.pt", "rng.pt", "scheduler.pt", "state.json"]
    run = load_run(tiny_run)
    assert run.chat_format.name == "guanaco" and "### Human:" in run.chat_format.stop
    assert run.config.lora.r == 16 and run.config.train.steps == 12
    card = (tiny_run / "README.md").read_text()
    assert "validation loss" in card and run.base in card
    assert (tiny_run / "loss.png").read_bytes()[:4] == b"\x89PNG"


def test_metrics_are_logged(tiny_run):
    rows = [json.loads(line) for line in (tiny_run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "eval_loss" in r] == [0, 6, 12]
    train = [r for r in rows if "loss" in r]
    assert [r["step"] for r in train] == [5, 10, 12]
    for r in train:
        assert r["tokens_per_s"] > 0 and r["memory_gb"] > 0 and r["lr"] == pytest.approx(2e-3)


NUMBERS = "zero one two three four five six seven eight nine".split()


def spelled(n: int) -> str:
    return " ".join(NUMBERS[int(d)] for d in str(n))


def test_a_short_run_lowers_validation_loss(tiny_base, tmp_path):
    """On data with a pattern the model can learn (spell a number digit by digit), validation
    conversations, which training never sees, get cheaper to predict."""
    data = tmp_path / "spell.jsonl"
    with open(data, "w") as f:
        for n in range(100, 400, 2):
            f.write(json.dumps({"messages": [{"role": "user", "content": f"Spell {n}."},
                                             {"role": "assistant", "content": f"{n} is spelled {spelled(n)}."}]}) + "\n")
    run = finetune_tiny(tiny_base, tmp_path / "spell", f"data.train={data}", "data.val_fraction=0.2", "train.steps=12",
                        "train.eval_every=6", "train.save_every=0", "train.lr=5e-3")
    evals = [json.loads(line)["eval_loss"] for line in (run / "metrics.jsonl").read_text().splitlines() if "eval_loss" in line]
    assert len(evals) == 3
    assert evals[-1] < evals[0] - 0.3, evals


def test_lora_weights_move_and_base_weights_do_not(tiny_base, tmp_path, monkeypatch):
    """Train in-process, snapshotting every parameter right after LoRA is attached, and compare
    after training: base parameters (4-bit and the rest) bit for bit, LoRA ones must all move."""
    from chatbuild import modeling
    from pipelines.finetune import finetune, resolve_config

    seen = {}
    attach = modeling.attach_lora

    def snapshotting_attach(*a, **k):
        model = attach(*a, **k)
        seen["model"] = model
        seen["before"] = {n: p.detach().clone() for n, p in model.named_parameters()}
        return model

    monkeypatch.setattr(modeling, "attach_lora", snapshotting_attach)
    cfg = resolve_config("tiny-cpu", [f"model.base={tiny_base}", f"output_dir={tmp_path / 'r'}", "train.steps=3",
                                      "train.eval_every=0", "train.save_every=0"])
    finetune(cfg, progress=False)
    after = {n: p.detach() for n, p in seen["model"].named_parameters()}
    base = [n for n in seen["before"] if "lora_" not in n]
    lora = [n for n in seen["before"] if "lora_" in n]
    assert base and lora
    assert any(seen["before"][n].dtype == torch.uint8 for n in base), "the NF4 weights should be among them"
    for n in base:
        assert torch.equal(seen["before"][n], after[n]), f"base parameter changed: {n}"
    unmoved = [n for n in lora if torch.equal(seen["before"][n], after[n])]
    assert not unmoved, f"LoRA tensors that did not move: {unmoved[:3]}"


def test_a_validation_pass_does_not_change_the_training_kernel(tiny_base):
    """bitsandbytes repacks 4-bit weights for a CPU inference kernel (no autograd formula) on the first
    no-grad eval forward where the CPU has AVX512-BF16; a model being trained must not switch. LoRA
    gradients after a validation pass equal those without one. (On CPUs without AVX512-BF16 the
    repacking never happens and both sides take the same path.)"""
    from bitsandbytes.nn import Linear4bit

    from chatbuild.modeling import attach_lora, load_base_model

    ids = torch.arange(3, 35).reshape(2, 16)

    def lora_grads(validate_first: bool) -> dict:
        torch.manual_seed(0)
        model = attach_lora(load_base_model(str(tiny_base), quant="nf4", double_quant=True,
                                            compute_dtype="float32", device="cpu"), 4, 8, 0.0)
        if validate_first:
            model.eval()
            with torch.no_grad():
                model(input_ids=ids)
            model.train()
        model(input_ids=ids, labels=ids).loss.backward()
        layers = [m for m in model.modules() if isinstance(m, Linear4bit)]
        assert layers and not any(getattr(m.weight.quant_state, "packing_format_for_cpu", False) for m in layers)
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}

    plain, validated = lora_grads(False), lora_grads(True)
    assert plain.keys() == validated.keys() and plain
    for n in plain:
        assert torch.equal(plain[n], validated[n]), n


def test_adapter_loads_with_plain_peft_and_matches_our_loader(tiny_run):
    """The adapter folder loads with plain transformers + PEFT and gives our loader's logits. Plain
    bitsandbytes switches to its packed CPU kernel on AVX512-BF16 CPUs, which rounds differently (see
    chatbuild.modeling.use_one_4bit_kernel): on the same kernel the logits are equal, on that one close."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

    from chatbuild.modeling import load_base_model, use_one_4bit_kernel

    run = load_run(tiny_run)
    tok = AutoTokenizer.from_pretrained(run.tokenizer_dir)
    ids = tok("### Human: Tell me about tea.\n### Assistant:", return_tensors="pt").input_ids
    q = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                           bnb_4bit_compute_dtype=torch.float32)
    def plain(one_kernel: bool):
        model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(run.base, quantization_config=q),
                                          run.adapter_dir)
        if one_kernel:
            use_one_4bit_kernel(model)
        return model.eval()

    ours = PeftModel.from_pretrained(load_base_model(run.base, quant="nf4", double_quant=True, compute_dtype="float32"),
                                     run.adapter_dir)
    bare = load_base_model(run.base, quant="nf4", double_quant=True, compute_dtype="float32")
    with torch.no_grad():
        a, b, c = plain(True)(ids).logits, ours.eval()(ids).logits, bare.eval()(ids).logits
        packed = plain(False)(ids).logits
    torch.testing.assert_close(a, b)
    torch.testing.assert_close(packed, b, rtol=0.01, atol=0.05)
    assert (a - c).abs().max() > 1e-3, "the adapter should change the logits"


def _cli_finetune(tiny_base, out, *extra):
    return [sys.executable, "-m", "pipelines.finetune", "tiny-cpu", f"model.base={tiny_base}", f"output_dir={out}",
            "train.steps=8", "train.save_every=2", "train.eval_every=4", "--no-progress", *extra]


def test_resume_after_sigkill_matches_an_uninterrupted_run(tiny_base, tmp_path):
    straight = finetune_tiny(tiny_base, tmp_path / "straight", "train.steps=8", "train.save_every=2", "train.eval_every=4")
    killed = tmp_path / "killed"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen(_cli_finetune(tiny_base, killed), cwd=REPO, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 300
    while not (killed / "checkpoints" / "step-4" / "state.json").exists():
        assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
        assert time.monotonic() < deadline, "no checkpoint appeared"
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (killed / "adapter").exists(), "the run should have been killed before finishing"
    # Resuming without --resume is refused; with it, training continues from the last checkpoint.
    refused = subprocess.run(_cli_finetune(tiny_base, killed), cwd=REPO, env=env, capture_output=True, text=True)
    assert refused.returncode == 2 and "--resume" in refused.stderr
    resumed = subprocess.run(_cli_finetune(tiny_base, killed, "--resume"), cwd=REPO, env=env, capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resume: continuing from" in resumed.stdout
    a, b = adapter_weights(straight), adapter_weights(killed)
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6)
    steps = [json.loads(line)["step"] for line in (killed / "metrics.jsonl").read_text().splitlines()]
    assert steps == sorted(steps) and len(steps) == len(set(map(str, [(s, i) for i, s in enumerate(steps)])))


def test_refuses_bad_situations_before_heavy_work(tiny_base, tiny_run, tmp_path):
    from pipelines.finetune import finetune, resolve_config

    def attempt(*overrides, **kw):
        cfg = resolve_config("tiny-cpu", [f"model.base={tiny_base}", *overrides])
        finetune(cfg, progress=False, **kw)

    with pytest.raises(UserError, match="already holds a run"):
        attempt(f"output_dir={tiny_run}")
    with pytest.raises(UserError, match="cannot resume, the configuration differs in lora.r"):
        attempt(f"output_dir={tiny_run}", "lora.r=4", "train.seed=1", resume=True)
    junk = tmp_path / "junk"
    junk.mkdir()
    (junk / "notes.txt").write_text("mine")
    with pytest.raises(UserError, match="holds no run"):
        attempt(f"output_dir={junk}")
    assert (junk / "notes.txt").read_text() == "mine"
    with pytest.raises(UserError, match="nothing to resume"):
        attempt(f"output_dir={tmp_path / 'empty'}", resume=True)
    with pytest.raises(UserError, match="could not be read"):
        attempt(f"model.base={tmp_path / 'no-model'}", f"output_dir={tmp_path / 'x'}")
    not_lm = tmp_path / "t5"
    not_lm.mkdir()
    (not_lm / "config.json").write_text(json.dumps({"model_type": "t5", "d_model": 8, "num_heads": 2,
                                                    "num_layers": 1, "d_ff": 8, "vocab_size": 10}))
    with pytest.raises(UserError, match="not a causal language model"):
        attempt(f"model.base={not_lm}", f"output_dir={tmp_path / 'y'}")
    with pytest.raises(UserError, match="no training conversations"):
        attempt(f"output_dir={tmp_path / 'z'}", "data.lang=xx")


def test_cli_reports_bad_config_without_traceback(tmp_path):
    out = subprocess.run([sys.executable, "-m", "chatbuild.cli", "finetune", "tiny-cpu", "lora.rr=4"],
                         cwd=REPO, capture_output=True, text=True)
    assert out.returncode == 2
    assert "did you mean lora.r" in out.stderr and "Traceback" not in out.stderr


def test_two_process_data_parallel_on_cpu(tiny_base, tmp_path):
    out = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "pipelines.finetune", "tiny-cpu", f"model.base={tiny_base}", f"output_dir={out}", "train.steps=4",
           "train.micro_batch_size=2", "train.save_every=2", "train.eval_every=0", "--no-progress"]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    run = load_run(out)
    assert run.config.train.steps == 4
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-2", "step-4"]
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in rows if "loss" in r]
    assert [r["step"] for r in train] == [4], "only one process writes metrics"
    assert done.stdout.count("done: run folder") == 1


REFERENCE = REPO / "tests" / "reference" / "tiny-cpu-loss.json"


def trajectory(run_dir: Path) -> dict:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {"train": [[r["step"], r["loss"]] for r in rows if "loss" in r],
            "eval": [[r["step"], r["eval_loss"]] for r in rows if "eval_loss" in r]}


def test_loss_trajectory_matches_the_recorded_reference(tiny_run):
    """The tiny-cpu recipe (12 steps, seed 1, on the session's tiny base) against a recorded run.

    Re-record with `python -m tests.reference.record` after a deliberate change to the recipe,
    the tiny base or the sample data; the file keeps the library versions it was recorded with."""
    ref = json.loads(REFERENCE.read_text())
    got = trajectory(tiny_run)
    assert [s for s, _ in got["train"]] == [s for s, _ in ref["train"]]
    assert [s for s, _ in got["eval"]] == [s for s, _ in ref["eval"]]
    for (_, a), (_, b) in zip(got["train"] + got["eval"], ref["train"] + ref["eval"]):
        assert a == pytest.approx(b, abs=2e-2), (got, ref["versions"])
