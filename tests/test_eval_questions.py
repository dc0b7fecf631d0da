"""Question sets: the bundled demo set, both Vicuna/FastChat layouts, and the pinned Vicuna download."""

import hashlib
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from chatbuild.errors import UserError
from eval import questions as qs
from eval.questions import load_questions, read_questions, vicuna_file

VICUNA_LIKE = "".join(json.dumps({"question_id": i, "text": f"Question {i}?", "category": "generic"}) + "\n"
                      for i in range(1, 81)).encode()


def test_demo_set_loads():
    questions = load_questions("demo")
    assert questions and len({q.question_id for q in questions}) == len(questions)
    assert all(q.turns and all(t.strip() for t in q.turns) for q in questions)


def test_both_layouts(tmp_path):
    f = tmp_path / "q.jsonl"
    f.write_text(json.dumps({"question_id": 1, "category": "generic", "text": "Hi?"}) + "\n\n"
                 + json.dumps({"question_id": "mt-81", "category": "writing", "turns": ["Write.", "Rewrite."]}) + "\n")
    q1, q2 = read_questions(f)
    assert (q1.question_id, q1.turns, q1.category, q1.text) == (1, ("Hi?",), "generic", "Hi?")
    assert (q2.question_id, q2.turns) == ("mt-81", ("Write.", "Rewrite."))


@pytest.mark.parametrize("lines, message", [
    (['{"question_id": 1, "text": "a"}', '{"question_id": 1, "text": "b"}'], "q.jsonl:2: duplicate question_id 1 (first at line 1)"),
    (['{"question_id": 1}'], 'q.jsonl:1: a question needs "text"'),
    (['{"question_id": 1, "turns": []}'], 'field "turns"'),
    (['{"text": "a"}'], '"question_id" must be'),
    (["nope"], "q.jsonl:1: not valid JSON"),
    ([""], "no questions in this file"),
])
def test_bad_question_files(tmp_path, lines, message):
    f = tmp_path / "q.jsonl"
    f.write_text("\n".join(lines) + "\n")
    with pytest.raises(UserError) as e:
        read_questions(f)
    assert message in str(e.value)


def test_unknown_name_or_missing_file(tmp_path):
    with pytest.raises(UserError, match='no such questions file.*"demo" or "vicuna"'):
        load_questions(tmp_path / "nope.jsonl")


class _Files(BaseHTTPRequestHandler):
    payload = b""

    def log_message(self, *args):
        pass

    def do_GET(self):
        self.send_response(200)
        self.send_header("content-length", str(len(self.payload)))
        self.end_headers()
        self.wfile.write(self.payload)


@pytest.fixture
def file_server():
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Files)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}/vicuna_questions.jsonl"
    httpd.shutdown()
    httpd.server_close()


def test_vicuna_download_is_verified_and_cached(tmp_path, monkeypatch, file_server):
    monkeypatch.setenv("CHATBUILD_HOME", str(tmp_path / "home"))
    _Files.payload = VICUNA_LIKE
    sha = hashlib.sha256(VICUNA_LIKE).hexdigest()
    path = vicuna_file(file_server, sha)
    assert path == tmp_path / "home" / "questions" / "vicuna_questions.jsonl"
    assert len(read_questions(path)) == 80
    _Files.payload = b"changed upstream"
    assert vicuna_file(file_server, sha) == path  # served from the cache, not downloaded again

    path.unlink()
    with pytest.raises(UserError, match="SHA-256 is .* expected") as e:
        vicuna_file(file_server, sha)
    assert "--questions PATH" in str(e.value) and not path.exists()


def test_vicuna_offline_says_how_to_pass_the_file(tmp_path, monkeypatch):
    monkeypatch.setenv("CHATBUILD_HOME", str(tmp_path / "home"))
    monkeypatch.setattr(qs, "VICUNA_URL", "http://127.0.0.1:9/vicuna_questions.jsonl")  # nothing listens there
    with pytest.raises(UserError) as e:
        qs.vicuna_file(qs.VICUNA_URL)
    message = str(e.value)
    assert "cannot download the Vicuna questions" in message and "--questions PATH" in message
    assert str(tmp_path / "home" / "questions" / "vicuna_questions.jsonl") in message


def test_pinned_source():
    assert qs.VICUNA_URL == "https://raw.githubusercontent.com/artidoro/qlora/main/eval/prompts/vicuna_questions.jsonl"
    assert qs.VICUNA_SHA256 == "590c39157bc561eadd7f03cad4be18c2b597f93029780af65f86718f39eafa87"


def test_the_one_jsonl_reader(tmp_path):
    """`read_jsonl`: (line, value) for non-blank lines; bad lines name file:line, or go to `on_error`,
    which learns whether the line is the last one (a cut-off append)."""
    from chatbuild.data.sources import read_jsonl

    f = tmp_path / "r.jsonl"
    f.write_text('{"a": 1}\n\n[2]\n{"cut\n')
    with pytest.raises(UserError, match=r"r\.jsonl:4: malformed JSON \(Unterminated string .* at column 2\)$"):
        list(read_jsonl(f))
    seen = []
    assert list(read_jsonl(f, on_error=lambda *bad: seen.append(bad))) == [(1, {"a": 1}), (3, [2])]
    assert [(n, last) for n, _, last in seen] == [(4, True)]
    f.write_text('nope\n{"a": 1}\n')
    assert list(read_jsonl(f, on_error=lambda *bad: seen.append(bad)))[0] == (2, {"a": 1}) and seen[-1][2] is False
    with pytest.raises(UserError, match=r"nope\.jsonl: no such questions file$"):
        list(read_jsonl(tmp_path / "nope.jsonl", "questions file"))
