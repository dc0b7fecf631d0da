"""Question sets: the prompts models answer and the judge compares answers to.

    load_questions("demo")      the bundled demo set (chatbuild/data/sample/questions.jsonl)
    load_questions("vicuna")    the 80 Vicuna-bench questions the QLoRA paper evaluated on, downloaded
                                once from the official QLoRA repository (pinned URL and SHA-256) and
                                cached under $CHATBUILD_HOME/questions/ (default ~/.cache/chatbuild)
    load_questions("my.jsonl")  any questions JSONL in either Vicuna/FastChat layout

Layouts (one JSON object per line; `category` optional):

    {"question_id": 1, "category": "generic", "text": "How can I improve my time management skills?"}
    {"question_id": 81, "category": "writing", "turns": ["Compose a travel blog post ...", "Rewrite it ..."]}

A question is a list of user turns; single-turn questions have one. Question ids may be numbers or
strings and must be unique within a file.
"""

import hashlib
import os
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from chatbuild.data.sources import SAMPLE_DIR, read_jsonl
from chatbuild.errors import UserError, where

DEMO = SAMPLE_DIR / "questions.jsonl"
VICUNA_URL = "https://raw.githubusercontent.com/artidoro/qlora/main/eval/prompts/vicuna_questions.jsonl"
VICUNA_SHA256 = "590c39157bc561eadd7f03cad4be18c2b597f93029780af65f86718f39eafa87"


@dataclass(frozen=True)
class Question:
    question_id: int | str
    turns: tuple[str, ...]
    category: str | None = None

    @property
    def text(self) -> str:
        return self.turns[0]


def cache_dir() -> Path:
    return Path(os.environ.get("CHATBUILD_HOME", Path.home() / ".cache" / "chatbuild")) / "questions"


def load_questions(spec: str | Path) -> list[Question]:
    """Questions from "demo", "vicuna", or a JSONL file path. Raises UserError on bad input."""
    if str(spec) == "demo":
        if not DEMO.is_file():
            raise UserError(f"the bundled demo questions are missing ({DEMO}); reinstall chatbuild")
        return read_questions(DEMO)
    if str(spec) == "vicuna":
        return read_questions(vicuna_file())
    path = Path(spec)
    if not path.is_file():
        raise UserError(f'{path}: no such questions file (or use "demo" or "vicuna")')
    return read_questions(path)


def read_questions(path: str | Path) -> list[Question]:
    """Read a questions JSONL file; errors name file:line."""
    path = Path(path)

    def not_json(n: int, detail: str, last: bool) -> None:
        raise UserError(f"{where(path, n)}: not valid JSON ({detail})")

    out, seen = [], {}
    for n, obj in read_jsonl(path, "questions file", not_json):
        q = _question(obj, where(path, n))
        if q.question_id in seen:
            raise UserError(f"{where(path, n)}: duplicate question_id {q.question_id!r} (first at line {seen[q.question_id]})")
        seen[q.question_id] = n
        out.append(q)
    if not out:
        raise UserError(f"{path}: no questions in this file")
    return out


def _question(obj, at: str) -> Question:
    if not isinstance(obj, dict):
        raise UserError(f"{at}: a question must be a JSON object")
    qid = obj.get("question_id")
    if isinstance(qid, bool) or not isinstance(qid, (int, str)) or qid == "":
        raise UserError(f'{at}: "question_id" must be a number or a non-empty string, got {qid!r}')
    if "turns" in obj:
        turns = obj["turns"]
        if not isinstance(turns, list) or not turns or not all(isinstance(t, str) and t.strip() for t in turns):
            raise UserError(f'{at}, field "turns": must be a non-empty list of non-empty strings')
    elif "text" in obj:
        if not isinstance(obj["text"], str) or not obj["text"].strip():
            raise UserError(f'{at}, field "text": must be a non-empty string')
        turns = [obj["text"]]
    else:
        raise UserError(f'{at}: a question needs "text" (one turn) or "turns" (a list of turns)')
    category = obj.get("category")
    return Question(qid, tuple(turns), category if isinstance(category, str) else None)


def vicuna_file(url: str = VICUNA_URL, sha256: str = VICUNA_SHA256) -> Path:
    """The Vicuna-bench questions file: from the cache, or downloaded and verified first."""
    cached = cache_dir() / "vicuna_questions.jsonl"
    if cached.is_file() and _sha256(cached.read_bytes()) == sha256:
        return cached
    how = (f"Download {url} on a machine with internet access and pass it as --questions PATH, "
           f"or put it at {cached}")
    if cached.is_file():
        how = f"{cached} does not match the pinned SHA-256 {sha256}. " + how
    try:
        with urllib.request.urlopen(url, timeout=30) as response:
            data = response.read()
    except (urllib.error.URLError, OSError) as e:
        reason = getattr(e, "reason", e)
        raise UserError(f"cannot download the Vicuna questions ({reason}). {how}.") from None
    if _sha256(data) != sha256:
        raise UserError(f"{url}: the download's SHA-256 is {_sha256(data)}, expected {sha256}; "
                        f"the file changed upstream or the download is corrupt. {how} (after checking it).")
    cached.parent.mkdir(parents=True, exist_ok=True)
    tmp = cached.with_suffix(".tmp")
    tmp.write_bytes(data)
    tmp.replace(cached)
    return cached


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()
