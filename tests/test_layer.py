"""The MoE layer against its definition: paths vs the loop reference, one expert
vs a dense FFN, the dense softmax gate vs Σ g_i E_i(x) by hand."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tests.helpers import assert_close_dicts, run_path

from moekit import MoE, MoEConfig

CORE_ROUTERS = ["softmax", "topk", "noisy_topk", "switch"]
FAST_PATHS = ["segment", "fused", "grouped_mm", "small_batch"]


def _paths_for(dtype):
    return ["segment", "fused", "small_batch"] if dtype == torch.float64 else FAST_PATHS


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("router", CORE_ROUTERS)
@pytest.mark.parametrize("expert", ["swiglu", "geglu", "ffn"])
def test_paths_match_loop_for_every_router_and_expert(router, expert, dtype):
    config = MoEConfig(d_model=12, d_ff=20, num_experts=5, router=router, expert=expert, expert_bias=True,
                       z_loss_coef=1e-3, importance_coef=0.1, load_coef=0.1)
    moe = MoE(config).to(dtype)
    moe.train()
    x = torch.randn(3, 7, 12, dtype=dtype)
    ref, ref_grads = run_path(moe, "loop", x)
    tol = {"rtol": 1e-10, "atol": 1e-10} if dtype == torch.float64 else {"rtol": 1e-5, "atol": 1e-5}
    for path in _paths_for(dtype):
        out, grads = run_path(moe, path, x)
        torch.testing.assert_close(out.y, ref.y, **tol)
        torch.testing.assert_close(out.aux_loss, ref.aux_loss, **tol)
        assert torch.equal(out.routing.tokens_per_expert_E, ref.routing.tokens_per_expert_E)
        assert_close_dicts(grads, ref_grads, **tol)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    num_experts=st.integers(1, 6),
    data=st.data(),
    d_model=st.integers(1, 9),
    d_ff=st.integers(1, 9),
    num_tokens=st.integers(0, 17),
    capacity_factor=st.sampled_from([None, 0.5, 1.0, 1.7]),
    drop_priority=st.sampled_from(["probability", "position"]),
    seed=st.integers(0, 2**16),
)
def test_paths_match_loop_on_random_shapes(
    num_experts, data, d_model, d_ff, num_tokens, capacity_factor, drop_priority, seed
):
    top_k = data.draw(st.integers(1, num_experts))
    torch.manual_seed(seed)
    config = MoEConfig(d_model=d_model, d_ff=d_ff, num_experts=num_experts, top_k=top_k,
                       capacity_factor=capacity_factor, drop_priority=drop_priority, z_loss_coef=1e-2)
    moe = MoE(config).double()
    # Skewed router so that some experts get no tokens at all.
    with torch.no_grad():
        moe.router.weight.mul_(20.0)
    x = torch.randn(num_tokens, d_model, dtype=torch.float64)
    ref, ref_grads = run_path(moe, "loop", x)
    for path in ("segment", "fused", "small_batch"):
        out, grads = run_path(moe, path, x)
        torch.testing.assert_close(out.y, ref.y, rtol=1e-10, atol=1e-10)
        assert torch.equal(out.routing.tokens_per_expert_E, ref.routing.tokens_per_expert_E)
        assert int(out.routing.num_dropped) == int(ref.routing.num_dropped)
        assert_close_dicts(grads, ref_grads, rtol=1e-10, atol=1e-10)
    # grouped_mm runs in float32 with 16-byte aligned rows: widen the dims to multiples of 4.
    config32 = MoEConfig(d_model=4 * d_model, d_ff=4 * d_ff, num_experts=num_experts, top_k=top_k,
                         capacity_factor=capacity_factor, drop_priority=drop_priority, z_loss_coef=1e-2)
    moe32 = MoE(config32)
    with torch.no_grad():
        moe32.router.weight.mul_(20.0)
    x32 = torch.randn(num_tokens, 4 * d_model)
    ref32, ref32_grads = run_path(moe32, "loop", x32)
    out32, grads32 = run_path(moe32, "grouped_mm", x32)
    torch.testing.assert_close(out32.y, ref32.y, rtol=1e-5, atol=1e-5)
    assert_close_dicts(grads32, ref32_grads, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("path", ["loop", "segment", "fused", "grouped_mm"])
@pytest.mark.parametrize("expert", ["swiglu", "ffn"])
def test_one_expert_equals_dense_ffn(path, expert):
    d_model, d_ff = 8, 16
    moe = MoE(d_model=d_model, d_ff=d_ff, num_experts=1, top_k=1, expert=expert, activation="relu",
              expert_bias=True, compute=path)
    with torch.no_grad():
        moe.experts.b_in.normal_()
        moe.experts.b_out.normal_()
    w_in, w_out = moe.experts.w_in[0].detach().clone(), moe.experts.w_out[0].detach().clone()
    b_in, b_out = moe.experts.b_in[0].detach().clone(), moe.experts.b_out[0].detach().clone()
    for p in (w_in, w_out, b_in, b_out):
        p.requires_grad_(True)
    x = torch.randn(4, 5, d_model)
    x_moe, x_dense = x.clone().requires_grad_(True), x.clone().requires_grad_(True)

    out = moe(x_moe)
    h = F.linear(x_dense, w_in, b_in)
    if expert == "swiglu":
        gate, up = h.chunk(2, dim=-1)
        h = F.silu(gate) * up
    else:
        h = F.relu(h)
    y_dense = F.linear(h, w_out, b_out)
    torch.testing.assert_close(out.y, y_dense)

    grad_y = torch.randn_like(y_dense)
    (out.y * grad_y).sum().backward()
    (y_dense * grad_y).sum().backward()
    torch.testing.assert_close(x_moe.grad, x_dense.grad)
    torch.testing.assert_close(moe.experts.w_in.grad[0], w_in.grad)
    torch.testing.assert_close(moe.experts.w_out.grad[0], w_out.grad)
    torch.testing.assert_close(moe.experts.b_in.grad[0], b_in.grad)
    torch.testing.assert_close(moe.experts.b_out.grad[0], b_out.grad)


@pytest.mark.parametrize("path", ["loop", "segment"])
def test_softmax_gate_equals_weighted_sum_of_all_experts(path):
    E, D = 3, 4
    moe = MoE(d_model=D, d_ff=5, num_experts=E, router="softmax", compute=path).double()
    x = torch.randn(6, D, dtype=torch.float64)
    out = moe(x)
    g = torch.softmax(x @ moe.router.weight.T, dim=-1)
    expected = sum(g[:, i : i + 1] * moe.experts.forward_expert(i, x) for i in range(E))
    torch.testing.assert_close(out.y, expected, rtol=1e-12, atol=1e-12)
    assert out.routing.indices_TK.shape == (6, E)


def test_topk_combines_the_renormalised_top_k_experts_by_hand():
    moe = MoE(d_model=4, d_ff=3, num_experts=4, top_k=2).double()
    x = torch.randn(5, 4, dtype=torch.float64)
    out = moe(x)
    p = torch.softmax(x @ moe.router.weight.T, dim=-1)
    for t in range(5):
        top = sorted(range(4), key=lambda i: -p[t, i].item())[:2]
        w = p[t, top] / p[t, top].sum()
        expected = sum(w[j] * moe.experts.forward_expert(top[j], x[t : t + 1])[0] for j in range(2))
        torch.testing.assert_close(out.y[t], expected, rtol=1e-12, atol=1e-12)

    raw = MoE(d_model=4, d_ff=3, num_experts=4, top_k=2, normalize_weights=False).double()
    raw.load_state_dict(moe.state_dict())
    torch.testing.assert_close(raw(x).routing.weights_TK, p.topk(2, dim=-1).values)


def test_noisy_topk_is_deterministic_in_eval_and_noisy_in_training():
    moe = MoE(d_model=6, d_ff=8, num_experts=4, top_k=2, router="noisy_topk")
    x = torch.randn(32, 6)
    moe.eval()
    a, b = moe(x), moe(x)
    assert torch.equal(a.y, b.y)
    clean_top = (x @ moe.router.weight.T).topk(2, dim=-1).indices
    assert torch.equal(a.routing.indices_TK, clean_top)
    moe.train()
    torch.manual_seed(1)
    noisy = moe(x)
    assert not torch.equal(noisy.routing.indices_TK, clean_top)


def test_switch_routes_top1_with_its_probability_and_jitters_only_in_training():
    moe = MoE(d_model=6, d_ff=8, num_experts=4, router="switch")
    assert moe.config.top_k == 1 and moe.config.router_options.jitter == 0.01
    x = torch.randn(10, 6)
    moe.eval()
    out = moe(x)
    p = torch.softmax(x @ moe.router.weight.T, dim=-1)
    torch.testing.assert_close(out.routing.weights_TK[:, 0], p.max(dim=-1).values)
    moe.train()
    torch.manual_seed(0)
    jittered = moe(x)
    assert not torch.equal(jittered.routing.logits_TE, out.routing.logits_TE)


@pytest.mark.parametrize("path", ["loop", "segment", "fused", "grouped_mm", "small_batch"])
def test_batch_and_flat_inputs_and_zero_tokens(path):
    moe = MoE(d_model=8, d_ff=16, num_experts=4, compute=path)
    x = torch.randn(2, 3, 8)
    torch.testing.assert_close(moe(x).y.reshape(6, 8), moe(x.reshape(6, 8)).y)
    empty = torch.randn(0, 8, requires_grad=True)
    out = moe(empty)
    assert out.y.shape == (0, 8)
    assert out.aux_loss.item() == 0.0
    assert out.routing.tokens_per_expert_E.tolist() == [0, 0, 0, 0]
    (out.y.sum() + out.aux_loss).backward()
    assert empty.grad.shape == (0, 8)


@pytest.mark.parametrize("path", ["segment", "fused", "grouped_mm"])
def test_autocast_bf16_matches_fp32_closely_and_router_stays_fp32(path):
    moe = MoE(d_model=32, d_ff=64, num_experts=4, compute=path)
    x = torch.randn(64, 32)
    ref = moe(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = moe(x)
    assert out.routing.logits_TE.dtype == torch.float32
    assert out.routing.weights_TK.dtype == torch.float32
    assert out.y.dtype == torch.float32
    torch.testing.assert_close(out.y, ref.y, rtol=0.05, atol=0.02)
    out.y.sum().backward()
    assert moe.experts.w_in.grad is not None and moe.experts.w_in.grad.abs().sum() > 0


def test_bf16_parameters_run_on_fast_paths():
    moe = MoE(d_model=16, d_ff=32, num_experts=4).to(torch.bfloat16)
    x = torch.randn(20, 16, dtype=torch.bfloat16)
    ref = run_path(moe, "loop", x)[0]
    for path in FAST_PATHS:
        out = run_path(moe, path, x)[0]
        assert out.y.dtype == torch.bfloat16
        torch.testing.assert_close(out.y, ref.y, rtol=0.02, atol=0.02)


def test_heterogeneous_experts_match_by_hand():
    experts = [torch.nn.Linear(4, 4), torch.nn.Sequential(torch.nn.Linear(4, 7), torch.nn.Tanh(), torch.nn.Linear(7, 4)),
               torch.nn.Identity()]
    moe = MoE(d_model=4, d_ff=1, top_k=2, experts=experts).double()
    assert moe.config.num_experts == 3
    x = torch.randn(9, 4, dtype=torch.float64)
    ref = run_path(moe, "loop", x)
    out = run_path(moe, "segment", x)
    torch.testing.assert_close(out[0].y, ref[0].y)
    assert_close_dicts(out[1], ref[1])
    routing = ref[0].routing
    for t in range(9):
        expected = sum(routing.weights_TK[t, k] * experts[routing.indices_TK[t, k]].double()(x[t]) for k in range(2))
        torch.testing.assert_close(ref[0].y[t], expected)
    with pytest.raises(ValueError, match="grouped_mm"):
        MoE(d_model=4, d_ff=1, top_k=2, experts=experts, compute="grouped_mm")
    with pytest.raises(ValueError, match="compute path 'fused' needs stacked MLP experts"):
        MoE(d_model=4, d_ff=1, top_k=2, experts=experts, compute="fused")


def test_dropless_grouped_mm_compiles_without_graph_breaks():
    # bf16: in torch 2.13 the fake-tensor kernel of grouped_mm accepts only bf16 on CPU.
    moe = MoE(d_model=16, d_ff=32, num_experts=4, compute="grouped_mm").to(torch.bfloat16)
    x = torch.randn(24, 16, dtype=torch.bfloat16)
    explanation = torch._dynamo.explain(moe)(x)
    assert explanation.graph_break_count == 0, explanation.break_reasons
    compiled = torch.compile(moe, backend="eager", fullgraph=True)
    torch.testing.assert_close(compiled(x).y, moe(x).y)


def test_auto_compiles_in_float32_on_cpu():
    # grouped_mm's fake kernel takes bf16 only on CPU: auto must pick a path that traces.
    moe = MoE(d_model=16, d_ff=32, num_experts=4, top_k=2)
    x = torch.randn(24, 16)
    compiled = torch.compile(moe, backend="eager")
    torch.testing.assert_close(compiled(x).y, moe(x).y)


def test_debug_balanced_routing_spreads_tokens_evenly():
    moe = MoE(d_model=8, d_ff=8, num_experts=4, top_k=2, debug_balanced_routing=True)
    with torch.no_grad():
        moe.router.weight.mul_(100)  # a collapsed router underneath
    out = moe(torch.randn(16, 8))
    assert out.routing.tokens_per_expert_E.tolist() == [8, 8, 8, 8]
    assert (out.routing.indices_TK[:, 0] != out.routing.indices_TK[:, 1]).all()
    ref = run_path(moe, "loop", torch.randn(16, 8))[0]
    assert ref.routing.tokens_per_expert_E.tolist() == [8, 8, 8, 8]


@pytest.mark.parametrize("expert", ["swiglu", "ffn"])
def test_fused_path_matches_loop_with_padding_bias_and_expanded_gradients(expert):
    moe = MoE(MoEConfig(d_model=6, d_ff=5, num_experts=4, top_k=3, expert=expert, activation="gelu",
                        expert_bias=True, z_loss_coef=1e-2)).double()
    with torch.no_grad():
        moe.experts.b_in.normal_()
        moe.experts.b_out.normal_()
        moe.router.weight.mul_(10)  # skewed: some experts get few or no rows
    x = torch.randn(2, 9, 6, dtype=torch.float64)
    mask = torch.rand(2, 9) > 0.3
    ref, ref_grads = run_path(moe, "loop", x, mask=mask)
    out, grads = run_path(moe, "fused", x, mask=mask)
    torch.testing.assert_close(out.y, ref.y, rtol=1e-12, atol=1e-12)
    assert out.y[~mask].abs().max() == 0
    assert_close_dicts(grads, ref_grads, rtol=1e-12, atol=1e-12)
    # The gradient of y.sum() is expanded (zero strides).
    layer = MoE(MoEConfig(**{**moe.config.__dict__, "compute": "fused"})).double()
    layer.load_state_dict(moe.state_dict())
    reference = MoE(MoEConfig(**{**moe.config.__dict__, "compute": "loop"})).double()
    reference.load_state_dict(moe.state_dict())
    layer(x).y.sum().backward()
    reference(x).y.sum().backward()
    for (name, p), q in zip(layer.named_parameters(), reference.parameters(), strict=True):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-12, atol=1e-12, msg=name)


def test_fused_path_keeps_no_routed_row_tensors_for_backward():
    from moekit.apps.bench import activation_bytes

    T, D, F_, E, K = 256, 32, 16, 8, 4
    moe = MoE(d_model=D, d_ff=F_, num_experts=E, top_k=K)
    x = torch.randn(T, D, requires_grad=True)
    params = list(moe.parameters())
    saved = {}
    for path in ("fused", "grouped_mm"):
        moe.config.compute = path
        saved[path] = activation_bytes(lambda: moe(x).y, exclude=[x, *params])
    routed_rows_bytes = T * K * D * 4
    # grouped_mm keeps the gathered (T·K, D) input and the (T·K, D) expert outputs;
    # fused keeps the pre-activations (T·K, 2F) and per-assignment indices and weights.
    assert saved["grouped_mm"] - saved["fused"] >= 2 * routed_rows_bytes - T * K * 16
    assert saved["fused"] < T * K * (2 * F_ * 4 + 32) + T * E * 16


@pytest.mark.parametrize("router,top_k", [("topk", 2), ("topk", 3), ("switch", 1), ("sigmoid", 2), ("softmax", 4)])
def test_one_token_decoding_step_matches_loop(router, top_k):
    moe = MoE(MoEConfig(d_model=6, d_ff=10, num_experts=4, top_k=top_k, router=router, expert_bias=True,
                        z_loss_coef=1e-3)).double()
    x = torch.randn(1, 1, 6, dtype=torch.float64)
    ref, ref_grads = run_path(moe, "loop", x)
    out, grads = run_path(moe, "small_batch", x)
    torch.testing.assert_close(out.y, ref.y)
    assert torch.equal(out.routing.tokens_per_expert_E, ref.routing.tokens_per_expert_E)
    assert out.routing.tokens_per_expert_E.sum() == top_k
    assert_close_dicts(grads, ref_grads)


def test_a_call_without_the_auxiliary_loss_routes_and_computes_the_same():
    torch.manual_seed(0)
    moe = MoE(d_model=8, d_ff=16, num_experts=4, top_k=2, z_loss_coef=1e-3)
    x = torch.randn(5, 8)
    full, lean = moe(x), moe(x, aux_loss=False)
    assert lean.aux_loss is None
    assert torch.equal(lean.y, full.y)
    losses = lean.routing.losses  # still there for monitoring, computed when read
    torch.testing.assert_close(0.01 * losses["load_balance"] + 1e-3 * losses["z_loss"], full.aux_loss)
