"""Soft MoE (Puigcerver et al. 2023) against its formula."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from moekit import MoE, MoEConfig
from moekit.routing import check_causal


def _soft_moe(**fields) -> MoE:
    fields = {"d_model": 6, "d_ff": 8, "num_experts": 3, "router": "soft", "slots_per_expert": 2,
              "compute": "loop", **fields}
    torch.manual_seed(0)
    return MoE(MoEConfig(**fields)).double()


def test_hand_case_dispatch_and_combine():
    # One expert, two slots, Φ = I and no normalisation: logits = X.
    moe = _soft_moe(d_model=2, num_experts=1, soft_normalize=False)
    with torch.no_grad():
        moe.router.weight.copy_(torch.eye(2))
    x = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]], dtype=torch.float64)
    r = moe(x).routing
    e = math.e
    # Slot 0 column: softmax over tokens of [1, 0, 1]; slot 1: of [0, 1, 1].
    expected_dispatch = [[e / (2 * e + 1), 1 / (2 * e + 1)],
                         [1 / (2 * e + 1), e / (2 * e + 1)],
                         [e / (2 * e + 1), e / (2 * e + 1)]]
    torch.testing.assert_close(r.dispatch_GLS[0], torch.tensor(expected_dispatch, dtype=torch.float64))
    # Token rows: softmax over slots of [1, 0], [0, 1], [1, 1].
    expected_combine = [[e / (e + 1), 1 / (e + 1)], [1 / (e + 1), e / (e + 1)], [0.5, 0.5]]
    torch.testing.assert_close(r.combine_GLS[0], torch.tensor(expected_combine, dtype=torch.float64))


@pytest.mark.parametrize("normalize", [True, False])
def test_output_follows_the_formula(normalize):
    moe = _soft_moe(soft_normalize=normalize)
    x = torch.randn(2, 5, 6, dtype=torch.float64)
    out = moe(x)
    phi = moe.router.weight
    for g in range(2):
        X = x[g]
        if normalize:
            logits = F.normalize(X, dim=-1) @ (moe.router.scale * F.normalize(phi, dim=-1)).t()
        else:
            logits = X @ phi.t()
        dispatch = logits.softmax(dim=0)
        combine = logits.softmax(dim=1)
        slots = dispatch.t() @ X  # (E·P, D), expert j owns slots 2j, 2j+1
        slot_out = torch.cat([moe.experts.forward_expert(j, slots[2 * j : 2 * j + 2]) for j in range(3)])
        torch.testing.assert_close(out.y[g], combine @ slot_out)
    assert out.routing.tokens_per_expert_E.tolist() == [4, 4, 4]  # G·P slots each


def test_dispatch_columns_and_combine_rows_sum_to_one_and_padding_is_excluded():
    moe = _soft_moe()
    x = torch.randn(2, 5, 6, dtype=torch.float64)
    mask = torch.tensor([[True] * 5, [True, True, False, True, False]])
    out = moe(x, mask=mask)
    r = out.routing
    torch.testing.assert_close(r.dispatch_GLS.sum(dim=1), torch.ones(2, 6, dtype=torch.float64))
    assert torch.all(r.dispatch_GLS[1, [2, 4]] == 0)
    row_sums = r.combine_GLS.sum(dim=2)
    torch.testing.assert_close(row_sums[mask], torch.ones(8, dtype=torch.float64))
    assert torch.all(row_sums[~mask] == 0)
    assert torch.all(out.y[~mask] == 0)
    # Padding content does not leak into real tokens.
    x2 = x.clone()
    x2[~mask] = 100.0
    torch.testing.assert_close(moe(x2, mask=mask).y, out.y)


def test_sequences_do_not_mix_and_normalisation_makes_logits_scale_free():
    moe = _soft_moe()
    x = torch.randn(2, 4, 6, dtype=torch.float64)
    y = moe(x).y
    x2 = x.clone()
    x2[1] = torch.randn(4, 6, dtype=torch.float64)
    torch.testing.assert_close(moe(x2).y[0], y[0])
    # With l2 normalisation the logits ignore each token's norm.
    torch.testing.assert_close(moe(3.0 * x).routing.logits_GLS, moe(x).routing.logits_GLS)


def test_soft_moe_is_not_causal():
    moe = _soft_moe()
    assert moe.router.causal is False
    with pytest.raises(ValueError, match="'soft'.*not causal"):
        check_causal(moe)
    x = torch.randn(1, 4, 6, dtype=torch.float64)
    y0 = moe(x).y[0, 0]
    x[0, 3] += 1.0
    assert not torch.allclose(moe(x).y[0, 0], y0)
