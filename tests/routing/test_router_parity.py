"""Every router under every compute path equals the ``loop`` reference: outputs
and the gradients of the input and of every parameter, in float32 and (where
the path supports it) float64."""

from __future__ import annotations

import pytest
import torch

from moekit import MoE, MoEConfig
from moekit.routing import ExpertChoiceRouting, SoftRouting

ROUTER_CASES = {
    "topk": {},
    "topk_capacity_position": {"router": "topk", "capacity_factor": 0.75, "drop_priority": "position"},
    "topk_random_second": {"router": "topk", "second_expert_policy": "random"},
    "noisy_topk_capacity": {"router": "noisy_topk", "capacity_factor": 0.75},
    "switch": {"router": "switch"},
    "softmax": {"router": "softmax"},
    "expert_choice": {"router": "expert_choice", "capacity_factor": 1.5},
    "sigmoid_groups": {"router": "sigmoid", "num_expert_groups": 2, "topk_groups": 1, "routed_scaling_factor": 2.0},
    "soft": {"router": "soft", "slots_per_expert": 2},
    "hash": {"router": "hash", "hash_vocab_size": 11},
    "shared_gated_biased": {"router": "topk", "num_shared_experts": 2, "shared_expert_gate": True, "expert_bias": True},
}


def _run(config: MoEConfig, state, x, token_ids, mask, seed):
    moe = MoE(config).to(x.dtype)
    moe.load_state_dict(state)
    moe.train()
    x = x.clone().requires_grad_(True)
    torch.manual_seed(seed)  # the same noise / jitter / random second expert on every path
    out = moe(x, mask=mask, token_ids=token_ids)
    # A loss that weights every output element differently, plus the aux loss.
    weight = torch.linspace(-1.0, 2.0, x.numel(), dtype=x.dtype).view_as(x)
    ((out.y * weight).sum() + out.aux_loss).backward()
    grads = {name: p.grad for name, p in moe.named_parameters()}
    return out, x.grad, grads


def _randomise_biases(moe: MoE) -> None:
    with torch.no_grad():
        for name, p in moe.named_parameters():
            if name.endswith(("b_in", "b_out")):
                p.normal_(0, 0.3)


def _reached_TK(routing):
    """Assignments that reached an expert, whichever way the path reports them."""
    if routing.kept_TK is not None:
        return routing.kept_TK
    if routing.active_TK is not None:
        return routing.active_TK
    return torch.ones_like(routing.indices_TK, dtype=torch.bool)


# grouped_mm has no float64 kernel, so float64 parity runs on the other paths.
PATHS_AND_DTYPES = [("segment", torch.float32), ("fused", torch.float32), ("grouped_mm", torch.float32),
                    ("small_batch", torch.float32), ("segment", torch.float64), ("fused", torch.float64),
                    ("small_batch", torch.float64)]


@pytest.mark.parametrize("path,dtype", PATHS_AND_DTYPES)
@pytest.mark.parametrize("case", sorted(ROUTER_CASES))
@pytest.mark.parametrize("padded", [False, True])
def test_path_matches_loop(case, path, dtype, padded):
    fields = {"router": "topk", **ROUTER_CASES[case]}
    base = dict(d_model=8, d_ff=12, num_experts=4, top_k=2 if fields["router"] not in ("switch", "softmax", "hash") else None)
    if base["top_k"] is None:
        del base["top_k"]
    torch.manual_seed(0)
    reference = MoE(MoEConfig(**base, **fields, compute="loop")).to(dtype)
    _randomise_biases(reference)
    state = reference.state_dict()
    x = torch.randn(2, 6, 8, dtype=dtype)
    token_ids = torch.randint(0, 11, (2, 6))
    mask = torch.tensor([[True] * 6, [True] * 4 + [False] * 2]) if padded else None

    ref_out, ref_dx, ref_grads = _run(MoEConfig(**base, **fields, compute="loop"), state, x, token_ids, mask, seed=1)
    out, dx, grads = _run(MoEConfig(**base, **fields, compute=path), state, x, token_ids, mask, seed=1)

    tol = {"atol": 1e-5, "rtol": 1e-4} if dtype == torch.float32 else {"atol": 1e-11, "rtol": 1e-9}
    torch.testing.assert_close(out.y, ref_out.y, **tol)
    torch.testing.assert_close(out.aux_loss, ref_out.aux_loss, **tol)
    torch.testing.assert_close(dx, ref_dx, **tol)
    assert grads.keys() == ref_grads.keys()
    for name, grad in ref_grads.items():
        if grad is None:
            assert grads[name] is None, name
        else:
            torch.testing.assert_close(grads[name], grad, **tol, msg=lambda m, n=name: f"{n}: {m}")
    torch.testing.assert_close(out.routing.tokens_per_expert_E, ref_out.routing.tokens_per_expert_E)
    for name, value in ref_out.routing.stats.items():
        torch.testing.assert_close(out.routing.stats[name], value, msg=name)
    if not isinstance(ref_out.routing.decision, ExpertChoiceRouting | SoftRouting):
        assert torch.equal(_reached_TK(out.routing), _reached_TK(ref_out.routing))
        assert int(out.routing.num_dropped) == int(ref_out.routing.num_dropped)
    if padded:
        # Padding receives nothing, on any path.
        assert torch.all(out.y[1, 4:] == 0)


@pytest.mark.parametrize("case", sorted(ROUTER_CASES))
def test_router_math_stays_float32_under_autocast_and_float64_for_float64(case):
    fields = {"router": "topk", **ROUTER_CASES[case]}
    torch.manual_seed(0)
    moe = MoE(MoEConfig(d_model=8, d_ff=8, num_experts=4, **fields)).eval()
    x = torch.randn(2, 6, 8)
    token_ids = torch.randint(0, 11, (2, 6))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = moe(x, token_ids=token_ids)
    assert out.routing.probs_TE.dtype == torch.float32
    assert out.y.dtype == torch.float32
    reference = moe(x, token_ids=token_ids)
    # The router ignores autocast: the same float32 probabilities as without it.
    torch.testing.assert_close(out.routing.probs_TE, reference.routing.probs_TE)
    # The experts ran in bfloat16, so y is close to, not equal to, the float32 result.
    torch.testing.assert_close(out.y, reference.y, atol=2e-2, rtol=5e-2)
    out64 = moe.double()(x.double(), token_ids=token_ids)
    assert out64.routing.probs_TE.dtype == torch.float64 and out64.y.dtype == torch.float64
