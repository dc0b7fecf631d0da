"""Configuration: defaults are the paper's recipe; presets hold differences; overrides come last;
mistakes are named before any heavy work."""

import pytest
import yaml

from chatbuild.config import RunConfig, load_config, read_config, save_config
from chatbuild.errors import ConfigError, UserError
from chatbuild.presets import DIR as PRESETS
from pipelines.finetune import resolve_config


def test_defaults_reproduce_the_guanaco_recipe():
    c = RunConfig()
    assert (c.model.quant, c.model.double_quant, c.model.compute_dtype) == ("nf4", True, "auto")
    assert (c.lora.r, c.lora.alpha, c.lora.targets) == (64, 16, "all-linear")
    assert (c.train.optimizer, c.train.lr, c.train.schedule, c.train.max_grad_norm) == ("paged_adamw_32bit", 2e-4, "constant", 0.3)
    assert c.train.batch_size == 16 and c.model.gradient_checkpointing


def test_layers_preset_then_overrides(tmp_path):
    preset = tmp_path / "p.yaml"
    preset.write_text("name: x\nlora:\n  r: 8\ntrain:\n  lr: 1.0e-3\n")
    c = load_config(preset, ["lora.r=4", "data.lang=en,de", "train.lr=5e-4"])
    assert c.name == "x" and c.lora.r == 4 and c.train.lr == 5e-4 and c.data.lang == ["en", "de"]
    assert c.lora.alpha == 16  # untouched default


@pytest.mark.parametrize("override, message", [
    ("lora.alph=8", "did you mean lora.alpha"),
    ("trian.lr=1", "did you mean train"),
    ("train.lr=fast", "train.lr must be float"),
    ("train.steps=1.5", "train.steps must be int"),
    ("model.quant=nf5", 'model.quant: "nf5" is not one of'),
    ("lora.dropout=1.5", "lora.dropout"),
    ("train.steps=0", "train.steps: must be > 0"),
    ("justaword", "must look like key=value"),
    ("train.optimizer=adam", "train.optimizer"),
])
def test_mistakes_are_named(override, message):
    with pytest.raises(UserError, match=message.replace("(", r"\(")):
        resolve_config(None, [override])


@pytest.mark.parametrize("override, key, problem, message", [
    ("train.steps=0", "train.steps", "must be > 0, got 0", "train.steps: must be > 0, got 0"),
    ("model.quant=nf5", "model.quant", '"nf5" is not one of nf4, fp4, int8, none', None),
    ("lora.r=x", "lora.r", "must be int, got 'x'", "command line: lora.r must be int, got 'x'"),
    ("train.micro_batch_size=3", "train.batch_size", "must be a multiple of train.micro_batch_size (3), got 16", None),
    ("data.chat_format=vicuna", "data.chat_format", '"vicuna" is not one of guanaco, tokenizer, chatml, llama3 or a '
                                                    ".jinja file", None),
])
def test_config_errors_carry_their_key(override, key, problem, message):
    """A form shows `problem` beside the field of `key`; the message reads as it always did."""
    with pytest.raises(ConfigError) as e:
        load_config(None, [override])
    assert (e.value.key, e.value.problem) == (key, problem)
    assert str(e.value) == (message or f"{key}: {problem}")


def test_bad_preset_files(tmp_path):
    with pytest.raises(UserError, match="neither a file nor a bundled preset"):
        resolve_config("no-such-preset", [])
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [1, 2\n")
    with pytest.raises(UserError, match="not valid YAML"):
        load_config(bad)
    bad.write_text("- a list\n")
    with pytest.raises(UserError, match="mapping"):
        load_config(bad)


def test_bundled_presets_resolve_and_hold_only_differences():
    names = sorted(p.stem for p in PRESETS.glob("*.yaml"))
    assert names == ["guanaco-65b", "guanaco-7b", "guanaco-7b-dpo", "smollm2-persona", "tiny-cpu", "tiny-cpu-dpo"]
    persona = yaml.safe_load((PRESETS / "smollm2-persona.yaml").read_text())  # resolving it would import SmolLM2
    assert persona["model"]["base"] == "smollm2" and persona["data"]["train"] == "sample:persona"
    assert persona["data"]["chat_format"] == "tokenizer"
    g65 = resolve_config("guanaco-65b", [])
    assert g65.train.lr == 1e-4 and g65.lora.dropout == 0.05 and g65.lora.r == 64
    g7 = resolve_config("guanaco-7b", [])
    assert (g7.train.steps, g7.data.max_length, g7.lora.dropout, g7.train.lr) == (1875, 512, 0.1, 2e-4)
    tiny = resolve_config("tiny-cpu", [])
    assert tiny.model.base == "tiny" and tiny.data.train.endswith("oasst1_sample.jsonl")
    tiny_dpo = resolve_config("tiny-cpu-dpo", [])
    assert (tiny_dpo.train.objective, tiny_dpo.train.beta, tiny_dpo.train.init_adapter) == ("dpo", 0.1, None)
    assert tiny_dpo.data.train.endswith("oasst1_sample.jsonl") and tiny_dpo.train.steps <= 60
    g7_dpo = resolve_config("guanaco-7b-dpo", [])
    assert (g7_dpo.train.objective, g7_dpo.model.base, g7_dpo.train.init_adapter) == ("dpo", "huggyllama/llama-7b", None)
    for p in PRESETS.glob("*.yaml"):
        raw = yaml.safe_load(p.read_text())
        defaults = RunConfig()
        for section, values in raw.items():
            if isinstance(values, dict):
                for k, v in values.items():
                    assert getattr(getattr(defaults, section), k) != v, f"{p.name}: {section}.{k} repeats the default"


def test_saved_config_reads_back_identically(tmp_path):
    c = load_config(None, ["lora.r=8", "data.lang=en", "model.base=/some/path"])
    save_config(c, tmp_path / "config.yaml")
    assert read_config(tmp_path / "config.yaml") == c
