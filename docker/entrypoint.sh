#!/bin/sh
# Entry point of the chatbuild images (Dockerfile targets `cpu` and `gpu`).
#
#   (no arguments)  serve: the run folders in CHATBUILD_RUNS (and/or the base CHATBUILD_BASE), or the
#                   models of the server at CHATBUILD_REMOTE_URL (CHATBUILD_ENGINE=openai), or else
#                   the demo run, fine-tuned first if the data folder doesn't hold it yet: preset
#                   CHATBUILD_DEMO_PRESET, by default smollm2-persona (SmolLM2-135M-Instruct, imported
#                   once into CHATBUILD_HOME, as "Captain Byte"); tiny-cpu is the two-minute toy
#   ARGS...         run `chatbuild ARGS...` instead, e.g. `finetune tiny-cpu output_dir=/data/runs/x`
#
# Settings are environment variables (docs/hosting.md, "Settings"); the image sets the defaults below.
# Tests run this script directly, outside any container, with the data folder in a temporary directory.
set -eu

: "${CHATBUILD_DATA:=/data}"                      # runs/, the SQLite store, logs
: "${CHATBUILD_HOME:=$CHATBUILD_DATA/chatbuild}"  # where SmolLM2 is imported (and the tiny base built)
: "${CHATBUILD_DEMO_PRESET:=smollm2-persona}"     # the demo's fine-tune when no runs are given
: "${CHATBUILD_HOST:=0.0.0.0}"
: "${CHATBUILD_PORT:=7860}"
: "${CHATBUILD_ENGINE:=hf}"                       # hf (in process) | openai (remote) | vllm (launched)
export CHATBUILD_DATA CHATBUILD_HOME

if [ "$#" -gt 0 ]; then
    exec chatbuild "$@"
fi

mkdir -p "$CHATBUILD_DATA"
set -f  # CHATBUILD_RUNS and the *_ARGS settings are split on spaces, never globbed

demo_run="$CHATBUILD_DATA/runs/$CHATBUILD_DEMO_PRESET"
if [ "$CHATBUILD_ENGINE" != openai ] && [ -z "${CHATBUILD_RUNS:-}" ] && [ -z "${CHATBUILD_BASE:-}" ]; then
    CHATBUILD_RUNS=$demo_run
    # README.md is the last file a fine-tune writes: without it the run is missing or unfinished.
    if [ ! -f "$demo_run/README.md" ]; then
        echo "chatbuild: no demo run in $demo_run yet; fine-tuning it (preset $CHATBUILD_DEMO_PRESET)" >&2
        # In the background, so that `docker stop` (SIGTERM to this shell) reaches the fine-tune,
        # which saves a checkpoint and exits instead of being killed mid-step.
        # shellcheck disable=SC2086  # CHATBUILD_DEMO_ARGS: key=value overrides, split on spaces
        chatbuild finetune "$CHATBUILD_DEMO_PRESET" "output_dir=$demo_run" ${CHATBUILD_DEMO_ARGS:-} --overwrite --no-progress &
        child=$!
        trap 'kill -TERM "$child" 2>/dev/null || true' TERM INT
        status=0
        while kill -0 "$child" 2>/dev/null; do
            status=0
            wait "$child" || status=$?
        done
        trap - TERM INT
        [ "$status" -eq 0 ] || exit "$status"
    fi
fi

if [ "$CHATBUILD_ENGINE" = openai ]; then
    # A remote OpenAI-compatible server (compose.yaml's vllm service): it lists the models itself.
    # Its key comes from OPENAI_API_KEY, read by `chatbuild serve`.
    set -- --remote-url "${CHATBUILD_REMOTE_URL:?CHATBUILD_ENGINE=openai needs CHATBUILD_REMOTE_URL}"
else
    # shellcheck disable=SC2086  # CHATBUILD_RUNS: run folders separated by spaces
    set -- ${CHATBUILD_RUNS:-}
    if [ -n "${CHATBUILD_BASE:-}" ]; then
        set -- "$@" --base "$CHATBUILD_BASE"
    fi
fi
# The API key and the UI logins stay in the environment (CHATBUILD_API_KEY, CHATBUILD_UI_AUTH), where
# `chatbuild serve` reads them: never on a command line that `ps` shows.
# shellcheck disable=SC2086  # CHATBUILD_SERVE_ARGS: further `chatbuild serve` flags
exec chatbuild serve "$@" --engine "$CHATBUILD_ENGINE" --host "$CHATBUILD_HOST" --port "$CHATBUILD_PORT" \
    ${CHATBUILD_SERVE_ARGS:-}
