"""`chatbuild data prepare|inspect` through the console script, on the bundled sample and on bad input."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


def cli(*args):
    return subprocess.run([sys.executable, "-m", "chatbuild.cli", "data", *map(str, args)], capture_output=True,
                          text=True, cwd=REPO)


def read_jsonl(path):
    return [json.loads(line) for line in Path(path).read_text().splitlines()]


def test_prepare_the_sample_with_a_validation_split(tmp_path):
    out = cli("prepare", "sample", "--out", tmp_path / "train.jsonl", "--val-fraction", "0.1",
              "--val-out", tmp_path / "val.jsonl", "--seed", "1")
    assert out.returncode == 0, out.stderr
    assert "format: oasst1 (detected: OASST1 flat message table)" in out.stdout
    assert "trees not ready_for_export" in out.stdout and "messages deleted" in out.stdout
    train, val = read_jsonl(tmp_path / "train.jsonl"), read_jsonl(tmp_path / "val.jsonl")
    assert len(val) > 0 and len(train) > 5 * len(val)
    assert not {c["message_tree_id"] for c in train} & {c["message_tree_id"] for c in val}
    first = train[0]
    assert set(first) == {"messages", "message_tree_id", "lang"} and first["messages"][-1]["role"] == "assistant"
    assert f"wrote {len(train)} conversations" in out.stdout
    again = cli("prepare", "sample", "--out", tmp_path / "train2.jsonl", "--val-fraction", "0.1",
                "--val-out", tmp_path / "val2.jsonl", "--seed", "1")
    assert again.returncode == 0 and read_jsonl(tmp_path / "val2.jsonl") == val  # deterministic


def test_prepare_all_threads_in_some_languages(tmp_path):
    out = cli("prepare", "sample", "--out", tmp_path / "de.jsonl", "--mode", "all", "--lang", "de,fr")
    assert out.returncode == 0, out.stderr
    convs = read_jsonl(tmp_path / "de.jsonl")
    assert convs and {c["lang"] for c in convs} == {"de", "fr"}
    assert "trees in another language (en)" in out.stdout


def test_inspect_the_sample_with_a_plot(tmp_path):
    out = cli("inspect", "sample", "--plot", tmp_path / "p.png")
    assert out.returncode == 0, out.stderr
    for text in ("input messages by language: en", "kept: ", "dropped:", "assistant replies per conversation:",
                 "length per conversation, in words:", "whitespace-separated words (pass --tokenizer", "median"):
        assert text in out.stdout
    assert (tmp_path / "p.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.integration
def test_inspect_measures_tokens_with_a_tokenizer(tiny_base):
    out = cli("inspect", "sample", "--tokenizer", tiny_base)
    assert out.returncode == 0, out.stderr
    assert f"lengths: tokens of {tiny_base}, rendered in chat format guanaco" in out.stdout
    assert "length per conversation, in tokens (chat format guanaco):" in out.stdout


def test_inspect_other_formats(tmp_path):
    src = tmp_path / "sg.jsonl"
    src.write_text(json.dumps({"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello"}]}) + "\n")
    out = cli("inspect", src)
    assert out.returncode == 0, out.stderr
    assert "format: sharegpt (detected" in out.stdout and "kept: 1 conversations" in out.stdout


def test_user_mistakes_are_one_line_errors_without_a_traceback(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yo"}]}\n{oops\n')
    cases = [
        (("prepare", bad, "--out", tmp_path / "o.jsonl"), [f"{bad}:2: malformed JSON", "--skip-invalid"]),
        (("prepare", tmp_path / "missing.jsonl", "--out", tmp_path / "o.jsonl"), ["no such file"]),
        (("prepare", "sample", "--out", tmp_path / "o.jsonl", "--val-fraction", "0.1"), ["--val-out go together"]),
        (("prepare", "sample", "--out", tmp_path / "o.jsonl", "--val-fraction", "1.5", "--val-out", tmp_path / "v.jsonl"),
         ["--val-fraction must be in [0, 1), got 1.5"]),
        (("inspect", "sample", "--lang", ","), ["no language codes"]),
        (("inspect", "sample", "--tokenizer", tmp_path / "nothing-here"), ["--tokenizer", "cannot load a tokenizer"]),
        (("prepare", "sample", "--out", tmp_path), ["is a folder"]),
    ]
    for args, expected in cases:
        out = cli(*args)
        assert out.returncode == 2, (args, out.stdout, out.stderr)
        assert out.stderr.startswith("chatbuild data: error: ") and "Traceback" not in out.stderr, out.stderr
        for text in expected:
            assert text in out.stderr, (text, out.stderr)
    assert not (tmp_path / "o.jsonl").exists()


def test_skip_invalid_counts_what_it_skipped(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yo"}]}\n{oops\n')
    out = cli("prepare", bad, "--out", tmp_path / "o.jsonl", "--skip-invalid")
    assert out.returncode == 0, out.stderr
    assert "invalid records skipped: 1" in out.stdout and f"{bad}:2: malformed JSON" in out.stdout
    assert len(read_jsonl(tmp_path / "o.jsonl")) == 1


def test_usage_errors():
    out = cli()
    assert out.returncode == 2 and "ACTION" in out.stderr
    out = cli("prepare", "sample")
    assert out.returncode == 2 and "--out" in out.stderr
    out = cli("--help")
    assert out.returncode == 0 and "prepare" in out.stdout and "inspect" in out.stdout


def test_reading_data_pulls_in_nothing_heavy():
    code = ("import sys\nfrom chatbuild.data import load_conversations\nfrom chatbuild.cli import main\n"
            "load_conversations('sample')\ntry:\n    main(['data', '--help'])\nexcept SystemExit:\n    pass\n"
            "print(' '.join(sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, check=True)
    heavy = {"torch", "transformers", "datasets", "pyarrow", "matplotlib", "gradio", "bitsandbytes"}
    assert not heavy & set(out.stdout.split()), sorted(heavy & set(out.stdout.split()))
