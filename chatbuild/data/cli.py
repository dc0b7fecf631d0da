"""`chatbuild data prepare|inspect`: turn raw conversation data into conversations JSONL, and look at it.

    chatbuild data prepare OpenAssistant/oasst1 --out data/oasst1-top1.jsonl --lang en \\
        --val-fraction 0.05 --val-out data/oasst1-top1.val.jsonl
    chatbuild data prepare trees.jsonl.gz --format oasst1-trees --mode all --out all.jsonl
    chatbuild data inspect sample --tokenizer .chatbuild/tiny-base --plot lengths.png

Both read SOURCE exactly as `chatbuild.data.load_conversations` does, and print what was detected,
kept and dropped (with reasons).
"""

import argparse
import sys

from chatbuild.data import (
    FORMATS,
    MODES,
    InvalidRecord,
    load_conversations,
    split_conversations,
    write_conversations,
)
from chatbuild.errors import UserError
from chatbuild.templates import DEFAULT_FORMAT, format_choices


def add_arguments(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="data_command", metavar="ACTION", required=True)
    prep = sub.add_parser("prepare", help="write training conversations (JSONL) from a data source",
                          description="Read SOURCE (OASST1 trees, chat, ShareGPT, Alpaca or Guanaco data) and write "
                                      'conversations JSONL: {"messages": [{"role", "content"}], ...metadata}.')
    _source_arguments(prep)
    prep.add_argument("--out", required=True, metavar="FILE.jsonl", help="where to write the (training) conversations")
    prep.add_argument("--val-fraction", type=float, metavar="F",
                      help="move this fraction of trees (or conversations) to --val-out, e.g. 0.05")
    prep.add_argument("--val-out", metavar="FILE.jsonl", help="where to write the validation conversations")
    prep.add_argument("--seed", type=int, default=0, help="seed of the train/validation split (default 0)")

    insp = sub.add_parser("inspect", help="counts, drop reasons and length histograms of a data source",
                          description="Show what SOURCE holds: the format, what is kept and dropped and why, "
                                      "counts by language and role, histograms of turns and lengths.")
    _source_arguments(insp)
    insp.add_argument("--tokenizer", metavar="PATH",
                      help="measure lengths in this tokenizer's tokens (default: whitespace-separated words)")
    insp.add_argument("--chat-format", default=DEFAULT_FORMAT, metavar="FORMAT",
                      help=f"with --tokenizer: render conversations in this chat format: {format_choices()} "
                           f"(default {DEFAULT_FORMAT})")
    insp.add_argument("--plot", metavar="PNG", help="also draw the histograms into this PNG file")


def _source_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("source", metavar="SOURCE",
                   help='a .jsonl / .json / .jsonl.gz / .parquet file, a dataset folder, a hub id (optionally '
                        'ID:SPLIT), or "sample" (the bundled OASST1 sample)')
    p.add_argument("--format", choices=FORMATS, default="auto", help="data format (default: detect from the first record)")
    p.add_argument("--mode", choices=MODES, default="top1",
                   help="OASST1: top1 = the highest-ranked thread per tree (default), all = every root-to-leaf thread")
    p.add_argument("--lang", metavar="CODES", help="keep only these languages, comma-separated (e.g. en,de)")
    p.add_argument("--include-synthetic", action="store_true", help="OASST1: keep synthetic messages")
    p.add_argument("--skip-invalid", action="store_true",
                   help="skip malformed records (and count them) instead of stopping at the first one")


def run(args: argparse.Namespace) -> int:
    if args.data_command == "prepare":  # checked before the (possibly long) load
        if (args.val_fraction is None) != (args.val_out is None):
            raise UserError("--val-fraction and --val-out go together")
        if args.val_fraction is not None and not 0 <= args.val_fraction < 1:
            raise UserError(f"--val-fraction must be in [0, 1), got {args.val_fraction}")
    try:
        convs, report = load_conversations(args.source, format=args.format, mode=args.mode, lang=args.lang,
                                           include_synthetic=args.include_synthetic, skip_invalid=args.skip_invalid)
    except InvalidRecord as e:
        raise UserError(f"{e} (pass --skip-invalid to skip such records)") from None
    if args.data_command == "prepare":
        return _prepare(args, convs, report)
    return _inspect(args, convs, report)


def _prepare(args, convs, report) -> int:
    print("\n".join(report.lines()))
    val = []
    if args.val_fraction is not None:
        convs, val = split_conversations(convs, args.val_fraction, args.seed)
    if not convs:
        print(f"warning: no conversations left to write to {args.out}", file=sys.stderr)
    write_conversations(convs, args.out)
    print(f"wrote {len(convs)} conversations to {args.out}")
    if args.val_out is not None:
        write_conversations(val, args.val_out)
        print(f"wrote {len(val)} validation conversations to {args.val_out} (split by tree, seed {args.seed})")
    return 0


def _inspect(args, convs, report) -> int:
    from chatbuild.data import stats

    tokenizer = fmt = None
    if args.tokenizer:
        tokenizer, fmt = _load_tokenizer(args.tokenizer, args.chat_format)
    lengths, unit = stats.conversation_lengths(convs, tokenizer, fmt)
    lines = report.lines()
    lines.append("lengths: " + (f"tokens of {args.tokenizer}, rendered in chat format {args.chat_format}" if tokenizer
                                else "whitespace-separated words (pass --tokenizer PATH to count tokens)"))
    lines += stats.describe(convs, lengths, unit)
    print("\n".join(lines))
    if args.plot:
        turns = [sum(m["role"] == "assistant" for m in c["messages"]) for c in convs]
        print(f"wrote {stats.plot(turns, lengths, unit, args.plot)}")
    return 0


def _load_tokenizer(path: str, chat_format: str):
    from chatbuild.templates import make_format

    try:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as e:
        raise UserError(f"--tokenizer {path}: cannot load a tokenizer from it ({e})") from None
    return tokenizer, make_format(chat_format, tokenizer=tokenizer, key="--chat-format")
