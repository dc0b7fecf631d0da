"""Tokenized examples, padded and packed batches, length grouping; on the tiny model, packing gives
every sequence exactly the loss it has alone."""

import random

import pytest
import torch

from chatbuild.data import load_conversations
from chatbuild.data.batching import (
    PackedCollator,
    PaddedCollator,
    cu_seqlens,
    group_by_length,
    tokenize_conversations,
)
from chatbuild.errors import UserError
from chatbuild.templates import IGNORE_INDEX, ChatFormat, Encoded


def ex(ids, labels):
    return Encoded(list(ids), list(labels))


EXAMPLES = [ex([1, 5, 6, 7], [-100, -100, 6, 7]), ex([1, 8], [-100, 8]), ex([1, 9, 10, 11, 12], [-100, -100, -100, 11, 12])]


def test_padded_collator_right_pads_and_masks():
    b = PaddedCollator(pad_id=None)(EXAMPLES)
    assert set(b) == {"input_ids", "attention_mask", "labels"} and all(v.dtype == torch.long for v in b.values())
    assert b["input_ids"].tolist() == [[1, 5, 6, 7, 0], [1, 8, 0, 0, 0], [1, 9, 10, 11, 12]]
    assert b["attention_mask"].tolist() == [[1, 1, 1, 1, 0], [1, 1, 0, 0, 0], [1, 1, 1, 1, 1]]
    assert b["labels"].tolist() == [[-100, -100, 6, 7, -100], [-100, 8, -100, -100, -100], [-100, -100, -100, 11, 12]]
    b = PaddedCollator(pad_id=3, pad_to_multiple_of=4)(EXAMPLES[:2])
    assert b["input_ids"].tolist() == [[1, 5, 6, 7], [1, 8, 3, 3]]


def test_packed_collator_restarts_positions_and_never_predicts_across_a_boundary():
    b = PackedCollator()(EXAMPLES)
    assert set(b) == {"input_ids", "labels", "position_ids"}  # no attention_mask: it would hide the boundaries
    assert b["input_ids"].tolist() == [[1, 5, 6, 7, 1, 8, 1, 9, 10, 11, 12]]
    assert b["position_ids"].tolist() == [[0, 1, 2, 3, 0, 1, 0, 1, 2, 3, 4]]
    assert b["labels"].tolist() == [[-100, -100, 6, 7, -100, 8, -100, -100, -100, 11, 12]]
    # Even an example whose first label is set gets -100 there: its first token is not predictable.
    b = PackedCollator()([ex([4, 5], [4, 5]), ex([6, 7], [6, 7])])
    assert b["labels"].tolist() == [[-100, 5, -100, 7]]
    assert cu_seqlens(PackedCollator()(EXAMPLES)["position_ids"]).tolist() == [0, 4, 6, 11]


def test_group_by_length_makes_seeded_batches_of_similar_length():
    rng = random.Random(0)
    lengths = [int(rng.lognormvariate(5.4, 0.7)) + 1 for _ in range(1003)]
    batches = group_by_length(lengths, 16, seed=1)
    flat = [i for b in batches for i in b]
    assert sorted(flat) == list(range(len(lengths)))
    assert all(len(b) == 16 for b in batches[:-1]) and len(batches[-1]) == 1003 % 16
    assert [flat[i:i + 16] for i in range(0, len(flat), 16)] == batches  # re-cutting the flat order keeps them
    assert group_by_length(lengths, 16, seed=1) == batches
    assert group_by_length(lengths, 16, seed=2) != batches

    def padding(bs):
        return sum(max(lengths[i] for i in b) * len(b) - sum(lengths[i] for i in b) for b in bs) / sum(lengths)

    shuffled = list(range(len(lengths)))
    random.Random(1).shuffle(shuffled)
    assert padding(batches) < 0.1 < padding([shuffled[i:i + 16] for i in range(0, len(shuffled), 16)])
    assert group_by_length([], 4, seed=0) == []
    with pytest.raises(UserError):
        group_by_length(lengths, 0, seed=0)


class FakeTokenizer:
    """Characters as tokens: enough for checking how conversations reach `encode`."""

    bos_token, eos_token, eos_token_id = "^", "$", 36
    chat_template = None

    def __call__(self, text, add_special_tokens=False, return_offsets_mapping=False):
        return {"input_ids": [ord(c) for c in text], "offset_mapping": [(i, i + 1) for i in range(len(text))]}


def test_tokenize_conversations_keeps_order_and_names_a_bad_conversation():
    convs = [{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]},
             {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "bc"}]}]
    out = tokenize_conversations(convs, ChatFormat("guanaco"), FakeTokenizer(), max_length=None)
    assert ["".join(chr(t) for t in e.input_ids) for e in out] == [
        "^### Human: hi\n### Assistant: yo$\n", "^### Human: a\n### Assistant: bc$\n"]
    assert "".join(chr(t) for t in out[1].labels if t != IGNORE_INDEX) == " bc$"
    bad = [*convs, {"message_tree_id": "t7", "messages": [{"role": "assistant", "content": "x"}]}]
    with pytest.raises(UserError, match=r"conversation 3 \(tree t7\): message 0 is \"assistant\""):
        tokenize_conversations(bad, ChatFormat("guanaco"), FakeTokenizer(), max_length=None)


# ── on the tiny model ─────────────────────────────────────────────────────────────────────────────
def token_losses(model, batch) -> torch.Tensor:
    """Cross-entropy of every position (0 where the label is -100), shape (batch, length - 1)."""
    with torch.no_grad():
        logits = model(**{k: v for k, v in batch.items() if k != "labels"}).logits.float()
    labels = batch["labels"][:, 1:]
    loss = torch.nn.functional.cross_entropy(logits[:, :-1].transpose(1, 2), labels.clamp(min=0), reduction="none")
    return loss * (labels != IGNORE_INDEX)


@pytest.fixture(scope="module")
def examples(tiny_base):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_base)
    convs, _ = load_conversations("sample")
    # Different lengths, so that padding and packing both matter (truncation makes them short enough).
    out = [tokenize_conversations([c], ChatFormat("guanaco"), tokenizer, max_length=n)[0]
           for c, n in zip(convs, (48, 96, 72, 120, 60))]
    assert len({len(e) for e in out}) == 5 and all(set(e.labels) != {IGNORE_INDEX} for e in out)
    return out


@pytest.mark.integration
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_packing_gives_every_sequence_its_unpacked_loss(tiny_base, examples, attn):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_base, attn_implementation=attn, dtype=torch.float32).eval()
    model.config.use_cache = False  # what chatbuild.modeling.load_base_model sets; packing needs it

    alone = [token_losses(model, PaddedCollator()([e]))[0] for e in examples]
    padded = token_losses(model, PaddedCollator(pad_id=0)(examples))
    packed_batch = PackedCollator()(examples)
    packed = token_losses(model, packed_batch)[0]
    bounds = cu_seqlens(packed_batch["position_ids"]).tolist()
    for i, e in enumerate(examples):
        n = len(e) - 1  # predicted positions of this sequence
        torch.testing.assert_close(padded[i, :n], alone[i], atol=1e-4, rtol=1e-4)
        # Packed row position p predicts token p+1; the sequence's predictions are bounds[i] .. bounds[i+1]-2.
        torch.testing.assert_close(packed[bounds[i]:bounds[i] + n], alone[i], atol=1e-4, rtol=1e-4)
        if i + 1 < len(examples):  # the last token of a sequence has no target: the next one is not its text
            assert packed[bounds[i + 1] - 1].item() == 0

    # The model's own loss over the packed row is the token-weighted mean of the sequences' losses.
    targets = sum(sum(label != IGNORE_INDEX for label in e.labels[1:]) for e in examples)
    total = sum(a.sum() for a in alone) / targets
    with torch.no_grad():
        torch.testing.assert_close(model(**packed_batch).loss, total, atol=1e-4, rtol=1e-4)

    # The check can fail: with positions that do not restart, later sequences see the earlier ones.
    leaky = dict(packed_batch, position_ids=torch.arange(packed_batch["input_ids"].shape[1]).unsqueeze(0))
    assert not torch.allclose(token_losses(model, leaky)[0][bounds[1]:bounds[1] + len(examples[1]) - 1], alone[1], atol=1e-3)
