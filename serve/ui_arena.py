"""The Arena tab: two models answer the same prompt side by side, and people vote.

Two modes:
- anonymous battle: a random pair of the served models (uniform over pairs), in random positions;
  the names stay on the server until the vote is stored, then they are revealed and the battle ends;
- named: the user picks both models; the conversation may go on, one vote per turn.

A round is registered server-side (`chatbuild.arena.open_round`) when its first message is sent; the
session's state holds its id and the models, and never reaches the browser (Gradio keeps `gr.State`
on the server). A vote is accepted only for the session's own round, once both answers of the
current turn are complete, once per turn, and while its login (its session, without logins) has
cast fewer than `Settings.max_votes_per_minute` votes in the last minute: `chatbuild.arena.record_vote`
checks all of these in the same transaction that writes the battle, and names are revealed only
after that write. Named-mode votes are stored marked `anony: false`, and the leaderboard leaves them
out by default. Answers cut short by Stop are not complete: Regenerate answers the turn again. Each side streams with its own
generation slot from the shared admission, so an arena turn takes two.

API names: `/arena_send`, `/arena_regenerate`, `/arena_stop`, `/arena_new_round`, and
`/vote_a`, `/vote_b`, `/vote_tie`, `/vote_bothbad`.
"""

import asyncio
import copy
import logging
import random

import gradio as gr

from chatbuild import arena
from chatbuild.errors import UserError
from serve.ui_common import (
    ENGINE_GROUP,
    UIContext,
    check_input,
    params_from,
    sampling_controls,
    session_of,
    stream_reply,
)

log = logging.getLogger("chatbuild.serve")

SIDES = ("arena-a", "arena-b")  # keys of the two streams' cancel events (serve.ui_common.Cancels)
STOPPED = "Stopped. Stopped answers can't be voted on: press Regenerate, or ask something else."
ANONYMOUS, NAMED = "Anonymous battle", "Named models"
VOTES = {"a": "A is better", "b": "B is better", "tie": "Tie", "bothbad": "Both are bad"}


def new_state() -> dict:
    """A session's arena state (server-side): round id, models in display order, both
    conversations, how many turns were sent / fully answered / voted."""
    return {"round": None, "models": None, "anonymous": True, "conv": [[], []], "turn": 0,
            "answered": 0, "voted": 0, "params": None}


def build_arena_tab(ctx: UIContext) -> tuple[gr.Dropdown, gr.Dropdown, gr.Markdown]:
    """Lay out the tab and wire its events; returns the two model pickers and the status line (the
    app refreshes them on page load, as models may still be loading when the UI is built)."""
    models = ctx.models()
    rng = random.Random()
    state = gr.State(new_state())
    with gr.Row():
        mode = gr.Radio([ANONYMOUS, NAMED], value=ANONYMOUS, label="Mode", scale=2, elem_id="arena-mode")
        pick_a = gr.Dropdown(models, value=models[0] if models else None, label="Model A", visible=False,
                             allow_custom_value=True, elem_id="arena-pick-a")
        pick_b = gr.Dropdown(models, value=models[1] if len(models) > 1 else None, label="Model B", visible=False,
                             allow_custom_value=True, elem_id="arena-pick-b")
    status = gr.Markdown(intro(models), elem_id="arena-status")
    with gr.Row():
        chat_a = gr.Chatbot(label="Model A", height=400, elem_id="arena-a", feedback_options=())
        chat_b = gr.Chatbot(label="Model B", height=400, elem_id="arena-b", feedback_options=())
    with gr.Row():
        vote_buttons = [gr.Button(label, interactive=False, elem_id=f"vote-{key}") for key, label in VOTES.items()]
    with gr.Row():
        message = gr.Textbox(show_label=False, placeholder="Ask both models something and press Enter",
                             scale=5, elem_id="arena-input")
        send = gr.Button("Send", variant="primary", scale=1, elem_id="arena-send")
        stop = gr.Button("Stop", variant="stop", scale=1, elem_id="arena-stop")
    with gr.Row():
        regenerate = gr.Button("Regenerate", size="sm", elem_id="arena-regenerate")
        new_round = gr.Button("New round", size="sm", elem_id="arena-new-round")
    with gr.Accordion("Sampling (both models)", open=False):
        sampling = sampling_controls(ctx, "arena", full=False)

    chats = [chat_a, chat_b]
    stream_outputs = [state, *chats, status, message, *vote_buttons]

    async def send_message(text, mode, pick_a, pick_b, st, temperature, top_p, max_new_tokens, request: gr.Request):
        text = (text or "").strip()
        st = copy.deepcopy(st)
        if not text:
            yield _frame(st, gr.skip(), "")
            return
        try:
            if st["round"] is not None and st["anonymous"] and st["voted"]:
                raise UserError("This battle is decided; press New round for another one.")
            if st["round"] is None:
                st = _open_round(ctx, st, mode, pick_a, pick_b, rng, session_of(request))
            for conv in st["conv"]:
                conv.append({"role": "user", "content": text})
                check_input(ctx, text, conv)
        except UserError as e:
            gr.Warning(str(e))
            yield _frame(_unsend(st, text), text, f"⚠️ {e}")
            return
        st["turn"] += 1
        async for frame in _answer(ctx, st, (temperature, top_p, max_new_tokens), session_of(request)):
            yield frame

    async def regenerate_last(st, temperature, top_p, max_new_tokens, request: gr.Request):
        st = copy.deepcopy(st)
        if st["round"] is None or not st["turn"]:
            yield _frame(st, gr.skip(), gr.skip())
            return
        if st["voted"] >= st["turn"]:
            gr.Warning("You already voted on these answers.")
            yield _frame(st, gr.skip(), gr.skip())
            return
        for conv in st["conv"]:
            if conv and conv[-1]["role"] == "assistant":
                conv.pop()
        # The answers being replaced can't be voted on any more, nor the new ones until complete.
        arena.mark_answered(ctx.db_path, st["round"], st["turn"] - 1)
        st["answered"] = st["turn"] - 1
        async for frame in _answer(ctx, st, (temperature, top_p, max_new_tokens), session_of(request)):
            yield frame

    def stop_answers(request: gr.Request):
        stopped = [ctx.cancels.stop(session_of(request), side) for side in SIDES]
        return gr.skip() if stopped == [None, None] else STOPPED

    def start_new_round(st):
        if st["round"] is not None:
            arena.close_round(ctx.db_path, st["round"])
        return _frame(new_state(), gr.update(value="", interactive=True), intro(ctx.models()), labels=True)

    def vote(choice: str):
        def cast(st, request: gr.Request):
            st = copy.deepcopy(st)
            try:
                if st["round"] is None or not st["turn"]:
                    raise UserError("Nothing to vote on yet: send a message first.")
                battle = arena.record_vote(ctx.db_path, st["round"], session=session_of(request), turn=st["turn"],
                                           vote=choice, conversation_a=st["conv"][0],
                                           conversation_b=st["conv"][1], generation=st["params"],
                                           voter=voter_of(request),
                                           max_per_minute=ctx.state.settings.max_votes_per_minute)
            except UserError as e:
                gr.Warning(str(e))
                return _frame(st, gr.skip(), f"⚠️ {e}")
            st["voted"] = st["turn"]
            # The battle is stored: now, and only now, the names may be shown.
            a, b = battle["model_a"], battle["model_b"]
            outcome = {"a": f"**{a}** wins", "b": f"**{b}** wins", "tie": "a tie", "bothbad": "both bad"}[choice]
            text = (f"Model A was **{a}**, model B was **{b}**. Your vote: {VOTES[choice]} ({outcome}), saved. ")
            text += "Press New round for another battle." if st["anonymous"] else "Keep chatting to vote again."
            return _frame(st, gr.skip() if not st["anonymous"] else gr.update(interactive=False, value=""),
                          text, labels=True)
        return cast

    # `.input`: the user's changes only (the page-load refresh of the pickers must not reset a round).
    gr.on([mode.input, pick_a.input, pick_b.input], _switch_mode(ctx), [mode, state],
          [pick_a, pick_b, *stream_outputs], api_visibility="private", queue=False)
    engine_events = dict(concurrency_id=ENGINE_GROUP, concurrency_limit=ctx.concurrency, show_progress="hidden")
    sent = gr.on([message.submit, send.click], send_message, [message, mode, pick_a, pick_b, state, *sampling],
                 stream_outputs, api_name="arena_send", **engine_events)
    regenerated = regenerate.click(regenerate_last, [state, *sampling], stream_outputs,
                                   api_name="arena_regenerate", **engine_events)
    stop.click(stop_answers, None, status, api_name="arena_stop", cancels=[sent, regenerated], queue=False)
    new_round.click(start_new_round, state, stream_outputs, api_name="arena_new_round", queue=False)
    # A chat's own trash icon empties only that side in the browser: treat it as a new round.
    gr.on([chat_a.clear, chat_b.clear], start_new_round, state, stream_outputs, api_visibility="private",
          queue=False)
    for key, button in zip(VOTES, vote_buttons):
        button.click(vote(key), state, stream_outputs, api_name=f"vote_{key}", concurrency_limit=None)
    return pick_a, pick_b, status


def intro(models: list[str]) -> str:
    if not models:
        return "The models are still loading…"
    if len(models) < 2:
        return "⚠️ The arena needs at least two models; this server has " + (", ".join(models) or "none") + "."
    return (f"Two of the {len(models)} models served here answer your message side by side, names hidden. "
            "Vote for the better answer to see who they are.")


def voter_of(request: gr.Request | None) -> str:
    """Who a vote counts against for the rate limit: the login when the UI has logins, else the
    browser session. Without logins a script can open new sessions at will, so there the limit
    only slows down one page; logins (`--ui-auth`) make it a limit per person."""
    username = getattr(request, "username", None)
    return f"login:{username}" if username else f"session:{session_of(request)}"


def _switch_mode(ctx: UIContext):
    def switch(mode, st, request: gr.Request):
        for side in SIDES:
            ctx.cancels.stop(session_of(request), side)
        named = mode == NAMED
        if st["round"] is not None:
            arena.close_round(ctx.db_path, st["round"])
        fresh = new_state()
        fresh["anonymous"] = not named
        text = "Pick two models and chat with both; vote after each answer." if named else intro(ctx.models())
        return (gr.update(visible=named), gr.update(visible=named),
                *_frame(fresh, gr.update(value="", interactive=True), text, labels=True))
    return switch


def _open_round(ctx: UIContext, st: dict, mode: str, pick_a, pick_b, rng: random.Random, session: str) -> dict:
    served = ctx.engine.models()  # UserError while the models load
    if mode == NAMED:
        if pick_a not in served or pick_b not in served:
            raise UserError(f"Pick two of the served models: {', '.join(served)}.")
        if pick_a == pick_b:
            raise UserError("Pick two different models.")
        pair = [pick_a, pick_b]
    else:
        if len(served) < 2:
            raise UserError("The arena needs at least two models.")
        pair = rng.sample(served, 2)  # a uniform pair, in a uniformly random order (positions shuffled)
    st["anonymous"] = mode != NAMED
    st["models"] = pair
    st["round"] = arena.open_round(ctx.db_path, session=session, model_a=pair[0], model_b=pair[1],
                                   anonymous=st["anonymous"])
    return st


def _unsend(st: dict, text: str) -> dict:
    for conv in st["conv"]:
        if conv and conv[-1] == {"role": "user", "content": text}:
            conv.pop()
    return st


def _frame(st: dict, message, status, labels: bool = False, votable: bool = False):
    """Values for (state, chat A, chat B, status, input box, 4 vote buttons)."""
    revealed = st["models"] is not None and (not st["anonymous"] or st["voted"] > 0)
    chats = []
    for side, conv in zip("AB", st["conv"]):
        value = copy.deepcopy(conv)
        if labels or revealed:
            name = f"Model {side}" + (f": {st['models']['AB'.index(side)]}" if revealed else "")
            chats.append(gr.update(value=value, label=name))
        else:
            chats.append(value)
    buttons = [gr.update(interactive=votable) for _ in VOTES]
    return (st, *chats, status, message, *buttons)


async def _answer(ctx: UIContext, st: dict, sampling, session: str):
    """Stream both models' replies to the last user message, side by side (two concurrent streams,
    each with its own generation slot). Votes open only when both finished on their own."""
    params = params_from(ctx, *sampling)
    st["params"] = vars(params)
    # One cancel event per side: a stream that ends sets its own event (serve.generation.generate does),
    # which must not stop the other side. Stop sets both.
    cancels = [ctx.cancels.start(session, side) for side in SIDES]
    updates: asyncio.Queue = asyncio.Queue()
    for conv in st["conv"]:
        conv.append({"role": "assistant", "content": ""})

    async def run(side: int):
        try:
            async for progress in stream_reply(ctx, st["conv"][side][:-1], params, st["models"][side],
                                               cancels[side]):
                updates.put_nowait((side, progress.text, progress.finish_reason))
        except UserError as e:  # busy, prompt too long, ...: shown; the other side keeps going
            updates.put_nowait((side, None, f"⚠️ {e}"))
        except Exception as e:
            log.exception("arena generation failed")
            updates.put_nowait((side, None, f"⚠️ generation failed: {type(e).__name__}: {e}"))

    tasks = [asyncio.create_task(run(side)) for side in (0, 1)]
    yield _frame(st, "", "Both models are answering…")
    finished: dict[int, str] = {}
    try:
        while len(finished) < 2:
            side, text, finish = await updates.get()
            if text is not None:
                st["conv"][side][-1]["content"] = text
            if finish:
                finished[side] = finish
            yield _frame(st, gr.skip(), gr.skip())
    finally:
        for task in tasks:  # abandoned (Stop in the browser, a closed tab): their streams close and cancel
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for side, cancel in zip(SIDES, cancels):
            ctx.cancels.finish(session, side, cancel)
    problems = [f for f in finished.values() if f.startswith("⚠️")]
    if problems:
        gr.Warning(problems[0].removeprefix("⚠️ "))
        yield _frame(st, gr.skip(), f"{problems[0]} Press Regenerate to try again.")
    elif "cancelled" in finished.values():
        yield _frame(st, gr.skip(), STOPPED)
    else:
        st["answered"] = st["turn"]
        arena.mark_answered(ctx.db_path, st["round"], st["turn"])
        yield _frame(st, gr.skip(), "Which answer is better? Vote below (you can't change it afterwards).",
                     votable=True)
