"""chatbuild: build a chatbot the way QLoRA built Guanaco, serve it, and evaluate it.

Importing this package must stay light (no torch, gradio, vllm, bitsandbytes or fastapi at import
time): the CLI starts fast, and `serve`/`eval` pull in only what they use.
"""

__version__ = "0.1.0"
