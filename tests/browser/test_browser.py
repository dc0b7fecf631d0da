"""The UI in a real browser: Playwright driving Debian's Chromium against the serving app on the tiny
model (in-process HF engine: 4-bit tiny base + two fine-tuned adapters + the bare base).

Chat a turn and watch the text stream in, like it, press Stop mid-reply; run an anonymous battle,
vote, see the names revealed and the leaderboard change. Screenshots of each tab go to
tests/artifacts/ (chat.png, arena.png, arena-voted.png, leaderboard.png).

Chromium is /usr/bin/chromium (`apt-get install chromium`; `make test` installs it). Without it these
tests skip, except under CI (CI set), where a missing browser is a failure.
"""

import os
import re
import time

import pytest

from chatbuild import arena, storage
from chatbuild.engines import GenerationParams

pytest.importorskip("gradio")
playwright = pytest.importorskip("playwright.sync_api")

from test_ui_helpers import CHROMIUM, CHROMIUM_ARGS, serving, ui_app  # noqa: E402

pytestmark = pytest.mark.browser

if not CHROMIUM.exists() and not os.environ.get("CI"):
    pytest.skip(f"{CHROMIUM} is missing (apt-get install chromium)", allow_module_level=True)

TIMEOUT_MS = 120_000  # the tiny model makes a few tokens/s on a busy 2-core CPU


@pytest.fixture(scope="module")
def tiny(tiny_run, tiny_run_b, tmp_path_factory):
    """(url, engine, db_path): the serving app over tiny-a, tiny-b and the tiny base."""
    from chatbuild.engines.hf import HFEngine

    engine = HFEngine.from_runs([tiny_run, tiny_run_b])
    db = tmp_path_factory.mktemp("browser") / "chatbuild.sqlite"
    with serving(ui_app(engine, db, max_running=2, max_new_tokens=256)) as url:
        yield url, engine, db
    engine.close()


@pytest.fixture(scope="module")
def browser():
    with playwright.sync_playwright() as p:
        b = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        yield b
        b.close()


@pytest.fixture
def page(browser, tiny):
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    page = context.new_page()
    page.set_default_timeout(TIMEOUT_MS)
    page.goto(tiny[0])
    page.wait_for_selector("#chat-input textarea")
    yield page
    context.close()


def set_slider(page, elem_id: str, value: int, accordion: str) -> None:
    """Type into a Gradio slider's number box, opening the accordion it sits in if needed."""
    box = page.locator(f"#{elem_id} input[type=number]")
    if not box.is_visible():
        page.get_by_text(accordion, exact=True).click()
    box.fill(str(value))
    box.press("Enter")


def bot_text(page, box: str) -> str:
    replies = page.locator(f"#{box} [data-testid='bot']")
    return replies.last.inner_text() if replies.count() else ""


def wait_until(condition, timeout: float = TIMEOUT_MS / 1000, every: float = 0.05):
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(every)


def test_chat_streams_likes_and_stops(page, tiny, artifacts_dir):
    url, engine, db = tiny
    expect = playwright.expect
    set_slider(page, "chat-max-new-tokens", 24, "Sampling")

    # one turn: the reply grows on screen while it streams
    page.fill("#chat-input textarea", "Hello! Who are you?")
    page.press("#chat-input textarea", "Enter")
    seen = []
    wait_until(lambda: (seen.append(bot_text(page, "chat-box")) or
                        re.search(r"finished|hit max new tokens", page.inner_text("#chat-stats"))))
    partial = [t for t in dict.fromkeys(seen) if t]
    assert len(partial) >= 2, f"the reply should appear piece by piece, saw {partial}"
    assert re.search(r"\d+ tokens · [\d.]+ tokens/s", page.inner_text("#chat-stats"))
    page.screenshot(path=str(artifacts_dir / "chat.png"), full_page=True)

    # like the reply: stored with the conversation
    page.locator("#chat-box button[aria-label='Like']").last.click()
    wait_until(lambda: len(arena.feedback(db)) == 1, timeout=30)
    liked = arena.feedback(db)[0]
    assert liked["liked"] is True and liked["index"] == 1 and liked["model"] == engine.models()[0]
    assert liked["messages"][0]["content"] == "Hello! Who are you?"

    # Stop in the middle of a long reply: the text stops growing and the engine was cancelled. The
    # engine decodes ahead of its reader, so the reply must not be able to end by itself first: a
    # seed whose reply runs the full 200 tokens, in a fresh conversation.
    story, d = [{"role": "user", "content": "Tell me a very long story."}], GenerationParams()

    def runs_long(seed: int) -> bool:
        params = GenerationParams(temperature=d.temperature, top_p=d.top_p, max_new_tokens=200, seed=seed)
        list(engine.stream(story, params, engine.models()[0]))
        return engine.recent[-1].finish_reason == "length"

    seed = next(s for s in range(50) if runs_long(s))
    page.click("#chat-clear")
    set_slider(page, "chat-max-new-tokens", 200, "Sampling")
    page.locator("#chat-seed input").fill(str(seed))
    page.locator("#chat-seed input").press("Enter")
    page.fill("#chat-input textarea", story[0]["content"])
    page.press("#chat-input textarea", "Enter")
    wait_until(lambda: page.locator("#chat-box [data-testid='bot']").count() == 1 and bot_text(page, "chat-box"))
    page.click("#chat-stop")
    expect(page.locator("#chat-stats")).to_contain_text("stopped")
    wait_until(lambda: engine.recent[-1].finish_reason == "cancelled", timeout=30)
    assert engine.recent[-1].completion_tokens < 200
    stopped_text = bot_text(page, "chat-box")
    time.sleep(1.0)
    assert bot_text(page, "chat-box") == stopped_text and stopped_text
    page.screenshot(path=str(artifacts_dir / "chat-stopped.png"), full_page=True)


def test_anonymous_battle_vote_reveals_names_and_moves_the_leaderboard(page, tiny, artifacts_dir):
    url, engine, db = tiny
    expect = playwright.expect

    page.get_by_role("tab", name="Leaderboard").click()
    expect(page.locator("#leaderboard-summary")).to_contain_text("battles")
    before = page.inner_text("#leaderboard-summary")

    page.get_by_role("tab", name="Arena").click()
    set_slider(page, "arena-max-new-tokens", 6, "Sampling (both models)")
    page.fill("#arena-input textarea", "What is a llama?")
    page.press("#arena-input textarea", "Enter")
    expect(page.locator("#vote-a")).to_be_enabled()  # only once both answers are complete
    labels = [page.locator(f"#{side} [data-testid='block-label']").inner_text() for side in ("arena-a", "arena-b")]
    assert [label.strip() for label in labels] == ["Model A", "Model B"]
    status = page.inner_text("#arena-status")
    assert not any(m in status for m in engine.models()), "names stay hidden until the vote"
    page.screenshot(path=str(artifacts_dir / "arena.png"), full_page=True)

    page.click("#vote-b")
    expect(page.locator("#arena-status")).to_contain_text("Model A was")
    left, right = re.search(r"Model A was (\S+), model B was (\S+?)\.", page.inner_text("#arena-status")).groups()
    assert {left, right} <= set(engine.models()) and left != right
    expect(page.locator("#arena-a [data-testid='block-label']")).to_contain_text(left)
    expect(page.locator("#arena-b [data-testid='block-label']")).to_contain_text(right)
    expect(page.locator("#vote-a")).to_be_disabled()
    page.screenshot(path=str(artifacts_dir / "arena-voted.png"), full_page=True)
    battles = storage.list_battles(db)
    assert [(b["model_a"], b["model_b"], b["winner"], b["anony"]) for b in battles] == [(left, right, "model_b", True)]

    page.get_by_role("tab", name="Leaderboard").click()
    expect(page.locator("#leaderboard-summary")).not_to_have_text(before)
    expect(page.locator("#leaderboard-summary")).to_contain_text("1 battles")
    table = page.locator("#leaderboard-table")
    expect(table).to_contain_text(left)
    expect(table).to_contain_text(right)
    expect(page.locator("#leaderboard-intervals img")).to_be_visible()
    expect(page.locator("#leaderboard-heatmap img")).to_be_visible()
    page.screenshot(path=str(artifacts_dir / "leaderboard.png"), full_page=True)
