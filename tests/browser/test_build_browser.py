"""The Build tab in a real browser (Playwright driving Debian's Chromium) on the tiny model: preview
the bundled data, see an invalid setting refused on its field, start a fine-tune, watch the progress
bar move and the job finish, then chat with the new run in the Chat tab — no restart in between.
Screenshots: tests/artifacts/build.png (job running) and build-done.png."""

import os
import re
import time
from pathlib import Path

import pytest

pytest.importorskip("gradio")
playwright = pytest.importorskip("playwright.sync_api")

from test_ui_helpers import CHROMIUM, CHROMIUM_ARGS, serving, ui_app  # noqa: E402

pytestmark = pytest.mark.browser

if not CHROMIUM.exists() and not os.environ.get("CI"):
    pytest.skip(f"{CHROMIUM} is missing (apt-get install chromium)", allow_module_level=True)

TIMEOUT_MS = 240_000  # a fine-tune process starts, trains and saves on a busy 2-core CPU


@pytest.fixture(scope="module")
def app(tiny_run, tmp_path_factory):
    from chatbuild.engines.hf import HFEngine

    engine = HFEngine.from_runs([tiny_run])
    root = tmp_path_factory.mktemp("build-browser")
    with serving(ui_app(engine, root / "chatbuild.sqlite", builder=True, builder_dir=str(root / "builder"),
                        max_new_tokens=64)) as url:
        yield url, engine, root
    engine.close()


def server_side(root) -> str:
    """What the server knows of the jobs (their rows and log tails), for a failure message: the page
    alone cannot tell a job that never started from a view that stopped refreshing."""
    import sqlite3

    with sqlite3.connect(f"file:{root / 'chatbuild.sqlite'}?mode=ro", uri=True) as db:
        rows = db.execute("SELECT id, name, status, pid, error, log_path FROM jobs").fetchall()
    out = []
    for job_id, name, status, pid, error, log_path in rows:
        log = Path(log_path).read_text()[-2000:] if Path(log_path).exists() else "(no log file)"
        out.append(f"job {job_id} {name}: {status} pid={pid} error={error}\n{log}")
    return "\n".join(out) or "no jobs in the database"


def fraction(page) -> float:
    return float(page.locator("#build-progress progress").get_attribute("data-fraction") or 0)


def test_build_a_run_in_the_browser_then_chat_with_it(app, artifacts_dir):
    url, engine, root = app
    expect = playwright.expect
    with playwright.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1400, "height": 1100})
        page.set_default_timeout(TIMEOUT_MS)
        page.goto(url)
        page.get_by_role("tab", name="Build").click()

        # data: the bundled sample, previewed
        page.click("#build-preview")
        expect(page.locator("#build-data-report")).to_contain_text("kept: 57 conversations")

        # an invalid setting is refused on its field, and no job starts
        rank = page.locator("#build-lora-r input")
        rank.fill("0")
        page.fill("#build-name textarea, #build-name input", "browser-run")
        page.click("#build-start")
        expect(page.locator("#build-lora-r")).to_contain_text("must be > 0")
        assert page.inner_text("#build-started").strip() == ""

        # fix it, shorten the run, start it
        rank.fill("8")
        page.locator("#build-steps input").fill("12")
        page.click("#build-start")
        expect(page.locator("#build-started")).to_contain_text("queued")

        # the progress bar moves while it trains, then the job is done and served
        seen = set()
        deadline = time.monotonic() + TIMEOUT_MS / 1000
        while "served as browser-run" not in page.inner_text("#build-stats"):
            seen.add(fraction(page))
            if 0 < fraction(page) < 1 and len(seen) == 2:
                page.screenshot(path=str(artifacts_dir / "build.png"), full_page=True)
            assert time.monotonic() < deadline, server_side(root) + "\npage's log:\n" + page.inner_text("#build-log textarea")
            time.sleep(0.2)
        assert any(0 < f < 1 for f in seen), f"expected the bar part-way at some point, saw {sorted(seen)}"
        assert fraction(page) == 1.0
        stats = page.inner_text("#build-stats")
        assert re.search(r"step 12 of 12 · loss \d+\.\d+", stats), stats
        assert "chatbuild.cli finetune" in page.locator("#build-log textarea").input_value()
        page.screenshot(path=str(artifacts_dir / "build-done.png"), full_page=True)
        assert "browser-run" in engine.models()

        # the new run is in the Chat tab's picker without a reload; chat with it
        page.get_by_role("tab", name="Chat").click()
        picker = page.locator("#chat-model input")
        picker.click()
        page.get_by_role("option", name="browser-run").click()
        expect(picker).to_have_value("browser-run")
        page.fill("#chat-input textarea", "Hello!")
        page.press("#chat-input textarea", "Enter")
        expect(page.locator("#chat-stats")).to_contain_text(re.compile("finished|hit max new tokens"))
        assert page.locator("#chat-box [data-testid='bot']").last.inner_text().strip()
        assert engine.recent[-1].model == "browser-run"
        browser.close()
