"""What a load did: the format read, what was kept, what was dropped and why, what was invalid.

Every reader writes into one `Report`. Dropped is not invalid: a dropped item is valid data that a rule
leaves out (a deleted OASST1 message, a tree still growing, a duplicate thread); an invalid record is
a mistake in the file (malformed JSON, a missing field, an unknown role). Invalid records stop the load
with a `UserError` naming file, line and field, unless `skip_invalid` is set: then they are counted here.
"""

from collections import Counter
from dataclasses import dataclass, field

from chatbuild.errors import UserError

MAX_LISTED = 20  # invalid records listed one by one; the rest are only counted


class InvalidRecord(UserError):
    """A record in the input is malformed (raised only when invalid records are not skipped)."""


@dataclass
class Report:
    source: str
    format: str = ""
    detected: bool = False  # True when `format="auto"` chose `format`
    skip_invalid: bool = False
    records: int = 0  # records read: lines (rows for parquet and hub datasets, items for JSON arrays)
    kept: int = 0  # conversations (or pairs) returned
    unit: str = "conversations"  # what `kept` counts: "conversations" or "pairs"
    dropped: Counter = field(default_factory=Counter)  # reason (naming its unit) -> count
    invalid: list[str] = field(default_factory=list)  # the first MAX_LISTED skipped records, "where: what"
    invalid_count: int = 0
    input_messages: Counter = field(default_factory=Counter)  # OASST1 only: (lang, role) -> messages read

    def reject(self, where: str, problem: str) -> None:
        """An invalid record: raise, or count it when skipping invalid records."""
        self.invalid_message(f"{where}: {problem}")

    def invalid_message(self, message: str) -> None:
        """`reject` for a message that already names where ("file.jsonl:3: ...", a checker's UserError)."""
        if not self.skip_invalid:
            raise InvalidRecord(message)
        self.invalid_count += 1
        if len(self.invalid) < MAX_LISTED:
            self.invalid.append(message)

    def drop(self, reason: str, n: int = 1) -> None:
        if n:
            self.dropped[reason] += n

    def summary(self) -> str:
        """One line, e.g. for a training log."""
        how = " (detected)" if self.detected else ""
        out = f"{self.format}{how}, {self.records} records, {self.kept} {self.unit} kept"
        if self.dropped:
            out += "; dropped: " + ", ".join(f"{n} {reason}" for reason, n in sorted(self.dropped.items()))
        if self.invalid_count:
            out += f"; {self.invalid_count} invalid records skipped"
        return out

    def lines(self) -> list[str]:
        """Several lines, for `chatbuild data inspect/prepare`."""
        how = "detected" if self.detected else "as given"
        out = [f"source: {self.source}", f"format: {self.format} ({how}: {ALL_FORMAT_NAMES.get(self.format, '')})",
               f"records read: {self.records}"]
        if self.input_messages:
            langs, roles = Counter(), Counter()
            for (lang, role), n in self.input_messages.items():
                langs[lang] += n
                roles[role] += n
            out.append("input messages by language: " + _counts(langs))
            out.append("input messages by role: " + _counts(roles))
        out.append(f"kept: {self.kept} {self.unit}")
        if self.dropped:
            out.append("dropped:")
            out += [f"  {n:>7}  {reason}" for reason, n in sorted(self.dropped.items(), key=lambda kv: (-kv[1], kv[0]))]
        if self.invalid_count:
            out.append(f"invalid records skipped: {self.invalid_count}")
            out += [f"  {line}" for line in self.invalid]
            if self.invalid_count > len(self.invalid):
                out.append(f"  ... and {self.invalid_count - len(self.invalid)} more")
        return out

    def __str__(self) -> str:
        return self.summary()


FORMAT_NAMES = {
    "oasst1": "OASST1 flat message table",
    "oasst1-trees": "OASST1 nested message trees",
    "chat": 'chat JSONL, {"messages": [{"role", "content"}]}',
    "sharegpt": 'ShareGPT, {"conversations": [{"from", "value"}]}',
    "alpaca": 'Alpaca, {"instruction", "input", "output"}',
    "guanaco": 'Guanaco text, {"text": "### Human: ... ### Assistant: ..."}',
}
PAIR_FORMAT_NAMES = {  # what preference pairs are read from (chatbuild.data.pairs)
    "oasst1": FORMAT_NAMES["oasst1"],
    "oasst1-trees": FORMAT_NAMES["oasst1-trees"],
    "pairs": 'preference pairs, {"prompt", "chosen", "rejected"}',
}
ALL_FORMAT_NAMES = {**FORMAT_NAMES, **PAIR_FORMAT_NAMES}


def _counts(counter: Counter) -> str:
    return ", ".join(f"{key if key is not None else 'unknown'} {n}"
                     for key, n in sorted(counter.items(), key=lambda kv: (-kv[1], str(kv[0]))))
