"""The run folder API (chatbuild.runs), without training: checkpoints round trip and are pruned,
metrics append, read and rewind as resume needs, one definition of a finished run, the card and
the plot, and the key that decides which runs share a loaded base."""

import json
import random
from pathlib import Path

import pytest

from chatbuild import runs
from chatbuild.config import ModelSettings, RunConfig, save_config
from chatbuild.errors import UserError
from chatbuild.templates import ChatFormat


# ── checkpoints ─────────────────────────────────────────────────────────────────────────────────
def tiny_peft_model(seed: int = 0):
    """A two-layer random Llama with LoRA on its attention projections: a few thousand weights."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    base = LlamaForCausalLM(LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                        num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=32))
    return get_peft_model(base, LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"],
                                           task_type="CAUSAL_LM"))


def train_step(model, optimizer, scheduler):
    import torch

    ids = torch.randint(0, 32, (2, 8))
    model(input_ids=ids, labels=ids).loss.backward()
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad()


def lora_state(model) -> dict:
    return {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" in n}


def test_checkpoints_round_trip_and_keep_only_the_newest(tmp_path):
    import torch

    model = tiny_peft_model()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1 / (s + 1))
    for step in (1, 2, 3):
        train_step(model, optimizer, scheduler)
        runs.save_checkpoint(tmp_path, step, model, optimizer, scheduler, keep=2)
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step-2", "step-3"]
    assert sorted(p.name for p in (tmp_path / "checkpoints" / "step-3").iterdir()) == [
        "adapter", "optimizer.pt", "rng.pt", "scheduler.pt", "state.json"]
    saved, saved_lr = lora_state(model), scheduler.get_last_lr()
    after_save = (random.random(), torch.rand(3))  # what the RNGs give next, after the checkpoint

    # A half-written checkpoint (killed before its state.json) is never the latest.
    (tmp_path / "checkpoints" / "step-4" / "adapter").mkdir(parents=True)
    (tmp_path / "checkpoints" / ".step-5.tmp").mkdir()
    assert runs.latest_checkpoint(tmp_path) == tmp_path / "checkpoints" / "step-3"

    other = tiny_peft_model(seed=1)
    other_opt = torch.optim.AdamW([p for p in other.parameters() if p.requires_grad], lr=1e-2)
    other_sched = torch.optim.lr_scheduler.LambdaLR(other_opt, lambda s: 1 / (s + 1))
    random.random(), torch.rand(3)  # move the RNGs on
    step = runs.load_checkpoint(runs.latest_checkpoint(tmp_path), other, other_opt, other_sched, "cpu")
    assert step == 3
    for name, value in lora_state(other).items():
        torch.testing.assert_close(value, saved[name])
    assert other_sched.get_last_lr() == saved_lr and other_sched.last_epoch == 3
    assert other_opt.state_dict()["state"].keys() == optimizer.state_dict()["state"].keys()
    got = (random.random(), torch.rand(3))
    assert got[0] == after_save[0] and torch.equal(got[1], after_save[1])

    runs.prune_checkpoints(tmp_path, keep=1)
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == [".step-5.tmp", "step-3", "step-4"]
    assert runs.latest_checkpoint(tmp_path / "nowhere") is None


def test_a_broken_checkpoint_fails_in_one_line_naming_its_file(tmp_path):
    import torch

    model = tiny_peft_model()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
    ckpt = runs.save_checkpoint(tmp_path, 1, model, optimizer, scheduler, keep=0)
    (ckpt / "optimizer.pt").write_bytes((ckpt / "optimizer.pt").read_bytes()[:100])  # cut short by a full disk
    with pytest.raises(UserError, match="optimizer.pt: cannot read this checkpoint file"):
        runs.load_checkpoint(ckpt, model, optimizer, scheduler, "cpu")


# ── metrics ─────────────────────────────────────────────────────────────────────────────────────
def test_metrics_append_read_and_rewind_for_resume(tmp_path):
    assert runs.read_metrics(tmp_path) == []
    rows = [{"step": 0, "eval_loss": 3.0}, {"step": 2, "loss": 2.5}, {"step": 4, "loss": 2.0},
            {"step": 4, "eval_loss": 2.2}, {"step": 6, "loss": 1.8}]
    for row in rows:
        runs.append_metrics(tmp_path, row)
    assert runs.read_metrics(tmp_path) == rows
    assert runs.read_metrics(tmp_path, upto=4) == rows[:4]
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 8, "lo')  # a line the run is writing right now
    assert runs.read_metrics(tmp_path) == rows

    # Resuming from the checkpoint at step 4 keeps the rows logged up to it, on disk too.
    assert runs.rewind_metrics(tmp_path, 4) == rows[:4]
    assert runs.read_metrics(tmp_path) == rows[:4]
    assert [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()] == rows[:4]
    # A fresh start keeps none.
    assert runs.rewind_metrics(tmp_path, 0) == [] and not (tmp_path / "metrics.jsonl").exists()
    assert runs.rewind_metrics(tmp_path, 3) == []


# ── finished runs ───────────────────────────────────────────────────────────────────────────────
def write_run_files(run: Path, upto: str | None = None, base: str = "some/base", **model) -> Path:
    """The files a finished run has, in the order the recipe writes them, stopping before `upto`."""
    run.mkdir(parents=True, exist_ok=True)
    steps = [
        ("config.yaml", lambda: save_config(RunConfig(name=run.name, model=ModelSettings(base=base, **model)),
                                            run / "config.yaml")),
        ("adapter/adapter_model.safetensors", lambda: (run / "adapter").mkdir() or
         (run / "adapter" / "adapter_model.safetensors").write_bytes(b"")),
        ("adapter/adapter_config.json", lambda: (run / "adapter" / "adapter_config.json").write_text("{}")),
        ("tokenizer", lambda: (run / "tokenizer").mkdir()),
        ("chat_format.json", lambda: ChatFormat().save(run / "chat_format.json")),
    ]
    for name, write in steps:
        if name == upto:
            break
        write()
    return run


def test_one_definition_of_a_finished_run(tmp_path):
    assert not runs.is_run(tmp_path / "missing") and runs.missing_files(tmp_path / "missing") == list(runs.FINISHED_FILES)
    # A run killed while saving its final files is not finished, whatever it already has.
    for upto in ("adapter/adapter_model.safetensors", "adapter/adapter_config.json", "tokenizer", "chat_format.json"):
        partial = write_run_files(tmp_path / upto.replace("/", "_"), upto=upto)
        assert not runs.is_run(partial)
        assert upto in runs.missing_files(partial)
        with pytest.raises(UserError, match=f"not a finished run folder \\(missing .*{upto}"):
            runs.load_run(partial)
    done = write_run_files(tmp_path / "done")
    assert runs.is_run(done) and runs.missing_files(done) == []
    run = runs.load_run(done)
    assert run.name == "done" and run.path == done.resolve() and run.chat_format == ChatFormat()
    with pytest.raises(UserError, match="no such run folder"):
        runs.load_run(tmp_path / "nowhere")
    assert runs.read_run_config(write_run_files(tmp_path / "config-only", upto="adapter/adapter_model.safetensors")).name == "config-only"
    assert runs.read_run_config(tmp_path / "nowhere") is None


def test_base_key_is_what_a_shared_base_depends_on(tmp_path, monkeypatch):
    base = tmp_path / "bases" / "tiny"
    base.mkdir(parents=True)
    monkeypatch.chdir(tmp_path)

    def key(name, base, **model):
        return runs.load_run(write_run_files(tmp_path / name, base=str(base), **model)).base_key()

    a = key("a", base)
    assert a == (str(base.resolve()), None, "nf4")
    # The same folder spelled another way, or loaded with another double quantization or compute
    # dtype, shares the base; other weights or another quantization do not.
    assert key("b", "bases/tiny", double_quant=False, compute_dtype="float32") == a
    assert key("c", base, quant="int8") != a
    assert key("d", base, revision="v2") != a
    assert key("e", "org/model") == ("org/model", None, "nf4")


# ── preparing the folder ────────────────────────────────────────────────────────────────────────
def test_prepare_refuses_what_it_must_and_finds_the_checkpoint_to_resume(tmp_path):
    import torch

    cfg = RunConfig(name="r", output_dir=str(tmp_path / "r"))
    assert runs.prepare_run_dir(cfg, resume=False, overwrite=False) is None
    with pytest.raises(UserError, match="nothing to resume"):
        runs.prepare_run_dir(cfg, resume=True, overwrite=False)
    runs.start_run_dir(cfg, overwrite=False)
    with pytest.raises(UserError, match="already holds a run"):
        runs.prepare_run_dir(cfg, resume=False, overwrite=False)
    with pytest.raises(UserError, match="no checkpoint to resume from"):
        runs.prepare_run_dir(cfg, resume=True, overwrite=False)
    model = tiny_peft_model()
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
    runs.save_checkpoint(cfg.run_dir, 2, model, optimizer, scheduler, keep=0)
    longer = RunConfig(name="r", output_dir=str(tmp_path / "r"))
    longer.train.steps = cfg.train.steps * 2  # resuming may train longer
    assert runs.prepare_run_dir(longer, resume=True, overwrite=False) == cfg.run_dir / "checkpoints" / "step-2"
    other = RunConfig(name="r", output_dir=str(tmp_path / "r"))
    other.lora.r = cfg.lora.r * 2
    with pytest.raises(UserError, match="differs in lora.r"):
        runs.prepare_run_dir(other, resume=True, overwrite=False)
    runs.start_run_dir(cfg, overwrite=True)
    assert sorted(p.name for p in cfg.run_dir.iterdir()) == ["config.yaml"]


def test_a_finished_run_that_is_resumed_is_unfinished_until_saved_again(tmp_path):
    """Resuming a finished run to train longer overwrites its adapter at the end: until then nothing
    may take it for a finished run (the Build tab would serve it, merge would merge it)."""
    cfg = RunConfig(name="r", output_dir=str(tmp_path / "r"))
    runs.start_run_dir(cfg, overwrite=False)
    for name in runs.FINISHED_FILES:  # what save_final leaves (is_run looks only at their presence)
        (cfg.run_dir / name).parent.mkdir(parents=True, exist_ok=True)
        if name != "tokenizer":
            (cfg.run_dir / name).write_text("{}")
    (cfg.run_dir / "tokenizer").mkdir(exist_ok=True)
    assert runs.is_run(cfg.run_dir)
    runs.start_run_dir(cfg, overwrite=False)  # what a resume does before it trains
    assert not runs.is_run(cfg.run_dir) and runs.missing_files(cfg.run_dir) == ["chat_format.json"]


# ── card and plot ───────────────────────────────────────────────────────────────────────────────
def test_card_names_the_objective_and_its_metrics_and_the_plot_is_a_png(tmp_path):
    cfg = RunConfig(name="pref", model=ModelSettings(base="org/model"))
    history = [{"step": 0, "eval_loss": 0.69}, {"step": 5, "loss": 0.6, "reward_margin": 0.1},
               {"step": 10, "loss": 0.4, "reward_margin": 0.5}, {"step": 10, "eval_loss": 0.5}]
    runs.write_model_card(tmp_path, cfg, history, objective="preference-tuning (DPO) recipe",
                          data=["120 preference pairs"], metrics=[("loss", "training loss"), ("reward_margin", "reward margin")])
    card = (tmp_path / "README.md").read_text()
    assert card.split("\n---\n", 1)[1].lstrip().startswith("# pref\n") and "chatbuild's preference-tuning (DPO) recipe" in card
    assert "- 120 preference pairs\n" in card
    assert "- final training loss: 0.4 at step 10" in card and "- final reward margin: 0.5 at step 10" in card
    assert "- validation loss: 0.69 at step 0 → 0.5 at step 10" in card
    runs.plot_loss(tmp_path, history)
    assert (tmp_path / "loss.png").read_bytes()[:4] == b"\x89PNG"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["README.md", "loss.png"]
