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
