"""Files that clients upload through the UI: where they may be, how large they may be.

An upload reaches an event as a FileData naming a path on the server, and a client can name any
path (issue 17: `{"path": "/any/file.json", "meta": {"_type": "gradio.FileData"}}`). Before the
handler runs, Gradio copies the named file into its cache, refusing paths outside its upload folder
only in Blocks it believes launched. So the path is checked twice before that copy, each check
enough alone:

1. serve/ui.py marks the mounted Blocks launched, so Gradio's own check runs;
2. serve/app.py's `UIBodyLimit` refuses a request whose JSON holds a FileData naming a file outside
   the upload folder (`foreign_files`), before Gradio sees it;

and handlers take an upload only through `uploaded_file` (inside the upload folder, under the size
limit of what they do with it), which deletes what it refuses for its size.
"""

from pathlib import Path

from chatbuild.errors import UserError

UPLOAD_ROUTE = "/gradio_api/upload"  # where Gradio takes uploads (the UI is mounted at /)


def max_file_size(settings) -> int:
    """The largest upload Gradio takes (one cap for every File component: it has no per-component
    one): the Build tab's `max_upload_bytes` when the tab is on, else the chat import's
    `max_ui_body_bytes` (an imported conversation then travels in each request: it is a body's size)."""
    return max(settings.max_ui_body_bytes, settings.max_upload_bytes if settings.builder else 0)


def upload_folder() -> Path:
    """Gradio's upload folder, where everything clients upload lands (`GRADIO_TEMP_DIR`, else
    gradio/ in the system's temp folder), resolved."""
    from gradio.utils import get_upload_folder

    return Path(get_upload_folder()).resolve()


def foreign_files(data) -> list[str]:
    """The paths of FileData in `data` (a request's parsed JSON, any shape) that name a local file
    outside Gradio's upload folder: files no client of this server can have uploaded. FileData as
    Gradio finds them: objects with a string "path" and "meta": {"_type": "gradio.FileData"}; http(s)
    URLs are Gradio's to fetch, not local files."""
    folder = upload_folder()
    out, stack = [], [data]
    while stack:  # no recursion: the body may be nested as deep as the JSON parser allows
        node = stack.pop()
        if isinstance(node, dict):
            path, meta = node.get("path"), node.get("meta")
            if isinstance(path, str) and isinstance(meta, dict) and meta.get("_type") == "gradio.FileData" \
                    and not path.startswith(("http://", "https://")) and not _inside(path, folder):
                out.append(path)
            stack.extend(node.values())
        elif isinstance(node, list):
            stack.extend(node)
    return out


def _inside(path: str, folder: Path) -> bool:
    try:
        return Path(path).resolve().is_relative_to(folder)
    except (OSError, RuntimeError, ValueError):  # a symlink loop, a NUL byte
        return False


def uploaded_file(path: str | Path, max_bytes: int, limit_name: str) -> Path:
    """The uploaded file a handler was given, resolved (symlinks too); checked before anything reads it.

    UserError, one line naming the file by its name alone, when it does not lie inside Gradio's upload
    folder or is not a regular file (one message for both: no saying which server files exist), or
    when it is over `max_bytes` (`limit_name`: the setting to raise); an upload refused for its size is
    deleted, so nothing refused stays on disk."""
    name = Path(str(path)).name
    if not _inside(str(path), upload_folder()) or not Path(path).resolve().is_file():
        raise UserError(f"{name}: not a file uploaded to this server")
    real = Path(path).resolve()
    size = real.stat().st_size
    if size > max_bytes:
        discard(real)
        raise UserError(f"{name}: {size / 1e6:.1f} MB is over the upload limit of {max_bytes / 1e6:.1f} MB "
                        f"({limit_name})")
    return real


def discard(path: Path) -> None:
    """Delete an upload `uploaded_file` returned, and the folder Gradio made for it if that is empty now."""
    path.unlink(missing_ok=True)
    if path.parent != upload_folder():
        try:
            path.parent.rmdir()
        except OSError:  # other files in it, or gone already
            pass
