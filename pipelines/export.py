"""Export a run for llama.cpp and Ollama: `chatbuild export`.

    chatbuild export runs/my-run --gguf f16                     # -> runs/my-run-gguf-f16/
    chatbuild export runs/my-run --gguf q8_0 --out exports/my-run
    cd exports/my-run && ollama create my-run -f Modelfile      # then: ollama run my-run

The output folder holds `<run>.<type>.gguf`, an Ollama `Modelfile` beside it and
`chatbuild_export.json` (what it was made from). The stages, in order:

    run folder ─▶ 16-bit merge (pipelines/merge.py, the base reloaded unquantized + the adapter)
    ─▶ GGUF: llama metadata, tensors under llama.cpp's names (q/k rows permuted the way llama.cpp
       expects), F16 or Q8_0, the run's tokenizer and chat template ─▶ Modelfile from the chat format

llama.cpp's own converter (convert_hf_to_gguf.py) is not published on the package registries (the
`gguf` wheel leaves it out, llama-cpp-python ships no binary wheel for this machine), so the llama
conversion is written here from the `gguf` package's building blocks: `GGUFWriter`, the tensor name
map (`get_tensor_name_map`), `SpecialVocab` (merges, special token ids) and `gguf.quants` (Q8_0).
What it supports: llama-architecture bases (SmolLM2, the tiny base, Llama 2/3-shaped models without
rope scaling), with a byte-level BPE tokenizer (GGUF tokenizer model "gpt2") or a SentencePiece-style
BPE with byte fallback ("llama"); anything else is refused in one line before any work.
"""

import argparse
import json
import shutil
import sys
import tempfile
from pathlib import Path

from chatbuild.errors import UserError
from chatbuild.runs import ADAPTER_FILES, Run, load_run

GGUF_TYPES = ("f16", "q8_0")
ARCHITECTURES = ("llama",)  # transformers model_type values this exporter writes
EMBEDDINGS = ("embed_tokens", "lm_head")
Q8_0_BLOCK = 32  # Q8_0 packs 32 weights per block; rows of another length stay F16 (as llama.cpp does)


def default_out(run_path: str | Path, gguf_type: str) -> Path:
    return Path(f"{Path(run_path).resolve()}-gguf-{gguf_type}")


def export_run(run_path: str | Path, gguf_type: str, out: str | Path | None = None, dtype: str = "float16",
               overwrite: bool = False, log=print) -> Path:
    """Write the run's merged model as a GGUF file and an Ollama Modelfile into `out`; returns the
    GGUF file's path. Everything that can be refused is checked before the merge."""
    from pipelines.merge import merge_run

    if gguf_type not in GGUF_TYPES:
        raise UserError(f'--gguf "{gguf_type}" is not one of {", ".join(GGUF_TYPES)}')
    run = load_run(run_path)
    out = Path(out) if out is not None else default_out(run.path, gguf_type)
    _check_out(out, overwrite)

    # ── checks (config and tokenizer files only) ──
    from chatbuild.bases import resolve_base
    from chatbuild.modeling import check_causal_lm, load_tokenizer
    from chatbuild.templates import as_named_format, ollama_template

    base = resolve_base(run.base)
    config = check_causal_lm(base, run.config.model.revision, run.config.model.trust_remote_code)
    check_architecture(run, config)
    tokenizer = load_tokenizer(str(run.tokenizer_dir))
    check_vocabulary(run, config, tokenizer)
    kind = tokenizer_kind(run.tokenizer_dir)
    fmt = as_named_format(run.chat_format, tokenizer)  # the base's own template, when it is ChatML say
    template, starts_with_bos = ollama_template(fmt, tokenizer)
    name = f"{run.name}.{gguf_type}.gguf"
    text = modelfile(name, template, fmt)

    # ── merge, convert, describe ──
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        log(f"export: merging {run.path.name}'s adapter into its base in {dtype}")
        merged = merge_run(run.path, tmp / "merged", dtype=dtype, log=lambda _: None)  # a scratch folder
        write_gguf(merged, tmp / name, gguf_type, run, tokenizer, kind, add_bos=starts_with_bos, log=log)
        shutil.rmtree(merged)
        (tmp / "Modelfile").write_text(text)
        record = {"run": str(run.path), "adapter_sha256": _adapter_digest(run), "gguf": gguf_type,
                  "merge_dtype": dtype, "file": name, "tokenizer_model": kind, "writer": "gguf " + _gguf_version()}
        (tmp / "chatbuild_export.json").write_text(json.dumps(record, indent=2) + "\n")
        if out.exists():  # --overwrite, checked above
            shutil.rmtree(out) if out.is_dir() else out.unlink()
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log(f"export: wrote {out / name} and {out / 'Modelfile'}")
    return out / name


def _check_out(out: Path, overwrite: bool) -> None:
    """Never replace something silently: an existing file, or a folder with anything in it, needs
    --overwrite."""
    if out.is_file() or (out.is_dir() and any(out.iterdir())):
        if not overwrite:
            what = "a file" if out.is_file() else "a folder that is not empty"
            raise UserError(f"--out {out} is {what}; choose another --out or pass --overwrite to replace it")


def _adapter_digest(run: Run) -> str:
    import hashlib

    return hashlib.sha256((run.adapter_dir / ADAPTER_FILES[1]).read_bytes()).hexdigest()


def _gguf_version() -> str:
    import importlib.metadata

    return importlib.metadata.version("gguf")


# ── what can be exported ──────────────────────────────────────────────────────────────────────
def check_architecture(run: Run, config) -> None:
    """The base must be a llama model without the features this writer leaves out."""
    if config.model_type not in ARCHITECTURES:
        raise UserError(f'{run.path}: the base "{run.base}" is a "{config.model_type}" model; GGUF export supports '
                        f"{', '.join(ARCHITECTURES)}")
    rope = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    if rope.get("rope_type", "default") != "default":
        raise UserError(f'{run.path}: the base uses rope scaling "{rope["rope_type"]}", which GGUF export does not '
                        "write yet (it writes plain RoPE)")
    if getattr(config, "attention_bias", False) or getattr(config, "mlp_bias", False):
        raise UserError(f"{run.path}: the base has bias terms in its attention or MLP layers, which GGUF export does "
                        "not write")


def check_vocabulary(run: Run, config, tokenizer) -> None:
    """Refuse a run whose tokenizer grew past the base's vocabulary. Fine-tuning then grows the
    embeddings and saves them whole with the adapter (modules_to_save, pipelines/finetune.py); the 16-bit
    merge reloads the base at its own size, so those rows have nowhere to go."""
    from safetensors import safe_open

    rows = [len(tokenizer)]
    adapter_config = json.loads((run.adapter_dir / ADAPTER_FILES[0]).read_text())
    saved = [m for m in adapter_config.get("modules_to_save") or [] if m in EMBEDDINGS]
    with safe_open(run.adapter_dir / ADAPTER_FILES[1], "np") as f:
        for key in f.keys():
            if any(f".{m}." in key for m in EMBEDDINGS) and "lora_" not in key:
                rows.append(f.get_slice(key).get_shape()[0])
    added = max(rows) - config.vocab_size
    if added > 0 or saved:
        grew = f"added {added} tokens to" if added > 0 else "trained whole embedding matrices of"
        raise UserError(f"{run.path}: the run {grew} the base's vocabulary ({config.vocab_size} tokens; its adapter "
                        "carries embed_tokens/lm_head as modules_to_save), which the 16-bit merge cannot put back "
                        "into the base; export supports runs on the base's own vocabulary")


def tokenizer_kind(tokenizer_dir: Path) -> str:
    """The GGUF tokenizer model ("gpt2" or "llama") the run's tokenizer.json can be written as."""
    path = Path(tokenizer_dir) / "tokenizer.json"
    try:
        data = json.loads(path.read_text())
        model, pre = data["model"], data.get("pre_tokenizer") or {}
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise UserError(f"{path}: GGUF export needs the fast tokenizer's tokenizer.json ({e})") from None
    if model.get("type") == "BPE" and not model.get("byte_fallback") and pre.get("type") == "ByteLevel":
        if not pre.get("use_regex", True) or pre.get("add_prefix_space"):
            raise UserError(f"{path}: a byte-level BPE whose pre-tokenizer ({json.dumps(pre)}) is not GPT-2's; GGUF "
                            "export writes the GPT-2 split only")
        return "gpt2"
    if model.get("type") == "BPE" and model.get("byte_fallback") and pre.get("type") == "Metaspace":
        return "llama"
    described = f'{model.get("type")} model, {pre.get("type") or "no"} pre-tokenizer'
    raise UserError(f"{path}: GGUF export writes byte-level BPE (GPT-2 style) and SentencePiece-style BPE with byte "
                    f"fallback tokenizers; this one is a {described}")


# ── the GGUF file ─────────────────────────────────────────────────────────────────────────────
def write_gguf(model_dir: Path, path: Path, gguf_type: str, run: Run, tokenizer, kind: str, add_bos: bool,
               log=print) -> Path:
    """The merged llama model in `model_dir` as one GGUF file: metadata, tokenizer, tensors."""
    import gguf
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(model_dir)
    writer = gguf.GGUFWriter(str(path), "llama")
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    rope = getattr(config, "rope_parameters", None) or {}
    writer.add_name(run.name)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    if head_dim != config.hidden_size // config.num_attention_heads:
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
    writer.add_rope_dimension_count(head_dim)
    writer.add_rope_freq_base(float(rope.get("rope_theta", getattr(config, "rope_theta", 10000.0))))
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_vocab_size(config.vocab_size)
    writer.add_file_type(gguf.LlamaFileType.MOSTLY_F16 if gguf_type == "f16" else gguf.LlamaFileType.MOSTLY_Q8_0)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)

    add_tokenizer(writer, run.tokenizer_dir, tokenizer, kind, config.vocab_size, add_bos)
    counts = add_tensors(writer, model_dir, config, gguf_type)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    log(f"export: {path.name}: {', '.join(f'{n} {t}' for t, n in sorted(counts.items()))} tensors")
    return path


def add_tokenizer(writer, tokenizer_dir: Path, tokenizer, kind: str, n_vocab: int, add_bos: bool) -> None:
    """Tokens (one per embedding row), their types and (for "llama") scores, merges, special ids,
    whether llama.cpp adds BOS, and the chat template the run renders with.

    Token types are llama.cpp's: special added tokens are CONTROL, other added tokens USER_DEFINED,
    <0xNN> byte pieces BYTE, the unknown token UNKNOWN. SentencePiece-style BPE is applied by llama.cpp
    by merging the best-scored pair first, so a token's score is minus the rank of the merge that
    makes it (what SentencePiece stores for its BPE pieces)."""
    import re

    import gguf

    vocab = tokenizer.get_vocab()
    if max(vocab.values()) >= n_vocab:
        raise UserError(f"{tokenizer_dir}: the tokenizer has ids up to {max(vocab.values())}, the model "
                        f"{n_vocab} embedding rows")
    by_id = {i: t for t, i in vocab.items()}
    added = tokenizer.added_tokens_decoder  # id -> AddedToken
    special = gguf.SpecialVocab(tokenizer_dir, load_merges=True, n_vocab=n_vocab)
    merges = special.merges
    made_by = {"".join(m.split(" ")): rank for rank, m in enumerate(merges)}
    tokens, types, scores = [], [], []
    for i in range(n_vocab):
        text = by_id.get(i)
        if text is None:  # an embedding row no token uses (a padded vocabulary)
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
        elif i in added:
            tokens.append(text)
            types.append(gguf.TokenType.CONTROL if added[i].special else gguf.TokenType.USER_DEFINED)
        elif kind == "llama" and re.fullmatch(r"<0x[0-9A-Fa-f]{2}>", text):
            tokens.append(text)
            types.append(gguf.TokenType.BYTE)
        else:
            tokens.append(text)
            types.append(gguf.TokenType.NORMAL)
        scores.append(-float(made_by[tokens[-1]]) if tokens[-1] in made_by else 0.0)
    if kind == "llama" and tokenizer.unk_token_id is not None:
        types[tokenizer.unk_token_id] = gguf.TokenType.UNKNOWN

    writer.add_tokenizer_model(kind)
    writer.add_tokenizer_pre("gpt-2" if kind == "gpt2" else "default")
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    if kind == "llama":
        writer.add_token_scores(scores)
    # A SentencePiece-style tokenizer puts "▁" before the first word of its input, but chatbuild's
    # prompts begin with a special token (BOS or a turn marker), after which it never did: llama.cpp
    # must not add one either (it would, before the text that follows the BOS it adds).
    writer.add_add_space_prefix(False)
    special.add_special_token = {"bos": add_bos, "eos": False}
    special.chat_template = tokenizer.chat_template
    special.add_to_gguf(writer, quiet=True)


def permute_for_llama_cpp(weight, n_head: int):
    """q_proj/k_proj rows reordered from transformers' rotary layout (the two halves of each head)
    to llama.cpp's (interleaved pairs). transformers' GGUF loader undoes exactly this
    (`LlamaTensorProcessor._reverse_permute_weights`); the reshape follows llama.cpp's
    convert_hf_to_gguf.py `LlamaModel.permute`."""
    rows = weight.shape[0]
    return weight.reshape(n_head, 2, rows // n_head // 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def add_tensors(writer, model_dir: Path, config, gguf_type: str) -> dict[str, int]:
    """Every weight of the merged model under its GGUF name: matrices as F16 or Q8_0, norms F32.
    A tied lm_head is left out (llama.cpp then uses token_embd). Returns {GGML type: count}."""
    import gguf
    import numpy as np
    from safetensors import safe_open

    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, config.num_hidden_layers)
    counts: dict[str, int] = {}
    files = sorted(Path(model_dir).glob("*.safetensors"))
    for file in files:
        with safe_open(file, "pt") as f:
            for key in f.keys():
                if key == "lm_head.weight" and config.tie_word_embeddings:
                    continue
                name = names.get_name(key, try_suffixes=(".weight", ".bias"))
                if name is None:
                    raise UserError(f"{file}: tensor {key} has no GGUF llama name")
                data = f.get_tensor(key).float().numpy()
                if key.endswith("q_proj.weight"):
                    data = permute_for_llama_cpp(data, config.num_attention_heads)
                elif key.endswith("k_proj.weight"):
                    data = permute_for_llama_cpp(data, config.num_key_value_heads)
                if data.ndim == 1:
                    kind = gguf.GGMLQuantizationType.F32
                elif gguf_type == "q8_0" and data.shape[-1] % Q8_0_BLOCK == 0:
                    kind = gguf.GGMLQuantizationType.Q8_0
                else:
                    kind = gguf.GGMLQuantizationType.F16
                packed = gguf.quants.quantize(np.ascontiguousarray(data), kind)
                writer.add_tensor(name, packed, raw_dtype=kind if kind == gguf.GGMLQuantizationType.Q8_0 else None)
                counts[kind.name] = counts.get(kind.name, 0) + 1
    return counts


# ── the Ollama Modelfile ──────────────────────────────────────────────────────────────────────
def modelfile(gguf_name: str, template: str, fmt) -> str:
    """FROM the GGUF beside it, the chat format as TEMPLATE, its stop strings as PARAMETER stop lines
    and its default system prompt as SYSTEM. Values go between Ollama's triple quotes (strings)."""
    for what, text in (("chat template", template), ("system prompt", fmt.system_prompt or "")):
        if '"""' in text:
            raise UserError(f'the run\'s {what} contains """, which ends a Modelfile value early; remove it to export')
    lines = [f"FROM ./{gguf_name}", f'TEMPLATE """{template}"""']
    lines += [f"PARAMETER stop {json.dumps(s, ensure_ascii=False)}" for s in fmt.stop]
    if fmt.system_prompt:
        lines.append(f'SYSTEM """{fmt.system_prompt}"""')
    return "\n".join(lines) + "\n"


# ── command line ──────────────────────────────────────────────────────────────────────────────
def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("run", help="the run folder to export")
    p.add_argument("--gguf", required=True, metavar="TYPE", help=f"GGUF weight type: {' or '.join(GGUF_TYPES)}")
    p.add_argument("--out", help="output folder (default: RUN-gguf-TYPE beside the run)")
    p.add_argument("--dtype", default="float16", choices=("float16", "float32"),
                   help="dtype the adapter is merged in before conversion (default float16)")
    p.add_argument("--overwrite", action="store_true", help="replace what is already in --out")


def run(args: argparse.Namespace) -> int:
    export_run(args.run, args.gguf, args.out, args.dtype, args.overwrite)
    return 0


if __name__ == "__main__":
    from chatbuild.cli import main

    raise SystemExit(main(["export", *sys.argv[1:]]))
