"""The serving layer: OpenAI-compatible HTTP API and the Gradio UI, over a `chatbuild.engines.ChatEngine`."""
