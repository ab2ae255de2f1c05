"""The chunked frozen-head cross-entropy equals the plain one, in value and in gradient."""

import pytest
import torch
import torch.nn.functional as F

from deltaw.train import losses
from deltaw.train.data import IGNORE
from tests.conftest import make_tiny_llama


@pytest.mark.parametrize("rows", [5, 1024, 2500])
def test_frozen_head_cross_entropy_matches_autograd(rows, monkeypatch):
    monkeypatch.setattr(losses, "CHUNK_ROWS", 1000)  # several chunks, a partial last one
    generator = torch.Generator().manual_seed(0)
    hidden = torch.randn(rows, 16, generator=generator, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(50, 16, generator=generator, dtype=torch.float64)
    targets = torch.randint(0, 50, (rows,), generator=generator)
    ours = losses.FrozenHeadCrossEntropy.apply(hidden, weight, targets)
    (grad_ours,) = torch.autograd.grad(ours * 0.5, hidden)
    reference = F.cross_entropy(hidden @ weight.t(), targets, reduction="sum")
    (grad_reference,) = torch.autograd.grad(reference * 0.5, hidden)
    assert ours.item() == pytest.approx(reference.item(), rel=1e-6)
    torch.testing.assert_close(grad_ours, grad_reference, rtol=1e-5, atol=1e-7)


def test_lm_loss_sum_matches_transformers_loss():
    model = make_tiny_llama()
    for param in model.parameters():
        param.requires_grad_(False)
    input_ids = torch.randint(0, 128, (2, 10), generator=torch.Generator().manual_seed(1))
    labels = input_ids.clone()
    labels[0, :4] = IGNORE
    labels[1, 7:] = IGNORE
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, 7:] = 0
    batch = {"input_ids": input_ids, "labels": labels, "attention_mask": attention_mask}
    total, count = losses.lm_loss_sum(model, batch)
    expected = model(input_ids=input_ids, attention_mask=attention_mask, labels=labels).loss
    assert count == int((labels[:, 1:] != IGNORE).sum())
    assert (total / count).item() == pytest.approx(expected.item(), rel=1e-5)


def test_a_trainable_head_takes_the_plain_path():
    model = make_tiny_llama()
    batch = {"input_ids": torch.randint(0, 128, (1, 6)), "attention_mask": torch.ones(1, 6, dtype=torch.long)}
    batch["labels"] = batch["input_ids"].clone()
    total, _ = losses.lm_loss_sum(model, batch)
    total.backward()
    assert model.lm_head.weight.grad is not None and model.lm_head.weight.grad.abs().sum() > 0
