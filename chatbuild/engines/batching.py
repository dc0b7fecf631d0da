"""Continuous batching for the in-process engine: many replies, one forward pass per token step.

    scheduler = Scheduler(SlotBatch(decoder, forward, device), max_batch=16)   # or HFBatch(forward, device)
    scheduler.submit(request)                          # from any thread; events arrive on request.events
    scheduler.close()

One background thread owns the decoding. Each iteration it
  1. drops rows whose reply is over (finished, cancelled, or abandoned by their reader);
  2. admits waiting requests, up to `max_batch` rows and `prefill_tokens` prompt tokens a step: the
     first waiting prompts are prefilled together in one pass (each row its own adapter and
     positions), or a prompt longer than `prefill_tokens` one chunk at a time, alone, over several
     steps; each row's first token is sampled from the prefill logits and the row joins the batch;
  3. runs ONE forward pass over all rows (one new token each), each row with its own adapter
     ("__base__" = the bare base), so requests for different runs share a batch;
  4. samples every row with that row's own picker (its temperature, top-p/k, penalty, seeded
     generator, guided choices) and hands the token to the row's reader.

Where the keys and values live is the running batch's business, behind one small interface (see
`HFBatch`): `SlotBatch` runs `chatbuild.engines.decoder.SlotDecoder`, the fast path (fixed KV slots:
row i of the batch owns slot i, a step attends over a view of slots 0..n-1, rows join into free slots
and a leaving row's slot is taken by the last row, so nothing is concatenated or re-padded), and
`HFBatch` runs transformers' forward with PEFT's `adapter_names` over a left-padded `DynamicCache`
(`KVBatch`: row i's real tokens are the last `lengths[i]` positions, the zeros before them are hidden
by the 2-D mask, and rows join by padding the shorter side and leave by indexing the batch). Either
way a row computes what it would compute alone, up to floating-point reassociation in batched matrix
products (greedy tokens agree on our tests; sampled ones agree unless two tokens' probabilities differ
in the last bits).

Failures: whatever fails for one row (its prefill, its sampler: a picker that raises, probabilities
that are not finite) ends that row alone with the exception; it leaves the batch at the next step
like a finished row, and the other rows go on with their cache. Only a failed batched forward pass
fails every row in it: the layers it had already run have written the step's keys and values and the
rest have not, so no row's cache can be trusted. The rows could be retried: each keeps its prompt and
reply so far (`seen`) and its picker, so prefilling `seen` alone would rebuild its cache and single
out a row that cannot run. Not done yet, since no request we know of makes a valid batch's forward
pass fail (an out-of-memory aside, which such a retry would help).

The scheduler knows tokens, not text: its events are (token, finish) pairs, and the reading thread
turns tokens into text and checks stop strings (which keeps the tokenizer work off the decode thread);
a reader that has seen enough sets `request.abandoned` and the row leaves at the next step.

Prefill is bounded so that running rows wait for at most one pass of `prefill_tokens` tokens (256) between
two steps: 32 prompts arriving together take a few batched passes instead of 32, and a 4,000-token
prompt joins after 16 chunks while the others keep decoding. A batched prefill that fails is retried
prompt by prompt, so a prompt that cannot run fails alone. The p95 time to first token this gives
under load is measured by bench/serve.py.
"""

import threading
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from queue import SimpleQueue


@dataclass
class Request:
    """One reply being generated. `pick(seen, logits[1, vocab]) -> token id | None` samples (None: a
    guided choice is complete); `budget` is the most tokens to generate. Events on `events`:
    `(token, None)` for a token, `(token | None, finish)` for the last one ("stop": EOS, whose token is
    not reply text, or a complete choice; "length"; "cancelled"), or an exception."""

    prompt: list[int]
    adapter: str
    pick: Callable
    eos: set[int]
    budget: int
    cancel: threading.Event | None = None
    events: SimpleQueue = field(default_factory=SimpleQueue)
    abandoned: bool = False  # set by the reader: nobody reads the rest
    # scheduler-side state
    seen: object = None  # prompt + reply so far, a [1, n] tensor (the repetition penalty reads it)
    generated: int = 0
    length: int = 0  # real tokens in the cache for this row
    next_token: int | None = None  # sampled, not yet fed to the model
    done: bool = False
    cache: object = None  # a long prompt's own cache while it is prefilled chunk by chunk
    prefilled: int = 0  # prompt tokens in `cache` so far

    def over(self) -> bool:
        return self.done or self.abandoned or (self.cancel is not None and self.cancel.is_set())


class KVBatch:
    """The running batch's key/value cache, left-padded, plus its 2-D attention mask.

    `cache` is a transformers `DynamicCache` whose layers hold [rows, kv_heads, T, head_dim] tensors;
    `mask` is a [rows, T] long tensor, 1 where a row has a real token."""

    def __init__(self):
        self.cache = None
        self.mask = None

    @property
    def rows(self) -> int:
        return 0 if self.mask is None else self.mask.shape[0]

    def join(self, cache, length: int) -> None:
        """Append a row whose own (batch-1, unpadded) cache holds `length` tokens."""
        import torch

        self.join_rows(cache, torch.ones(1, length, dtype=torch.long, device=cache.layers[0].keys.device))

    def join_rows(self, cache, mask) -> None:
        """Append the rows of a left-padded `cache` whose real tokens `mask` [rows, T] marks (a batched
        prefill's); its padded positions must hold zeros (`zero_padding`)."""
        import torch

        if self.cache is None:
            self.cache, self.mask = cache, mask
            return
        width = max(self.mask.shape[1], mask.shape[1])
        for mine, theirs in zip(self.cache.layers, cache.layers, strict=True):
            mine.keys = torch.cat([_pad_left(mine.keys, width, 2), _pad_left(theirs.keys, width, 2)])
            mine.values = torch.cat([_pad_left(mine.values, width, 2), _pad_left(theirs.values, width, 2)])
        self.mask = torch.cat([_pad_left(self.mask, width, 1), _pad_left(mask, width, 1)])

    def keep(self, rows: list[int]) -> None:
        """Keep only `rows` (indices, in order); trim leading columns no remaining row uses."""
        import torch

        if not rows:
            self.cache = self.mask = None
            return
        index = torch.tensor(rows, device=self.mask.device)
        mask = self.mask[index]
        start = int((mask.sum(dim=0) == 0).long().cumprod(dim=0).sum())  # all-padding columns on the left
        self.mask = mask[:, start:]
        for layer in self.cache.layers:
            layer.keys = layer.keys[index, :, start:]
            layer.values = layer.values[index, :, start:]

    def step_mask(self):
        """The attention mask for one more token per row (and, after the step, the batch's mask)."""
        import torch

        self.mask = torch.cat([self.mask, self.mask.new_ones(self.rows, 1)], dim=1)
        return self.mask


def zero_padding(cache, mask) -> None:
    """Zero the keys and values at the padded positions of a left-padded prefill's cache. They are
    masked out of every later step, but a padded query attends to nothing, and whatever the attention
    kernel makes of that (NaN, where a fully masked softmax is 0/0) must not sit in the cache: a masked
    key has weight 0, and 0 x NaN is NaN."""
    hidden = (mask == 0)[:, None, :, None]
    for layer in cache.layers:
        layer.keys.masked_fill_(hidden, 0)
        layer.values.masked_fill_(hidden, 0)


def _pad_left(t, width: int, dim: int):
    import torch.nn.functional as F

    missing = width - t.shape[dim]
    if missing == 0:
        return t
    pad = [0, 0] * (t.dim() - 1 - dim) + [missing, 0]  # F.pad lists dimensions from the last one
    return F.pad(t, pad)


PREFILL_TOKENS = 256  # the most prompt tokens (padding included) prefilled between two decode steps


class HFBatch:
    """The running batch over transformers' forward pass and a left-padded `DynamicCache` (`KVBatch`).

    Every batch kind offers what the scheduler calls, on its thread only: `prefill(group)` (whole
    prompts in one pass; they join the batch at its end, in order; returns their next-token logits
    [rows, vocab], or raises and joins none), `chunk(request, size)` (the next `size` tokens of a long
    prompt, alone; its logits once the last chunk is in and it has joined, else None), `forget(request)`
    (a long prompt given up between chunks), `step(rows)` (each row's `next_token` at position
    `length`; logits [rows, vocab]), `keep(indices)` (only those rows go on; returns their order in
    the batch from now on, as indices into the old one) and `clear()`.

    `forward(input_ids, attention_mask, position_ids, cache, adapters)` runs the model (the engine
    adds its lock and PEFT's `adapter_names`)."""

    def __init__(self, forward: Callable, device):
        self.forward, self.device = forward, device
        self.kv = KVBatch()

    def prefill(self, group: list[Request]):
        import torch
        from transformers import DynamicCache

        width = max(len(r.prompt) for r in group)
        ids = torch.tensor([[0] * (width - len(r.prompt)) + r.prompt for r in group], device=self.device)
        mask = torch.tensor([[0] * (width - len(r.prompt)) + [1] * len(r.prompt) for r in group], device=self.device)
        cache = DynamicCache()  # a full-attention cache, whatever the model's config says: rows merge simply
        positions = (mask.cumsum(dim=1) - 1).clamp(min=0) if len(group) > 1 else None
        out = self.forward(ids, mask, positions, cache, [r.adapter for r in group])
        zero_padding(cache, mask)
        self.kv.join_rows(cache, mask)
        return out.logits[:, -1, :].float()

    def chunk(self, request: Request, size: int):
        import torch
        from transformers import DynamicCache

        start = request.prefilled
        end = min(len(request.prompt), start + size)
        if request.cache is None:
            request.cache = DynamicCache()
        ids = torch.tensor([request.prompt[start:end]], device=self.device)
        positions = torch.arange(start, end, device=self.device)[None] if start else None
        out = self.forward(ids, torch.ones(1, end, dtype=torch.long, device=self.device), positions,
                           request.cache, [request.adapter])
        request.prefilled = end
        if end < len(request.prompt):
            return None
        cache, request.cache = request.cache, None
        self.kv.join(cache, end)
        return out.logits[:, -1, :].float()

    def forget(self, request: Request) -> None:
        request.cache = None

    def step(self, rows: list[Request]):
        import torch

        input_ids = torch.tensor([[r.next_token] for r in rows], device=self.device)
        positions = torch.tensor([[r.length] for r in rows], device=self.device)
        out = self.forward(input_ids, self.kv.step_mask(), positions, self.kv.cache, [r.adapter for r in rows])
        return out.logits[:, -1, :].float()

    def keep(self, indices: list[int]) -> list[int]:
        self.kv.keep(indices)
        return indices

    def clear(self) -> None:
        self.kv = KVBatch()


class SlotBatch:
    """The running batch over `chatbuild.engines.decoder.SlotDecoder`: row i of the batch owns KV slot
    i, so the running rows are slots 0..n-1 and a step is one view of them. A batched prefill takes the
    next free slots; a long prompt is prefilled chunk by chunk into slot n (nobody joins meanwhile:
    the chunking prompt heads the queue) and moves to the last row's slot if rows left meanwhile. A
    leaving row's slot is taken by the batch's last row (one row's keys and values copied), so the
    others keep their slots. The same calls as `HFBatch`; `forward(ids, slots, starts, last, adapters)`
    is the decoder's, run under the engine's lock."""

    def __init__(self, decoder, forward: Callable, device):
        self.decoder, self.forward, self.device = decoder, forward, device
        self.lengths: list[int] = []  # tokens in the cache of each running row (= its slot)

    def prefill(self, group: list[Request]):
        import torch

        first = len(self.lengths)
        width = max(len(r.prompt) for r in group)
        ids = torch.tensor([r.prompt + [0] * (width - len(r.prompt)) for r in group], device=self.device)
        logits = self.forward(ids, list(range(first, first + len(group))), [0] * len(group),
                              [len(r.prompt) - 1 for r in group], [r.adapter for r in group])
        self.lengths.extend(len(r.prompt) for r in group)
        return logits

    def chunk(self, request: Request, size: int):
        import torch

        slot, start = len(self.lengths), request.prefilled
        end = min(len(request.prompt), start + size)
        if request.cache is not None and request.cache != slot:  # rows left since the last chunk
            self.decoder.move(request.cache, slot, start)
        request.cache = slot
        ids = torch.tensor([request.prompt[start:end]], device=self.device)
        logits = self.forward(ids, [slot], [start], [end - start - 1], [request.adapter])
        request.prefilled = end
        if end < len(request.prompt):
            return None
        request.cache = None
        self.lengths.append(end)
        return logits

    def forget(self, request: Request) -> None:
        request.cache = None

    def step(self, rows: list[Request]):
        import torch

        ids = torch.tensor([[r.next_token] for r in rows], device=self.device)
        logits = self.forward(ids, list(range(len(rows))), [r.length for r in rows], [0] * len(rows),
                              [r.adapter for r in rows])
        self.lengths = [n + 1 for n in self.lengths]
        return logits

    def keep(self, indices: list[int]) -> list[int]:
        n = len(indices)
        kept = set(indices)
        free = [slot for slot in range(n) if slot not in kept]  # freed slots below the new end
        movers = [i for i in reversed(indices) if i >= n]  # as many kept rows above it, the last first
        for slot, source in zip(free, movers, strict=True):
            self.decoder.move(source, slot, self.lengths[source])
        placed = dict(zip(free, movers, strict=True))
        order = [placed.get(slot, slot) for slot in range(n)]
        self.lengths = [self.lengths[i] for i in order]
        if not order:
            self.decoder.release()
        return order

    def clear(self) -> None:
        self.lengths = []
        self.decoder.release()


class Scheduler:
    """The decode thread (see the module docstring) over a running `batch` (`HFBatch` or `SlotBatch`)."""

    def __init__(self, batch, max_batch: int = 16, prefill_tokens: int = PREFILL_TOKENS):
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch}")
        if prefill_tokens < 1:
            raise ValueError(f"prefill_tokens must be >= 1, got {prefill_tokens}")
        self.batch, self.max_batch = batch, max_batch
        self.prefill_tokens = prefill_tokens
        self.prefill_sizes: Counter = Counter()  # prefill passes by number of prompts, for tests and benchmarks
        self.batch_sizes: Counter = Counter()  # decode steps by number of rows, for tests and benchmarks
        self._waiting: list[Request] = []
        self._rows: list[Request] = []
        self._wake = threading.Condition()
        self._closed = False
        self._thread: threading.Thread | None = None

    def submit(self, request: Request) -> None:
        with self._wake:
            if self._closed:
                raise RuntimeError("the engine is closed")
            self._waiting.append(request)
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="chatbuild-decode", daemon=True)
                self._thread.start()
            self._wake.notify()

    def close(self) -> None:
        """Stop the thread; requests still running or waiting end with an error."""
        with self._wake:
            self._closed = True
            self._wake.notify()
        if self._thread is not None:
            self._thread.join()

    # ── the decode thread ───────────────────────────────────────────────────────────────────
    def _run(self) -> None:
        import torch

        while True:
            with self._wake:
                while not (self._closed or self._waiting or self._rows):
                    self._wake.wait()
                if self._closed:
                    self._fail(RuntimeError("the engine was closed"), self._rows + self._waiting)
                    return
                for request in [r for r in self._waiting if r.over()]:  # given up while waiting for a row
                    self._waiting.remove(request)
                    self._finish(request, None, "cancelled")
                candidates = self._waiting[:self.max_batch - len(self._rows)]
            try:
                with torch.inference_mode():
                    self._drop_finished()
                    try:
                        admitted = self._prefill(candidates)
                    except Exception as e:  # a bug of ours, not a prompt's: these requests fail, not loop
                        self._fail(e, candidates)
                        admitted = candidates
                    with self._wake:  # only this thread removes waiting requests; submit() only appends
                        for request in admitted:
                            self._waiting.remove(request)
                    self._drop_finished()
                    if self._rows:
                        self._decode()
            except Exception as e:  # a failed batched forward pass fails every row in it; the thread lives on
                self._fail(e, self._rows)
                self._rows = []
                self.batch.clear()

    def _prefill(self, candidates: list[Request]) -> list[Request]:
        """Prefill what `prefill_tokens` allows of the waiting `candidates` (first come, first served)
        and return the requests done waiting: joined, failed, or over. Either the first one is a long
        prompt, and its next chunk of `prefill_tokens` tokens is prefilled alone (it joins after its last
        chunk), or the first prompts whose padded batch fits are prefilled together in one pass. Either
        way the running rows wait for at most one pass of `prefill_tokens` tokens before their next step."""
        admitted = []
        for request in candidates:
            if not request.over():
                break
            self.batch.forget(request)  # a long prompt given up between its chunks
            self._finish(request, None, "cancelled")
            admitted.append(request)
        candidates = candidates[len(admitted):]
        if not candidates:
            return admitted
        head = candidates[0]
        if head.prefilled or len(head.prompt) > self.prefill_tokens:
            return admitted + self._prefill_chunk(head)
        group = []
        for request in candidates:
            if request.over() or (len(group) + 1) * max(len(r.prompt) for r in [*group, request]) > self.prefill_tokens:
                break
            group.append(request)
        return admitted + self._prefill_together(group)

    def _prefill_together(self, group: list[Request]) -> list[Request]:
        """One forward pass over whole prompts (each row with its adapter); each row's first token is
        sampled and the rows join the batch. If the pass fails, each prompt is tried alone, so a prompt
        that cannot run fails by itself."""
        import torch

        try:
            logits = self.batch.prefill(group)
        except Exception as e:
            if len(group) > 1:
                return [r for request in group for r in self._prefill_together([request])]
            self._fail(e, group)
            return group
        self.prefill_sizes[len(group)] += 1
        for i, request in enumerate(group):
            request.seen = torch.tensor([request.prompt], device=self.batch.device)
            request.length = len(request.prompt)
            try:
                self._sample(request, logits[i:i + 1])
            except Exception as e:  # this row's sampling failed: it ends alone and leaves at once
                self._fail(e, [request])
        self._rows.extend(group)  # rows already done leave at the next `_drop_finished`
        return group

    def _prefill_chunk(self, request: Request) -> list[Request]:
        """The next `prefill_tokens` tokens of a long prompt, alone; after the last chunk its first
        token is sampled and it joins the batch. Returns [request] once it is done waiting."""
        import torch

        try:
            logits = self.batch.chunk(request, self.prefill_tokens)
        except Exception as e:  # this prompt failed alone: the batch goes on
            self.batch.forget(request)
            self._fail(e, [request])
            return [request]
        if logits is None:
            return []
        self.prefill_sizes[1] += 1
        self._rows.append(request)  # it has joined the batch; if its first token ends it, it leaves next
        request.seen, request.length = torch.tensor([request.prompt], device=self.batch.device), len(request.prompt)
        try:
            self._sample(request, logits)
        except Exception as e:
            self._fail(e, [request])
        return [request]

    def _decode(self) -> None:
        import torch

        rows = self._rows
        self.batch_sizes[len(rows)] += 1
        tokens = [r.next_token for r in rows]
        logits = self.batch.step(rows)
        for i, request in enumerate(rows):
            request.length += 1
            request.seen = torch.cat([request.seen, request.seen.new_tensor([[tokens[i]]])], dim=1)
            try:
                self._sample(request, logits[i:i + 1])
            except Exception as e:  # this row's sampling failed: it ends alone and leaves at the next step
                self._fail(e, [request])

    def _sample(self, request: Request, logits) -> None:
        """Pick the row's next token and tell its reader."""
        if request.over():  # cancelled or abandoned while the step ran: not one token more
            self._finish(request, None, "cancelled")
            return
        token = request.pick(request.seen, logits)
        if token is None:
            self._finish(request, None, "stop")
            return
        request.generated += 1
        if token in request.eos:
            self._finish(request, token, "stop")
        elif request.generated >= request.budget:
            self._finish(request, token, "length")
        else:
            request.next_token = token
            request.events.put((token, None))

    def _finish(self, request: Request, token: int | None, finish: str) -> None:
        request.done = True
        request.events.put((token, finish))

    def _drop_finished(self) -> None:
        keep = []
        for i, request in enumerate(self._rows):
            if request.over():
                if not request.done:  # cancelled between steps
                    self._finish(request, None, "cancelled")
            else:
                keep.append(i)
        if len(keep) < len(self._rows):
            order = self.batch.keep(keep)
            self._rows = [self._rows[i] for i in order]

    @staticmethod
    def _fail(error: Exception, requests: list[Request]) -> None:
        for request in requests:
            request.done = True
            request.events.put(error)
