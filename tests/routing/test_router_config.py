"""Config errors of the new router and expert options name the bad value."""

from __future__ import annotations

import pytest
import torch

from moekit import MoE, MoEConfig
from moekit.routing.sigmoid import sequence_balance_loss

BASE = {"d_model": 4, "d_ff": 4, "num_experts": 4}


@pytest.mark.parametrize(
    "fields,error,message",
    [
        ({"router": "soft", "slots_per_expert": 0}, ValueError, "slots_per_expert \\(0\\) must be a positive integer"),
        ({"num_expert_groups": 1.5}, ValueError, "num_expert_groups \\(1.5\\)"),
        ({"router": "hash", "hash_vocab_size": 0}, ValueError, "hash_vocab_size.*got 0"),
        ({"shared_d_ff": 0, "num_shared_experts": 1}, ValueError, "shared_d_ff \\(0\\)"),
        ({"sequence_balance_coef": float("nan")}, ValueError, "sequence_balance_coef \\(nan\\)"),
        ({"router": "expert_choice", "capacity_factor": -1.0}, ValueError, "capacity_factor \\(-1.0\\)"),
    ],
)
def test_bad_values_are_named(fields, error, message):
    with pytest.raises(error, match=message):
        MoEConfig(**BASE, **fields)


@pytest.mark.parametrize("tokens,factor,expected", [(10, None, 5), (10, 0.1, 1), (10, 3.0, 8), (10, 9.0, 10)])
def test_expert_choice_capacity_is_ceil_factor_t_over_e_within_1_and_t(tokens, factor, expected):
    moe = MoE(MoEConfig(**BASE, top_k=2, router="expert_choice", capacity_factor=factor))
    assert moe.router.capacity(tokens) == expected
    assert moe.config.capacity_factor is None  # expert choice's own option, not dispatch capacity


def test_sequence_length_must_divide_the_tokens():
    with pytest.raises(ValueError, match="sequence_length \\(4\\) must divide the number of tokens \\(6\\)"):
        sequence_balance_loss(torch.full((6, 2), 0.5), torch.zeros(6, 1, dtype=torch.long), sequence_length=4)
