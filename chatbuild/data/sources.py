"""Where records come from: a local file or folder, or a dataset on the Hugging Face hub.

A source is read into `Record`s, one per JSON line (or parquet row, JSON-array item, dataset row),
each knowing its location for error messages. Nothing here knows what a record means.

- `*.jsonl`, `*.json` (JSON lines, or one JSON array), optionally gzip-compressed (`*.gz`);
- `*.parquet` (read with pyarrow, which `datasets` brings along);
- a folder, or a hub id like `OpenAssistant/oasst1`: `datasets.load_dataset`, split "train" unless the
  source ends in `:SPLIT` (`OpenAssistant/oasst1:validation`);
- `hub:OWNER/NAME[:SPLIT]`: a hub id and nothing else. A bare owner/name is read from disk when a
  file or folder of that name exists (and so does `datasets.load_dataset`); a `hub:` source is
  refused then, so a hub id a client typed (the UI's Build tab) never reads a local file;
- `sample`: the OASST1-format sample bundled with chatbuild (unless a file of that name exists);
  `sample:persona` and `sample:persona-val`: the bundled "Captain Byte" persona set (OASST1 flat table,
  written for chatbuild: every top-ranked reply begins "Ahoy!"), what the demo fine-tunes SmolLM2 on,
  and its held-out validation trees. Some prompts of each also have a plain rank-1 reply, so both give
  preference pairs ("Ahoy!" chosen over plain: 21 and 12).
"""

import gzip
import json
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from chatbuild.errors import UserError, where

SAMPLE_DIR = Path(__file__).resolve().parent / "sample"
SAMPLE = SAMPLE_DIR / "oasst1_sample.jsonl"
SAMPLES = {  # bundled data sets by source name
    "sample": SAMPLE,
    "sample:persona": SAMPLE_DIR / "persona_oasst.jsonl",
    "sample:persona-val": SAMPLE_DIR / "persona_oasst_val.jsonl",
}
PERSONA_PROMPTS = SAMPLE_DIR / "persona_prompts.jsonl"  # held-out prompts for checking the persona

_HUB_ID = re.compile(r"^[\w.-]+/[\w.-]+(:[\w.-]+)?$")
HUB_PREFIX = "hub:"


@dataclass
class Record:
    location: str  # file (or dataset) the record comes from
    index: int  # 1-based line, row or item number
    unit: str  # "line", "row" or "item"
    value: object = None  # the parsed record; None when `error` says why it could not be parsed
    error: str | None = None

    def where(self, field: str | None = None) -> str:
        """'file.jsonl:12, field "role"' (lines) or 'file.parquet, row 12, field "role"'."""
        if self.unit == "line":
            return where(self.location, self.index, field)
        out = f"{self.location}, {self.unit} {self.index}"
        return out + (f', field "{field}"' if field else "")


def resolve(source: str) -> str:
    """The path or hub id a source name stands for (`sample` -> the bundled sample, and so on for
    the other names in SAMPLES)."""
    if source in SAMPLES and not Path(source).exists():
        return str(SAMPLES[source])
    return str(source)


def hub_id(value: str) -> str:
    """`value` (owner/name, optionally :split) checked to name a dataset on the hub and never a local
    path: UserError when it is not shaped so (a part starting with "." — `..` among them — or an
    absolute path), or when a file or folder of that name exists here, which `datasets.load_dataset`
    would read instead of the hub."""
    name = value.partition(":")[0]
    if not _HUB_ID.match(value) or any(part.startswith(".") for part in name.split("/")):
        raise UserError(f'"{value}": a hub dataset id looks like owner/name (optionally owner/name:split)')
    if Path(name).exists() or Path(value).exists():
        raise UserError(f'"{value}": a hub dataset id names a dataset on the hub, never a local file or folder')
    return value


def read_records(source: str) -> Iterator[Record]:
    """Every record of `source`, in order (see the module docstring for what a source can be)."""
    if source.startswith(HUB_PREFIX):
        return _read_dataset(hub_id(source[len(HUB_PREFIX):]), hub=True)
    source = resolve(source)
    path = Path(source)
    if path.is_file():
        name = path.name.lower()
        if name.endswith(".parquet"):
            return _read_parquet(path)
        return _read_json(path, compressed=name.endswith(".gz"))
    if path.is_dir() or _HUB_ID.match(source):
        return _read_dataset(source)
    raise UserError(f"{source}: no such file, and not a hub dataset id (like OpenAssistant/oasst1)")


def read_jsonl(path: str | Path, what: str = "file",
               on_error: Callable[[int, str, bool], None] | None = None) -> Iterator[tuple[int, object]]:
    """(line number, value) for every non-blank line of the UTF-8 JSON-lines file `path`, in order: the
    one reader of the JSONL files that are not training data (battles, answers, questions).

    A line that does not parse raises UserError "FILE:LINE: malformed JSON (<what> at column <c>)";
    with `on_error`, `on_error(line, detail, last)` is called instead (detail: "<what> at column <c>")
    and the line skipped. It may raise an error of its own; `last` says the line is the file's last
    non-blank one, which is what an interrupted append leaves cut off. A missing file raises
    "FILE: no such `what`", an unreadable one "FILE: cannot read (...)"."""
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        raise UserError(f"{path}: no such {what}") from None
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"{path}: cannot read ({e})") from None
    last = max((n for n, line in enumerate(lines, 1) if line.strip()), default=0)
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            value = json.loads(line)
        except json.JSONDecodeError as e:
            detail = f"{e.msg} at column {e.colno}"
            if on_error is None:
                raise UserError(f"{where(path, n)}: malformed JSON ({detail})") from None
            on_error(n, detail, n == last)
            continue
        yield n, value


def _read_json(path: Path, compressed: bool) -> Iterator[Record]:
    try:
        with (gzip.open(path, "rb") if compressed else open(path, "rb")) as f:
            head = f.read(4096).lstrip()
            f.seek(0)
            if head.startswith(b"["):
                yield from _read_json_array(path, f.read())
                return
            for n, raw in enumerate(f, 1):
                if not raw.strip():
                    continue
                try:
                    yield Record(str(path), n, "line", json.loads(raw.decode("utf-8")))
                except UnicodeDecodeError:
                    yield Record(str(path), n, "line", error="not UTF-8 text")
                except json.JSONDecodeError as e:
                    yield Record(str(path), n, "line", error=f"malformed JSON ({e.msg} at column {e.colno})")
    except (OSError, EOFError, gzip.BadGzipFile) as e:
        raise UserError(f"{path}: cannot read ({e})") from None


def _read_json_array(path: Path, data: bytes) -> Iterator[Record]:
    try:
        items = json.loads(data.decode("utf-8"))
    except UnicodeDecodeError:
        raise UserError(f"{path}: not UTF-8 text") from None
    except json.JSONDecodeError as e:
        raise UserError(f"{where(path, e.lineno)}: malformed JSON ({e.msg} at column {e.colno})") from None
    for n, item in enumerate(items, 1):
        yield Record(str(path), n, "item", item)


def _read_parquet(path: Path) -> Iterator[Record]:
    try:
        import pyarrow.parquet as pq

        batches = pq.ParquetFile(path).iter_batches(batch_size=4096)
        n = 0
        for batch in batches:
            for row in batch.to_pylist():
                n += 1
                yield Record(str(path), n, "row", row)
    except ImportError:
        raise UserError("reading parquet needs pyarrow: pip install pyarrow") from None
    except (OSError, ValueError) as e:  # pyarrow's ArrowInvalid is a ValueError
        raise UserError(f"{path}: not a readable parquet file ({e})") from None


def _read_dataset(source: str, hub: bool = False) -> Iterator[Record]:
    name, _, split = source.partition(":") if hub or not Path(source).exists() else (source, "", "")
    split = split or "train"
    try:
        import datasets

        ds = datasets.load_dataset(name, split=split)
    except ImportError:
        raise UserError("reading a hub dataset needs the `datasets` package: pip install datasets") from None
    except Exception as e:  # offline, unknown id, no such split, a folder datasets cannot read: all user-fixable
        raise UserError(f"{source}: cannot load it as a dataset ({type(e).__name__}: {e})") from None
    label = f"{name} (split {split})"
    for n, row in enumerate(ds, 1):
        yield Record(label, n, "row", row)
