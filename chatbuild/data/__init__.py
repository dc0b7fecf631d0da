"""Conversation data: raw sources in, training conversations out.

    source (file, folder, hub id, "sample") ─▶ records ─▶ OASST1 trees ─▶ threads   ─▶ conversations
                                                        └▶ chat / ShareGPT / Alpaca / Guanaco ─┘

A conversation is `{"messages": [{"role": "system|user|assistant", "content": "..."}], ...metadata}`:
an optional system message, then user and assistant turns alternating, ending with an assistant reply.
OASST1 threads carry `message_tree_id` and `lang`.

    convs, report = load_conversations("OpenAssistant/oasst1", mode="top1", lang=["en"])
    train, val = split_conversations(convs, val_fraction=0.05, seed=0)
    write_conversations(train, "train.jsonl")

Preference pairs (prompt, chosen reply, rejected reply; `chatbuild.data.pairs`) come the same way:

    pairs, report = load_pairs("sample", lang=["en"], max_per_prompt=4)
    train, val = split_pairs(pairs, val_fraction=0.05, seed=0)
    write_pairs(train, "pairs.jsonl")

Modules: `sources` (reading files and datasets), `oasst` (the tree rules), `formats` (the other formats
and detection), `report`, `batching` (tokenized examples, padded and packed batches; imports torch),
`stats` (what `chatbuild data inspect` shows), `cli` (`chatbuild data prepare|inspect`), `pairs` (preference
pairs: OASST1 ranked replies and pair files).
"""

import hashlib
import json
import os
import tempfile
from pathlib import Path

from chatbuild.data import formats, oasst
from chatbuild.data.pairs import MAX_PER_PROMPT, Pair, pairs_from_trees, read_pair_records
from chatbuild.data.report import FORMAT_NAMES, PAIR_FORMAT_NAMES, InvalidRecord, Report
from chatbuild.data.sources import SAMPLE, read_records, resolve
from chatbuild.errors import UserError

FORMATS = ("auto", *FORMAT_NAMES)  # auto, oasst1, oasst1-trees, chat, sharegpt, alpaca, guanaco
MODES = ("top1", "all")  # OASST1 thread extraction, load_conversations
PAIR_FORMATS = ("auto", *PAIR_FORMAT_NAMES)  # auto, oasst1, oasst1-trees, pairs
DATA_MODES = (*MODES, "pairs")  # `chatbuild data prepare|inspect --mode`: threads, or load_pairs

__all__ = ["DATA_MODES", "FORMATS", "MAX_PER_PROMPT", "MODES", "PAIR_FORMATS", "SAMPLE", "InvalidRecord", "Pair",
           "Report", "load_conversations", "load_pairs", "split_conversations", "split_pairs", "write_conversations",
           "write_pairs"]


def load_conversations(source: str, format: str = "auto", mode: str = "top1", lang: list[str] | str | None = None,
                       include_synthetic: bool = False, skip_invalid: bool = False) -> tuple[list[dict], Report]:
    """Read `source` into conversations, and say what happened.

    source: a .jsonl/.json/.jsonl.gz/.parquet file, a dataset folder, a hub id (optionally `:split`), or
      "sample" (see `chatbuild.data.sources`). format: one of FORMATS; "auto" looks at the first record.
    mode, include_synthetic: OASST1 thread extraction (`chatbuild.data.oasst`); other formats ignore them.
    lang: keep only these languages (a list, or "en,de"); conversations without a language are dropped.
    skip_invalid: skip malformed records and count them in the report instead of raising `UserError`.
    """
    if format == "pairs":
        raise UserError(_PAIRS_NOT_CONVERSATIONS.format(source=source))
    if format not in FORMATS:
        raise UserError(f'data format "{format}" is unknown; use one of {", ".join(FORMATS)}')
    if mode not in MODES:
        raise UserError(f'mode "{mode}" is unknown; use one of {", ".join(MODES)}')
    langs = parse_langs(lang)
    report = Report(source=resolve(source), skip_invalid=skip_invalid)
    records = read_records(source)
    if format == "auto":
        format, records = formats.detect_format(records, report.source)
        report.detected = True
        if format == "pairs":
            raise UserError(_PAIRS_NOT_CONVERSATIONS.format(source=report.source))
    report.format = format
    if format in ("oasst1", "oasst1-trees"):
        read = oasst.messages_from_table if format == "oasst1" else oasst.messages_from_trees
        messages, skipped = read(records, report)
        convs = oasst.extract_threads(messages, skipped, report, mode, langs, include_synthetic)
    else:
        convs = formats.read(format, records, report)
        if langs is not None:
            kept = [c for c in convs if c.get("lang") in langs]
            for c in convs:
                if c.get("lang") not in langs:
                    report.drop(f"conversations in another language ({c.get('lang') or 'unknown'})")
            convs = kept
    report.kept = len(convs)
    return convs, report


_PAIRS_NOT_CONVERSATIONS = ("{source} holds preference pairs, not conversations: read it with --mode pairs "
                            "(chatbuild.data.load_pairs)")


def load_pairs(source: str, format: str = "auto", lang: list[str] | str | None = None, include_synthetic: bool = False,
               skip_invalid: bool = False, max_per_prompt: int | None = MAX_PER_PROMPT) -> tuple[list[Pair], Report]:
    """Read `source` into preference pairs (`chatbuild.data.pairs`), and say what happened.

    source, lang, include_synthetic, skip_invalid: as `load_conversations`. format: one of PAIR_FORMATS:
      OASST1 trees (the flat table or nested trees; pairs from ranked sibling replies) or "pairs" files (our
      form, TRL's standard and conversational forms, told apart per record); "auto" looks at the first record.
    max_per_prompt: OASST1 only, pairs per prompt (best reply vs the next ones in rank order); None: no cap.
    Identical pairs (same prompt, chosen and rejected) are kept once, the first in input order."""
    if format not in PAIR_FORMATS:
        raise UserError(f'data format "{format}" cannot give preference pairs; use one of {", ".join(PAIR_FORMATS)}')
    if max_per_prompt is not None and (isinstance(max_per_prompt, bool) or not isinstance(max_per_prompt, int)
                                       or max_per_prompt < 1):
        raise UserError(f"max_per_prompt must be a whole number >= 1 (or None: no cap), got {max_per_prompt!r}")
    langs = parse_langs(lang)
    report = Report(source=resolve(source), skip_invalid=skip_invalid, unit="pairs")
    records = read_records(source)
    if format == "auto":
        format, records = formats.detect_format(records, report.source)
        report.detected = True
        if format not in PAIR_FORMATS:
            raise UserError(f"{report.source}: {format} records are conversations, which hold no preferences; pairs "
                            'come from OASST1 trees (ranked replies) or pair files {"prompt", "chosen", "rejected"}')
    report.format = format
    if format in ("oasst1", "oasst1-trees"):
        read = oasst.messages_from_table if format == "oasst1" else oasst.messages_from_trees
        messages, skipped = read(records, report)
        found = pairs_from_trees(messages, skipped, report, langs, include_synthetic, max_per_prompt)
    else:
        found = read_pair_records(records, report)
        if langs is not None:
            for p in found:
                if p.lang not in langs:
                    report.drop(f"pairs in another language ({p.lang or 'unknown'})")
            found = [p for p in found if p.lang in langs]
    pairs, seen = [], set()
    for p in found:
        if p.key() in seen:
            report.drop("duplicate pairs")
            continue
        seen.add(p.key())
        pairs.append(p)
    report.kept = len(pairs)
    return pairs, report


def parse_langs(lang: list[str] | str | None) -> list[str] | None:
    if lang is None:
        return None
    items = lang.split(",") if isinstance(lang, str) else list(lang)
    langs = [str(x).strip() for x in items if str(x).strip()]
    if not langs:
        raise UserError(f"lang: no language codes in {lang!r} (use e.g. en,de)")
    return langs


def split_conversations(convs: list[dict], val_fraction: float, seed: int) -> tuple[list[dict], list[dict]]:
    """Split into (train, validation) by `message_tree_id`, so no tree is in both.

    Conversations without a tree id form groups of their own, keyed by a hash of their messages. Groups
    are ordered by a hash of (seed, key) and the first round(val_fraction × groups) go to validation (at
    least one when val_fraction > 0 and there are two groups or more; never all). The result depends only
    on the seed and the set of groups, not on the input order; each part keeps the input order."""
    return _split(convs, [_group_key(c.get("message_tree_id"), c["messages"]) for c in convs], val_fraction, seed)


def split_pairs(pairs: list[Pair], val_fraction: float, seed: int) -> tuple[list[Pair], list[Pair]]:
    """Split pairs into (train, validation) by `message_tree_id`, so no tree is in both: all pairs of one
    OASST1 tree (every prompt in it) go to the same side. Pairs without a tree id are grouped by their
    prompt, so the pairs of one prompt stay together. Otherwise as `split_conversations`."""
    return _split(pairs, [_group_key(p.message_tree_id, list(p.prompt)) for p in pairs], val_fraction, seed)


def _split(items: list, keys: list[str], val_fraction: float, seed: int) -> tuple[list, list]:
    if not 0 <= val_fraction < 1:
        raise UserError(f"val_fraction must be in [0, 1), got {val_fraction}")
    groups = sorted(set(keys), key=lambda k: hashlib.sha256(f"{seed}\0{k}".encode()).hexdigest())
    n_val = round(val_fraction * len(groups))
    if val_fraction > 0 and len(groups) >= 2:
        n_val = min(max(n_val, 1), len(groups) - 1)
    val_groups = set(groups[:n_val])
    train = [x for x, k in zip(items, keys) if k not in val_groups]
    val = [x for x, k in zip(items, keys) if k in val_groups]
    return train, val


def _group_key(tree, messages: list[dict]) -> str:
    if tree is not None:
        return f"tree:{tree}"
    return "hash:" + hashlib.sha256(json.dumps(messages, sort_keys=True, ensure_ascii=False).encode()).hexdigest()


def write_conversations(convs: list[dict], path: str | Path) -> Path:
    """Write conversations as JSON lines (UTF-8, one per line), atomically: a reader never sees half a file."""
    return _write_jsonl(convs, path, "conversations.jsonl")


def write_pairs(pairs: list[Pair], path: str | Path) -> Path:
    """Write pairs as JSON lines in chatbuild's pair form (`Pair.to_json`), atomically like
    `write_conversations`; `load_pairs` reads the file back to the same pairs."""
    return _write_jsonl([p.to_json() for p in pairs], path, "pairs.jsonl")


def _write_jsonl(rows: list[dict], path: str | Path, example_name: str) -> Path:
    path = Path(path)
    if path.is_dir():
        raise UserError(f"{path} is a folder; give a file name like {path / example_name}")
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            for row in rows:
                f.write(json.dumps(row, ensure_ascii=False, default=str) + "\n")
        os.replace(tmp, path)
    except OSError as e:
        raise UserError(f"{path}: cannot write ({e})") from None
    finally:
        if tmp is not None and os.path.exists(tmp):
            os.unlink(tmp)
    return path
