"""The in-process engine: one base, several run adapters, chosen per request.

    engine = HFEngine.from_runs(["runs/a", "runs/b"])      # base and quantization from the runs' config.yaml
    engine = HFEngine.from_runs(["runs/a"], precision="auto")   # base held in fp32 on a CPU if it fits (PRECISIONS)
    engine.models()                                         # ["a", "b", "tiny-base"]: runs, then the bare base
    engine.load_adapter("c", "runs/c")                      # hot-load another run on the same base

How a request picks its adapter without touching shared state: every forward pass names each batch
row's adapter (`"__base__"` = none), so nothing like `set_adapter` is ever toggled and requests for
different runs share one forward pass. Two forward passes can decode (`DECODERS`, `serve --decoder`):
the fast one (`chatbuild.engines.decoder`: fixed KV slots, a lean Llama-family layer loop that adds
each row group's LoRA itself; the default on a CPU where it runs the model) and transformers' own
with PEFT's `adapter_names` (any causal LM and PEFT adapter). PEFT implements `adapter_names` with
forward hooks that live for the duration of one call on the shared modules, and the fast path reads
the adapters' modules, so calls must not overlap: forward passes and adapter loading take one lock.

Concurrent requests are batched continuously (`chatbuild.engines.batching`): one decode thread runs
one forward pass per token step for every running reply, replies join and leave the batch between
steps, at most `max_batch` at once (the rest wait their turn). Each reply gets the tokens it would get
alone (its own seeded sampler; left-padded rows see only their own tokens). The reading thread turns
tokens into text: stop strings, and what a cancelled or closed stream counts, are decided there.

The decode loop is ours rather than `model.generate` because it needs, per token: the cancel check,
the stop strings, the running token counts, and rows joining mid-flight. Sampling uses transformers'
own logits processors, in `generate`'s order (repetition penalty, temperature, top-k, top-p).
"""

import re
import threading
import time
from collections import deque
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from chatbuild.config import ModelSettings, RunConfig
from chatbuild.engines import (
    BASE_ADAPTER,
    GREEDY_BELOW,
    Chunk,
    GenerationParams,
    PromptTooLong,
    UnknownModel,
    check_params,
)
from chatbuild.engines.batching import HFBatch, Request, Scheduler, SlotBatch
from chatbuild.errors import UserError
from chatbuild.runs import Run, load_run
from chatbuild.templates import ChatFormat, bare_base_format, prompt_ids, stop_token_ids


@dataclass
class ServedModel:
    """One name an engine answers to: a run's adapter, or the bare base."""

    name: str
    adapter: str  # PEFT adapter name, or BASE_ADAPTER
    tokenizer: object
    chat_format: ChatFormat
    run_path: Path | None = None
    token_chars: int = 0  # characters of the vocabulary's longest token (0: count them on creation)

    def __post_init__(self):
        # A prompt of n tokens has at most n * token_chars characters of text: the cheap bound that
        # refuses a hopeless prompt before tokenizing it (token strings spell spaces and bytes with
        # at least as many characters as they stand for, so this never refuses a prompt that fits).
        if not self.token_chars:
            self.token_chars = max(map(len, self.tokenizer.get_vocab()), default=1)


@dataclass
class GenerationRecord:
    """How one finished generation went (kept in `HFEngine.recent`, newest last)."""

    model: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str
    seconds: float


class HFEngine:
    """A `ChatEngine` over transformers + bitsandbytes + PEFT (see the module docstring)."""

    def __init__(self, base: str, *, revision: str | None = None, quant: str = "nf4", double_quant: bool = True,
                 compute_dtype: str = "auto", quant_storage: str = "uint8", trust_remote_code: bool = False,
                 device: str | None = None, base_name: str | None = None, chat_format: ChatFormat | str | None = None,
                 max_prompt_tokens: int | None = None, max_batch: int = 16, precision: str | None = None,
                 decoder: str = "auto"):
        """Load the base model and serve it bare under `base_name` (default: the base's folder name or
        hub id). Adapters come with `load_adapter`. `quant` and the settings after it are how runs on
        this base were trained; `precision` is how the base is held while serving (`PRECISIONS`; None:
        as trained). `chat_format` is how the bare base is prompted: a ChatFormat, a registry name or
        .jinja file (`chatbuild.templates`), or None for the base's own chat template when it has one,
        else Guanaco; `max_prompt_tokens` caps prompts below the context window; `max_batch` is the
        most replies decoded in one forward pass (1: one reply at a time); `decoder` is which forward
        pass decodes (`DECODERS`)."""
        from chatbuild.modeling import default_device, load_base_model, load_tokenizer

        device = device or default_device()
        trained_quant = quant  # what runs on this base must name, whatever precision serves it
        chosen = precision and choose_precision(precision, base, device)
        if chosen and chosen != quant:  # nf4 for a base trained in nf4 keeps its own compute dtype
            quant, compute_dtype = PRECISIONS[chosen]
        precision_note = ""
        if chosen == "q8":
            try:
                _check_q8(device, decoder)
            except UserError as e:
                if precision == "q8":
                    raise
                chosen, precision_note = "fp32", f"fp32, not q8: {e}"  # auto: the next fastest
        model = load_base_model(base, revision, quant, double_quant, compute_dtype, device, trust_remote_code,
                                quant_storage=quant_storage)
        tokenizer = load_tokenizer(base, revision, trust_remote_code)
        if not isinstance(chat_format, ChatFormat):
            chat_format = bare_base_format(tokenizer, chat_format)
        self._setup(model, tokenizer, base_name or _default_base_name(base), chat_format, max_prompt_tokens, max_batch,
                    decoder, q8="asked" if precision == "q8" else "auto" if chosen == "q8" else None)
        self.precision_note = self.precision_note or precision_note
        # What a run must be trained on to be served here (`LoadsAdapters`): the key of a run on this base.
        # Double quantization is a 4-bit feature; a run's config records it off for int8 and none.
        self.base_key = _base_key(ModelSettings(
            base=base, revision=revision, quant=trained_quant,
            double_quant=double_quant and trained_quant in ("nf4", "fp4"),
            quant_storage=quant_storage, compute_dtype=compute_dtype, trust_remote_code=trust_remote_code))

    @classmethod
    def from_model(cls, model, tokenizer, name: str, *, adapters: dict[str, str] | None = None,
                   chat_format: ChatFormat | None = None, max_prompt_tokens: int | None = None,
                   max_batch: int = 16, decoder: str = "auto", q8: bool = False) -> "HFEngine":
        """An engine over a model already in memory (benchmarks: `chatbuild.shapes.build_random_4bit`),
        served bare under `name`, plus `adapters` ({model name: PEFT adapter name}) already on `model`
        (then a PeftModel). Run folders cannot be hot-loaded onto it: it has no base on disk to check.
        `q8`: the fast decoder multiplies the (fp32, CPU) model's linear layers in q8."""
        engine = cls.__new__(cls)
        if q8:
            _check_q8(next(model.parameters()).device, decoder)
        engine._setup(model, tokenizer, name, chat_format, max_prompt_tokens, max_batch, decoder,
                      q8="asked" if q8 else None)
        engine.base_key = (name, None, "in memory")
        for served, adapter in (adapters or {}).items():
            engine._models[served] = ServedModel(served, adapter, tokenizer, chat_format or ChatFormat())
        return engine

    def _setup(self, model, tokenizer, base_name: str, chat_format: ChatFormat | None, max_prompt_tokens: int | None,
               max_batch: int, decoder: str = "auto", q8: str | None = None) -> None:
        self.model = model
        self.model.eval()
        self.device = next(self.model.parameters()).device
        self.context_window = getattr(self.model.config, "max_position_embeddings", None)
        self.max_prompt_tokens = max_prompt_tokens
        self.base_name = base_name
        self.recent: deque[GenerationRecord] = deque(maxlen=256)
        self._models = {base_name: ServedModel(base_name, BASE_ADAPTER, tokenizer, chat_format or ChatFormat())}
        self._lock = threading.Lock()  # forward passes and adapter loading, one at a time
        self._count_lock = threading.Lock()
        self._active = 0
        self._adapters_loaded = 0
        self._scheduler = Scheduler(self._batch(check_decoder(decoder), max_batch, q8), max_batch)
        # how the base is held: nf4, bf16, fp32, q8 (fp32 multiplied in q8), ...
        self.precision = "q8" if getattr(self._decoder, "q8", False) else precision_of(model)

    def _batch(self, decoder: str, max_batch: int, q8: str | None = None):
        """The running batch for the `decoder` asked for: the fast path (`SlotDecoder`) where it runs
        this model ("auto": on a CPU; on a GPU it is untested so far), else transformers' forward.
        Sets `self.decoder` to the one chosen and `self.decoder_note` to why the fast one was not.
        `q8`: the fast path multiplies in q8; "asked": nothing else will do (UserError if it cannot),
        "auto": else fp32, with the reason in `self.precision_note`."""
        from chatbuild.engines.decoder import SlotDecoder, Unsupported, q8_reason, unsupported_reason

        self._decoder, self.decoder_note, self.precision_note = None, "", ""
        if q8 == "auto" and (why := q8_reason(self.model) or unsupported_reason(self.model)):
            q8, self.precision_note = None, f"fp32, not q8: {why}"
        if decoder == "fast" or (decoder == "auto" and self.device.type == "cpu"):
            try:
                self._decoder = SlotDecoder.for_model(self.model, slots=max_batch, q8=bool(q8))
            except Unsupported as e:
                if decoder == "fast" or q8:
                    raise UserError(f"--{'quant q8' if q8 else 'decoder fast'}: {e}") from e
                self.decoder_note = f"transformers' forward pass: {e}"
        elif decoder == "auto":
            self.decoder_note = "transformers' forward pass: the fast decoder is used on CPUs only (untested on GPUs)"
        self.decoder = "fast" if self._decoder else "hf"
        if self._decoder:
            return SlotBatch(self._decoder, self._fast_forward, self.device)
        return HFBatch(self._forward, self.device)

    @property
    def batch_sizes(self):
        """A Counter of decode steps by how many replies each one ran (batch size -> steps)."""
        return self._scheduler.batch_sizes

    @classmethod
    def from_runs(cls, runs: Sequence[str | Path] = (), *, base: str | None = None, base_name: str | None = None,
                  chat_format: str | None = None, device: str | None = None, max_prompt_tokens: int | None = None,
                  max_batch: int = 16, precision: str | None = None, decoder: str = "auto") -> "HFEngine":
        """An engine serving run folders on their shared base, plus the bare base.

        All runs must name the same base, revision and quantization (one base per engine: start one
        server per base otherwise); the first run's remaining model settings (double quantization,
        compute dtype) are the engine's. `base` replaces the base path the runs name (e.g. a local copy of
        the same model); with no runs it is the base to serve alone. `chat_format` is how the bare base
        is prompted (see `__init__`); each run is prompted in its own format; `precision` is how the
        base is held while serving (`PRECISIONS`; None: as the runs were trained); `decoder`: which
        forward pass decodes (`DECODERS`). Model names are the
        runs' `config.name`, made unique with a -2, -3, ... suffix."""
        from chatbuild.config import ModelSettings

        loaded = [load_run(r) for r in runs]
        if not loaded and not base:
            raise UserError("nothing to serve: give one or more run folders, or a base model")
        keys = {}
        for run in loaded:
            keys.setdefault(run.base_key(), []).append(run)
        if len(keys) > 1:
            groups = "; ".join(f"{', '.join(r.name for r in rs)} on {_describe(k)}" for k, rs in keys.items())
            raise UserError(f"these runs were trained on different bases ({groups}); one server hosts one base, "
                            "so start one `chatbuild serve` per base")
        m = loaded[0].config.model if loaded else ModelSettings(base=base)
        note = ""
        if check_decoder(decoder) == "auto":  # a run the fast path cannot run: serve them all with hf
            from chatbuild.engines.decoder import adapter_config_reason

            for run in loaded:
                reason = adapter_config_reason(run.adapter_dir)
                if reason and precision == "q8":
                    raise UserError(f"--quant q8 runs in the fast decoder, which cannot serve run {run.name}: it has "
                                    f"{reason}; serve it with --quant fp32")
                if reason:
                    decoder, note = "hf", f"transformers' forward pass: run {run.name} has {reason}"
                    break
        engine = cls(base or m.base, revision=m.revision, quant=m.quant, double_quant=m.double_quant,
                     compute_dtype=m.compute_dtype, quant_storage=m.quant_storage, trust_remote_code=m.trust_remote_code,
                     device=device, base_name=base_name, chat_format=chat_format,
                     max_prompt_tokens=max_prompt_tokens, max_batch=max_batch, precision=precision,
                     decoder=decoder)
        engine.decoder_note = note or engine.decoder_note
        if loaded:
            engine.base_key = loaded[0].base_key()  # what later runs must name, even when `base` moved it
        for run in loaded:
            engine.load_adapter(engine.unique_name(run.name), run.path)
        return engine

    # ── models ──────────────────────────────────────────────────────────────────────────────
    def models(self) -> list[str]:
        """Run names in load order, then the bare base."""
        served = list(self._models.values())
        return [m.name for m in served if m.adapter != BASE_ADAPTER] + [self.base_name]

    def unique_name(self, name: str) -> str:
        """`name`, or `name-2`, `name-3`, ... if it is taken."""
        candidate, n = name, 1
        while candidate in self._models:
            n += 1
            candidate = f"{name}-{n}"
        return candidate

    def load_adapter(self, name: str, run_path: str | Path) -> str:
        """Serve the run folder at `run_path` under `name` (hot: requests keep running meanwhile,
        pausing for the moment the adapter is attached). The run must be trained on this engine's
        base. Returns the name."""
        from peft import PeftModel

        from chatbuild.modeling import load_tokenizer, vocab_mismatch

        run = load_run(run_path)
        if name in self._models:
            raise UserError(f'a model named "{name}" is already served; pick another name')
        if run.base_key() != self.base_key:
            raise UserError(f"{run.path}: trained on {_describe(run.base_key())}, but this engine serves "
                            f"{_describe(self.base_key)}")
        tokenizer = load_tokenizer(str(run.tokenizer_dir))
        if vocab_mismatch(self.model, tokenizer):
            raise UserError(f"{run.path}: its tokenizer has more ids than the base has embeddings (a run with "
                            "resized embeddings); serving such runs is not supported")
        with self._lock:
            if name in self._models:  # checked again: another thread may have taken the name meanwhile
                raise UserError(f'a model named "{name}" is already served; pick another name')
            adapter = f"adapter{self._adapters_loaded}"  # PEFT names are module keys: no dots, so not the run name
            bare = self.model
            if isinstance(self.model, PeftModel):
                self.model.load_adapter(str(run.adapter_dir), adapter_name=adapter)
            else:
                self.model = PeftModel.from_pretrained(self.model, str(run.adapter_dir), adapter_name=adapter)
            self.model.eval()
            if self._decoder is not None:
                self._refresh_decoder(run, adapter, bare)
            self._adapters_loaded += 1
            self._models[name] = ServedModel(name, adapter, tokenizer, run.chat_format, run.path)
        return name

    def _refresh_decoder(self, run: Run, adapter: str, bare) -> None:
        """Show the fast decoder the adapter just loaded; one it cannot run is unloaded again and refused
        (the rows running meanwhile are untouched: this holds the forward lock)."""
        from chatbuild.engines.decoder import Unsupported

        self._decoder.model = self.model
        try:
            self._decoder.refresh()
        except Unsupported as e:
            if bare is self.model:
                self.model.delete_adapter(adapter)
            else:  # the model was bare before this adapter: unwrap it again
                self.model = self.model.unload()
            self._decoder.model = self.model
            self._decoder.refresh()
            raise UserError(f"{run.path}: {e}; the fast decoder cannot serve it: start the server with "
                            "--decoder hf") from e

    def _served(self, model: str) -> ServedModel:
        served = self._models.get(model)
        if served is None:
            raise UnknownModel(model, self.models())
        return served

    # ── requests ────────────────────────────────────────────────────────────────────────────
    def count_tokens(self, messages: list[dict], model: str, limit: int | None = None) -> int:
        """Prompt tokens `messages` make for `model` (UserError if the conversation is malformed).
        With `limit`, a conversation with more characters than `limit` tokens can spell is refused
        with PromptTooLong without being tokenized (a count over `limit` is the caller's to refuse)."""
        return len(self._prompt(self._served(model), messages, limit))

    def prompt_limit(self) -> int | None:
        """The most prompt tokens a request may have: the context window less one token to reply
        with, lowered to `max_prompt_tokens` if that is set."""
        limits = [n for n in (self.context_window and self.context_window - 1, self.max_prompt_tokens) if n]
        return min(limits) if limits else None

    def _prompt(self, served: ServedModel, messages: list[dict], limit: int | None = None) -> list[int]:
        """The prompt's ids; a prompt whose characters alone prove it over `limit` tokens is refused
        first, so the tokenizer never sees more than `limit * token_chars` characters of content.

        No lock: the tokenizer is only called without truncation or padding, so transformers never
        reconfigures the Rust tokenizer (`set_truncation_and_padding` changes nothing then) and
        concurrent calls are safe; they run in parallel (the Rust side releases the GIL), so a short
        prompt is not queued behind long ones."""
        if limit is not None:
            chars = sum(len(m["content"]) for m in messages if isinstance(m, dict) and isinstance(m.get("content"), str))
            if chars > limit * served.token_chars:
                raise PromptTooLong(-(-chars // served.token_chars), limit, served.name, chars=chars)
        return prompt_ids(served.chat_format, served.tokenizer, messages)

    def stream(self, messages: list[dict], params: GenerationParams, model: str,
               cancel: threading.Event | None = None) -> Iterator[Chunk]:
        """Stream a reply (ChatEngine contract). The request is checked now; it joins the decode batch
        when the returned iterator is first read, and leaves it when done, cancelled or closed."""
        served = self._served(model)
        check_params(params)
        limit = self.prompt_limit()
        ids = self._prompt(served, messages, limit)
        if limit is not None and len(ids) > limit:
            raise PromptTooLong(len(ids), limit, model)
        return self._generate(served, ids, params, cancel)

    @property
    def active(self) -> int:
        """Generations in progress right now."""
        return self._active

    def _generate(self, served: ServedModel, ids: list[int], params: GenerationParams,
                  cancel: threading.Event | None) -> Iterator[Chunk]:
        """Read one reply's tokens from the decode thread and turn them into chunks of text. What this
        reader has taken is what the reply counts: a cancelled stream reports no token it did not see."""
        with self._count_lock:
            self._active += 1
        started, finish, generated, done = time.perf_counter(), "length", 0, False
        request = None
        try:
            tokenizer = served.tokenizer
            eos = _eos_ids(tokenizer, self.model) | stop_token_ids(served.chat_format, tokenizer)
            reply = ReplyText(tokenizer, [] if params.choices else [*served.chat_format.stop, *params.stop])
            pick = _token_picker(params, self.device)
            if params.choices:
                pick, eos = _choice_picker(pick, tokenizer, params.choices), set()
            budget = params.max_new_tokens
            if self.context_window:
                budget = min(budget, self.context_window - len(ids))
            request = Request(ids, served.adapter, pick, eos, budget, cancel)
            self._scheduler.submit(request)
            last_piece = None
            while True:
                if cancel is not None and cancel.is_set():
                    finish = "cancelled"
                    break
                event = request.events.get()
                if isinstance(event, BaseException):
                    raise event
                token, ended = event
                if token is not None:
                    generated += 1
                    if ended != "stop":  # a reply's last token is text unless it is EOS
                        piece, stopped = reply.push(token)
                        if stopped:
                            finish, last_piece = "stop", piece
                            break
                        if piece:
                            yield Chunk(piece, None, len(ids), generated)
                if ended:
                    finish = ended
                    break
            done = True
            yield Chunk(reply.flush() if last_piece is None else last_piece, finish, len(ids), generated)
        except GeneratorExit:  # the reader closed the iterator mid-reply: that is a cancel too
            if not done:
                finish = "cancelled"
            raise
        finally:
            if request is not None:
                request.abandoned = True  # a no-op if the row is done; else it leaves at the next step
            with self._count_lock:
                self._active -= 1
            self.recent.append(GenerationRecord(served.name, len(ids), generated, finish,
                                                time.perf_counter() - started))

    def _forward(self, input_ids, attention_mask, position_ids, cache, adapters: list[str]):
        """One forward pass for the decode thread: `adapters` names each row's adapter."""
        with self._lock:  # looked up per call: `load_adapter` may wrap a bare base meanwhile
            adapter = {"adapter_names": adapters} if _is_peft(self.model) else {}
            return self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                              past_key_values=cache, use_cache=True, logits_to_keep=1, **adapter)

    def _fast_forward(self, ids, slots, starts, last, adapters: list[str]):
        """One forward pass of the fast decoder for the decode thread."""
        with self._lock:
            return self._decoder.forward(ids, slots, starts, last, adapters)

    def close(self) -> None:
        """Drop the model and adapters (and the GPU memory they held)."""
        import gc

        import torch

        self._scheduler.close()
        with self._lock:
            self._models.clear()
            self.model = self._decoder = None
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


class ReplyText:
    """Turns generated token ids into reply text, piece by piece, safe to show as it comes.

    The reply is decoded whole at every token (SentencePiece-style decoders are not additive: a
    token's text depends on its neighbours) and only the part that can no longer change is released.
    Held back are: the text of a trailing run of byte-fallback tokens (`<0x..>`: the decoder turns a
    run into characters only if the whole run is valid UTF-8, so "3" can become "\ufffd" once the next
    byte arrives), a trailing incomplete character (byte-level BPEs), text that could be the start of
    a stop string, and trailing whitespace. Leading whitespace of the reply (the space after
    "### Assistant:") and the whitespace before a stop string are dropped. The pieces add up to the
    decoded reply. `push` returns (new text, whether a stop string ended the reply).

    The stop checks look only at the end of the text: released text never ends with the start of a
    stop string, so a stop string can only begin in the last `longest stop` characters before the
    unreleased tail. Their cost per token is the new text plus the stop strings' length, whatever the
    reply's length (issue 17: rebuilding every prefix of 240 KB stop strings made each token cost ~3 s)."""

    BYTE_TOKEN = re.compile(r"<0x[0-9A-Fa-f]{2}>")

    def __init__(self, tokenizer, stop: list[str]):
        self.tokenizer, self.stop = tokenizer, [s for s in stop if s]
        self._longest = max(map(len, self.stop), default=0)
        self.ids: list[int] = []
        self.sent = ""
        self._byte_run_start: int | None = None  # where the trailing run of byte tokens begins

    def _text(self, upto: int | None = None) -> str:
        return self.tokenizer.decode(self.ids[:upto], skip_special_tokens=True).lstrip()

    def _release(self, upto: str) -> str:
        if len(upto) <= len(self.sent) or not upto.startswith(self.sent):
            return ""
        piece, self.sent = upto[len(self.sent):], upto
        return piece

    def push(self, token: int) -> tuple[str, bool]:
        self.ids.append(token)
        if self.BYTE_TOKEN.fullmatch(str(self.tokenizer.convert_ids_to_tokens(token))):
            if self._byte_run_start is None:
                self._byte_run_start = len(self.ids) - 1
        else:
            self._byte_run_start = None
        text = self._text()
        start = max(0, len(self.sent) - self._longest)
        hits = [i for i in (text.find(s, start) for s in self.stop) if i >= 0]
        if hits:
            return self._release(text[:min(hits)].rstrip()), True
        stable = text if self._byte_run_start is None else self._text(self._byte_run_start)
        safe = stable.rstrip("\ufffd")
        return self._release(safe[:len(safe) - self._held(safe)].rstrip()), False

    def _held(self, text: str) -> int:
        """Length of the longest end of `text` that is the start of a stop string (not all of it)."""
        held = 0
        for s in self.stop:
            # Candidates are the places in the last len(s) - 1 characters where s's first character is.
            j = text.find(s[0], max(0, len(text) - len(s) + 1))
            while j != -1 and len(text) - j > held:
                if s.startswith(text[j:]):
                    held = len(text) - j
                    break
                j = text.find(s[0], j + 1)
        return held

    def flush(self) -> str:
        """The rest of the reply, once no more tokens come."""
        return self._release(self._text().rstrip())


# ── serving precision ───────────────────────────────────────────────────────────────────────
# How the base is held while serving, apart from how the run was trained: QLoRA trains the adapter
# against an NF4 base, but the adapter is a difference of 16/32-bit weights and applies to the base at
# any precision. On a CPU, NF4 costs more than it saves for small bases: its kernel dequantizes every
# weight at every step (bench/serve.py --base measures it), so serving dequantized is faster, memory
# allowing. Greedy replies at each precision are that precision's own (rounding differs).
# q8 holds the base in fp32 too, and the fast decoder multiplies its linear layers in 8-bit integers
# (`chatbuild.engines.q8`: GGML's Q8_0 blocks, a small C kernel compiled on first use); CPU only.
PRECISIONS = {"nf4": ("nf4", "auto"), "bf16": ("none", "bfloat16"), "fp32": ("none", "float32"),
              "q8": ("none", "float32")}
CPU_RAM_SHARE = 4  # `auto` holds the base in fp32 on a CPU when that takes at most 1/4 of available RAM
Q8_BYTES = 4 + 1 + 4 / 32  # bytes per weight under q8: fp32, and int8 with an fp32 scale per 32


# Which forward pass decodes: "fast" is `chatbuild.engines.decoder` (fixed KV slots, a lean Llama-family
# layer loop; models and adapters it does not run are refused with the reason), "hf" is transformers'
# own forward with a DynamicCache (any causal LM, any PEFT adapter), "auto" the fast one on a CPU
# where it runs the model, else hf.
DECODERS = ("auto", "fast", "hf")


def check_decoder(name: str, where: str = "--decoder") -> str:
    """`name` if it is one of DECODERS; else a one-line UserError naming `where`."""
    if name not in DECODERS:
        raise UserError(f'{where}: "{name}" is not a decoder; use {", ".join(DECODERS)}')
    return name


def _check_q8(device, decoder: str) -> None:
    """q8 runs in the fast decoder on a CPU; a UserError before anything loads otherwise."""
    if not str(device).startswith("cpu"):
        raise UserError(f"--quant q8 is a CPU kernel; on {device} use nf4, bf16 or fp32")
    if decoder == "hf":
        raise UserError("--quant q8 runs in the fast decoder, and this engine decodes with transformers' forward "
                        "(--decoder hf); use fp32 there")
    from chatbuild.engines import q8

    q8.kernel()  # built (once per machine) before the base loads, so a missing compiler is told at once


def check_precision(name: str, where: str = "--quant") -> str:
    """`name` if it is a serving precision or "auto"; else a one-line UserError naming `where`."""
    if name not in (*PRECISIONS, "auto"):
        raise UserError(f'{where}: "{name}" is not a serving precision; use {", ".join(PRECISIONS)} or auto')
    return name


def choose_precision(name: str, base: str, device: str) -> str:
    """The precision `name` means for `base` on `device`. "auto": on a CPU, q8 when the base's
    weights in fp32 plus their int8 copy take at most 1/CPU_RAM_SHARE of the available memory (the
    fastest there: bench/serve.py), else fp32 when fp32 alone does (no dequantizing, unlike nf4), else
    nf4; on a GPU, nf4 (the memory QLoRA was chosen for; a measured GPU rule is future work). A base
    whose size cannot be read here (a hub id) gets nf4. The engine serves fp32 instead of an auto q8
    where q8 cannot run (no C compiler, a model or adapter the fast decoder does not run), saying why."""
    check_precision(name)
    if name != "auto":
        return name
    if device.startswith("cuda"):
        return "nf4"
    params = parameter_count(base)
    if params is None:
        return "nf4"
    available = available_memory()
    if params * Q8_BYTES * CPU_RAM_SHARE <= available:
        return "q8"
    return "fp32" if params * 4 * CPU_RAM_SHARE <= available else "nf4"


def parameter_count(base: str) -> int | None:
    """The number of weights in a local base folder, from its .safetensors headers (nothing loaded);
    None when `base` is not a local folder with safetensors files."""
    import math

    from safetensors import safe_open

    folder = Path(base).expanduser()
    files = sorted(folder.glob("*.safetensors")) if folder.is_dir() else []
    if not files:
        return None
    total = 0
    for file in files:
        with safe_open(str(file), "pt") as weights:  # reads the header only
            total += sum(math.prod(weights.get_slice(k).get_shape()) for k in weights.keys())
    return total


def available_memory() -> int:
    """Bytes of memory available to new allocations: Linux MemAvailable (else the physical total),
    lowered to what the container's cgroup v2 limit leaves (memory.max less memory.current), as a
    container on a large host (a hosted Space) sees the host's memory in /proc/meminfo."""
    import os

    available = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                available = int(line.split()[1]) * 1024
    except OSError:
        pass
    left = _cgroup_memory_left(Path("/sys/fs/cgroup"))
    return available if left is None else min(available, left)


def _cgroup_memory_left(root: Path) -> int | None:
    """memory.max less memory.current of the cgroup v2 at `root`; None without a limit ("max") or files."""
    try:
        limit = (root / "memory.max").read_text().strip()
        used = int((root / "memory.current").read_text().strip())
    except (OSError, ValueError):
        return None
    return None if limit == "max" else max(0, int(limit) - used)


def precision_of(model) -> str:
    """How a loaded model holds its base weights: "nf4"/"fp4" (bitsandbytes 4-bit), "int8", or the
    dtype of its floating-point weights ("fp32", "bf16", "fp16")."""
    import torch
    from bitsandbytes.nn import Linear4bit, Linear8bitLt

    for module in model.modules():
        if isinstance(module, Linear4bit):
            return module.weight.quant_type
        if isinstance(module, Linear8bitLt):
            return "int8"
    dtype = next(p.dtype for p in model.parameters() if p.is_floating_point())
    return {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}.get(dtype, str(dtype))


# ── helpers ─────────────────────────────────────────────────────────────────────────────────
def _token_picker(params: GenerationParams, device):
    """A function (seen ids, next-token logits [1, vocab]) -> token id implementing `params`."""
    import torch
    from transformers.generation.logits_process import (
        LogitsProcessorList,
        RepetitionPenaltyLogitsProcessor,
        TemperatureLogitsWarper,
        TopKLogitsWarper,
        TopPLogitsWarper,
    )

    processors = LogitsProcessorList()
    if params.repetition_penalty != 1.0:
        processors.append(RepetitionPenaltyLogitsProcessor(params.repetition_penalty))

    def not_finite() -> RuntimeError:
        # Bounded settings keep the arithmetic finite; NaN here means the model's logits were NaN.
        return RuntimeError(f"the next-token probabilities are not finite (temperature {params.temperature}, "
                            f"repetition_penalty {params.repetition_penalty}): this reply cannot go on")

    if params.temperature < GREEDY_BELOW:  # 0, or a temperature so small it is greedy anyway
        def greedy(seen, logits):
            scores = processors(seen, logits)
            if torch.isnan(scores).any():
                raise not_finite()
            return int(scores.argmax(dim=-1))

        return greedy
    processors.append(TemperatureLogitsWarper(params.temperature))
    if params.top_k > 0:
        processors.append(TopKLogitsWarper(params.top_k))
    if params.top_p < 1.0:
        processors.append(TopPLogitsWarper(params.top_p))
    # A generator per request: a seeded request draws the same tokens whatever else runs concurrently.
    generator = torch.Generator(device=device)
    if params.seed is None:
        generator.seed()
    else:
        generator.manual_seed(params.seed)

    def pick(seen, logits):
        probs = torch.softmax(processors(seen, logits), dim=-1)
        if not torch.isfinite(probs).all():  # multinomial would fail with a cryptic message
            raise not_finite()
        return int(torch.multinomial(probs, 1, generator=generator))

    return pick


def _choice_picker(pick, tokenizer, choices: list[str]):
    """Wrap a token picker so the reply spells one of `choices`: at each step only tokens that
    continue some choice keep their logits; None once a choice is complete (and no longer one
    could still be meant, a shorter complete choice wins when its sibling is not preferred)."""
    import torch

    sequences = [tokenizer(c, add_special_tokens=False)["input_ids"] for c in choices]
    so_far: list[int] = []

    def constrained(seen, logits):
        n = len(so_far)
        live = [s for s in sequences if s[:n] == so_far]
        if any(len(s) == n for s in live) and not any(len(s) > n for s in live):
            return None
        allowed = sorted({s[n] for s in live if len(s) > n})
        masked = torch.full_like(logits, float("-inf"))
        masked[..., allowed] = logits[..., allowed]
        token = pick(seen, masked)
        so_far.append(token)
        return token

    return constrained


def _eos_ids(tokenizer, model) -> set[int]:
    ids = {tokenizer.eos_token_id}
    config_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids.update(config_eos if isinstance(config_eos, list) else [config_eos])
    return {i for i in ids if i is not None}


def _is_peft(model) -> bool:
    from peft import PeftModel

    return isinstance(model, PeftModel)


def _default_base_name(base: str) -> str:
    path = Path(base).expanduser()
    return path.resolve().name if path.exists() else base


def _base_key(model: ModelSettings) -> tuple:
    """The `Run.base_key()` of a run trained on `model`: one definition of "the same base" for the
    runs an engine serves and the base it loaded (chatbuild.runs owns it)."""
    return Run(path=Path(model.base), config=RunConfig(model=model), chat_format=ChatFormat()).base_key()


def _describe(key: tuple) -> str:
    """A base key for a message: "base <base>[@revision] (<quantization>, ...)"."""
    base, revision, *how = key
    return f"base {base}" + (f"@{revision}" if revision else "") + f" ({', '.join(map(str, how))})"
