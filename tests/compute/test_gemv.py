"""The gemv path (numba decode kernel) against the float64 loop reference, its fallbacks
and its errors."""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch

from moekit import MoE, MoEConfig
from moekit.compute import mlp
from moekit.compute.kernels import cpu_gemv
from moekit.compute.kernels.cpu_gemv import Weights
from moekit.compute.paths import resolve_path, rows_one_expert_at_a_time
from moekit.experts.quantized import QuantizedExperts


@pytest.fixture
def kernel_calls(monkeypatch):
    """How many times the numba kernel ran."""
    calls = []
    real = cpu_gemv.decode_mlp

    def counted(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(cpu_gemv, "decode_mlp", counted)
    return calls


def _on(moe: MoE, path: str) -> MoE:
    layer = copy.deepcopy(moe)
    layer.config = dataclasses.replace(layer.config, compute=path)
    return layer


def _reference(moe: MoE, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return _on(moe, "loop").double()(x.double()).y


@pytest.mark.parametrize("expert,activation", [("swiglu", "gelu"), ("geglu", "gelu"), ("ffn", "relu"),
                                               ("ffn", "gelu"), ("ffn", "gelu_tanh"), ("ffn", "silu")])
@pytest.mark.parametrize("bias", [False, True])
def test_gemv_equals_the_float64_loop_for_every_activation(expert, activation, bias, kernel_calls):
    torch.manual_seed(0)
    moe = MoE(MoEConfig(d_model=24, d_ff=40, num_experts=6, top_k=2, expert=expert, activation=activation,
                        expert_bias=bias)).eval()
    with torch.no_grad():
        for b in (moe.experts.b_in, moe.experts.b_out):
            if b is not None:
                b.normal_()  # biases start at zero: make them count
    for T in (1, 3, 16, 40):
        x = torch.randn(T, 24)
        with torch.no_grad():
            y = _on(moe, "gemv")(x).y
        torch.testing.assert_close(y.double(), _reference(moe, x), rtol=1e-5, atol=1e-5)
    assert len(kernel_calls) == 4


@pytest.mark.parametrize("top_k", [1, 3])
def test_gemv_keeps_capacity_drops_and_skips_experts_without_tokens(top_k, kernel_calls):
    torch.manual_seed(1)
    moe = MoE(MoEConfig(d_model=16, d_ff=32, num_experts=5, top_k=top_k, capacity_factor=0.5)).eval()
    with torch.no_grad():
        # Positive inputs and logits for experts 0-2 only: they overflow, experts 3 and 4 get nothing.
        moe.router.weight.abs_()[3:] = 0
        x = torch.randn(20, 16).abs()
        out = _on(moe, "gemv")(x)
    assert int(out.routing.num_dropped) > 0 and int((out.routing.tokens_per_expert_E == 0).sum()) > 0
    torch.testing.assert_close(out.y.double(), _reference(moe, x), rtol=1e-5, atol=1e-5)
    assert kernel_calls


def test_gemv_rows_form_equals_one_expert_at_a_time(kernel_calls):
    torch.manual_seed(2)
    experts = MoE(d_model=16, d_ff=24, num_experts=4, expert_bias=True).experts
    counts_E = torch.tensor([3, 0, 1, 5])
    x_RD = torch.randn(9, 16)
    with torch.no_grad():
        torch.testing.assert_close(mlp.gemv_rows(experts, x_RD, counts_E),
                                   rows_one_expert_at_a_time(experts, x_RD, counts_E), rtol=1e-5, atol=1e-5)
    assert len(kernel_calls) == 1


def test_gemv_falls_back_to_autograd_when_gradients_are_needed(kernel_calls):
    torch.manual_seed(3)
    moe = MoE(d_model=16, d_ff=32, num_experts=4, top_k=2)
    x = torch.randn(5, 16, requires_grad=True)
    fast, reference = _on(moe, "gemv"), _on(moe, "loop")
    (fast(x).y ** 2).sum().backward()
    gemv_grads = [p.grad.clone() for p in fast.parameters()], x.grad.clone()
    x.grad = None
    (reference(x).y ** 2).sum().backward()
    for a, b in zip(gemv_grads[0], [p.grad for p in reference.parameters()], strict=True):
        torch.testing.assert_close(a, b)
    torch.testing.assert_close(gemv_grads[1], x.grad)
    assert not kernel_calls


def test_a_process_forked_after_the_kernel_ran_takes_the_autograd_path(monkeypatch, kernel_calls):
    torch.manual_seed(4)
    moe = MoE(d_model=16, d_ff=32, num_experts=4, top_k=2).eval()
    x = torch.randn(6, 16)
    with torch.no_grad():
        parent = _on(moe, "gemv")(x).y
        monkeypatch.setattr(cpu_gemv, "_launched_in_pid", -1)  # as seen from a forked child
        assert not cpu_gemv.usable()
        child = _on(moe, "gemv")(x).y
    assert len(kernel_calls) == 1
    torch.testing.assert_close(child, parent, rtol=1e-5, atol=1e-5)


def test_gemv_names_what_it_lacks():
    moe = MoE(d_model=16, d_ff=32, num_experts=4, compute="gemv")
    with pytest.raises(ValueError, match=r"compute path 'gemv' needs float32 weights and input \(got torch.float64"):
        moe.double()(torch.randn(2, 16, dtype=torch.float64))
    with pytest.raises(ValueError, match=r"compute path 'gemv' needs stacked MLP or int8 experts \(got Modu"):
        MoE(d_model=4, d_ff=1, top_k=2, experts=[torch.nn.Linear(4, 4) for _ in range(3)], compute="gemv")


def test_decode_mlp_rejects_rows_that_do_not_fit_and_unknown_activations():
    w_in, w_out = Weights(32, torch.randn(2, 8, 4)), Weights(32, torch.randn(2, 4, 8))
    x, weights = torch.randn(3, 4), torch.ones(3, 1)
    experts = torch.tensor([[0], [1], [1]])
    with pytest.raises(ValueError, match=r"input \(3, 4\), gate weights \(2, 1\) and torch.int64 experts \(2, 1\)"):
        cpu_gemv.decode_mlp(x, weights[:2], experts[:2], w_in, w_out, None, None, "relu", False)
    with pytest.raises(ValueError, match=r"torch.int32 experts"):
        cpu_gemv.decode_mlp(x, weights, experts.int(), w_in, w_out, None, None, "relu", False)
    with pytest.raises(ValueError, match=r"do not fit weights of widths \(8, 4\) and \(4, 8\)"):
        cpu_gemv.decode_mlp(x, weights, experts, w_in, w_out, None, None, "relu", True)
    with pytest.raises(ValueError, match="activation 'tanh'; choose from relu, gelu, gelu_tanh, silu"):
        cpu_gemv.decode_mlp(x, weights, experts, w_in, w_out, None, None, "tanh", False)
    with pytest.raises(ValueError, match="float32 CPU tensors; got torch.float64"):
        cpu_gemv.decode_mlp(x.double(), weights, experts, w_in, w_out, None, None, "relu", False)
    with pytest.raises(ValueError, match="weights of 32 and 8 bits; both must be 32 or 8"):
        cpu_gemv.decode_mlp(x, weights, experts, w_in, Weights(8, w_out.values.to(torch.int8), torch.ones(2, 4)),
                            None, None, "relu", False)
    for bad in (3, -1):
        with pytest.raises(ValueError, match=rf"experts_TK\[2, 0\] = {bad} is not an expert id in \[0, 2\]"):
            cpu_gemv.decode_mlp(x, weights, torch.tensor([[0], [2], [bad]]), w_in, w_out, None, None, "relu", False)


def test_decode_mlp_skips_assignments_to_expert_e_and_keeps_each_experts_order():
    torch.manual_seed(5)
    w_in, w_out = torch.randn(3, 8, 4), torch.randn(3, 4, 8)
    x, weights = torch.randn(4, 4), torch.rand(4, 2)
    experts = torch.tensor([[2, 0], [3, 2], [0, 3], [2, 1]])  # 3: not routed
    y = cpu_gemv.decode_mlp(x, weights, experts, Weights(32, w_in), Weights(32, w_out), None, None, "relu", False)
    expected = torch.zeros(4, 4, dtype=torch.float64)
    for t in range(4):
        for k in range(2):
            e = int(experts[t, k])
            if e < 3:
                h = torch.relu(w_in[e].double() @ x[t].double())
                expected[t] += weights[t, k].double() * (w_out[e].double() @ h)
    torch.testing.assert_close(y.double(), expected, rtol=1e-5, atol=1e-5)


def test_gemv_leaves_padding_out(kernel_calls):
    torch.manual_seed(6)
    moe = MoE(MoEConfig(d_model=16, d_ff=32, num_experts=4, top_k=2)).eval()
    x = torch.randn(2, 5, 16)
    mask = torch.tensor([[True] * 5, [True, True, False, False, False]])
    with torch.no_grad():
        out = _on(moe, "gemv")(x, mask=mask)
        reference = _on(moe, "loop").double()(x.double(), mask=mask)
    torch.testing.assert_close(out.y.double(), reference.y, rtol=1e-5, atol=1e-5)
    assert len(kernel_calls) == 1 and out.routing.tokens_per_expert_E.sum() == 2 * 7


def test_gemv_fallback_keeps_capacity_drops_with_gradients(kernel_calls):
    torch.manual_seed(7)
    moe = MoE(MoEConfig(d_model=16, d_ff=32, num_experts=4, top_k=2, capacity_factor=0.5))
    x = torch.randn(12, 16)
    fast, reference = _on(moe, "gemv"), _on(moe, "loop")
    out = fast(x)
    assert int(out.routing.num_dropped) > 0
    torch.testing.assert_close(out.y, reference(x).y)
    assert not kernel_calls


@pytest.mark.parametrize("expert", ["swiglu", "ffn"])
def test_gemv_runs_int8_experts_as_their_dequantized_weights(expert, kernel_calls):
    torch.manual_seed(5)
    moe = MoE(MoEConfig(d_model=64, d_ff=128, num_experts=4, top_k=2, expert=expert, expert_bias=True)).eval()
    with torch.no_grad():
        moe.experts.b_in.normal_()
        moe.experts.b_out.normal_()
    int4 = QuantizedExperts.from_stacked(moe.experts, bits=4, group_size=64)
    moe.experts = QuantizedExperts.from_stacked(moe.experts, bits=8, kernel="reference")
    # The reference: the dequantized weights in float64 on the loop path.
    dequantized = MoE(MoEConfig(d_model=64, d_ff=128, num_experts=4, top_k=2, expert=expert, expert_bias=True))
    with torch.no_grad():
        dequantized.router.load_state_dict(moe.router.state_dict())
        for name in ("w_in", "w_out"):
            getattr(dequantized.experts, name).copy_(moe.experts.dequantized(name))
        dequantized.experts.b_in.copy_(moe.experts.b_in)
        dequantized.experts.b_out.copy_(moe.experts.b_out)
    for T in (1, 9, 64):
        x = torch.randn(T, 64)
        with torch.no_grad():
            assert moe.compute_path(x).name == "gemv"
            y = _on(moe, "gemv")(x).y
        torch.testing.assert_close(y.double(), _reference(dequantized.eval(), x), rtol=1e-5, atol=1e-5)
    assert len(kernel_calls) == 3
    # A gradient-taking call runs the experts' own rows form.
    x = torch.randn(5, 64, requires_grad=True)
    _on(moe, "gemv")(x).y.sum().backward()
    assert x.grad is not None and len(kernel_calls) == 3
    with pytest.raises(ValueError, match="compute path 'gemv' needs float32 or int8 weights"):
        resolve_path("gemv", int4, torch.randn(2, 64))


def test_a_decode_call_on_gemv_dispatches_few_tensor_operations():
    """The kernel groups the assignments itself: the layer's plan sorts nothing, so a
    one-token call is the router's few operations, the kernel and the balancing loss."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Count(TorchDispatchMode):
        ops: list[str] = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.ops.append(str(func))
            return func(*args, **(kwargs or {}))

    torch.manual_seed(8)
    moe = _on(MoE(MoEConfig(d_model=32, d_ff=64, num_experts=8, top_k=2)).eval(), "gemv")
    x = torch.randn(1, 32)
    with torch.no_grad():
        moe(x)
        with Count() as count:
            moe(x)
    assert not any("sort" in op or "bincount" in op for op in count.ops), count.ops
    assert len(count.ops) <= 20, count.ops
