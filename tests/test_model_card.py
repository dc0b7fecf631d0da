"""The run's README.md is a Hub model card: huggingface_hub's own ModelCard parser reads its metadata
(base_model and license only where known), and the plain-PEFT snippet in it runs as written."""

import contextlib
import io
import json
import re
from pathlib import Path

import pytest
import torch
from huggingface_hub import ModelCard

from chatbuild import runs
from chatbuild.bases import PROVENANCE, SHORT_NAMES
from chatbuild.config import DataSettings, ModelSettings, RunConfig, TrainSettings


def python_block(card_text: str) -> str:
    """The code of the card's load section (between chatbuild's markers)."""
    section = card_text.split(runs.LOAD_START, 1)[1].split(runs.LOAD_END, 1)[0]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


# ── metadata ────────────────────────────────────────────────────────────────────────────────────
def test_a_hub_base_and_hub_dataset_are_named_and_an_unknown_license_is_left_out():
    cfg = RunConfig(model=ModelSettings(base="huggyllama/llama-7b"), data=DataSettings(train="OpenAssistant/oasst1"),
                    train=TrainSettings(objective="dpo"))
    meta = runs.card_metadata(cfg)
    assert meta == {"base_model": "huggyllama/llama-7b", "base_model_relation": "adapter", "library_name": "peft",
                    "pipeline_tag": "text-generation", "tags": ["chatbuild", "qlora", "lora", "dpo"],
                    "datasets": ["OpenAssistant/oasst1"]}


def test_an_imported_smollm2_folder_is_named_by_its_hub_id_with_its_license(tmp_path):
    """The folder is what `chatbuild.bases` writes for the packaged GGUF (its provenance file with the
    package's checksum); the weights themselves play no part in the metadata."""
    spec = SHORT_NAMES["smollm2"]
    folder = tmp_path / spec.folder
    folder.mkdir()
    (folder / PROVENANCE).write_text(json.dumps({"sha256": spec.sha256}))
    meta = runs.card_metadata(RunConfig(model=ModelSettings(base=str(folder), quant="none")), merged=True)
    assert meta["base_model"] == "HuggingFaceTB/SmolLM2-135M-Instruct" and meta["license"] == "apache-2.0"
    assert meta["library_name"] == "transformers" and meta["base_model_relation"] == "finetune"
    assert meta["tags"] == ["chatbuild", "lora", "sft", "merged"]


def test_a_local_base_of_unknown_origin_gets_no_base_model_and_no_license(tmp_path):
    (tmp_path / PROVENANCE).write_text(json.dumps({"sha256": "0" * 64}))  # some other GGUF
    for base in (str(tmp_path), str(tmp_path / "missing.gguf")):
        meta = runs.card_metadata(RunConfig(model=ModelSettings(base=base)))
        assert "base_model" not in meta and "license" not in meta and "datasets" not in meta


# ── a real run's card ───────────────────────────────────────────────────────────────────────────
@pytest.mark.integration
def test_the_card_of_a_run_parses_as_a_hub_model_card(tiny_run):
    card = ModelCard.load(tiny_run / "README.md")
    data = card.data.to_dict()
    assert data["library_name"] == "peft" and data["pipeline_tag"] == "text-generation"
    assert data["tags"] == ["chatbuild", "qlora", "lora", "sft"]
    assert "base_model" not in data and "license" not in data  # the tiny base is a local folder
    assert card.text.lstrip().startswith("# tiny-a\n") and "## Load it with transformers and PEFT" in card.text


@pytest.mark.integration
def test_the_cards_peft_snippet_runs_and_loads_the_trained_adapter(tiny_run):
    """Executes the card's code as written, then checks the model it built is the trained one: its
    logits differ from the base's (the adapter does something) and equal those of the adapter
    loaded here by hand."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    code = python_block((tiny_run / "README.md").read_text())
    scope: dict = {}
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        exec(compile(code, "README.md", "exec"), scope)  # noqa: S102 - the card's own snippet is the thing tested
    assert isinstance(scope["model"], PeftModel) and isinstance(scope["reply"], str)
    assert printed.getvalue() == scope["reply"] + "\n"
    run = runs.load_run(tiny_run)
    assert "### Human:" in code and run.chat_format.stop[0] not in scope["reply"]  # stops at the next turn
    ids = scope["inputs"]["input_ids"]
    with torch.no_grad():
        tuned = scope["model"](input_ids=ids).logits
        base = AutoModelForCausalLM.from_pretrained(run.base)
        plain = base(input_ids=ids).logits
        again = PeftModel.from_pretrained(base, run.adapter_dir)(input_ids=ids).logits
    assert not torch.allclose(tuned, plain, atol=1e-4)
    torch.testing.assert_close(tuned, again)


@pytest.mark.integration
def test_the_hub_card_loads_from_the_repository_not_from_this_machine(tiny_run):
    run = runs.load_run(tiny_run)
    text = runs.hub_card(run, "someone/tiny-a")
    card = ModelCard(text)
    assert card.data.library_name == "peft"
    code = python_block(text)
    assert "PeftModel.from_pretrained(base, 'someone/tiny-a')" in code
    assert "AutoTokenizer.from_pretrained('someone/tiny-a')" in code and str(tiny_run) not in text
    assert runs.USE_HEADING not in text and "## Results" in text
    # no path of this machine anywhere in the card: the base and the data are named by their names
    local = [v for v in (run.config.model.base, str(run.config.data.train)) if Path(v).is_absolute()]
    assert local and not [v for v in local if v in text], local
    assert f"`{Path(run.config.model.base).name}`" in text or f"`{runs.hub_metadata_base(run.config)}`" in text
    merged = runs.hub_card(run, "someone/tiny-a-merged", merged=True)
    assert ModelCard(merged).data.library_name == "transformers" and "PeftModel" not in python_block(merged)
    assert text.count(runs.LOAD_START) == merged.count(runs.LOAD_START) == 1
