"""The serving settings: every limit of `chatbuild serve` by name, in one dataclass.

Kept apart from serve/api.py so that the CLI's --help and the UI read the defaults without FastAPI.
"""

from dataclasses import dataclass


@dataclass
class Settings:
    """Limits and switches of one server. Every limit is a named setting here."""

    api_key: str | None = None  # None: no authentication
    ui_auth: list[tuple[str, str]] | None = None  # (user, password) logins for the web UI; None: open
    # Login throttle (serve/login.py): after login_max_failures wrong passwords for one user within
    # login_window_s, every login as that user (the right password too) is refused for login_lockout_s.
    login_max_failures: int = 5
    login_window_s: float = 60.0
    login_lockout_s: float = 30.0
    max_messages: int = 256  # messages in one request
    max_prompt_tokens: int = 4096  # tokens of the rendered prompt (engines that count tokens locally)
    max_new_tokens: int = 2048  # the largest max_tokens a request may ask for
    default_max_tokens: int = 256  # when a request gives no max_tokens
    max_body_bytes: int = 1_000_000  # request body size
    max_running: int = 16  # generations at once (the in-process engine decodes them in one batch)
    queue_size: int = 64  # requests waiting for a generation slot; one more gets 429
    max_stop: int = 4  # stop strings in one request (OpenAI's limit)
    db_path: str | None = None  # the UI's SQLite database (arena votes, ...); None: chatbuild.storage's default
    max_votes_per_minute: int = 10  # arena votes one login (one session without logins) may cast a minute; 0: no limit
    # The Build tab (fine-tune and evaluate from the browser): off unless asked for, since it runs jobs
    # on this machine. Its folder holds uploads, runs, evaluations and job logs (serve.builder).
    builder: bool = False
    builder_dir: str | None = None  # None: builder/ beside the database
    max_upload_bytes: int = 200 * 1024 * 1024  # largest dataset upload to the Build tab
    self_url: str | None = None  # this server's /v1 address as seen from this machine (eval jobs call it)
    judge_url: str | None = None  # the Build tab's judge for "evaluate against" (OpenAI-compatible /v1)
    judge_model: str | None = None
    # The web UI's routes (everything outside /v1): a larger body is refused with 413 before it is read
    # (serve/app.py). A chat history travels in every request, so this is also the largest chat import.
    max_ui_body_bytes: int = 4_000_000
    # Who may build, and how much (serve.builder): with UI logins, only the logins listed here
    # ("*": every login; None: none). Without UI logins the tab is open (loopback only, see serve/cli.py).
    builder_users: list[str] | None = None
    builder_max_queued: int = 8  # Build jobs queued or running at once; one more is refused
    builder_max_queued_per_user: int = 2  # ... of them per login
    builder_max_steps: int = 100_000  # the largest train.steps the Build form accepts
