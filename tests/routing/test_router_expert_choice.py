"""Expert choice (Zhou et al. 2022) against its formula on hand-computed cases."""

from __future__ import annotations

import math

import pytest
import torch

from moekit import MoE, MoEConfig
from moekit.routing import check_causal


def _softmax(row):
    exps = [math.exp(v) for v in row]
    return [e / sum(exps) for e in exps]


# Identity router weight (E = D = 3), so each token's logits are the token itself.
HAND_X = [[2.0, 2.0, -5.0], [0.0, 0.0, 3.0], [0.0, 0.0, 0.0], [1.0, 0.0, 0.0]]


def _hand_moe(capacity_factor: float, compute: str = "loop") -> MoE:
    moe = MoE(
        MoEConfig(d_model=3, d_ff=4, num_experts=3, router="expert_choice",
                  capacity_factor=capacity_factor, compute=compute)
    ).double()
    with torch.no_grad():
        moe.router.weight.copy_(torch.eye(3))
    return moe


def test_each_expert_takes_its_top_c_tokens_by_hand():
    # S rows: t0 ≈ [.4996, .4996, .0005], t1 ≈ [.0453, .0453, .9094],
    # t2 = [1/3, 1/3, 1/3], t3 ≈ [.5761, .2119, .2119].
    # capacity_factor 1.5: C = ceil(1.5·4/3) = 2. Expert 0 takes t3, t0; expert 1
    # takes t0, t2; expert 2 takes t1, t2. So t0 and t2 get two experts each.
    moe = _hand_moe(1.5)
    x = torch.tensor(HAND_X, dtype=torch.float64)
    out = moe(x)
    r = out.routing
    S = [_softmax(row) for row in HAND_X]
    assert r.tokens_EC.tolist() == [[3, 0], [0, 2], [1, 2]]
    expected_weights = [[S[3][0], S[0][0]], [S[0][1], S[2][1]], [S[1][2], S[2][2]]]
    torch.testing.assert_close(r.weights_EC, torch.tensor(expected_weights, dtype=torch.float64))
    assert r.experts_per_token().tolist() == [2, 1, 2, 1]

    # y_t = Σ over the experts j that took t of S_tj·E_j(x_t)
    def expert(j, t):
        return moe.experts.forward_expert(j, x[t : t + 1])[0]

    expected_y = torch.stack([
        S[0][0] * expert(0, 0) + S[0][1] * expert(1, 0),
        S[1][2] * expert(2, 1),
        S[2][1] * expert(1, 2) + S[2][2] * expert(2, 2),
        S[3][0] * expert(0, 3),
    ])
    torch.testing.assert_close(out.y, expected_y)
    assert r.stats["unrouted_share"].item() == 0.0


def test_a_token_no_expert_takes_gets_zero_and_is_reported():
    # capacity_factor 0.75: C = ceil(0.75·4/3) = 1; experts take t3, t0, t1 and
    # the uniform token t2 is left out.
    moe = _hand_moe(0.75)
    out = moe(torch.tensor(HAND_X, dtype=torch.float64))
    assert out.routing.tokens_EC.tolist() == [[3], [0], [1]]
    assert torch.all(out.y[2] == 0)
    assert out.routing.stats["unrouted_share"].item() == pytest.approx(0.25)


@pytest.mark.parametrize("capacity_factor,expected_c", [(None, 6), (1.0, 3), (0.5, 2), (100.0, 12)])
def test_every_expert_processes_exactly_c_distinct_tokens(capacity_factor, expected_c):
    # T = 12, E = 4: C = ceil(factor·12/4), factor = top_k (2) when unset, at most T.
    torch.manual_seed(0)
    moe = MoE(MoEConfig(d_model=8, d_ff=8, num_experts=4, top_k=2, router="expert_choice",
                        capacity_factor=capacity_factor))
    out = moe(torch.randn(3, 4, 8))
    r = out.routing
    assert r.capacity == expected_c
    assert r.tokens_per_expert_E.tolist() == [expected_c] * 4
    for tokens in r.tokens_EC.tolist():
        assert len(set(tokens)) == expected_c
    assert r.stats["max_over_mean_load"].item() == pytest.approx(1.0)


def test_padding_is_never_taken_while_real_tokens_remain():
    torch.manual_seed(1)
    moe = MoE(MoEConfig(d_model=8, d_ff=8, num_experts=2, router="expert_choice", capacity_factor=1.0))
    x = torch.randn(1, 8, 8)
    mask = torch.tensor([[True, False, True, True, False, True, True, True]])
    out = moe(x, mask=mask)
    # C = ceil(1·8/2) = 4 of the 6 real tokens per expert.
    taken = set(out.routing.tokens_EC.flatten().tolist())
    assert not taken & {1, 4}
    assert torch.all(out.y[0, [1, 4]] == 0)
    assert out.routing.tokens_per_expert_E.tolist() == [4, 4]


def test_expert_choice_is_not_causal():
    moe = _hand_moe(0.75)
    assert moe.router.causal is False
    with pytest.raises(ValueError, match="'expert_choice'.*not causal.*generation"):
        check_causal(torch.nn.Sequential(moe), where="generation")
    # A later token changes an earlier token's output, the reason for the guard:
    # a strong t3 on expert 1 takes expert 1's only place from t0.
    x = torch.tensor(HAND_X, dtype=torch.float64)
    assert moe(x).routing.tokens_EC[1].tolist() == [0]
    x[3] = torch.tensor([0.0, 5.0, 0.0])
    out = moe(x)
    assert out.routing.tokens_EC.tolist() == [[0], [3], [1]]
    S0 = _softmax(HAND_X[0])
    torch.testing.assert_close(out.y[0], S0[0] * moe.experts.forward_expert(0, x[:1])[0])


def test_causal_routers_pass_the_guard():
    check_causal(MoE(MoEConfig(d_model=4, d_ff=4, num_experts=2, router="topk")))
