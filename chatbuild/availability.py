"""Cached checks for optional dependencies, and the error that names the extra to install.

Heavy optional libraries (gradio, fastapi, vllm, bitsandbytes on a machine without it) are imported
inside the functions that need them; those functions call `require(...)` first so a user sees which
extra is missing instead of a bare ImportError deep in a stack (the idea of litgpt's RequirementCache
and PEFT's import_utils).
"""

import functools
import importlib.util
import shutil

EXTRA_OF = {
    "gradio": "ui",
    "fastapi": "ui",
    "uvicorn": "ui",
    "httpx": "ui",
    "vllm": "vllm",
    "openai": "dev",
    "playwright": "dev",
}


@functools.cache
def available(module: str) -> bool:
    """True if `module` can be imported (without importing it)."""
    return importlib.util.find_spec(module) is not None


def require(module: str, feature: str) -> None:
    """Raise ImportError naming the pip extra that provides `module`, if it is missing."""
    if not available(module):
        extra = EXTRA_OF.get(module)
        hint = f'pip install "chatbuild[{extra}]"' if extra else f"pip install {module}"
        raise ImportError(f"{feature} needs the Python package '{module}', which is not installed: {hint}")


@functools.cache
def cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


@functools.cache
def executable(name: str) -> str | None:
    """Path of a program on PATH, or None."""
    return shutil.which(name)
