"""The stacked-MLP kernels against each other and the per-expert reference."""

from __future__ import annotations

import pytest
import torch

from moekit import StackedExperts
from moekit.compute.mlp import expert_mlp, grouped_rows, routed_rows, segment_rows


@pytest.mark.parametrize("num_rows", [0, 5])
def test_grouped_rows_backward_accepts_expanded_gradients(num_rows):
    experts = StackedExperts(4, 16, 32)
    reference = StackedExperts(4, 16, 32)
    reference.load_state_dict(experts.state_dict())
    counts = torch.tensor([num_rows, 0, 0, 0])
    x = torch.randn(num_rows, 16)
    grouped_rows(experts, x, counts).sum().backward()  # the gradient of sum() is expanded
    segment_rows(reference, x, counts).sum().backward()
    torch.testing.assert_close(experts.w_in.grad, reference.w_in.grad)
    torch.testing.assert_close(experts.w_out.grad, reference.w_out.grad)


@pytest.mark.parametrize("kind", ["swiglu", "ffn"])
@pytest.mark.parametrize("rows", [segment_rows, routed_rows])
def test_row_kernels_match_each_expert_by_itself(kind, rows):
    experts = StackedExperts(3, 6, 5, kind=kind, bias=True).double()
    with torch.no_grad():
        experts.b_in.normal_()
        experts.b_out.normal_()
    counts = torch.tensor([2, 0, 3])
    x = torch.randn(5, 6, dtype=torch.float64, requires_grad=True)
    out = rows(experts, x, counts)
    reference = torch.cat([expert_mlp(experts, 0, x[:2]), expert_mlp(experts, 2, x[2:])])
    torch.testing.assert_close(out, reference, rtol=1e-12, atol=1e-12)
    probe = torch.randn_like(out)
    got = torch.autograd.grad((out * probe).sum(), [x, experts.w_in, experts.b_out])
    want = torch.autograd.grad((reference * probe).sum(), [x, experts.w_in, experts.b_out])
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("rows", [1, 3, 16, 17])
@pytest.mark.parametrize("bias", [False, True])
def test_decode_linear_equals_f_linear_and_keeps_gradients(rows, bias):
    from moekit.compute.mlp import linear

    weight = torch.randn(1024, 512)  # 2 MiB: large enough for oneDNN's kernel
    b = torch.randn(1024) if bias else None
    x = torch.randn(rows, 512)
    with torch.no_grad():
        torch.testing.assert_close(linear(x, weight, b), torch.nn.functional.linear(x, weight, b),
                                   rtol=1e-5, atol=1e-4)
    x.requires_grad_(True)
    y = linear(x, weight, b)
    assert y.grad_fn is not None
    y.sum().backward()
    torch.testing.assert_close(x.grad, weight.sum(0).expand(rows, -1), rtol=1e-5, atol=1e-4)
