"""DeepSeek-V3 sigmoid routing against its formula, and auxiliary-loss-free balancing."""

from __future__ import annotations

import math

import pytest
import torch

from moekit import MoE, MoEConfig
from moekit.routing import attach_bias_updates
from moekit.routing.sigmoid import SigmoidRouter, sequence_balance_loss


def sig(z: float) -> float:
    return 1.0 / (1.0 + math.exp(-z))


def logit(p: float) -> float:
    return math.log(p / (1.0 - p))


def _router(**fields) -> SigmoidRouter:
    fields = {"d_model": 4, "d_ff": 4, "num_experts": 4, "top_k": 2, "router": "sigmoid", **fields}
    router = SigmoidRouter.from_config(MoEConfig(**fields)).double()
    with torch.no_grad():
        router.weight.copy_(torch.eye(fields["num_experts"], fields["d_model"]))
    return router


def test_gate_is_normalised_affinity_of_the_chosen_and_bias_only_chooses():
    router = _router(routed_scaling_factor=2.5)
    x = torch.tensor([[0.0, 1.0, 2.0, -1.0]], dtype=torch.float64)  # logits = x
    s = [sig(v) for v in (0.0, 1.0, 2.0, -1.0)]  # .5, .7311, .8808, .2689

    r = router(x)
    assert r.indices_TK.tolist() == [[2, 1]]
    expected = [2.5 * s[2] / (s[2] + s[1]), 2.5 * s[1] / (s[2] + s[1])]
    torch.testing.assert_close(r.weights_TK, torch.tensor([expected], dtype=torch.float64))
    torch.testing.assert_close(r.probs_TE, torch.tensor([[v / sum(s) for v in s]], dtype=torch.float64))

    # s + b = [1.0, .7311, .5808, .2689]: experts 0 and 1; the gate still uses s alone.
    router.expert_bias_E.copy_(torch.tensor([0.5, 0.0, -0.3, 0.0]))
    r = router(x)
    assert r.indices_TK.tolist() == [[0, 1]]
    expected = [2.5 * s[0] / (s[0] + s[1]), 2.5 * s[1] / (s[0] + s[1])]
    torch.testing.assert_close(r.weights_TK, torch.tensor([expected], dtype=torch.float64))


def test_unnormalised_gate_is_the_affinity_times_the_scale():
    router = _router(normalize_weights=False, routed_scaling_factor=2.0)
    r = router(torch.tensor([[0.0, 1.0, 2.0, -1.0]], dtype=torch.float64))
    torch.testing.assert_close(r.weights_TK, torch.tensor([[2 * sig(2.0), 2 * sig(1.0)]], dtype=torch.float64))


def test_group_limited_routing_keeps_the_groups_with_the_best_top2_sum():
    # Groups {0, 1} and {2, 3}. Expert 2 is the best single expert, but group
    # {0, 1} scores .8 + .79 = 1.59 > .95 + .1, so with one group kept both
    # choices come from it.
    x = torch.tensor([[logit(0.8), logit(0.79), logit(0.95), logit(0.1)]], dtype=torch.float64)
    assert _router()(x).indices_TK.tolist() == [[2, 0]]
    limited = _router(num_expert_groups=2, topk_groups=1)(x)
    assert limited.indices_TK.tolist() == [[0, 1]]
    torch.testing.assert_close(limited.weights_TK, torch.tensor([[0.8 / 1.59, 0.79 / 1.59]], dtype=torch.float64))


def test_sequence_balance_loss_extremes_and_a_hand_case():
    E, K = 4, 2
    # Uniform: every expert chosen equally often, s' = 1/E everywhere -> 1.
    indices = torch.tensor([[0, 1], [2, 3]])
    uniform = torch.full((2, E), 1.0 / E, dtype=torch.float64)
    assert sequence_balance_loss(uniform, indices).item() == pytest.approx(1.0)
    # Collapse: every token picks experts 0 and 1 with all its mass there -> E/K.
    collapsed = torch.tensor([[0.5, 0.5, 0, 0]] * 2, dtype=torch.float64)
    assert sequence_balance_loss(collapsed, torch.tensor([[0, 1]] * 2)).item() == pytest.approx(E / K)
    # Two sequences of two tokens, the last token padding.
    # Seq 0: f = (4/(2·2))·[2, 1, 1, 0] = [2, 1, 1, 0]; P = mean of rows = [.4, .3, .2, .1]
    #        -> .8 + .3 + .2 = 1.3.
    # Seq 1: one real token, f = (4/2)·[0, 0, 1, 1] = [0, 0, 2, 2]; P = [.1, .1, .4, .4] -> 1.6.
    probs = torch.tensor(
        [[0.5, 0.2, 0.2, 0.1], [0.3, 0.4, 0.2, 0.1], [0.1, 0.1, 0.4, 0.4], [0.9, 0.1, 0.0, 0.0]],
        dtype=torch.float64,
    )
    indices = torch.tensor([[0, 1], [0, 2], [2, 3], [0, 1]])
    weight = torch.tensor([1.0, 1.0, 1.0, 0.0])
    loss = sequence_balance_loss(probs, indices, sequence_length=2, token_weight_T=weight)
    assert loss.item() == pytest.approx((1.3 + 1.6) / 2)


def test_moe_reports_the_sequence_loss_per_sequence_and_weights_it():
    torch.manual_seed(0)
    moe = MoE(MoEConfig(d_model=8, d_ff=8, num_experts=4, router="sigmoid", sequence_balance_coef=0.5)).double()
    x = torch.randn(3, 5, 8, dtype=torch.float64)
    out = moe(x)
    r = out.routing
    per_sequence = [
        sequence_balance_loss(r.probs_TE[5 * g : 5 * g + 5], r.indices_TK[5 * g : 5 * g + 5]) for g in range(3)
    ]
    torch.testing.assert_close(r.losses["sequence_balance"], sum(per_sequence) / 3)
    torch.testing.assert_close(out.aux_loss, 0.5 * r.losses["sequence_balance"])


def _skewed_router(seed: int = 0):
    """A router whose affinities favour low-numbered experts for nearly every token."""
    torch.manual_seed(seed)
    E, D = 8, 8
    router = SigmoidRouter.from_config(MoEConfig(d_model=D, d_ff=4, num_experts=E, top_k=2, router="sigmoid",
                                     bias_update_rate=0.003))
    x = torch.randn(512, D) * 0.5
    x[:, 0] = 1.0
    with torch.no_grad():
        router.weight.normal_(0, 0.3)
        router.weight[:, 0] = torch.linspace(2.0, -2.0, E)
    return router, x


def _max_over_mean(router, x) -> float:
    counts = torch.bincount(router(x).indices_TK.flatten(), minlength=router.num_experts).float()
    return (counts.max() / counts.mean()).item()


def test_bias_updates_balance_a_skewed_router_without_touching_the_gates():
    router, x = _skewed_router()
    router.train()
    before = _max_over_mean(router, x)
    assert before > 3.0
    # Each measurement is a training forward, so it also counts the load that
    # the next update_bias() uses: one update per "step".
    steps = 0
    while _max_over_mean(router, x) > 1.3:
        router.update_bias()
        steps += 1
        assert steps <= 200, f"load still unbalanced after {steps} updates"
    router.update_bias()
    # Sign updates then hover around balance instead of drifting away.
    for _ in range(100):
        assert _max_over_mean(router, x) <= 1.35
        router.update_bias()
    # Gates are the chosen experts' normalised affinities, whatever the bias now is.
    r = router(x)
    s_TE = torch.sigmoid(x @ router.weight.t())
    chosen = s_TE.gather(1, r.indices_TK)
    torch.testing.assert_close(r.weights_TK, chosen / chosen.sum(-1, keepdim=True))
    assert router.expert_bias_E[0] < 0 < router.expert_bias_E[-1]


def test_bias_update_is_sign_of_mean_minus_load_and_counts_reset():
    router = _router(bias_update_rate=0.1).train()
    x = torch.tensor([[0.0, 1.0, 2.0, -1.0]] * 3, dtype=torch.float64)  # all pick experts 2, 1
    router(x)
    assert router.load_since_update_E.tolist() == [0, 3, 3, 0]
    router.update_bias()  # mean load 1.5
    expected = torch.tensor([0.1, -0.1, -0.1, 0.1], dtype=torch.float64)
    torch.testing.assert_close(router.expert_bias_E, expected)
    router.update_bias()  # nothing counted since: no move
    torch.testing.assert_close(router.expert_bias_E, expected)


def test_no_bias_update_in_eval_and_once_per_optimizer_step():
    torch.manual_seed(0)
    model = MoE(MoEConfig(d_model=8, d_ff=8, num_experts=4, router="sigmoid", bias_update_rate=0.1))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    handle = attach_bias_updates(model, optimizer)
    x = torch.randn(16, 8)

    model.eval()
    model(x)
    optimizer.step()
    assert torch.all(model.router.expert_bias_E == 0)

    model.train()
    model(x)
    model(x)  # two forwards, one step: one update of ±γ (or 0)
    assert torch.all(model.router.expert_bias_E == 0)
    optimizer.step()
    moved = model.router.expert_bias_E.abs()
    assert torch.all((moved == 0) | torch.isclose(moved, torch.tensor(0.1)))
    assert moved.sum() > 0
    handle.remove()
    assert "router.expert_bias_E" in model.state_dict()


@pytest.mark.parametrize(
    "fields,message",
    [
        ({"num_expert_groups": 3}, "divisible by num_expert_groups"),
        ({"num_expert_groups": 2, "topk_groups": 3}, "topk_groups"),
        ({"num_expert_groups": 4, "topk_groups": 1, "top_k": 2}, "top_k \\(2\\) must be <= topk_groups"),
        ({"routed_scaling_factor": 0.0}, "routed_scaling_factor"),
        ({"bias_update_rate": -1.0}, "bias_update_rate"),
    ],
)
def test_sigmoid_config_errors_name_the_value(fields, message):
    base = {"d_model": 4, "d_ff": 4, "num_experts": 4, "top_k": 1, "router": "sigmoid"}
    with pytest.raises(ValueError, match=message):
        MoEConfig(**{**base, **fields})


def test_bias_and_load_survive_a_cast_to_bfloat16():
    moe = MoE(MoEConfig(d_model=8, d_ff=8, num_experts=4, router="sigmoid")).to(torch.bfloat16).train()
    assert moe.router.expert_bias_E.dtype == torch.float32
    assert moe.router.load_since_update_E.dtype == torch.long
    moe.router.expert_bias_E.fill_(0.3)  # bfloat16 spacing near 0.3 is ~0.002 > γ = 0.001
    moe(torch.randn(64, 8, dtype=torch.bfloat16))
    assert moe.router.load_since_update_E.sum().item() == 64 * 2
    moe.router.update_bias()
    moved = (moe.router.expert_bias_E - 0.3).abs()
    assert torch.all((moved < 1e-6) | torch.isclose(moved, torch.tensor(0.001), atol=1e-6))
    assert moved.max() > 0.0005
