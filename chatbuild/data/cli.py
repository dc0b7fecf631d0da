"""`chatbuild data prepare|inspect`: turn raw conversation data into conversations JSONL, and look at it.

    chatbuild data prepare OpenAssistant/oasst1 --out data/oasst1-top1.jsonl --lang en \\
        --val-fraction 0.05 --val-out data/oasst1-top1.val.jsonl
    chatbuild data prepare trees.jsonl.gz --format oasst1-trees --mode all --out all.jsonl
    chatbuild data inspect sample --tokenizer .chatbuild/tiny-base --plot lengths.png
    chatbuild data prepare sample --mode pairs --out pairs.jsonl --max-per-prompt 2
    chatbuild data inspect sample --mode pairs

Both read SOURCE exactly as `chatbuild.data.load_conversations` does (`load_pairs` with `--mode pairs`),
and print what was detected, kept and dropped (with reasons).
"""

import argparse
import sys

from chatbuild.data import (
    DATA_MODES,
    FORMATS,
    MAX_PER_PROMPT,
    PAIR_FORMATS,
    InvalidRecord,
    load_conversations,
    load_pairs,
    split_conversations,
    split_pairs,
    write_conversations,
    write_pairs,
)
from chatbuild.errors import UserError
from chatbuild.templates import DEFAULT_FORMAT, format_choices


def add_arguments(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="data_command", metavar="ACTION", required=True)
    prep = sub.add_parser("prepare", help="write training conversations (JSONL) from a data source",
                          description="Read SOURCE (OASST1 trees, chat, ShareGPT, Alpaca or Guanaco data) and write "
                                      'conversations JSONL: {"messages": [{"role", "content"}], ...metadata}; with --mode pairs, '
                                      'preference pairs JSONL: {"prompt", "chosen", "rejected", ...}.')
    _source_arguments(prep)
    prep.add_argument("--out", required=True, metavar="FILE.jsonl",
                      help="where to write the (training) conversations, or pairs with --mode pairs")
    prep.add_argument("--val-fraction", type=float, metavar="F",
                      help="move this fraction of trees (or conversations, or prompts) to --val-out, e.g. 0.05")
    prep.add_argument("--val-out", metavar="FILE.jsonl", help="where to write the validation conversations (or pairs)")
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
    p.add_argument("--format", choices=list(dict.fromkeys(FORMATS + PAIR_FORMATS)), default="auto",
                   help="data format (default: detect from the first record); pairs: a preference pair file")
    p.add_argument("--mode", choices=DATA_MODES, default="top1",
                   help="OASST1: top1 = the highest-ranked thread per tree (default), all = every root-to-leaf "
                        "thread; pairs = preference pairs (OASST1 ranked replies, or a pair file) instead of conversations")
    p.add_argument("--max-per-prompt", type=int, metavar="N",
                   help=f"--mode pairs, OASST1: at most N pairs per prompt, the best reply against the next N in rank "
                        f"order (default {MAX_PER_PROMPT}; 0: no cap)")
    p.add_argument("--lang", metavar="CODES", help="keep only these languages, comma-separated (e.g. en,de)")
    p.add_argument("--include-synthetic", action="store_true", help="OASST1: keep synthetic messages")
    p.add_argument("--skip-invalid", action="store_true",
                   help="skip malformed records (and count them) instead of stopping at the first one")


def run(args: argparse.Namespace) -> int:
    pairs = args.mode == "pairs"
    if args.data_command == "prepare":  # checked before the (possibly long) load
        if (args.val_fraction is None) != (args.val_out is None):
            raise UserError("--val-fraction and --val-out go together")
        if args.val_fraction is not None and not 0 <= args.val_fraction < 1:
            raise UserError(f"--val-fraction must be in [0, 1), got {args.val_fraction}")
    if args.max_per_prompt is not None:
        if not pairs:
            raise UserError("--max-per-prompt goes with --mode pairs")
        if args.max_per_prompt < 0:
            raise UserError(f"--max-per-prompt must be >= 0 (0: no cap), got {args.max_per_prompt}")
    try:
        if pairs:
            cap = MAX_PER_PROMPT if args.max_per_prompt is None else (args.max_per_prompt or None)
            items, report = load_pairs(args.source, format=args.format, lang=args.lang, skip_invalid=args.skip_invalid,
                                       include_synthetic=args.include_synthetic, max_per_prompt=cap)
        else:
            items, report = load_conversations(args.source, format=args.format, mode=args.mode, lang=args.lang,
                                               include_synthetic=args.include_synthetic, skip_invalid=args.skip_invalid)
    except InvalidRecord as e:
        raise UserError(f"{e} (pass --skip-invalid to skip such records)") from None
    if args.data_command == "prepare":
        return _prepare(args, items, report)
    if pairs:
        return _inspect_pairs(args, items, report)
    return _inspect(args, items, report)


def _prepare(args, items, report) -> int:
    """Write conversations, or pairs (`report.unit` says which)."""
    split, write = (split_pairs, write_pairs) if report.unit == "pairs" else (split_conversations, write_conversations)
    print("\n".join(report.lines()))
    val = []
    if args.val_fraction is not None:
        items, val = split(items, args.val_fraction, args.seed)
    if not items:
        print(f"warning: no {report.unit} left to write to {args.out}", file=sys.stderr)
    write(items, args.out)
    print(f"wrote {len(items)} {report.unit} to {args.out}")
    if args.val_out is not None:
        write(val, args.val_out)
        print(f"wrote {len(val)} validation {report.unit} to {args.val_out} (split by tree, seed {args.seed})")
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


def _inspect_pairs(args, pairs, report) -> int:
    from chatbuild.data import stats

    if args.plot:
        raise UserError("--plot draws conversation histograms; it does not go with --mode pairs")
    tokenizer = _load_tokenizer(args.tokenizer, args.chat_format)[0] if args.tokenizer else None
    chosen, rejected, unit = stats.reply_lengths(pairs, tokenizer)
    lines = report.lines()
    lines.append("lengths: " + (f"tokens of {args.tokenizer}, the reply text alone" if tokenizer
                                else "whitespace-separated words (pass --tokenizer PATH to count tokens)"))
    lines += stats.describe_pairs(pairs, chosen, rejected, unit)
    print("\n".join(lines))
    return 0


def _load_tokenizer(path: str, chat_format: str):
    from chatbuild.templates import make_format

    try:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as e:
        raise UserError(f"--tokenizer {path}: cannot load a tokenizer from it ({e})") from None
    return tokenizer, make_format(chat_format, tokenizer=tokenizer, key="--chat-format")
