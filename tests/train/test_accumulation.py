"""Gradient accumulation: n micro-batches give the gradients of one n-times larger batch,
balancing and z losses included (float64, 1e-10), because the losses are the whole batch's."""

from __future__ import annotations

import pytest
import torch

from lm_fixtures import tiny_model_config, tiny_train_config
from moekit.train import TrainConfig, new_run


def _gradients(tmp_path, prepared, tiny_data_config, accumulation, router="topk", **moe_fields):
    vocab = prepared.tokenizer.vocab_size
    model_config = tiny_model_config(vocab, router=router)
    for name, value in moe_fields.items():
        setattr(model_config.moe, name, value)
    trainer = new_run(tmp_path / f"run{accumulation}", model_config,
                      tiny_train_config(batch_size=8, grad_accumulation=accumulation), tiny_data_config,
                      prepared=prepared, progress=False, tensorboard=False)
    trainer.model.double()
    torch.manual_seed(5)
    x = torch.randint(0, vocab, (8, 32))
    y = torch.randint(0, vocab, (8, 32))
    loss, aux_loss, sums = trainer.accumulate_gradients(x, y)
    grads = {name: p.grad.clone() for name, p in trainer.model.named_parameters() if p.grad is not None}
    return loss, aux_loss, sums, grads


@pytest.mark.parametrize("router,fields", [("topk", {"load_balance_coef": 0.5, "z_loss_coef": 0.1}),
                                           ("sigmoid", {"sequence_balance_coef": 0.3})])
def test_accumulated_micro_batches_give_the_full_batch_gradients(tmp_path, prepared, tiny_data_config, router, fields):
    full = _gradients(tmp_path, prepared, tiny_data_config, 1, router, **fields)
    accumulated = _gradients(tmp_path, prepared, tiny_data_config, 4, router, **fields)
    assert full[1] > 0  # the aux losses are in play
    assert abs(accumulated[0] - full[0]) < 1e-10 and abs(accumulated[1] - full[1]) < 1e-10
    assert full[3].keys() == accumulated[3].keys()
    for name, grad in full[3].items():
        torch.testing.assert_close(accumulated[3][name], grad, rtol=1e-10, atol=1e-12, msg=name)
    for a, b in zip(accumulated[2], full[2], strict=True):
        torch.testing.assert_close(a, b)


def test_per_micro_batch_balancing_would_differ(tmp_path, prepared, tiny_data_config, monkeypatch):
    # The check above can fail: losses computed per micro-batch give other router gradients.
    import moekit.train.trainer as trainer_module

    monkeypatch.setattr(trainer_module, "needs_global_sums", lambda model: False)
    full = _gradients(tmp_path, prepared, tiny_data_config, 1, load_balance_coef=0.5)
    local = _gradients(tmp_path, prepared, tiny_data_config, 4, load_balance_coef=0.5)
    router = next(name for name in full[3] if name.endswith("router.weight"))
    assert (local[3][router] - full[3][router]).abs().max() > 1e-6


def test_grad_accumulation_must_divide_the_batch():
    with pytest.raises(ValueError, match=r"batch_size \(8\) must be divisible by grad_accumulation \(3\)"):
        TrainConfig(batch_size=8, grad_accumulation=3)
    with pytest.raises(ValueError, match=r"grad_accumulation \(0\) must be a positive integer"):
        TrainConfig(grad_accumulation=0)
