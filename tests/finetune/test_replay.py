"""Routing record and replay: replayed forwards equal recorded ones bitwise (CPU float32),
routers keep their gradients, weights follow each router's formula at the replayed experts,
engine arrays round-trip, and the flip-rate meter counts changed choices."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from moekit import MoE, MoEConfig
from moekit.finetune import ChoiceRecord, flip_rate, record_choices, replay_choices
from moekit.models.lm import LanguageModel, LMConfig

ROUTERS = {
    "topk": {},
    "noisy_topk": {},
    "switch": {"top_k": 1},
    "sigmoid": {"num_expert_groups": 2, "topk_groups": 1},
}


def _layer(router, **fields):
    torch.manual_seed(0)
    return MoE(MoEConfig(d_model=16, d_ff=32, num_experts=4, top_k=fields.pop("top_k", 2), router=router,
                         **fields))


@pytest.mark.parametrize("router", ROUTERS)
def test_replaying_a_recorded_forward_gives_it_bitwise_with_router_gradients(router):
    moe = _layer(router, **ROUTERS[router]).eval()
    x = torch.randn(3, 6, 16)
    with record_choices(moe) as record:
        recorded = moe(x)
    with replay_choices(moe, record):
        replayed = moe(x)
    assert torch.equal(replayed.y, recorded.y)
    assert torch.equal(replayed.routing.indices_TK, recorded.routing.indices_TK)
    replayed.y.square().sum().backward()
    assert moe.router.weight.grad is not None and moe.router.weight.grad.abs().sum() > 0
    assert moe.router.replayed_TK is None  # the context leaves nothing behind


def test_a_changed_router_runs_the_replayed_experts_with_its_own_live_weights():
    moe = _layer("topk").double()
    x = torch.randn(10, 16, dtype=torch.float64)
    with record_choices(moe) as record:
        moe(x)
    with torch.no_grad():
        moe.router.weight.normal_()  # the live choice now differs
    with replay_choices(moe, record):
        out = moe(x)
    chosen = record.calls[""][0]
    assert torch.equal(out.routing.indices_TK, chosen) and not torch.equal(moe(x).routing.indices_TK, chosen)
    probs = (x @ moe.router.weight.t()).softmax(-1)
    expected = probs.gather(1, chosen)
    torch.testing.assert_close(out.routing.weights_TK, expected / expected.sum(-1, keepdim=True), rtol=1e-12,
                               atol=1e-12)


def test_replay_under_capacity_keeps_the_same_assignments():
    moe = _layer("topk", capacity_factor=0.75).eval()
    x = torch.randn(24, 16)
    with record_choices(moe) as record:
        recorded = moe(x)
    with replay_choices(moe, record):
        replayed = moe(x)
    assert recorded.routing.num_dropped > 0
    assert torch.equal(replayed.routing.kept_TK, recorded.routing.kept_TK)
    assert torch.equal(replayed.y, recorded.y)


def test_an_lm_replays_a_generation_record_call_by_call():
    torch.manual_seed(0)
    model = LanguageModel(LMConfig(vocab_size=50, context_length=16, n_layer=2, n_head=2, d_model=16, d_ff=32,
                                   moe=MoEConfig(d_model=16, d_ff=32, num_experts=4, top_k=2))).eval()
    ids = torch.randint(0, 50, (2, 8))
    with record_choices(model) as record:
        first = model(ids).logits
        second = model(ids[:, :5]).logits
    assert len(record.layers) == 2 and all(len(calls) == 2 for calls in record.calls.values())
    with replay_choices(model, record):
        torch.testing.assert_close(model(ids).logits, first, rtol=0, atol=0)
        torch.testing.assert_close(model(ids[:, :5]).logits, second, rtol=0, atol=0)
        with pytest.raises(ValueError, match="call 3 has no recorded choice"):
            model(ids)


def test_a_converted_hugging_face_model_replays():
    pytest.importorskip("transformers")
    from tests.interop.test_hf import _model

    from moekit.interop.hf import convert_model

    model = convert_model(_model("mixtral"))
    ids = torch.randint(0, 101, (2, 7))
    with record_choices(model) as record:
        expected = model(ids).logits
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("router.weight"):
                p.add_(torch.randn_like(p))
    with record_choices(model) as live:
        model(ids)
    with replay_choices(model, record), record_choices(model) as again:
        model(ids)
    assert flip_rate(record, live)["all"] > 0.2 and flip_rate(record, again)["all"] == 0.0
    assert expected.shape == (2, 7, 101)


def test_engine_arrays_round_trip_and_feed_a_replay():
    moe = _layer("topk")
    x = torch.randn(9, 16)
    with record_choices(moe) as record:
        expected = moe(x).y
    array = record.to_array()
    assert array.shape == (9, 1, 2) and array.dtype == np.int32
    imported = ChoiceRecord.from_array(array, [""])
    with replay_choices(moe, imported):
        assert torch.equal(moe(x).y, expected)
    with pytest.raises(ValueError, match=r"\[tokens, layers, top_k\] array with 1 layers"):
        ChoiceRecord.from_array(array[:, :, 0], [""])


def test_flip_rate_counts_changed_sets_of_experts():
    a = ChoiceRecord({"l0": [torch.tensor([[0, 1], [2, 3], [1, 2]])], "l1": [torch.tensor([[0, 1]] * 3)]})
    b = ChoiceRecord({"l0": [torch.tensor([[1, 0], [2, 0], [1, 2]])], "l1": [torch.tensor([[0, 1]] * 3)]})
    rates = flip_rate(a, b)
    assert rates == {"l0": 1 / 3, "l1": 0.0, "all": 1 / 6}  # the order within a token's choice is no flip


def test_replay_errors_name_the_layer_and_the_mismatch():
    moe = _layer("topk")
    with record_choices(moe) as record:
        moe(torch.randn(4, 16))
    with replay_choices(moe, record), pytest.raises(ValueError, match="shape .4, 2.; this call has 5 tokens"):
        moe(torch.randn(5, 16))
    bad = ChoiceRecord({"": [torch.tensor([[0, 9]] * 4)]})
    with replay_choices(moe, bad), pytest.raises(ValueError, match=r"must lie in \[0, 4\)"):
        moe(torch.randn(4, 16))
    with pytest.raises(ValueError, match="cannot replay"):
        with replay_choices(_layer("expert_choice", top_k=None), record):
            pass
    with pytest.raises(ValueError, match="no choices for layer"):
        with replay_choices(moe, ChoiceRecord({"other": []})):
            pass


def test_flip_rate_between_float32_and_float64_is_measured_not_assumed():
    moe = _layer("topk")
    x = torch.randn(256, 16)
    with record_choices(moe) as single:
        moe(x)
    with record_choices(moe) as double:
        copy.deepcopy(moe).double()(x.double())
    rate = flip_rate(single, double)["all"]
    assert 0.0 <= rate < 0.05
