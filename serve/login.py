"""The UI's login check, with a throttle against password guessing.

Gradio's POST /login calls the `auth` callable given to `mount_gradio_app` as `auth(username,
password) -> bool` and nothing else (gradio/routes.py, `login`): the callable never sees the request,
so there is no client address to throttle on. The throttle is therefore per username:

- after `max_failures` wrong passwords for one user within `window_s`, every login as that user,
  the right password included, is refused with 429 and a Retry-After for `lockout_s`; attempts
  refused that way are not checked, so they neither count nor extend the lockout;
- every username that is not a configured login shares one such budget, so guessing over made-up
  names is throttled as a whole and the bookkeeping stays as small as the list of logins. Together
  this bounds the guesses the whole server accepts to (logins + 1) x `max_failures` per lockout.

The price, as with any lockout: anyone can keep one login locked by failing it on purpose. Sessions
already logged in are not affected (Gradio checks their cookie, not the password). Passwords are
compared with `hmac.compare_digest` (constant time in their content), and an unknown name is
checked against a stand-in the same way, so it takes the same path as a known one.
"""

import hmac
import logging
import math
import threading
import time

from fastapi import HTTPException

log = logging.getLogger("chatbuild.serve")

UNKNOWN = ""  # the budget every name that is not a configured login shares


def login_guard(settings) -> "LoginGuard | None":
    """The `auth` for `gr.mount_gradio_app` from `serve.settings.Settings`: None (no login) without
    `ui_auth`."""
    if not settings.ui_auth:
        return None
    return LoginGuard(settings.ui_auth, settings.login_max_failures, settings.login_window_s,
                      settings.login_lockout_s)


class LoginGuard:
    """`guard(username, password) -> bool`, Gradio's `auth` callable; raises HTTPException 429 while
    that username is locked."""

    def __init__(self, users: list[tuple[str, str]], max_failures: int = 5, window_s: float = 60.0,
                 lockout_s: float = 30.0, clock=time.monotonic):
        self.passwords = dict(users)
        self.max_failures, self.window_s, self.lockout_s = max(1, max_failures), window_s, lockout_s
        self.clock = clock
        self._lock = threading.Lock()
        self._failures: dict[str, list[float]] = {}  # budget -> times of recent wrong passwords
        self._locked_until: dict[str, float] = {}

    def __call__(self, username: str, password: str) -> bool:
        budget = username if username in self.passwords else UNKNOWN
        expected = self.passwords.get(username, "\0not a password\0")
        # One lock around check, compare and count: concurrent guesses cannot all pass the check
        # before any of them is counted.
        with self._lock:
            now = self.clock()
            until = self._locked_until.get(budget, 0.0)
            if now < until:
                wait = max(1, math.ceil(until - now))
                raise HTTPException(429, f"too many failed logins for this user; try again in {wait} s",
                                    headers={"Retry-After": str(wait)})
            right = hmac.compare_digest(password.encode("utf-8", "surrogatepass"),
                                        expected.encode("utf-8", "surrogatepass")) and budget != UNKNOWN
            if right:
                self._failures.pop(budget, None)
                return True
            recent = [t for t in self._failures.get(budget, []) if t > now - self.window_s] + [now]
            if len(recent) < self.max_failures:
                self._failures[budget] = recent
                return False
            self._failures.pop(budget, None)
            self._locked_until[budget] = now + self.lockout_s
        log.warning("login: %d wrong passwords for %s within %g s; refusing its logins for %g s", len(recent),
                    repr(budget) if budget != UNKNOWN else "unknown users", self.window_s, self.lockout_s)
        return False
