"""The Build tab through gradio_client, on the real serving app over the tiny model: presets fill the
form, the memory estimate follows it, data previews, uploads stay in the data folder, invalid
settings are refused per field before any job exists, a fine-tune runs as a separate process and its
run is then served (and chatted with) without a restart, queued jobs wait, cancel and resume, a
restarted server serves finished runs again, and "evaluate against" stores judge battles that the
Leaderboard shows. Jobs run `python -m chatbuild.cli finetune` for real (2 steps each)."""

import json
import time

import pytest

from chatbuild.errors import UserError
from serve.builder import FIELDS

pytest.importorskip("gradio")
pytest.importorskip("gradio_client")

from gradio_client import handle_file  # noqa: E402
from gradio_client.exceptions import ValidationError  # noqa: E402
from test_ui_helpers import gradio_client, messages_of, serving, text_of, ui_app  # noqa: E402

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def build(tiny_run, tmp_path_factory):
    """(url, engine, builder, db): the app with the Build tab over tiny-a and the tiny base."""
    from chatbuild.engines.hf import HFEngine

    engine = HFEngine.from_runs([tiny_run])
    root = tmp_path_factory.mktemp("build")
    app = ui_app(engine, root / "chatbuild.sqlite", builder=True, builder_dir=str(root / "builder"),
                 max_new_tokens=64, max_upload_bytes=100_000)
    builder = app.state.serve.builder
    with serving(app) as url:
        builder.self_url = url + "v1"  # known only once the test server has its port
        yield url, engine, builder, root / "chatbuild.sqlite"
    engine.close()


def form(name, base, steps=2, source="Bundled sample", data_file=None, **changes):
    """The Start event's inputs: name, data (source, file, hub id, format, mode, languages), preset, fields."""
    values = {"model.base": base, "model.quant": "nf4", "model.double_quant": True, "lora.r": 8, "lora.alpha": 16,
              "lora.dropout": 0.0, "train.steps": steps, "train.lr": 2e-3, "data.max_length": 128,
              "train.batch_size": 4, "train.micro_batch_size": 4, "train.objective": "sft", "train.beta": 0.1,
              **changes}
    return [name, source, data_file, "", "auto", "top1", "", "tiny-cpu", *(values[k] for k in FIELDS)]


def wait_job(client, job_id, until=("done", "failed", "cancelled"), timeout=300):
    """Poll /build_job until the job's status is one of `until` (and, once done, its after-job note —
    served as ..., battles stored — is written); returns (status line, rows, log, curve, bar)."""
    deadline = time.monotonic() + timeout
    while True:
        bar, stats, curve, log, table, *_ = client.predict(job_id, [], api_name="/build_job")
        rows = {r[0]: r for r in table["data"]}
        if rows[job_id][3] in until and (rows[job_id][3] != "done" or rows[job_id][6]):
            return stats, rows, log, curve, bar
        assert time.monotonic() < deadline, f"job {job_id} still {rows[job_id][3]}:\n{log}"
        time.sleep(0.5)


def started_job(client, *inputs) -> int:
    started, job, _ = client.predict(*inputs, api_name="/build_start")
    assert "queued" in started
    return job["value"] if isinstance(job, dict) else job


def test_preset_fills_the_form_and_the_estimate_follows(build):
    url, *_ = build
    with gradio_client(url) as client:
        values = dict(zip(FIELDS, client.predict("guanaco-7b", api_name="/build_preset")))
        assert values["model.base"] == "huggyllama/llama-7b" and values["lora.r"] == 64 and values["train.steps"] == 1875
        small = client.predict(*[{**values, "model.base": "llama-7b", "train.micro_batch_size": 1}[k] for k in FIELDS],
                               api_name="/build_estimate")
        big = client.predict(*[{**values, "model.base": "llama-65b", "train.micro_batch_size": 1}[k] for k in FIELDS],
                             api_name="/build_estimate")
    gb = [float(text.split("**")[1].split()[0]) for text in (small, big)]
    assert 3 < gb[0] < 20 and 30 < gb[1] < 60, (small, big)


def test_preview_reports_format_counts_and_lengths(build):
    url, *_ = build
    with gradio_client(url) as client:
        report = client.predict("Bundled sample", None, "", "auto", "top1", "", api_name="/build_preview")
        german = client.predict("Bundled sample", None, "", "auto", "top1", "de", api_name="/build_preview")
        missing = client.predict("File in the data folder", "nothing.jsonl", "", "auto", "top1", "",
                                 api_name="/build_preview")
    assert "format: oasst1 (detected" in report and "kept: 57 conversations" in report
    assert "messages deleted" in report and "length per conversation" in report
    assert "kept: 8 conversations" in german
    assert "⚠️" in missing and "no such file in the data folder" in missing


def test_preference_objectives_preview_pairs_and_are_checked_against_the_data(build):
    """Choosing DPO (or ORPO) previews what the recipe will read — preference pairs from the sample's
    ranked replies — and a format that cannot give pairs is refused on the data field before a job exists;
    β has bounds; the preset tiny-cpu-dpo fills the objective."""
    url, _, builder, _ = build
    with gradio_client(url) as client:
        report = client.predict("Bundled sample", None, "", "auto", "top1", "", "dpo", api_name="/build_preview")
        assert "kept: 69 pairs" in report and "chosen reply longer" in report, report
        assert "conversations" not in report
        sft = client.predict("Bundled sample", None, "", "auto", "top1", "", "sft", api_name="/build_preview")
        assert "conversations" in sft and "kept: 69 pairs" not in sft
        values = dict(zip(FIELDS, client.predict("tiny-cpu-dpo", api_name="/build_preset")))
        assert values["train.objective"] == "dpo" and values["train.beta"] == 0.1
        with pytest.raises(ValidationError, match="trains on preference pairs"):
            client.predict(*form("dpo-chat", "tiny", **{"train.objective": "dpo"})[:4], "chat",
                           *form("dpo-chat", "tiny", **{"train.objective": "dpo"})[5:], api_name="/build_start")
        for beta, problem in ((0, "must be > 0, got 0"), (500, r"must be in \(0, 100\], got 500")):
            with pytest.raises(ValidationError, match=rf"β \(DPO/ORPO\): {problem}"):
                client.predict(*form("dpo-beta", "tiny", **{"train.objective": "dpo", "train.beta": beta}),
                               api_name="/build_start")
    assert not any(j.name in ("dpo-chat", "dpo-beta") for j in builder.jobs.jobs())


def test_upload_lands_in_the_data_folder_and_previews(build, tmp_path):
    url, _, builder, _ = build
    data = tmp_path / "my chats.jsonl"
    conv = {"messages": [{"role": "user", "content": "Hi there"}, {"role": "assistant", "content": "Hello!"}]}
    data.write_text("\n".join(json.dumps(conv) for _ in range(3)) + "\n")
    with gradio_client(url) as client:
        picker, note = client.predict(handle_file(str(data)), api_name="/build_upload")
        saved = picker["value"]
        report = client.predict("File in the data folder", saved, "", "auto", "top1", "", api_name="/build_preview")
        too_big = tmp_path / "big.jsonl"
        too_big.write_text(json.dumps(conv) * 5000)
        with pytest.raises(Exception, match="over the upload limit"):
            client.predict(handle_file(str(too_big)), api_name="/build_upload")
    assert saved == "my_chats.jsonl" and saved in note
    assert (builder.data_dir / saved).read_text() == data.read_text()
    assert "format: chat" in report and "kept: 3 conversations" in report


def test_uploads_never_leave_the_data_folder(build, tmp_path):
    _, _, builder, _ = build
    src = tmp_path / "x.jsonl"
    src.write_text("{}\n")
    name = builder.save_upload(src, name="../../../etc/cron.d/evil.jsonl")
    assert name == "evil.jsonl" and (builder.data_dir / name).is_file()
    again = builder.save_upload(src, name="evil.jsonl")
    assert again == "evil-2.jsonl"  # never over another file
    with pytest.raises(UserError, match="not a dataset file"):
        builder.save_upload(src, name="run.sh")
    from serve.builder import DataChoice

    for bad in ("../chatbuild.sqlite", "/etc/passwd", "../../etc/passwd"):
        with pytest.raises(UserError, match="only files in the data folder"):
            builder.data_source(DataChoice("file", bad))


def test_invalid_settings_are_refused_per_field_before_a_job_exists(build):
    url, engine, builder, _ = build
    before = len(builder.jobs.jobs())
    base = engine.base_key[0]
    with gradio_client(url) as client:
        with pytest.raises(ValidationError) as e:
            client.predict(*form("bad name/..", base, **{"lora.r": 0, "train.lr": -1.0, "lora.dropout": 1.5}),
                           api_name="/build_start")
        message = str(e.value)
        with pytest.raises(ValidationError, match="multiple of"):
            client.predict(*form("ok-name", base, **{"train.batch_size": 6}), api_name="/build_start")
        with pytest.raises(ValidationError, match="hub dataset id looks like"):
            client.predict(*form("ok-name", base, source="Hub dataset id"), api_name="/build_start")
        with pytest.raises(ValidationError, match="already a served model"):
            client.predict(*form(engine.models()[0], base), api_name="/build_start")
    assert "name: a name of letters" in message
    assert "lora_r" in message.replace(".", "_") or "must be > 0, got 0" in message
    assert "must be > 0, got -1" in message and "must be in [0, 1), got 1.5" in message
    assert len(builder.jobs.jobs()) == before  # nothing was queued


def test_a_job_runs_then_its_model_is_served_and_chats(build):
    """The acceptance path without a browser: start, watch progress, done, hot-loaded, chat."""
    url, engine, builder, _ = build
    with gradio_client(url) as client:
        job_id = started_job(client, *form("built-1", engine.base_key[0], steps=3))
        stats, rows, log, curve, bar = wait_job(client, job_id)
        assert rows[job_id][3] == "done", log
        assert rows[job_id][4] == "3/3" and "served as built-1" in rows[job_id][6]
        assert "chatbuild.cli finetune" in log and 'data-fraction="1.0000"' in bar
        points = curve["data"]  # the loss curve: (step, loss, split) rows, numeric axes
        assert [p[0] for p in points if p[2] == "train"] == [1, 2, 3] and curve["datatypes"]["loss"] == "quantitative"
        assert "built-1" in engine.models()
        outputs = client.predict("Hello!", [], "built-1", "", 0.0, 1.0, 6, 0, 1.0, 0, api_name="/chat")
    history = messages_of(outputs[0])
    assert history[-1]["role"] == "assistant" and text_of(history[-1]).strip()


def test_queued_jobs_wait_and_cancel_and_resume(build):
    url, engine, builder, _ = build
    base = engine.base_key[0]
    with gradio_client(url) as client:
        a = started_job(client, *form("queue-a", base, steps=2))
        b = started_job(client, *form("queue-b", base, steps=2))
        _, rows, *_ = wait_job(client, b, until=("queued",), timeout=5)
        assert rows[b][3] == "queued"
        assert "cancelled" in client.predict(b, api_name="/build_cancel")
        _, rows, *_ = wait_job(client, b, until=("cancelled",), timeout=5)
        assert "queued again" in client.predict(b, api_name="/build_resume")
        _, rows, log, *_ = wait_job(client, a)
        assert rows[a][3] == "done", log
        _, rows, log, *_ = wait_job(client, b)
        assert rows[b][3] == "done", log
        with pytest.raises(Exception, match="nothing to cancel"):
            client.predict(a, api_name="/build_cancel")
        with pytest.raises(Exception, match="only cancelled or failed"):
            client.predict(a, api_name="/build_resume")
    assert {"queue-a", "queue-b"} <= set(engine.models())
    # one at a time: b started only after a finished
    ja, jb = builder.jobs.get(a), builder.jobs.get(b)
    assert jb.started >= ja.finished


def test_a_failing_job_shows_its_error_and_log(build):
    url, engine, builder, _ = build
    with gradio_client(url) as client:
        # passes the form's checks, fails in the job: the data file is not a dataset
        (builder.data_dir / "broken.jsonl").write_text("this is not json\n")
        job_id = started_job(client, *form("broken-1", engine.base_key[0], source="File in the data folder",
                                            data_file="broken.jsonl"))
        stats, rows, log, *_ = wait_job(client, job_id)
    assert rows[job_id][3] == "failed"
    assert "broken.jsonl" in rows[job_id][6] and "broken.jsonl" in stats
    assert "broken.jsonl" in log


def test_a_restarted_server_serves_finished_runs_again(build, tiny_run):
    """A new Builder on the same database (as after a restart) hot-loads the runs its jobs finished."""
    from chatbuild.engines.hf import HFEngine
    from serve.builder import Builder

    _, engine, builder, db = build
    done = [j for j in builder.jobs.jobs() if j.status == "done" and j.kind == "finetune"]
    assert done, "run the job tests first (they run in file order)"
    fresh = HFEngine.from_runs([tiny_run])
    try:
        again = Builder(builder.root, db, engine=lambda: fresh)
        again.start(interval=60)
        again.stop()
        assert {j.name for j in done} <= set(fresh.models())
    finally:
        fresh.close()


def test_evaluate_against_stores_judge_battles_for_the_leaderboard(build):
    url, engine, builder, db = build
    from chatbuild import storage

    model = "built-1" if "built-1" in engine.models() else engine.models()[0]
    against = next(m for m in engine.models() if m != model)
    with gradio_client(url) as client:
        with pytest.raises(Exception, match="two different models"):
            client.predict(model, model, "demo", 4, api_name="/build_evaluate")
        message, job = client.predict(model, against, "demo", 4, api_name="/build_evaluate")
        job_id = job["value"] if isinstance(job, dict) else job
        stats, rows, log, *_ = wait_job(client, job_id, timeout=600)
        assert rows[job_id][3] == "done", log
        summary, table, *_ = client.predict(["judge"], False, api_name="/leaderboard")
    assert "evaluation" in message.lower()
    battles = storage.list_battles(db, source="judge")
    assert battles and {b["model_a"] for b in battles} | {b["model_b"] for b in battles} == {model, against}
    assert "battles stored for the Leaderboard" in rows[job_id][6]
    assert {r[1] for r in table["data"]} == {model, against}


def test_the_build_tab_is_never_open_to_the_network_without_a_login(tiny_run):
    """`chatbuild serve --builder` on a non-loopback address refuses to start without --ui-auth (the tab
    runs jobs on the machine); checked before any model loads."""
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "CHATBUILD_UI_AUTH"}
    for extra, expected in ((["--host", "0.0.0.0"], "needs a login"), (["--no-ui"], "cannot go with --no-ui")):
        out = subprocess.run([sys.executable, "-m", "chatbuild.cli", "serve", str(tiny_run), "--builder", *extra],
                             capture_output=True, text=True, env=env, timeout=120)
        assert out.returncode == 2 and expected in out.stderr, out.stderr
