"""Preference tuning (train.objective dpo / orpo): the losses equal the published formulas, the
reference policy is what it claims to be, short runs on the tiny base learn, resume exactly and leave
a normal run folder that serves."""

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from chatbuild.data.pairs import Pair
from chatbuild.errors import ConfigError, UserError
from chatbuild.losses import dpo_loss, orpo_loss, sequence_logps
from tests.conftest import REPO

# ── the losses, by hand ─────────────────────────────────────────────────────────────────────────
POLICY_C = [-12.0, -30.5, -4.25, -8.0]
POLICY_R = [-14.0, -29.0, -9.75, -8.0]
REF_C = [-13.0, -31.0, -4.0, -7.5]
REF_R = [-13.5, -30.0, -9.0, -9.0]


def log_sigmoid(x: float) -> float:
    return -math.log1p(math.exp(-x))


@pytest.mark.parametrize("beta,eps", [(0.1, 0.0), (0.5, 0.0), (0.1, 0.2), (2.0, 0.45)])
def test_dpo_loss_is_the_papers_formula(beta, eps):
    """Rafailov et al. 2023 eq. 7 (with cDPO's label smoothing), computed with math on floats."""
    losses, rc, rr = dpo_loss(*(torch.tensor(v) for v in (POLICY_C, POLICY_R, REF_C, REF_R)), beta, eps)
    for i in range(len(POLICY_C)):
        delta = (POLICY_C[i] - REF_C[i]) - (POLICY_R[i] - REF_R[i])
        want = -(1 - eps) * log_sigmoid(beta * delta) - eps * log_sigmoid(-beta * delta)
        assert losses[i].item() == pytest.approx(want, rel=1e-6)
        assert rc[i].item() == pytest.approx(beta * (POLICY_C[i] - REF_C[i]))
        assert rr[i].item() == pytest.approx(beta * (POLICY_R[i] - REF_R[i]))
    if eps == 0:  # equal policy and reference: log 2, whatever β
        zero, *_ = dpo_loss(*(torch.tensor(POLICY_C),) * 4, beta)
        assert torch.allclose(zero, torch.full((4,), math.log(2)))


@pytest.mark.parametrize("lam", [0.1, 1.0])
def test_orpo_loss_is_the_papers_formula(lam):
    """Hong et al. 2024 eqs. 6–8: −log p_c + λ·(−logσ(log odds_c − log odds_r)), p = per-token mean."""
    chosen, rejected = [-0.3, -1.2, -2.5, -0.01], [-0.9, -1.1, -0.2, -3.0]
    losses, rc, rr, nll = orpo_loss(torch.tensor(chosen), torch.tensor(rejected), lam)
    for i, (c, r) in enumerate(zip(chosen, rejected)):
        odds = lambda lp: math.exp(lp) / (1 - math.exp(lp))  # noqa: E731
        want = -c + lam * -log_sigmoid(math.log(odds(c)) - math.log(odds(r)))
        assert losses[i].item() == pytest.approx(want, rel=1e-5)
        assert nll[i].item() == pytest.approx(-c) and rc[i].item() == pytest.approx(lam * c)
        assert rr[i].item() == pytest.approx(lam * r)
    assert torch.isfinite(orpo_loss(torch.tensor([-1e-7]), torch.tensor([-1.0]), lam)[0]).all(), "p close to 1"


def random_logits_and_labels(seed=0):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(3, 7, 11, generator=g)
    labels = torch.randint(0, 11, (3, 7), generator=g)
    labels[0, :3] = -100  # a prompt
    labels[1, 5:] = -100  # padding
    labels[2, :] = -100   # nothing to learn
    return logits, labels


def test_sequence_logps_is_a_hand_loop():
    logits, labels = random_logits_and_labels()
    logps, counts = sequence_logps(logits, labels)
    for b in range(3):
        total, n = 0.0, 0
        for t in range(1, 7):  # position t-1 predicts label t
            if labels[b, t] != -100:
                total += torch.log_softmax(logits[b, t - 1].double(), -1)[labels[b, t]].item()
                n += 1
        assert logps[b].item() == pytest.approx(total, abs=1e-5) and counts[b].item() == n
    assert logps[2].item() == 0 and counts[2].item() == 0


def test_orpo_and_log_probs_equal_trls():
    """TRL's own functions on the same tensors (trl is a dev dependency). Its ORPO odds-ratio term is a
    trainer method that reads only `self.beta` and `self.accelerator.device`: it gets a namespace with
    those two instead of a whole trainer (which needs a model and a dataset)."""
    from types import SimpleNamespace

    trl_orpo = pytest.importorskip("trl.experimental.orpo.orpo_trainer")
    logits, labels = random_logits_and_labels(1)
    labels[2, 4] = 3
    ours, counts = sequence_logps(logits, labels)
    theirs = trl_orpo.ORPOTrainer.get_batch_logps(logits, labels, average_log_prob=False)
    torch.testing.assert_close(ours, theirs)
    torch.testing.assert_close(ours / counts, trl_orpo.ORPOTrainer.get_batch_logps(logits, labels, average_log_prob=True))
    chosen, rejected = torch.tensor([-0.3, -1.2, -2.5]), torch.tensor([-0.9, -1.1, -0.2])
    fake_self = SimpleNamespace(beta=0.25, accelerator=SimpleNamespace(device="cpu"))
    trl_ratio, trl_rc, trl_rr, *_ = trl_orpo.ORPOTrainer.odds_ratio_loss(fake_self, chosen, rejected)
    losses, rc, rr, nll = orpo_loss(chosen, rejected, 0.25)
    # TRL returns +λ·logσ(log odds) and subtracts it from the NLL in its loss.
    torch.testing.assert_close(losses, nll - trl_ratio)
    torch.testing.assert_close(rc, trl_rc) and torch.testing.assert_close(rr, trl_rr)


# ── data for the runs ───────────────────────────────────────────────────────────────────────────
NUMBERS = "zero one two three four five six seven eight nine".split()


def spelled(n: int) -> str:
    return " ".join(NUMBERS[int(d)] for d in str(n))


def make_pairs(n: int = 120) -> list[Pair]:
    """Chosen replies spell the number; rejected ones shrug. Each pair is its own tree."""
    return [Pair(prompt=({"role": "user", "content": f"Spell {k}."},), chosen=f"{k} is spelled {spelled(k)}.",
                 rejected=f"No idea, {k} is just a number.", message_tree_id=f"tree-{k}", lang="en")
            for k in range(100, 100 + 2 * n, 2)]


@pytest.fixture(scope="module")
def pairs_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("pairs") / "pairs.jsonl"
    path.write_text("".join(json.dumps(p.to_json()) + "\n" for p in make_pairs()))
    return path


def preference_run(tiny_base, out: Path, pairs_file: Path, objective: str, *overrides: str, resume: bool = False) -> Path:
    from pipelines.finetune import finetune, resolve_config

    cfg = resolve_config("tiny-cpu-dpo", [f"model.base={tiny_base}", f"output_dir={out}", f"name={out.name}",
                                          f"data.train={pairs_file}", f"train.objective={objective}",
                                          "data.val_fraction=0.2", "data.max_length=64", "train.steps=10",
                                          "train.batch_size=8", "train.micro_batch_size=4", "train.eval_every=5",
                                          "train.save_every=0", "train.log_every=5", *overrides])
    return finetune(cfg, resume=resume, progress=False)


def metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]




@pytest.fixture(scope="module")
def dpo_run(tiny_base, pairs_file, tmp_path_factory) -> Path:
    return preference_run(tiny_base, tmp_path_factory.mktemp("runs") / "dpo", pairs_file, "dpo", "train.lr=5e-3")


@pytest.mark.integration
def test_dpo_raises_held_out_reward_accuracy(dpo_run):
    rows = metrics(dpo_run)
    evals = [r for r in rows if "eval_reward_accuracy" in r]
    assert [r["step"] for r in evals] == [0, 5, 10]
    # LoRA's B starts at zero: the policy is the reference, every reward 0, every pair a tie.
    assert evals[0]["eval_reward_margin"] == 0 and evals[0]["eval_reward_accuracy"] == 0
    assert evals[0]["eval_loss"] == pytest.approx(math.log(2), abs=1e-5)
    assert evals[-1]["eval_reward_accuracy"] > 0.5 and evals[-1]["eval_reward_margin"] > 0, evals
    assert evals[-1]["eval_loss"] < math.log(2)
    train = [r for r in rows if "loss" in r]
    assert [r["step"] for r in train] == [5, 10]
    for r in train:
        assert {"reward_accuracy", "reward_margin", "logps_chosen", "logps_rejected", "grad_norm"} <= r.keys()
        assert r["logps_chosen"] < 0 and r["logps_rejected"] < 0


@pytest.mark.integration
def test_the_dpo_run_folder_is_a_normal_run_that_serves(dpo_run):
    from chatbuild.engines import GenerationParams, open_engine
    from chatbuild.runs import RUN_FILES, load_run

    assert sorted(p.name for p in dpo_run.iterdir()) == sorted(RUN_FILES)
    assert sorted(p.name for p in (dpo_run / "adapter").iterdir()) == ["README.md", "adapter_config.json",
                                                                      "adapter_model.safetensors"]
    run = load_run(dpo_run)
    assert run.config.train.objective == "dpo" and run.config.train.beta == 0.1
    card = (dpo_run / "README.md").read_text()
    assert "DPO objective" in card and "β=0.1" in card and "validation preference pairs" in card
    assert "reward accuracy" in card and "the base model with the adapter switched off" in card
    assert (dpo_run / "loss.png").read_bytes()[:4] == b"\x89PNG"
    engine = open_engine([dpo_run])
    try:
        chunks = list(engine.stream([{"role": "user", "content": "Spell 204."}],
                                    GenerationParams(temperature=0, max_new_tokens=4), run.name))
    finally:
        engine.close()
    assert chunks[-1].completion_tokens >= 1 and chunks[-1].finish_reason in ("stop", "length")


@pytest.mark.integration
def test_orpo_lowers_its_loss(tiny_base, pairs_file, tmp_path):
    run = preference_run(tiny_base, tmp_path / "orpo", pairs_file, "orpo", "train.lr=5e-3", "train.beta=0.5")
    evals = [r for r in metrics(run) if "eval_loss" in r]
    assert evals[-1]["eval_loss"] < evals[0]["eval_loss"] - 0.2, evals
    assert {"eval_nll_loss", "eval_reward_accuracy", "eval_logps_chosen"} <= evals[-1].keys()
    assert "ORPO objective" in (run / "README.md").read_text()


@pytest.mark.integration
def test_dpo_resumes_exactly(tiny_base, pairs_file, tmp_path):
    """Stopped after a checkpoint at step 1 and resumed to step 3, the adapter equals a straight
    3-step run's (the reference log-probs are recomputed in the resumed process, from the same batches)."""
    common = ("train.steps=3", "train.save_every=1", "train.eval_every=0", "train.log_every=1", "train.lr=5e-3",
              "train.batch_size=4", "train.micro_batch_size=2")
    straight = preference_run(tiny_base, tmp_path / "straight", pairs_file, "dpo", *common)
    part = tmp_path / "part"
    preference_run(tiny_base, part, pairs_file, "dpo", *common[1:], "train.steps=1")
    preference_run(tiny_base, part, pairs_file, "dpo", *common, resume=True)
    a = load_file(straight / "adapter" / "adapter_model.safetensors")
    b = load_file(part / "adapter" / "adapter_model.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6)
    assert [r["loss"] for r in metrics(straight) if "loss" in r] == pytest.approx(
        [r["loss"] for r in metrics(part) if "loss" in r], abs=1e-6)


# ── the reference policy ────────────────────────────────────────────────────────────────────────
def encoded_pairs(tiny_base, n=5):
    from chatbuild.data.batching import tokenize_pairs
    from chatbuild.modeling import load_tokenizer
    from chatbuild.templates import make_format

    tok = load_tokenizer(str(tiny_base))
    return tokenize_pairs(make_pairs(n), make_format("guanaco", None, tok), tok, 64), tok


def preference_objective(objective="dpo", **train):
    from chatbuild.config import RunConfig
    from pipelines.objectives import make_objective

    cfg = RunConfig()
    cfg.train.objective, cfg.train.micro_batch_size = objective, 2
    for k, v in train.items():
        setattr(cfg.train, k, v)
    return make_objective(cfg)


def chunked_logps(obj, model, examples):
    """Log-probs of both sides in the reference cache's batches (micro_batch_size 2), so that padding
    widths, and with them the float rounding, are the same as the reference's."""
    with torch.no_grad():
        parts = [obj._logps(model, examples[i:i + 2], "cpu")[:2] for i in range(0, len(examples), 2)]
    return torch.cat([c for c, _ in parts]), torch.cat([r for _, r in parts])


def load_nf4(base):
    """The base in NF4 on CPU, as chatbuild loads it (on bitsandbytes' one kernel, see
    `chatbuild.modeling.use_one_4bit_kernel`, so no-grad forwards round as the trained model's do)."""
    from chatbuild.modeling import load_base_model

    return load_base_model(str(base), quant="nf4", double_quant=True, compute_dtype="float32", device="cpu")


@pytest.mark.integration
def test_reference_with_the_adapter_off_is_the_bare_base(tiny_base):
    from chatbuild.data.batching import PaddedCollator
    from chatbuild.modeling import attach_lora

    examples, tok = encoded_pairs(tiny_base)
    obj = preference_objective()
    obj.train, obj.collate = examples, PaddedCollator(tok.pad_token_id)
    torch.manual_seed(0)
    model = attach_lora(load_nf4(tiny_base), 4, 8, 0.0)
    for name, p in model.named_parameters():
        if "lora_B" in name:
            p.data.normal_(0, 0.5)  # a trained adapter: the policy is no longer the base
    model.train()
    obj.prepare(model)
    ref_c, ref_r = obj._reference_logps(model, "train", list(range(5)), "cpu")
    bare = load_nf4(tiny_base).eval()
    want_c, want_r = chunked_logps(obj, bare, examples)
    policy_c, _ = chunked_logps(obj, model.eval(), examples)
    torch.testing.assert_close(ref_c, want_c, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(ref_r, want_r, rtol=1e-5, atol=1e-4)
    assert (policy_c - want_c).abs().max() > 1e-2, "the adapter should change the policy"
    assert all(p.requires_grad for n, p in model.named_parameters() if "lora_" in n), "still trainable afterwards"


@pytest.mark.integration
def test_reference_from_init_adapter_is_the_sft_run(tiny_base, tiny_run, tmp_path):
    """Loaded twice into one PeftModel, the starting run's adapter is the reference (equal to the SFT run
    served by plain PEFT) while "default" trains away from it; only "default" is saved."""
    from peft import PeftModel

    from chatbuild.data.batching import PaddedCollator
    from chatbuild.modeling import attach_lora, start_from_adapter
    from chatbuild.runs import load_run, save_adapter

    run = load_run(tiny_run)
    examples, tok = encoded_pairs(tiny_base)
    obj = preference_objective()
    obj.train, obj.collate = examples, PaddedCollator(tok.pad_token_id)
    lora = run.config.lora
    model = attach_lora(load_nf4(tiny_base), lora.r, lora.alpha, lora.dropout, lora.targets)
    start_from_adapter(model, run.adapter_dir, keep_reference=True)
    obj.prepare(model)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".default." in n for n in trainable)
    sft = PeftModel.from_pretrained(load_nf4(tiny_base), run.adapter_dir).eval()
    want_c, want_r = chunked_logps(obj, sft, examples)
    start_c, _ = chunked_logps(obj, model.eval(), examples)
    torch.testing.assert_close(start_c, want_c, rtol=1e-5, atol=1e-4)  # training starts from the SFT run
    for name, p in model.named_parameters():
        if ".default." in name and "lora_B" in name:
            p.data.add_(0.3)  # as if trained
    model.train()
    ref_c, ref_r = obj._reference_logps(model, "train", list(range(5)), "cpu")
    torch.testing.assert_close(ref_c, want_c, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(ref_r, want_r, rtol=1e-5, atol=1e-4)
    assert {n for n, p in model.named_parameters() if p.requires_grad} == trainable
    save_adapter(model, tmp_path / "adapter")
    assert sorted(p.name for p in (tmp_path / "adapter").iterdir()) == ["README.md", "adapter_config.json",
                                                                      "adapter_model.safetensors"]
    saved = load_file(tmp_path / "adapter" / "adapter_model.safetensors")
    moved = next(k for k in saved if "lora_B" in k)
    assert not torch.equal(saved[moved], load_file(run.adapter_dir / "adapter_model.safetensors")[moved])


@pytest.mark.integration
def test_dpo_from_init_adapter_starts_at_margin_zero(tiny_base, tiny_run, pairs_file, tmp_path):
    from chatbuild.runs import load_run

    run_dir = preference_run(tiny_base, tmp_path / "from-sft", pairs_file, "dpo", f"train.init_adapter={tiny_run}",
                             "train.steps=2", "train.eval_every=0", "train.eval_batches=2", "lora.r=4")
    evals = [r for r in metrics(run_dir) if "eval_reward_margin" in r]
    assert evals[0]["step"] == 0 and evals[0]["eval_reward_margin"] == 0 and evals[0]["eval_loss"] == pytest.approx(math.log(2), abs=1e-5)
    cfg = load_run(run_dir).config
    assert cfg.lora == load_run(tiny_run).config.lora, "the starting run's LoRA settings, not lora.r=4"
    assert "training started from the adapter" in (run_dir / "README.md").read_text()


# ── configuration ───────────────────────────────────────────────────────────────────────────────
def test_the_objective_registry_is_the_configs():
    from chatbuild.config import OBJECTIVES
    from pipelines.objectives import OBJECTIVES as IMPLEMENTED

    assert list(IMPLEMENTED) == list(OBJECTIVES) == ["sft", "dpo", "orpo"]


@pytest.mark.parametrize("override,key,problem", [
    ("train.objective=ppo", "train.objective", "not one of sft, dpo, orpo"),
    ("train.beta=0", "train.beta", "must be > 0"),
    ("train.label_smoothing=0.5", "train.label_smoothing", "must be in [0, 0.5)"),
    ("train.label_smoothing=-0.1", "train.label_smoothing", "must be in [0, 0.5)"),
    ("data.batching=packed", "data.batching", "one padded batch"),
    ("train.chunked_loss=true", "train.chunked_loss", "an SFT setting"),
])
def test_bad_values_name_the_key(override, key, problem):
    from pipelines.finetune import resolve_config

    with pytest.raises(ConfigError) as e:
        resolve_config("tiny-cpu-dpo", [override])
    assert e.value.key == key and problem in e.value.problem


def test_label_smoothing_is_dpo_only():
    from pipelines.finetune import resolve_config

    with pytest.raises(ConfigError, match="train.label_smoothing: is a DPO setting; train.objective is orpo"):
        resolve_config("tiny-cpu-dpo", ["train.objective=orpo", "train.label_smoothing=0.1"])


def test_init_adapter_must_be_a_finished_run_on_the_same_base(tiny_base, tiny_run, tmp_path):
    from pipelines.finetune import resolve_config
    from pipelines.objectives import resolve_init_adapter

    def check(*overrides):
        cfg = resolve_config("tiny-cpu-dpo", [f"model.base={tiny_base}", f"output_dir={tmp_path / 'x'}", *overrides])
        return cfg, resolve_init_adapter(cfg)

    with pytest.raises(ConfigError, match="train.init_adapter: .*not a finished run folder"):
        check(f"train.init_adapter={tmp_path}")
    with pytest.raises(ConfigError, match="train.init_adapter: .*no such run folder"):
        check(f"train.init_adapter={tmp_path / 'nowhere'}")
    with pytest.raises(ConfigError, match="train.init_adapter: .* was trained on .*this run's base"):
        check(f"train.init_adapter={tiny_run}", "model.quant=int8")
    cfg, run = check(f"train.init_adapter={tiny_run}", "lora.r=4")
    assert run.path == tiny_run.resolve() and cfg.lora.r == run.config.lora.r == 16


def test_cli_reports_a_bad_objective_value_in_one_line():
    out = subprocess.run([sys.executable, "-m", "chatbuild.cli", "finetune", "tiny-cpu-dpo", "train.beta=-1"],
                         cwd=REPO, capture_output=True, text=True)
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert out.stderr.strip().splitlines()[-1].endswith("train.beta: must be > 0, got -1.0")


def test_finetune_help_names_the_objectives():
    out = subprocess.run([sys.executable, "-m", "chatbuild.cli", "finetune", "--help"], cwd=REPO,
                         capture_output=True, text=True)
    assert out.returncode == 0
    assert all(name in out.stdout for name in ("sft:", "dpo:", "orpo:")), out.stdout


def test_a_pairs_file_without_pairs_is_one_line(tiny_base, tmp_path):
    from pipelines.finetune import finetune, resolve_config

    empty = tmp_path / "none.jsonl"
    empty.write_text("")
    cfg = resolve_config("tiny-cpu-dpo", [f"model.base={tiny_base}", f"output_dir={tmp_path / 'r'}",
                                          f"data.train={empty}"])
    with pytest.raises(UserError) as e:  # ours ("no training pairs left") or the pairs loader's own
        finetune(cfg, progress=False)
    assert empty.name in str(e.value) and len(str(e.value).splitlines()) == 1
