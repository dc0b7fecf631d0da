"""Conversations -> tokenized examples -> the batches a training step eats.

Two ways to batch, selectable (`data.batching`):
- "grouped": `group_by_length` orders examples into batches of similar length (what the QLoRA recipe's
  `--group_by_length` does through the HF Trainer) and `PaddedCollator` right-pads each batch;
- "packed" (padding-free): `PackedCollator` concatenates a batch into one row, with `position_ids`
  restarting at 0 for every sequence and no label predicted across a sequence boundary.

Attention across packed sequences. transformers 5 reads the `position_ids` resets as sequence
boundaries: flash-attention kernels get variable-length boundaries, sdpa / eager / flex attention get a
block-diagonal causal mask (`masking_utils.find_packed_sequence_indices`). It does so only when the
batch has no `attention_mask` and the model runs *without a KV cache*: with `use_cache=True` (the default
in most configs, Llama's included) the model creates an empty cache even in training, skips the
detection, and the packed sequences silently attend to each other. So a packed batch must run with
`use_cache=False` (`model.config.use_cache = False`, which `chatbuild.modeling.load_base_model` sets, or
as a forward argument). tests/test_data_batching.py checks on the tiny model, for sdpa and eager, that
every sequence's loss is the same packed as alone.
"""

import random
from dataclasses import dataclass

import torch

from chatbuild.errors import UserError
from chatbuild.templates import IGNORE_INDEX, ChatFormat, Encoded, check_messages, encode, encode_reply


def tokenize_conversations(convs: list[dict], fmt: ChatFormat, tokenizer, max_length: int | None,
                           train_on_prompts: bool = False) -> list[Encoded]:
    """One `Encoded` (input_ids, labels with -100 where nothing is learned) per conversation, in order.

    Truncation follows `chatbuild.templates.encode`; an example whose labels are all -100 (its prompt
    alone filled max_length) is returned as it is, for the caller to drop."""
    out = []
    for i, conv in enumerate(convs):
        name = f"conversation {i + 1}" + (f' (tree {conv["message_tree_id"]})' if conv.get("message_tree_id") else "")
        messages = conv.get("messages") if isinstance(conv, dict) else None
        if not isinstance(messages, list):
            raise UserError(f'{name}: no "messages" list')
        check_messages(messages, where=name)
        out.append(encode(fmt, tokenizer, messages, max_length=max_length, train_on_prompts=train_on_prompts))
    return out


@dataclass
class EncodedPair:
    chosen: Encoded
    rejected: Encoded

    def __len__(self):  # what length grouping sorts by: the longer side
        return max(len(self.chosen), len(self.rejected))


def tokenize_pairs(pairs: list, fmt: ChatFormat, tokenizer, max_length: int | None) -> list[EncodedPair]:
    """One `EncodedPair` per `chatbuild.data.pairs.Pair`, in order: prompt + reply with the labels on the
    reply only (`chatbuild.templates.encode_reply`, `encode`'s truncation). A side with nothing to learn
    (the prompt alone filled max_length) is returned as it is, for the caller to drop."""
    out = []
    for pair in pairs:
        prompt = list(pair.prompt)
        out.append(EncodedPair(encode_reply(fmt, tokenizer, prompt, pair.chosen, max_length),
                               encode_reply(fmt, tokenizer, prompt, pair.rejected, max_length)))
    return out


def group_by_length(lengths: list[int], batch_size: int, seed: int, mega_batch_mult: int = 50) -> list[list[int]]:
    """Batches of example indices with similar lengths, in a seeded random order.

    As the HF Trainer's LengthGroupedSampler: a seeded permutation is cut into mega-batches of
    `mega_batch_mult × batch_size` examples, each sorted by length (longest first) and cut into batches;
    then the batches are shuffled. Every index appears once. Every batch holds `batch_size` indices
    except possibly the last, which stays last, so the flattened order re-cut every `batch_size` gives
    back the same batches. Same lengths and seed -> same batches."""
    if batch_size < 1:
        raise UserError(f"batch size must be at least 1, got {batch_size}")
    rng = random.Random(seed)
    order = list(range(len(lengths)))
    rng.shuffle(order)
    mega = batch_size * max(1, mega_batch_mult)
    batches = []
    for start in range(0, len(order), mega):
        chunk = sorted(order[start:start + mega], key=lambda i: -lengths[i])  # stable: ties stay shuffled
        batches += [chunk[j:j + batch_size] for j in range(0, len(chunk), batch_size)]
    last = [batches.pop()] if batches and len(batches[-1]) < batch_size else []
    rng.shuffle(batches)
    return batches + last


@dataclass
class PaddedCollator:
    """Right-pads examples into `input_ids`, `attention_mask` (1 real, 0 padding) and `labels`
    (-100 on padding), each a (batch, longest) int64 tensor.

    pad_id: the id written into padded positions; None (tokenizers without a pad token, like Llama's)
    means 0. Padded positions are masked and never learned, so the value does not matter."""

    pad_id: int | None = None
    pad_to_multiple_of: int | None = None

    def __call__(self, examples: list[Encoded]) -> dict[str, torch.Tensor]:
        if not examples:
            raise ValueError("PaddedCollator: empty batch")
        width = max(len(e.input_ids) for e in examples)
        if self.pad_to_multiple_of:
            width = -(-width // self.pad_to_multiple_of) * self.pad_to_multiple_of
        pad = 0 if self.pad_id is None else self.pad_id
        input_ids = torch.full((len(examples), width), pad, dtype=torch.long)
        attention_mask = torch.zeros((len(examples), width), dtype=torch.long)
        labels = torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long)
        for row, e in enumerate(examples):
            n = len(e.input_ids)
            input_ids[row, :n] = torch.tensor(e.input_ids, dtype=torch.long)
            attention_mask[row, :n] = 1
            labels[row, :n] = torch.tensor(e.labels, dtype=torch.long)
        return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


@dataclass
class PackedCollator:
    """Concatenates examples into one row: `input_ids`, `labels`, `position_ids`, each (1, total) int64.

    `position_ids` restart at 0 for every example, which is how transformers finds the boundaries (see
    the module docstring: the model must run with use_cache=False). The first label of every example is
    -100: the model (which shifts labels by one) never learns to predict an example's first token from
    the previous one. No attention_mask: passing one would switch the boundary detection off."""

    def __call__(self, examples: list[Encoded]) -> dict[str, torch.Tensor]:
        if not examples:
            raise ValueError("PackedCollator: empty batch")
        ids, labels, positions = [], [], []
        for e in examples:
            n = len(e.input_ids)
            ids += e.input_ids
            labels += [IGNORE_INDEX, *e.labels[1:]] if n else []
            positions += range(n)
        return {"input_ids": _row(ids), "labels": _row(labels), "position_ids": _row(positions)}


def _row(values: list[int]) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.long).unsqueeze(0)


def cu_seqlens(position_ids: torch.Tensor) -> torch.Tensor:
    """Boundaries of the sequences in a packed row, flash-attention style: int32 [0, n1, n1+n2, ..., total]."""
    pos = position_ids.reshape(-1)
    starts = torch.nonzero(pos == 0).reshape(-1)
    return torch.cat([starts, torch.tensor([pos.numel()])]).to(torch.int32)
