"""The one exception type for mistakes a user can fix.

Every user-facing entry point (CLI, API, UI, file loaders) raises `UserError` with a message that
says what is wrong and where (file and line, field, value). The CLI prints it without a traceback;
anything else that escapes is a bug in chatbuild and keeps its traceback.
"""


class UserError(ValueError):
    """Bad input from the user: a file, a setting, a request. The message is shown as it is."""


def where(path, line: int | None = None, field: str | None = None) -> str:
    """'file.jsonl:12, field "role"' — the location prefix used in error messages."""
    out = str(path)
    if line is not None:
        out += f":{line}"
    if field is not None:
        out += f', field "{field}"'
    return out


class ConfigError(UserError):
    """A setting with a wrong value: `key` is the dotted setting ("lora.r", "data.chat_format", or the
    flag it came from, "--chat-format"), `problem` what is wrong with it ("must be > 0, got 0").

    The message reads "lora.r: must be > 0, got 0", or with the `source` the value came from,
    "guanaco.yaml + command line: lora.r must be int, got 'x'". Forms show `problem` beside the field
    of `key`, so they never search the message for a setting's name."""

    def __init__(self, key: str, problem: str, source: str | None = None):
        self.key, self.problem, self.source = key, problem, source
        super().__init__(f"{source}: {key} {problem}" if source else f"{key}: {problem}")
