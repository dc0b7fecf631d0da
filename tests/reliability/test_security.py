"""Security: the API key on every /v1 route (found by walking app.routes, so new routes are covered
without editing this file) and never on /healthz; the UI's login (`--ui-auth`); arena votes bound to
the session that saw the battle; models loaded from safetensors with trust_remote_code off; CORS closed.

The UI tests run over a ScriptedEngine (tests/test_ui_helpers.py): what they check is the web layer
(login, sessions, vote bookkeeping), for which the model's replies don't matter."""

import json
import sqlite3

import httpx
import pytest
from fastapi.routing import APIRoute
from test_ui_helpers import ScriptedEngine, gradio_client, serving, ui_app

from chatbuild import storage
from chatbuild.errors import UserError

pytestmark = pytest.mark.reliability

KEY = "sk-security-9d2c4e"
USERS = [("alice", "pw-alice-7f3"), ("bob", "pw-bob-21a")]
CHAT = ("hi", [], "alpha", "", 0.7, 1.0, 3, 0, 1.0, None)  # /chat's inputs (tests/test_ui.py chat_args)


@pytest.fixture(scope="module")
def locked(tmp_path_factory):
    """(url, app) of the app with the UI mounted, an API key and two UI logins."""
    db = tmp_path_factory.mktemp("security") / "chatbuild.sqlite"
    app = ui_app(ScriptedEngine(delay=0.001), db, api_key=KEY, ui_auth=USERS)
    with serving(app) as url:
        yield url.rstrip("/"), app


# ── the API key ────────────────────────────────────────────────────────────────────────────────
def v1_routes(app) -> list[tuple[str, str]]:
    """(method, path) of every API route under /v1, path parameters filled in."""
    out = []
    for route in app.routes:
        if isinstance(route, APIRoute) and route.path.startswith("/v1"):
            path = route.path.replace("{model:path}", "alpha").replace("{model}", "alpha")
            out += [(method, path) for method in sorted(route.methods)]
    return out


def test_every_v1_route_requires_the_key_and_healthz_does_not(locked):
    url, app = locked
    routes = v1_routes(app)
    assert {("GET", "/v1/models"), ("POST", "/v1/chat/completions")} <= set(routes)
    body = {"model": "alpha", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    wrong = [None, "Bearer", f"Basic {KEY}", f"Bearer {KEY[:-1]}", f"Bearer {KEY}x", f"Bearer x{KEY}",
             f"Bearer {KEY.upper()}", f"Bearer {KEY[:-1]}é".encode("latin-1")]
    with httpx.Client(timeout=30) as http:
        for method, path in routes:
            for auth in wrong:
                headers = {} if auth is None else {"Authorization": auth}
                r = http.request(method, url + path, headers=headers, json=body if method == "POST" else None)
                assert r.status_code == 401, (method, path, auth, r.status_code)
                assert r.json()["error"]["code"] == "invalid_api_key"
            r = http.request(method, url + path, headers={"Authorization": f"Bearer {KEY}"},
                             json=body if method == "POST" else None)
            assert r.status_code == 200, (method, path, r.text[:200])
        assert http.get(f"{url}/healthz").status_code == 200


def test_the_key_is_compared_in_constant_time():
    """Behaviour, not timing: the comparison is hmac.compare_digest on bytes (its contract is constant
    time in the length of the secret), and not `==` anywhere near the key."""
    import inspect

    from serve import api

    check = inspect.getsource(api.require_key)
    assert "hmac.compare_digest" in check and "== api_key" not in check and "!= api_key" not in check
    routes = inspect.getsource(api.add_api)  # every /v1 route's check goes through it
    assert "require_key(settings.api_key, request)" in routes


# ── the UI login ───────────────────────────────────────────────────────────────────────────────
def test_the_ui_needs_a_login_and_the_api_does_not(locked):
    url, _ = locked
    with httpx.Client(timeout=30) as http:
        assert http.get(f"{url}/config").status_code == 401
        assert http.post(f"{url}/gradio_api/call/chat", json={"data": list(CHAT)}).status_code == 401
        assert http.get(f"{url}/gradio_api/info").status_code == 401
        assert http.post(f"{url}/login", data={"username": "alice", "password": "nope"}).status_code >= 400
        assert http.get(f"{url}/config").status_code == 401
        ok = http.post(f"{url}/login", data={"username": "bob", "password": "pw-bob-21a"})
        assert ok.status_code == 200
        assert http.get(f"{url}/config").status_code == 200  # the session cookie opens it
        # /v1 ignores UI logins: its key is what counts, with or without a UI session
        assert http.get(f"{url}/v1/models").status_code == 401
        assert http.get(f"{url}/v1/models", headers={"Authorization": f"Bearer {KEY}"}).status_code == 200
    with httpx.Client(timeout=30) as fresh:
        assert fresh.get(f"{url}/v1/models", headers={"Authorization": f"Bearer {KEY}"}).status_code == 200

    with pytest.raises(Exception):  # noqa: B017 - gradio_client's error types vary by version
        with gradio_client(url + "/"):
            pass
    with gradio_client(url + "/", auth=USERS[0]) as client:
        history, _, _ = client.predict(*CHAT, api_name="/chat")
        assert history[-1]["content"] and "alpha says" in json.dumps(history)


def test_ui_auth_option_and_environment(monkeypatch):
    from chatbuild.cli import build_parser
    from serve.cli import _ui_auth

    assert _ui_auth("alice:pw,bob:p:w") == [("alice", "pw"), ("bob", "p:w")]
    assert _ui_auth(None) is None and _ui_auth("") is None
    for bad in ("alice", "alice:", ":pw", "alice:pw,,"):
        with pytest.raises(UserError, match="user:password"):
            _ui_auth(bad)
    monkeypatch.setenv("CHATBUILD_UI_AUTH", "carol:secret")
    args = build_parser(["serve"]).parse_args(["serve", "runs/x"])
    assert _ui_auth(args.ui_auth) == [("carol", "secret")]


# ── arena votes belong to the session that saw the battle ──────────────────────────────────────
def test_a_vote_needs_the_battle_shown_in_this_session(tmp_path):
    db = tmp_path / "chatbuild.sqlite"
    with serving(ui_app(ScriptedEngine(delay=0.001), db)) as url:
        with gradio_client(url) as alice, gradio_client(url) as mallory:
            assert "send a message first" in alice.predict(api_name="/vote_a")[2]  # nothing shown yet
            alice.predict("Which is better?", "Anonymous battle", "alpha", "beta", 0.7, 1.0, 3,
                          api_name="/arena_send")
            # another session votes right after Alice's battle: it has no battle of its own
            assert "send a message first" in mallory.predict(api_name="/vote_b")[2]
            # ... and smuggling Alice's round into the event's state does not help: state is server-side
            with sqlite3.connect(db) as conn:
                round_id, = conn.execute("SELECT id FROM arena_rounds").fetchone()
            forged = {"round": round_id, "models": ["alpha", "beta"], "anonymous": True, "conv": [[], []], "turn": 1,
                      "answered": 1, "voted": 0, "params": None}
            with httpx.Client(timeout=30) as http:
                r = http.post(f"{url}gradio_api/call/vote_b", json={"data": [forged]})
                if r.status_code == 200:
                    http.get(f"{url}gradio_api/call/vote_b/{r.json()['event_id']}").raise_for_status()
            assert storage.list_battles(db) == [], "no vote landed for a battle this session did not see"
            assert "saved" in alice.predict(api_name="/vote_a")[2]
            assert "over" in alice.predict(api_name="/vote_b")[2]  # a second vote on the same battle
            assert "send a message first" in mallory.predict(api_name="/vote_a")[2]
    battles = storage.list_battles(db)
    assert len(battles) == 1 and battles[0]["winner"] == "model_a"


# ── how models are loaded ──────────────────────────────────────────────────────────────────────
def test_models_load_from_safetensors_without_remote_code(fast_run, monkeypatch):
    """The calls themselves are recorded (the real loaders still run): a grep could not tell which
    value reaches from_pretrained, a recording can."""
    import transformers
    from peft import PeftModel

    from chatbuild.engines.hf import HFEngine

    calls = []

    def recording(owner, name):
        real = getattr(owner, name)

        def call(*args, **kwargs):
            calls.append((f"{owner.__name__}.{name}", kwargs))
            return real(*args, **kwargs)
        monkeypatch.setattr(owner, name, call)

    for cls in (transformers.AutoConfig, transformers.AutoTokenizer, transformers.AutoModelForCausalLM, PeftModel):
        recording(cls, "from_pretrained")
    engine = HFEngine.from_runs([fast_run])
    engine.close()
    names = {name for name, _ in calls}
    assert {"AutoModelForCausalLM.from_pretrained", "AutoTokenizer.from_pretrained"} <= names
    for name, kwargs in calls:
        if not name.startswith("PeftModel"):
            assert kwargs.get("trust_remote_code") is False, (name, kwargs)
    model_calls = [kw for name, kw in calls if name == "AutoModelForCausalLM.from_pretrained"]
    assert all(kw.get("use_safetensors") is True for kw in model_calls)
    adapter_files = {p.name for p in (fast_run / "adapter").iterdir()}
    assert "adapter_model.safetensors" in adapter_files and not any(f.endswith(".bin") for f in adapter_files)


# ── CORS ───────────────────────────────────────────────────────────────────────────────────────
def test_cors_is_closed_by_default(locked):
    url, _ = locked
    origin = {"Origin": "https://evil.example"}
    with httpx.Client(timeout=30) as http:
        r = http.get(f"{url}/v1/models", headers={**origin, "Authorization": f"Bearer {KEY}"})
        assert "access-control-allow-origin" not in r.headers
        pre = http.options(f"{url}/v1/chat/completions", headers={
            **origin, "Access-Control-Request-Method": "POST", "Access-Control-Request-Headers": "authorization"})
        assert "access-control-allow-origin" not in pre.headers
        assert "access-control-allow-origin" not in http.get(f"{url}/healthz", headers=origin).headers


def test_a_base_with_only_pickled_weights_is_refused(tiny_base, tmp_path):
    """A checkpoint whose weights are only a pickle (pytorch_model.bin) is not unpickled: one-line
    UserError naming safetensors."""
    import shutil

    import torch
    from safetensors.torch import load_file

    from chatbuild.modeling import load_base_model

    pickled = tmp_path / "pickled-base"
    pickled.mkdir()
    weights = {}
    for f in tiny_base.iterdir():
        if f.suffix == ".safetensors":
            weights.update(load_file(f))
        elif f.is_file():
            shutil.copy(f, pickled / f.name)
    torch.save(weights, pickled / "pytorch_model.bin")
    with pytest.raises(UserError, match="safetensors") as e:
        load_base_model(str(pickled), quant="none", compute_dtype="float32", device="cpu")
    assert "\n" not in str(e.value)
