"""The fast decode path: a lean forward pass for Llama-family models over a fixed-slot KV cache.

    decoder = SlotDecoder.for_model(model, slots=17)    # None (and a reason) if the model is not one it runs
    logits = decoder.forward(ids, slots, starts, last, adapters)

Why it exists (issue 22): on a 2-core CPU, serving SmolLM2-135M through transformers' forward spends
most of a batch-1 step outside the matrix products (per-layer module dispatch, mask building,
DynamicCache concatenation, PEFT's per-call hooks), and a batch of 32 spends more copying the
growing cache than multiplying: every step `torch.cat`s each layer's keys and values, and every row
that joins or leaves re-pads or re-indexes the whole cache. The matrix products alone take ~25 ms a
token at batch 1 and ~90 ms a step at batch 32 (bench/results/serve-cpu-smollm2-*.json).

What it does instead, with the model's own weights and modules (no copy of the base):
- **Fixed slots.** Keys and values live in one preallocated tensor per layer, [slots, kv_heads,
  capacity, head_dim]. A reply owns a slot for its life; its token at position p is at column p. A
  step writes each row's new key/value in place (index_put) and attends over a view of the slots the
  batch uses, masked per row to its own length: nothing is concatenated, padded or re-indexed, and a
  row joining or leaving copies nothing (the scheduler keeps the running rows in slots 0..n-1 by
  moving the last row into a leaver's slot: one row's cache, not the batch's). The columns per slot
  and the slots allocated grow by doubling when a row needs more (one copy, amortized), so memory
  follows the batch (one long conversation alone holds one slot's worth), and a long cache is
  released when the batch empties.
- **Right-padded prefill.** Prompts prefilled together are padded on the right, so every row's
  tokens sit at their true positions from column 0; the padding's keys land in columns past the
  row's length, which the mask hides and the row's next tokens overwrite. A long prompt's chunks
  are prefilled into its slot at their positions (start..end), attending to the columns before.
- **The same arithmetic as transformers.** Each layer calls the model's own RMSNorm modules,
  activation and rotary embedding, the same projections (nn.Linear, or a bitsandbytes 4-bit layer's
  own forward), and `scaled_dot_product_attention` with the model's scaling; LoRA adds
  `B(A(x)) * scaling` per row group exactly as PEFT's mixed-adapter forward does (rows named
  "__base__" get none). So greedy replies equal the transformers path's (tests/test_decoder.py, on
  the tiny base and SmolLM2), up to the last-bit differences batched matrix products may have.
- **q8** (`serve --quant q8`, `SlotDecoder(..., q8=True)`): decode steps multiply the base's linear
  layers and the head with `chatbuild.engines.q8` (int8 blocks, weights packed once: q/k/v as one
  weight, gate/up as one, each product with its rows' LoRA terms in the same kernel call). A step of
  one token a row runs every layer in ONE kernel call (`q8.decode`: norms, rotary, the KV slot
  write, attention, SiLU and residuals in C too), so a step is a handful of Python calls instead of
  some 1,800 and leaves the GIL to the server's threads; the layer-by-layer q8 path remains for other
  shapes and layers it does not compute. Prompts are multiplied in q8 too (the kernel beats fp32's
  BLAS at hundreds of rows). Replies are then q8's own (close to fp32's, not equal), and a row's
  step computes the same bits in any batch.

What it runs: decoder-only models whose layers are Llama's (model_type llama, mistral without a
sliding window shorter than the context, qwen2), with plain LoRA adapters on their linear layers.
Anything else (DoRA or other LoRA variants, LoRA on embeddings or the head, `modules_to_save`,
other architectures) is refused with the reason, and the engine serves through transformers instead.
"""

BASE_ROWS = "__base__"  # PEFT's name for "no adapter" in mixed batches (chatbuild.engines.BASE_ADAPTER)
ARCHITECTURES = ("llama", "mistral", "qwen2")
PROJECTIONS = (("self_attn", "q_proj"), ("self_attn", "k_proj"), ("self_attn", "v_proj"), ("self_attn", "o_proj"),
               ("mlp", "gate_proj"), ("mlp", "up_proj"), ("mlp", "down_proj"))
FUSED = ((0, 1, 2), (4, 5))  # PROJECTIONS that read one input: q/k/v, gate/up (one q8 product each)
MIN_CAPACITY = 128  # columns first allocated per slot
KEEP_CAPACITY = 1024  # an empty batch keeps a cache at most this long; a longer one is released


class Unsupported(Exception):
    """The model or one of its adapters is not one the fast path runs (the message says why)."""


class Projection:
    """One linear layer: its base (nn.Linear or a 4-bit layer: called as is) and its LoRA adapters
    {PEFT adapter name: (A, B, scaling)}.

    A batch whose rows all use one adapter gets PEFT's arithmetic, `B(A(x)) * scaling`. A mixed batch
    gets every adapter in two products instead of a gather, two products and a scatter per adapter:
    `x @ A_all^T` (the adapters' A matrices stacked, ranks r1 + r2 + ...), times a 0/1 mask that keeps
    each row's own adapter's columns, `@ B_all^T` (the B matrices side by side, each times its
    scaling). The zeros add nothing, so each row gets its own adapter's product (rounding aside); the
    cost is a few extra rank columns, and with three adapters in a batch of 8 it halves the step's
    LoRA time (the per-group indexing dominated; bench/NOTES.md). The idea is Punica's / S-LoRA's
    batched multi-adapter kernels, done with dense products on a CPU. With a packed base (q8), the
    product and every row's low-rank term are one kernel call (`chatbuild.engines.q8.matmul`)."""

    def __init__(self, base, loras: dict, packed=None):
        self.base, self.loras, self.packed = base, loras, packed  # packed: the base's Q8Weight (--quant q8)
        self.layout, self.a_all, self.b_all = _stack_loras([(loras, _out_features(base))])
        self.q8_lora = _q8_lora(self.a_all, self.b_all)

    def __call__(self, x, plan: "AdapterPlan", q8: bool = True):
        import torch.nn.functional as F

        shape = x.shape
        x = x.reshape(-1, shape[-1])  # [rows * tokens, features]: 2-D products, no batched copies
        if q8 and self.packed is not None:  # base product and low-rank terms in one kernel call
            from chatbuild.engines import q8 as kernel

            out = kernel.matmul(x, self.packed, self.q8_lora, plan.columns(self.layout, _tokens(shape)))
            return out.view(*shape[:-1], out.shape[-1])
        out = _linear(self.base, x, None)
        if plan.single is not None:
            lora = self.loras.get(plan.single)
            if lora is not None:  # every row of the batch uses this adapter: PEFT's order of operations
                a, b, scaling = lora
                out = out + (F.linear(F.linear(x.to(a.weight.dtype), a.weight), b.weight) * scaling).to(out.dtype)
        elif self.layout:
            mask = plan.mask(self.layout, _tokens(shape), self.a_all.dtype)
            if mask is not None:
                low_rank = (x.to(self.a_all.dtype) @ self.a_all.T) * mask
                out = out + (low_rank @ self.b_all.T).to(out.dtype)
        return out.view(*shape[:-1], out.shape[-1])


class FusedProjection:
    """Projections that read the same input (q/k/v; gate/up) as one q8 kernel call, for q8 decode
    steps: one packed weight (the parts' rows stacked) is one product and one quantization of the
    input instead of three or two, and their adapters are one stacked low-rank product: A matrices
    stacked (each adapter's columns: its A for q, then k, then v), B block-diagonal (each part's rows
    see only its own A's columns; the zeros add nothing). Calling it returns the parts' outputs, each
    computed from its own row alone (`chatbuild.engines.q8.matmul`)."""

    def __init__(self, parts: list[Projection], packed):
        self.packed, self.sizes = packed, [_out_features(part.base) for part in parts]
        self.layout, a_all, b_all = _stack_loras([(part.loras, size)
                                                  for part, size in zip(parts, self.sizes, strict=True)])
        self.q8_lora = _q8_lora(a_all, b_all)

    def __call__(self, x, plan: "AdapterPlan"):
        from chatbuild.engines import q8

        shape = x.shape
        columns = plan.columns(self.layout, _tokens(shape))
        out = q8.matmul(x.reshape(-1, shape[-1]), self.packed, self.q8_lora, columns)
        return [part.view(*shape[:-1], part.shape[-1]) for part in out.split(self.sizes, dim=-1)]


def _tokens(shape) -> int:
    """Tokens per row of an input [rows, tokens, features] ([rows, features]: 1)."""
    return shape[1] if len(shape) == 3 else 1


def _q8_lora(a_all, b_all):
    """Stacked adapters as the q8 kernel takes them (`chatbuild.engines.q8.pack_lora`; None: none)."""
    if a_all is None:
        return None
    from chatbuild.engines import q8

    return q8.pack_lora(a_all, b_all)


def _out_features(module) -> int:
    return getattr(module, "out_features", None) or module.weight.shape[0]


def _stack_loras(parts: list[tuple[dict, int]]):
    """The LoRA adapters of projections sharing one input, stacked (see `Projection`, `FusedProjection`):
    `parts` lists each projection's {name: (A, B, scaling)} and its output size. Returns the layout
    ((name, first column, end column), ...), A_all [columns, in] and B_all [sum of outputs, columns]
    (each B times its scaling, in its part's rows); ((), None, None) without adapters."""
    import torch

    names = list(dict.fromkeys(name for loras, _ in parts for name in loras))
    if not names:
        return (), None, None
    layout, a_rows, start = [], [], 0
    rows = sum(size for _, size in parts)
    with torch.no_grad():
        for name in names:
            first = start
            for loras, _ in parts:
                if name in loras:
                    a_rows.append(loras[name][0].weight)
                    start += loras[name][0].weight.shape[0]
            layout.append((name, first, start))
        b_all = a_rows[0].new_zeros(rows, start)
        column = 0
        for name in names:
            row = 0
            for loras, size in parts:
                if name in loras:
                    a, b, scaling = loras[name]
                    rank = a.weight.shape[0]
                    b_all[row:row + size, column:column + rank] = b.weight * scaling
                    column += rank
                row += size
        return tuple(layout), torch.cat(a_rows), b_all


class AdapterPlan:
    """Which adapter each row of one forward pass uses: `single`, the name when all rows use the same
    (None: a mixed batch, or every row bare), and for a mixed batch the rank-column masks, built once
    per pass for each layout of stacked adapters (`Projection`)."""

    def __init__(self, adapters: list[str], device):
        names = set(adapters)
        self.adapters, self.device = adapters, device
        self.single = adapters[0] if len(names) == 1 and adapters[0] != BASE_ROWS else None
        self.bare = names == {BASE_ROWS}
        self._masks: dict = {}

    def columns(self, layout: tuple, tokens: int):
        """int64 [2, rows * tokens]: each token's first and end column of its row's adapter in
        `layout` (equal: no adapter of `layout`), for the q8 kernel; None when no row uses one."""
        import torch

        if self.bare or not layout:
            return None
        key = ("columns", layout, tokens)
        if key not in self._masks:
            where = {name: (start, end) for name, start, end in layout}
            spans = [where.get(adapter, (0, 0)) for adapter in self.adapters]
            used = any(end > start for start, end in spans)
            columns = torch.tensor(spans, dtype=torch.int64).T.repeat_interleave(tokens, dim=1).contiguous()
            self._masks[key] = columns if used else None
        return self._masks[key]

    def mask(self, layout: tuple, tokens: int, dtype):
        """[rows * tokens, columns] of 0/1: each token of row i keeps the columns of row i's adapter;
        None when no row uses any adapter of `layout`."""
        import torch

        if self.bare:
            return None
        key = (layout, tokens, dtype)
        if key not in self._masks:
            columns = layout[-1][2]
            mask = torch.zeros(len(self.adapters), columns, dtype=dtype)
            where = {name: (start, end) for name, start, end in layout}
            used = False
            for row, adapter in enumerate(self.adapters):
                if adapter in where:
                    start, end = where[adapter]
                    mask[row, start:end] = 1
                    used = True
            mask = mask.repeat_interleave(tokens, dim=0).to(self.device)
            self._masks[key] = mask if used else None
        return self._masks[key]


class SlotDecoder:
    """A Llama-family model's forward pass over fixed KV slots (see the module docstring)."""

    def __init__(self, model, slots: int, q8: bool = False):
        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        self.model, self.inner, self.head = model, base.model, base.lm_head
        config = base.config
        self.heads = config.num_attention_heads
        self.kv_heads = getattr(config, "num_key_value_heads", None) or self.heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // self.heads
        self.scaling = self.head_dim ** -0.5
        self.context = getattr(config, "max_position_embeddings", None)
        self.slots = slots
        self.capacity = self.allocated = 0  # columns per slot, slots allocated (both grow: `reserve`)
        self.keys: list = []
        self.values: list = []
        # --quant q8: each base linear layer's weight packed once (chatbuild.engines.q8), by module; a
        # layer it cannot pack (an input size not a multiple of 32) keeps its fp32 product.
        self.q8 = q8
        self._packed: dict = {}
        self.refresh()
        self.head_packed = self._pack(self.head)

    @classmethod
    def for_model(cls, model, slots: int, q8: bool = False) -> "SlotDecoder":
        """The decoder for `model` (with its linear layers multiplied in q8 if `q8`), or Unsupported
        naming what it cannot run."""
        reason = unsupported_reason(model)
        if q8 and not reason:
            reason = q8_reason(model)
        if reason:
            raise Unsupported(reason)
        return cls(model, slots, q8)

    def _pack(self, *modules):
        """The Q8Weight of `modules`' weights stacked (one module: its own) when this decoder multiplies
        in q8, packed once per module or group; else None."""
        import torch

        if not self.q8:
            return None
        if modules not in self._packed:
            from chatbuild.engines import q8

            with torch.no_grad():
                weight = torch.cat([m.weight for m in modules]) if len(modules) > 1 else modules[0].weight
                biases = [m.bias for m in modules]
                bias = None if all(b is None for b in biases) else torch.cat(
                    [m.weight.new_zeros(m.weight.shape[0]) if b is None else b
                     for m, b in zip(modules, biases, strict=True)])
                self._packed[modules] = q8.pack(weight, bias)
        return self._packed[modules]

    def refresh(self) -> None:
        """Read the layers' projections and adapters again (after an adapter is loaded); Unsupported
        if an adapter is not plain LoRA on the linear layers. A q8 decoder packs q/k/v and gate/up as
        one weight each (`FusedProjection`) and the other projections alone."""
        reason = adapter_reason(self.model)
        if reason:
            raise Unsupported(reason)
        self.layers, self.fused = [], []
        for layer in self.inner.layers:
            projections = [_projection(getattr(getattr(layer, part), name)) for part, name in PROJECTIONS]
            fused = []
            if self.q8:
                for group in FUSED:
                    parts = [projections[i] for i in group]
                    fused.append(FusedProjection(parts, self._pack(*(part.base for part in parts))))
                for i in (3, 6):  # o_proj, down_proj: packed alone
                    projections[i].packed = self._pack(projections[i].base)
            self.layers.append(projections)
            self.fused.append(fused if all(f.packed is not None for f in fused) else None)
        self.native = self._native_layers() if self.q8 else None

    def _native_layers(self):
        """The layers as `chatbuild.engines.q8.decode` takes them (a q8 decode step in one call), or
        None when one of them is not the plain Llama layer it computes: RMSNorm, SiLU MLP, q/k/v and
        gate/up fused and every product packed."""
        import torch

        from chatbuild.engines import q8

        if (getattr(getattr(self.inner, "config", None), "hidden_act", None) != "silu"
                or self.heads % self.kv_heads or self.head_dim % 2):
            return None
        table = (q8.Layer * len(self.layers))()
        for entry, layer, projections, fused in zip(table, self.inner.layers, self.layers, self.fused, strict=True):
            norms = (layer.input_layernorm, layer.post_attention_layernorm)
            o, down = projections[3], projections[6]
            if (not fused or o.packed is None or down.packed is None
                    or any(getattr(n, "variance_epsilon", None) is None or n.weight.dtype != torch.float32
                           for n in norms)):
                return None
            entry.norm1, entry.norm2 = norms[0].weight.data_ptr(), norms[1].weight.data_ptr()
            entry.eps1, entry.eps2 = norms[0].variance_epsilon, norms[1].variance_epsilon
            entry.qkv = q8.projection(fused[0].packed, fused[0].q8_lora)
            entry.gate_up = q8.projection(fused[1].packed, fused[1].q8_lora)
            entry.o, entry.down = q8.projection(o.packed, o.q8_lora), q8.projection(down.packed, down.q8_lora)
        self._native_ff = self.fused[0][1].sizes[0]
        return table

    # ── the cache ───────────────────────────────────────────────────────────────────────────
    def reserve(self, columns: int, rows: int, like) -> None:
        """Make slots 0..rows-1 hold at least `columns` positions each. Both the slots allocated and the
        columns grow by doubling (existing contents kept), so memory follows the batch: one long
        conversation alone takes one slot's worth, not `slots` of them."""
        import torch

        if columns <= self.capacity and rows <= self.allocated:
            return
        capacity = max(columns, 2 * self.capacity, MIN_CAPACITY) if columns > self.capacity else self.capacity
        if self.context:
            capacity = max(columns, min(capacity, self.context))
        allocated = min(self.slots, max(rows, 2 * self.allocated)) if rows > self.allocated else self.allocated
        shape = (allocated, self.kv_heads, capacity, self.head_dim)
        grown_keys, grown_values = [], []
        for i in range(len(self.inner.layers)):
            k = torch.zeros(shape, dtype=like.dtype, device=like.device)
            v = torch.zeros(shape, dtype=like.dtype, device=like.device)
            if self.capacity:
                k[:self.allocated, :, :self.capacity] = self.keys[i]
                v[:self.allocated, :, :self.capacity] = self.values[i]
            grown_keys.append(k)
            grown_values.append(v)
        self.keys, self.values, self.capacity, self.allocated = grown_keys, grown_values, capacity, allocated

    def release(self) -> None:
        """Free a cache longer than KEEP_CAPACITY (called when no reply is running)."""
        if self.capacity > KEEP_CAPACITY:
            self.keys, self.values, self.capacity, self.allocated = [], [], 0, 0

    def move(self, source: int, target: int, length: int) -> None:
        """Copy slot `source`'s first `length` columns into slot `target` (a row changing slots)."""
        for k, v in zip(self.keys, self.values, strict=True):
            k[target, :, :length] = k[source, :, :length]
            v[target, :, :length] = v[source, :, :length]

    # ── the forward pass ────────────────────────────────────────────────────────────────────
    def forward(self, ids, slots: list[int], starts: list[int], last: list[int], adapters: list[str]):
        """Run `ids` [rows, T] (row i: tokens at positions starts[i].. of slot slots[i], right-padded),
        write their keys and values into the slots, and return float logits [rows, vocab] at each row's
        position `last[i]` (its last real token, an index into T). Slots must be distinct. A q8 decoder
        multiplies prompts and steps in q8 (its repacked kernel beats fp32's BLAS at many rows too), and
        a one-token-a-row step runs every layer in one kernel call."""
        import torch
        import torch.nn.functional as F

        rows, width = ids.shape
        if self.native is not None and width == 1:
            return self._native_step(ids, slots, starts, adapters)
        device = ids.device
        first = slots[0]
        contiguous = slots == list(range(first, first + rows))
        slot_index = torch.tensor(slots, device=device)
        positions = torch.tensor(starts, device=device)[:, None] + torch.arange(width, device=device)
        columns = max(starts) + width
        hidden = self.inner.embed_tokens(ids)
        cos, sin = self.inner.rotary_emb(hidden, positions)
        cos, sin = cos[:, None], sin[:, None]
        self.reserve(columns, max(slots) + 1, hidden)
        # Row i's query at position p sees the columns 0..p of its own slot.
        mask = (torch.arange(columns, device=device) <= positions[:, :, None])[:, None]
        groups = AdapterPlan(adapters, device)
        gqa = self.kv_heads != self.heads
        q8 = self.q8
        for layer, (q_proj, k_proj, v_proj, o_proj, gate, up, down), fused, keys, values in zip(
                self.inner.layers, self.layers, self.fused, self.keys, self.values, strict=True):
            fused = fused if q8 else None
            x = layer.input_layernorm(hidden)
            q, k, v = fused[0](x, groups) if fused else (q_proj(x, groups, q8), k_proj(x, groups, q8),
                                                          v_proj(x, groups, q8))
            q = q.view(rows, width, -1, self.head_dim).transpose(1, 2)
            k = k.view(rows, width, -1, self.head_dim).transpose(1, 2)
            v = v.view(rows, width, -1, self.head_dim)
            q = q * cos + _rotate_half(q) * sin
            k = k * cos + _rotate_half(k) * sin
            keys[slot_index[:, None], :, positions] = k.transpose(1, 2)
            values[slot_index[:, None], :, positions] = v
            if contiguous:  # a view: the batch's slots are first..first+rows-1
                seen_k, seen_v = keys[first:first + rows, :, :columns], values[first:first + rows, :, :columns]
            else:
                seen_k, seen_v = keys[slot_index, :, :columns], values[slot_index, :, :columns]
            attended = F.scaled_dot_product_attention(q, seen_k, seen_v, attn_mask=mask, scale=self.scaling,
                                                      enable_gqa=gqa)
            hidden = hidden + o_proj(attended.transpose(1, 2).reshape(rows, width, -1), groups, q8)
            x = layer.post_attention_layernorm(hidden)
            gated, upped = fused[1](x, groups) if fused else (gate(x, groups, q8), up(x, groups, q8))
            hidden = hidden + down(layer.mlp.act_fn(gated) * upped, groups, q8)
        ends = hidden[torch.arange(rows, device=device), torch.tensor(last, device=device)]
        return _linear(self.head, self.inner.norm(ends), self.head_packed if q8 else None).float()


    def _native_step(self, ids, slots: list[int], starts: list[int], adapters: list[str]):
        """A q8 decode step (one token a row) through `chatbuild.engines.q8.decode`: every layer in one
        kernel call, the embedding, rotary tables, final norm and head around it as in `forward`."""
        import torch

        from chatbuild.engines import q8

        rows = ids.shape[0]
        positions = torch.tensor(starts, dtype=torch.int64)
        hidden = self.inner.embed_tokens(ids)
        cos, sin = self.inner.rotary_emb(hidden, positions[:, None])
        self.reserve(max(starts) + 1, max(slots) + 1, hidden)
        hidden = hidden.reshape(rows, -1).float().contiguous()
        plan = AdapterPlan(adapters, ids.device)
        for entry, keys, values, projections, fused in zip(self.native, self.keys, self.values, self.layers,
                                                           self.fused, strict=True):
            entry.keys, entry.values = keys.data_ptr(), values.data_ptr()
            for field, layout in (("qkv", fused[0].layout), ("o", projections[3].layout),
                                  ("gate_up", fused[1].layout), ("down", projections[6].layout)):
                q8.set_columns(getattr(entry, field), plan.columns(layout, 1), rows)
        q8.decode(self.native, hidden, cos.reshape(rows, -1).float().contiguous(),
                  sin.reshape(rows, -1).float().contiguous(), torch.tensor(slots, dtype=torch.int64), positions,
                  self.capacity, self.heads, self.kv_heads, self.head_dim, self._native_ff, self.scaling)
        return _linear(self.head, self.inner.norm(hidden), self.head_packed).float()


SKINNY_ROWS = 16  # up to this many rows, W @ x^T beats x @ W^T on CPU (see `_linear`)


def _linear(module, x, packed=None):
    """`module(x)` for an nn.Linear or a 4-bit layer (x: [rows, features]); with `packed` (the
    module's Q8Weight, --quant q8) the q8 kernel's product instead. A dense weight is
    multiplied directly (no module call), and for 2..SKINNY_ROWS rows as W @ x^T instead of x @ W^T:
    the same dot products, but on a 2-core CPU oneDNN/MKL pick a far faster kernel for a wide weight
    times a few columns (SmolLM2's 30 layers at 8 rows: 68 vs 97 ms; its 49k-row head: 16 vs 35 ms;
    `bench/cpu_kernels.py`). Rounding may differ from x @ W^T in the last bits; greedy replies agree
    on our tests."""
    import torch
    import torch.nn.functional as F

    if packed is not None:
        from chatbuild.engines import q8

        return q8.matmul(x, packed)
    if type(module) is not torch.nn.Linear:  # a 4-bit layer (a subclass): its own forward
        return module(x)
    if not 2 <= x.shape[0] <= SKINNY_ROWS:
        return F.linear(x, module.weight, module.bias)
    out = (module.weight @ x.T).T
    return out if module.bias is None else out + module.bias


def _rotate_half(x):
    import torch

    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def _projection(module) -> Projection:
    base = getattr(module, "base_layer", None)
    if base is None:
        return Projection(module, {})
    loras = {name: (module.lora_A[name], module.lora_B[name], module.scaling[name]) for name in module.lora_A}
    return Projection(base, loras)


def q8_reason(model) -> str | None:
    """Why the fast path cannot multiply `model`'s linear layers in q8 (None: it can): they must be
    dense fp32 nn.Linear layers on the CPU."""
    import torch

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    linears = [base.lm_head] + [getattr(getattr(layer, part), name) for layer in base.model.layers
                                for part, name in PROJECTIONS]
    for module in linears:
        module = getattr(module, "base_layer", module)  # under a LoRA wrapper
        weight = getattr(module, "weight", None)
        if type(module) is not torch.nn.Linear or weight.dtype != torch.float32 or weight.device.type != "cpu":
            return (f"q8 multiplies an fp32 base on a CPU, and this one has {type(module).__name__} layers"
                    + ("" if weight is None else f" of {weight.dtype} on {weight.device}")
                    + " (load the base with --quant q8)")
    return None


def unsupported_reason(model) -> str | None:
    """Why the fast path cannot run `model` (None: it can)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    config = getattr(base, "config", None)
    kind = getattr(config, "model_type", None)
    if kind not in ARCHITECTURES:
        return f"model type {kind!r} is not one the fast path runs ({', '.join(ARCHITECTURES)})"
    window = getattr(config, "sliding_window", None)
    if window and getattr(config, "use_sliding_window", True) and window < (config.max_position_embeddings or 0):
        return f"sliding-window attention ({window} tokens) is not in the fast path"
    if getattr(config, "pretraining_tp", 1) != 1:
        return "pretraining_tp > 1 is not in the fast path"
    inner = getattr(base, "model", None)
    if inner is None or not hasattr(inner, "rotary_emb") or not hasattr(base, "lm_head"):
        return "the model does not have the layout of a Llama-family causal LM"
    return adapter_reason(model)


def adapter_reason(model) -> str | None:
    """Why the fast path cannot run `model`'s adapters (None: they are plain LoRA on the projections)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    allowed = {id(getattr(getattr(layer, part), name)) for layer in base.model.layers for part, name in PROJECTIONS}
    for name, module in base.named_modules():
        if hasattr(module, "modules_to_save") and getattr(module, "modules_to_save", None):
            return f"an adapter saves {name} whole (modules_to_save)"
        if not hasattr(module, "lora_A"):
            continue
        if id(module) not in allowed:
            return f"an adapter puts LoRA on {name}, which the fast path does not run"
        for adapter in module.lora_A:
            if adapter in getattr(module, "lora_variant", {}) or getattr(module, "use_dora", {}).get(adapter):
                return f"adapter {adapter} on {name} is a LoRA variant (e.g. DoRA)"
            if getattr(module, "lora_bias", {}).get(adapter):
                return f"adapter {adapter} on {name} has a LoRA bias"
        if getattr(module, "merged_adapters", None):
            return f"an adapter is merged into {name}"
    return None


def adapter_config_reason(adapter_dir) -> str | None:
    """Why the fast path cannot run the saved PEFT adapter in `adapter_dir`, read from its
    adapter_config.json before anything is loaded (None: plain LoRA on linear layers, as far as the
    file says; `adapter_reason` checks the loaded modules)."""
    import json
    from pathlib import Path

    try:
        config = json.loads((Path(adapter_dir) / "adapter_config.json").read_text())
    except (OSError, ValueError):
        return None  # loading it will say what is wrong
    targets = config.get("target_modules") or []
    targets = [targets] if isinstance(targets, str) else targets
    if config.get("peft_type", "LORA") != "LORA":
        return f"a {config['peft_type']} adapter (the fast path runs LoRA)"
    if config.get("use_dora"):
        return "a DoRA adapter (use_dora)"
    if config.get("lora_bias"):
        return "a LoRA adapter with a bias (lora_bias)"
    if config.get("modules_to_save"):
        return f"an adapter that saves {', '.join(config['modules_to_save'])} whole (modules_to_save)"
    if {"lm_head", "embed_tokens"} & set(targets):
        return "LoRA on the embeddings or the head"
    return None
