"""Build the embedded default base model, fully offline: `chatbuild tiny-base OUT_DIR`.

Model hubs are out of reach on our development and CI machines, so every stage of chatbuild runs end
to end on a base model this program makes from the bundled sample conversations:

    sample conversations ─▶ SentencePiece BPE tokenizer (byte fallback) ─▶ transformers tokenizer
    with the Guanaco chat template ─▶ small random-init LlamaForCausalLM ─▶ a bounded number of CPU
    pretraining steps on the sample text ─▶ HF folder (config.json, model.safetensors, tokenizer files)

The result loads like any hub model (`AutoModelForCausalLM.from_pretrained(OUT_DIR)`, also in 4-bit
through a `BitsAndBytesConfig`) and is deterministic for a fixed seed on a given machine.

    chatbuild tiny-base .chatbuild/tiny-base                 # defaults: ~3M parameters, 2048 tokens
    chatbuild tiny-base OUT --pretrain-steps 0 --force       # random weights only, fastest
    python -m pipelines.tiny_base OUT
"""

import argparse
import json
import math
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from chatbuild.errors import UserError
from chatbuild.templates import GUANACO_ASSISTANT, GUANACO_HUMAN, guanaco_jinja_template

SAMPLE_DIR = Path(__file__).resolve().parent.parent / "chatbuild" / "data" / "sample"
SAMPLE_CONVERSATIONS = SAMPLE_DIR / "oasst1_sample.jsonl"


@dataclass
class TinyBaseSpec:
    """Everything that determines the tiny base. Saved as `chatbuild_tiny_base.json` beside it."""

    vocab_size: int = 2048
    hidden_size: int = 192
    intermediate_size: int = 512
    num_hidden_layers: int = 4
    num_attention_heads: int = 4
    num_key_value_heads: int = 2  # grouped-query attention, like current bases
    max_position_embeddings: int = 1024
    pretrain_steps: int = 300
    pretrain_batch: int = 8
    pretrain_seq: int = 128
    pretrain_lr: float = 3e-3
    seed: int = 0


def build_tiny_base(out_dir: str | Path, spec: TinyBaseSpec = TinyBaseSpec(), data: str | Path = SAMPLE_CONVERSATIONS,
                    force: bool = False, log=print) -> Path:
    """Build the tiny base into `out_dir` and return its path (see the module docstring)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    out = Path(out_dir)
    _check_out_dir(out, force)
    texts, pairs = _read_sample_texts(Path(data))
    t0 = time.perf_counter()

    # ── tokenizer ─────────────────────────────────────────────────────────────────────────────
    tokenizer = _train_tokenizer(texts + pairs, spec, log)

    # ── model ─────────────────────────────────────────────────────────────────────────────────
    torch.manual_seed(spec.seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=spec.hidden_size, intermediate_size=spec.intermediate_size,
        num_hidden_layers=spec.num_hidden_layers, num_attention_heads=spec.num_attention_heads,
        num_key_value_heads=spec.num_key_value_heads, max_position_embeddings=spec.max_position_embeddings,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=None,
        tie_word_embeddings=False, dtype="float32",
    )
    model = LlamaForCausalLM(config)
    n_params = sum(p.numel() for p in model.parameters())
    log(f"tiny-base: LlamaForCausalLM with {n_params / 1e6:.2f}M parameters")

    # ── pretraining on the sample text (documents = single messages, so chat is left to fine-tuning)
    if spec.pretrain_steps > 0:
        _pretrain(model, tokenizer, texts, spec, log)

    # ── save (into a temporary sibling first, so a crash never leaves half a model behind) ────
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tiny-base-", dir=out.parent))
    model.generation_config.pad_token_id = tokenizer.eos_token_id
    model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    meta = {"spec": asdict(spec), "data": str(data), "parameters": n_params, "built_by": "chatbuild tiny-base"}
    (tmp / "chatbuild_tiny_base.json").write_text(json.dumps(meta, indent=2) + "\n")
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
    log(f"tiny-base: saved to {out} in {time.perf_counter() - t0:.0f}s")
    return out


def _check_out_dir(out: Path, force: bool) -> None:
    if out.exists() and not out.is_dir():
        raise UserError(f"{out} exists and is not a directory")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise UserError(f"{out} already exists and is not empty; pass --force to replace it")


def _read_sample_texts(path: Path) -> tuple[list[str], list[str]]:
    """Message texts of an OASST1 flat table, and each prompter→assistant exchange rendered in the
    Guanaco format (so the tokenizer learns the format's markers)."""
    if not path.is_file():
        raise UserError(f"{path}: sample conversations not found")
    rows = {}
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            rows[row["message_id"]] = row
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise UserError(f"{path}:{n}: not an OASST1 message row ({e})") from None
    usable = [r for r in rows.values() if not r.get("deleted") and r.get("text")]
    texts = [r["text"] for r in usable]
    pairs = [f"{GUANACO_HUMAN} {rows[r['parent_id']]['text']}\n{GUANACO_ASSISTANT} {r['text']}"
             for r in usable if r.get("role") == "assistant" and r.get("parent_id") in rows]
    if not texts:
        raise UserError(f"{path}: no usable message text")
    return texts, pairs


def _train_tokenizer(corpus: list[str], spec: TinyBaseSpec, log):
    import sentencepiece as spm
    from transformers import LlamaTokenizer

    with tempfile.TemporaryDirectory() as tmp:
        text_file = Path(tmp) / "corpus.txt"
        # SentencePiece reads one sentence per line; newlines inside messages become separate lines.
        text_file.write_text("\n".join(line for t in corpus for line in t.splitlines() if line.strip()), encoding="utf-8")
        spm.SentencePieceTrainer.train(
            input=str(text_file), model_prefix=str(Path(tmp) / "tokenizer"), model_type="bpe",
            vocab_size=spec.vocab_size, byte_fallback=True, character_coverage=1.0, split_digits=True,
            unk_id=0, bos_id=1, eos_id=2, pad_id=-1, num_threads=1, seed_sentencepiece_size=1_000_000,
            shuffle_input_sentence=False, hard_vocab_limit=False, minloglevel=2,
            normalization_rule_name="identity", remove_extra_whitespaces=False,
        )
        # transformers converts the SentencePiece model into its fast tokenizer (Llama conventions:
        # <s>=1, </s>=2, <unk>=0, byte fallback). No pad token, like Llama: fine-tuning handles that.
        tokenizer = LlamaTokenizer.from_pretrained(tmp, legacy=False)
    tokenizer.chat_template = guanaco_jinja_template()
    tokenizer.model_max_length = spec.max_position_embeddings
    log(f"tiny-base: tokenizer with {len(tokenizer)} tokens")
    return tokenizer


def _pretrain(model, tokenizer, texts: list[str], spec: TinyBaseSpec, log) -> None:
    import torch

    ids = []
    for t in texts:
        ids += tokenizer(t, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    stream = torch.tensor(ids)
    g = torch.Generator().manual_seed(spec.seed)
    opt = torch.optim.AdamW(model.parameters(), lr=spec.pretrain_lr, weight_decay=0.0)
    warmup = max(1, spec.pretrain_steps // 10)

    def lr_at(step):  # linear warmup, cosine decay to 10%
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, spec.pretrain_steps - warmup)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_at)
    model.train()
    for step in range(spec.pretrain_steps):
        starts = torch.randint(0, len(stream) - spec.pretrain_seq - 1, (spec.pretrain_batch,), generator=g)
        x = torch.stack([stream[s : s + spec.pretrain_seq] for s in starts])
        loss = model(input_ids=x, labels=x).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        if step % 25 == 0 or step == spec.pretrain_steps - 1:
            log(f"tiny-base: pretrain step {step + 1}/{spec.pretrain_steps} loss {loss.item():.3f}")
    model.eval()


def add_arguments(p: argparse.ArgumentParser) -> None:
    d = TinyBaseSpec()
    p.add_argument("out_dir", help="folder to write the model and tokenizer to")
    p.add_argument("--force", action="store_true", help="replace OUT_DIR if it is not empty")
    p.add_argument("--data", default=str(SAMPLE_CONVERSATIONS), help="OASST1 flat-table JSONL to learn from (default: bundled sample)")
    p.add_argument("--pretrain-steps", type=int, default=d.pretrain_steps, help=f"CPU pretraining steps (default {d.pretrain_steps}; 0 = random weights)")
    p.add_argument("--vocab-size", type=int, default=d.vocab_size, help=f"tokenizer vocabulary (default {d.vocab_size})")
    p.add_argument("--seed", type=int, default=d.seed)


def run(args: argparse.Namespace) -> int:
    if args.pretrain_steps < 0:
        raise UserError(f"--pretrain-steps must be >= 0, got {args.pretrain_steps}")
    if not 300 <= args.vocab_size <= 32000:
        raise UserError(f"--vocab-size must be between 300 and 32000, got {args.vocab_size}")
    spec = TinyBaseSpec(pretrain_steps=args.pretrain_steps, vocab_size=args.vocab_size, seed=args.seed)
    build_tiny_base(args.out_dir, spec, data=args.data, force=args.force)
    return 0


if __name__ == "__main__":
    from chatbuild.cli import main

    raise SystemExit(main(["tiny-base", *__import__("sys").argv[1:]]))
