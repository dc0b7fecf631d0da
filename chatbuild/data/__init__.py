"""Conversation data: raw sources in, training conversations out.

    source (file, folder, hub id, "sample") ─▶ records ─▶ OASST1 trees ─▶ threads   ─▶ conversations
                                                        └▶ chat / ShareGPT / Alpaca / Guanaco ─┘

A conversation is `{"messages": [{"role": "system|user|assistant", "content": "..."}], ...metadata}`:
an optional system message, then user and assistant turns alternating, ending with an assistant reply.
OASST1 threads carry `message_tree_id` and `lang`.

    convs, report = load_conversations("OpenAssistant/oasst1", mode="top1", lang=["en"])
    train, val = split_conversations(convs, val_fraction=0.05, seed=0)
    write_conversations(train, "train.jsonl")

Modules: `sources` (reading files and datasets), `oasst` (the tree rules), `formats` (the other formats
and detection), `report`, `batching` (tokenized examples, padded and packed batches; imports torch),
`stats` (what `chatbuild data inspect` shows), `cli` (`chatbuild data prepare|inspect`).
"""

import hashlib
import json
import os
import tempfile
from pathlib import Path

from chatbuild.data import formats, oasst
from chatbuild.data.report import FORMAT_NAMES, InvalidRecord, Report
from chatbuild.data.sources import SAMPLE, read_records, resolve
from chatbuild.errors import UserError

FORMATS = ("auto", *FORMAT_NAMES)  # auto, oasst1, oasst1-trees, chat, sharegpt, alpaca, guanaco
MODES = ("top1", "all")

__all__ = ["FORMATS", "MODES", "SAMPLE", "InvalidRecord", "Report", "load_conversations", "split_conversations",
           "write_conversations"]


def load_conversations(source: str, format: str = "auto", mode: str = "top1", lang: list[str] | str | None = None,
                       include_synthetic: bool = False, skip_invalid: bool = False) -> tuple[list[dict], Report]:
    """Read `source` into conversations, and say what happened.

    source: a .jsonl/.json/.jsonl.gz/.parquet file, a dataset folder, a hub id (optionally `:split`), or
      "sample" (see `chatbuild.data.sources`). format: one of FORMATS; "auto" looks at the first record.
    mode, include_synthetic: OASST1 thread extraction (`chatbuild.data.oasst`); other formats ignore them.
    lang: keep only these languages (a list, or "en,de"); conversations without a language are dropped.
    skip_invalid: skip malformed records and count them in the report instead of raising `UserError`.
    """
    if format not in FORMATS:
        raise UserError(f'data format "{format}" is unknown; use one of {", ".join(FORMATS)}')
    if mode not in MODES:
        raise UserError(f'mode "{mode}" is unknown; use "top1" or "all"')
    langs = parse_langs(lang)
    report = Report(source=resolve(source), skip_invalid=skip_invalid)
    records = read_records(source)
    if format == "auto":
        format, records = formats.detect_format(records, report.source)
        report.detected = True
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
    if not 0 <= val_fraction < 1:
        raise UserError(f"val_fraction must be in [0, 1), got {val_fraction}")
    keys = [_group_key(c) for c in convs]
    groups = sorted(set(keys), key=lambda k: hashlib.sha256(f"{seed}\0{k}".encode()).hexdigest())
    n_val = round(val_fraction * len(groups))
    if val_fraction > 0 and len(groups) >= 2:
        n_val = min(max(n_val, 1), len(groups) - 1)
    val_groups = set(groups[:n_val])
    train = [c for c, k in zip(convs, keys) if k not in val_groups]
    val = [c for c, k in zip(convs, keys) if k in val_groups]
    return train, val


def _group_key(conv: dict) -> str:
    tree = conv.get("message_tree_id")
    if tree is not None:
        return f"tree:{tree}"
    return "hash:" + hashlib.sha256(json.dumps(conv["messages"], sort_keys=True, ensure_ascii=False).encode()).hexdigest()


def write_conversations(convs: list[dict], path: str | Path) -> Path:
    """Write conversations as JSON lines (UTF-8, one per line), atomically: a reader never sees half a file."""
    path = Path(path)
    if path.is_dir():
        raise UserError(f"{path} is a folder; give a file name like {path / 'conversations.jsonl'}")
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            for c in convs:
                f.write(json.dumps(c, ensure_ascii=False, default=str) + "\n")
        os.replace(tmp, path)
    except OSError as e:
        raise UserError(f"{path}: cannot write ({e})") from None
    finally:
        if tmp is not None and os.path.exists(tmp):
            os.unlink(tmp)
    return path
