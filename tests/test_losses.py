"""The chunked causal-LM loss equals transformers' plain one: value, gradients, and a short fine-tune."""

import json

import pytest
import torch
from transformers.loss.loss_utils import ForCausalLMLoss

from chatbuild.losses import chunked_causal_lm_loss
from tests.conftest import finetune_tiny

V, H = 97, 16


def batch_with_padding(seed: int = 0):
    """Three right-padded rows of lengths 11, 7 and 4 (width 11), prompt tokens -100 as well."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, V, (3, 11), generator=g)
    mask = torch.zeros_like(ids)
    for row, n in enumerate((11, 7, 4)):
        mask[row, :n] = 1
    labels = ids.masked_fill(mask == 0, -100)
    labels[:, :3] = -100  # a prompt: nothing learned there
    return ids, mask, labels


@pytest.mark.parametrize("chunk", [1, 3, 5, 16, 1024])  # 20 target rows: divisible and not
@pytest.mark.parametrize("n_items", [None, 40.0])
def test_value_and_gradients_equal_the_plain_loss(chunk, n_items):
    _, _, labels = batch_with_padding()
    g = torch.Generator().manual_seed(1)
    hidden = torch.randn(3, 11, H, generator=g, dtype=torch.float64).float().requires_grad_()
    weight = (torch.randn(V, H, generator=g) * 0.3).requires_grad_()
    n = None if n_items is None else torch.tensor(n_items)

    plain = ForCausalLMLoss(torch.nn.functional.linear(hidden, weight), labels, V, num_items_in_batch=n)
    gh_plain, gw_plain = torch.autograd.grad(plain, [hidden, weight])
    ours = chunked_causal_lm_loss(hidden, weight, labels, n, chunk_size=chunk)
    gh, gw = torch.autograd.grad(ours, [hidden, weight])

    assert ours.dtype == torch.float32
    torch.testing.assert_close(ours, plain, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(gh, gh_plain, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(gw, gw_plain, rtol=1e-5, atol=1e-7)
    ignored = torch.nn.functional.pad(labels, (0, 1), value=-100)[:, 1:] == -100  # after the shift
    assert gh[ignored].abs().max() == 0


def test_scaled_upstream_gradient_and_no_grad_mode():
    _, _, labels = batch_with_padding(2)
    hidden = torch.randn(3, 11, H).requires_grad_()
    weight = torch.randn(V, H)  # frozen head, as in LoRA training
    plain = ForCausalLMLoss(torch.nn.functional.linear(hidden, weight), labels, V)
    (gh_plain,) = torch.autograd.grad(plain * 2.5, [hidden])
    (gh,) = torch.autograd.grad(chunked_causal_lm_loss(hidden, weight, labels, chunk_size=4) * 2.5, [hidden])
    torch.testing.assert_close(gh, gh_plain, rtol=1e-5, atol=1e-7)
    with torch.no_grad():
        torch.testing.assert_close(chunked_causal_lm_loss(hidden, weight, labels, chunk_size=4), plain.detach())


def test_bf16_matches_within_bf16_rounding():
    _, _, labels = batch_with_padding(3)
    hidden = torch.randn(3, 11, H, dtype=torch.bfloat16).requires_grad_()
    weight = torch.randn(V, H, dtype=torch.bfloat16) * 0.3
    plain = ForCausalLMLoss(torch.nn.functional.linear(hidden, weight), labels, V, num_items_in_batch=torch.tensor(20.0))
    ours = chunked_causal_lm_loss(hidden, weight, labels, torch.tensor(20.0), chunk_size=6)
    torch.testing.assert_close(ours, plain, rtol=1e-3, atol=1e-3)
    (gh_plain,), (gh,) = torch.autograd.grad(plain, [hidden]), torch.autograd.grad(ours, [hidden])
    assert gh.dtype == torch.bfloat16
    torch.testing.assert_close(gh, gh_plain, rtol=2e-2, atol=1e-3)


def lora_model(seed: int = 0):
    from chatbuild.modeling import attach_lora
    from chatbuild.shapes import build_random_4bit

    model = build_random_4bit("test-tiny", device="cpu", seed=seed)  # real NF4 layers, fp32 compute
    torch.manual_seed(seed)
    model = attach_lora(model, r=8, alpha=16, dropout=0.0, gradient_checkpointing=True)
    for name, p in model.named_parameters():  # lora_B starts at 0; move it so every LoRA gradient is nonzero
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.02)
    return model.train()


def lora_grads(model) -> dict:
    out = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad(set_to_none=True)
    return out


@pytest.mark.parametrize("batching", ["padded", "packed"])
@pytest.mark.parametrize("chunk", [7, 64])
def test_lora_gradients_through_the_4bit_model_equal_the_plain_path(batching, chunk, monkeypatch):
    from chatbuild import losses
    from chatbuild.data.batching import PackedCollator, PaddedCollator
    from chatbuild.templates import Encoded
    from pipelines.objectives import count_targets, forward_loss

    monkeypatch.setattr(losses, "CHUNK_ROWS", chunk)
    g = torch.Generator().manual_seed(4)
    examples = []
    for n in (13, 9, 5):
        ids = torch.randint(0, 1000, (n,), generator=g).tolist()
        examples.append(Encoded(ids, [-100] * 3 + ids[3:]))
    batch = (PackedCollator() if batching == "packed" else PaddedCollator(0))(examples)
    n_items = torch.tensor(float(count_targets(batch["labels"]) + 6))  # as if another micro-batch followed
    model = lora_model()

    plain = forward_loss(model, batch, n_items, chunked_loss=False)
    plain.backward()
    want = lora_grads(model)
    ours = forward_loss(model, batch, n_items, chunked_loss=True)
    ours.backward()
    got = lora_grads(model)

    torch.testing.assert_close(ours, plain, rtol=1e-5, atol=1e-7)
    assert want.keys() == got.keys() and len(want) > 8
    for name in want:
        assert want[name].abs().max() > 0, name
        torch.testing.assert_close(got[name], want[name], rtol=1e-5, atol=1e-7, msg=name)


def test_unsupported_model_family_is_refused():
    from chatbuild.errors import UserError
    from chatbuild.losses import decoder_and_head

    model = lora_model()
    model.get_base_model().config.model_type = "gemma2"  # soft-caps its logits: the chunked path would differ
    with pytest.raises(UserError, match="chunked_loss"):
        decoder_and_head(model)


def train_losses(run_dir) -> list[float]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in rows if "loss" in r]


@pytest.mark.integration
def test_a_short_fine_tune_has_the_same_losses_with_chunked_loss(tiny_base, tmp_path):
    common = ("train.steps=3", "train.log_every=1", "train.eval_every=0", "train.save_every=0", "data.val_fraction=0")
    plain = finetune_tiny(tiny_base, tmp_path / "plain", *common)
    chunked = finetune_tiny(tiny_base, tmp_path / "chunked", *common, "train.chunked_loss=true")
    a, b = train_losses(plain), train_losses(chunked)
    assert len(a) == 3 and a == pytest.approx(b, rel=1e-5, abs=1e-5), (a, b)
