"""Each autograd op of ``moekit.compute.ops`` against a float64 reference, forward and gradients.

The reference is the same formula written with torch's own differentiable ops;
``torch.autograd.gradcheck`` also checks each hand-written backward against
finite differences.

Shapes: T tokens, K experts per token, R routed rows, D model dim, H first
projection width, F expert hidden dim, E experts.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from moekit.compute.ops import (
    ACTIVATIONS,
    gather_tokens,
    glu,
    permute_rows,
    routed_mlp,
    segment_mlp,
    weighted_sum,
    weighted_sum_by,
)

f64 = torch.float64


def _grads(out: torch.Tensor, inputs: list[torch.Tensor], seed: int = 0) -> list[torch.Tensor]:
    probe = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed), dtype=out.dtype)
    return list(torch.autograd.grad((out * probe).sum(), inputs, allow_unused=True))


def _mlp_reference(x_ND, w_in_HD, b_in_H, w_out_DF, b_out_D, activation, is_glu):
    h = F.linear(x_ND, w_in_HD, b_in_H)
    if is_glu:
        gate, up = h.chunk(2, dim=-1)
        a = ACTIVATIONS[activation](gate) * up
    else:
        a = ACTIVATIONS[activation](h)
    return F.linear(a, w_out_DF, b_out_D)


def _weights(E, D, F_, is_glu, bias):
    H = 2 * F_ if is_glu else F_
    w_in = torch.randn(E, H, D, dtype=f64, requires_grad=True)
    w_out = torch.randn(E, D, F_, dtype=f64, requires_grad=True)
    b_in = torch.randn(E, H, dtype=f64, requires_grad=True) if bias else None
    b_out = torch.randn(E, D, dtype=f64, requires_grad=True) if bias else None
    return w_in, b_in, w_out, b_out


@pytest.mark.parametrize("activation", ["silu", "gelu", "gelu_tanh", "relu"])
def test_glu_matches_act_gate_times_up(activation):
    h = torch.randn(7, 10, dtype=f64, requires_grad=True)
    gate, up = h.chunk(2, dim=-1)
    reference = ACTIVATIONS[activation](gate) * up
    out = glu(h, activation)
    torch.testing.assert_close(out, reference, rtol=1e-14, atol=1e-14)
    torch.testing.assert_close(_grads(out, [h])[0], _grads(reference, [h])[0], rtol=1e-13, atol=1e-13)
    if activation != "relu":  # relu's kink makes finite differences unreliable
        assert torch.autograd.gradcheck(lambda h: glu(h, activation), (h,))


@pytest.mark.parametrize("is_glu,activation", [(True, "silu"), (False, "gelu"), (False, "relu")])
@pytest.mark.parametrize("bias", [False, True])
def test_segment_mlp_matches_a_loop_over_experts(is_glu, activation, bias):
    E, D, F_ = 4, 5, 3
    counts = [3, 0, 4, 1]  # one expert without rows
    x = torch.randn(sum(counts), D, dtype=f64, requires_grad=True)
    w_in, b_in, w_out, b_out = _weights(E, D, F_, is_glu, bias)
    out = segment_mlp(x, w_in, b_in, w_out, b_out, counts, activation, is_glu)
    pieces, start = [], 0
    for e, n in enumerate(counts):
        pieces.append(_mlp_reference(x[start:start + n], w_in[e], None if b_in is None else b_in[e], w_out[e],
                                     None if b_out is None else b_out[e], activation, is_glu))
        start += n
    reference = torch.cat(pieces)
    torch.testing.assert_close(out, reference, rtol=1e-13, atol=1e-13)
    inputs = [t for t in (x, w_in, b_in, w_out, b_out) if t is not None]
    for got, want in zip(_grads(out, inputs), _grads(reference, inputs), strict=True):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    if activation != "relu":
        assert torch.autograd.gradcheck(
            lambda *t: segment_mlp(t[0], t[1], b_in, t[2], b_out, counts, activation, is_glu), (x, w_in, w_out))


@pytest.mark.parametrize("is_glu,activation", [(True, "silu"), (True, "gelu_tanh"), (False, "gelu"), (False, "relu")])
@pytest.mark.parametrize("bias", [False, True])
def test_segment_mlp_without_gradients_equals_its_autograd_form(is_glu, activation, bias):
    E, D, F_ = 4, 5, 3
    counts = [3, 0, 4, 1]
    x = torch.randn(sum(counts), D, dtype=f64)
    weights = _weights(E, D, F_, is_glu, bias)
    with_graph = segment_mlp(x, *weights, counts, activation, is_glu)
    assert with_graph.grad_fn is not None
    with torch.no_grad():
        inference = segment_mlp(x, *weights, counts, activation, is_glu)
    assert inference.grad_fn is None
    torch.testing.assert_close(inference, with_graph.detach(), rtol=1e-14, atol=1e-14)


def test_permute_rows_is_indexing_by_the_permutation():
    x = torch.randn(6, 4, dtype=f64, requires_grad=True)
    perm = torch.randperm(6)
    inverse = torch.empty_like(perm).scatter_(0, perm, torch.arange(6))
    out = permute_rows(x, perm, inverse)
    torch.testing.assert_close(out, x[perm], rtol=0, atol=0)
    torch.testing.assert_close(_grads(out, [x])[0], _grads(x[perm], [x])[0], rtol=0, atol=0)
    assert torch.autograd.gradcheck(lambda x: permute_rows(x, perm, inverse), (x,))


@pytest.mark.parametrize("dropped", [False, True])
def test_gather_tokens_is_indexing_by_token_and_sums_gradients_per_token(dropped):
    T, K, D = 5, 2, 3
    x = torch.randn(T, D, dtype=f64, requires_grad=True)
    order = torch.randperm(T * K)
    inverse = torch.empty_like(order).scatter_(0, order, torch.arange(T * K))
    if dropped:  # not every assignment routed: no inverse permutation
        order, inverse = order[:-3], None
    out = gather_tokens(x, order, K, inverse)
    reference = x[order // K]
    torch.testing.assert_close(out, reference, rtol=0, atol=0)
    torch.testing.assert_close(_grads(out, [x])[0], _grads(reference, [x])[0], rtol=1e-14, atol=1e-14)
    assert torch.autograd.gradcheck(lambda x: gather_tokens(x, order, K, inverse), (x,))


@pytest.mark.parametrize("is_glu,activation", [(True, "silu"), (False, "gelu")])
@pytest.mark.parametrize("bias", [False, True])
def test_routed_mlp_matches_gather_mlp_and_weighted_scatter_add(is_glu, activation, bias):
    T, K, E, D, F_ = 6, 2, 4, 5, 3
    x = torch.randn(T, D, dtype=f64, requires_grad=True)
    weights = torch.rand(T, K, dtype=f64, requires_grad=True)
    indices = torch.stack([torch.randperm(E)[:K] for _ in range(T)])
    indices[indices == 1] = 0  # expert 1 gets no rows
    flat = indices.reshape(-1)
    order = torch.argsort(flat, stable=True)[:-2]  # two assignments dropped
    counts = torch.bincount(flat[order], minlength=E).tolist()
    w_in, b_in, w_out, b_out = _weights(E, D, F_, is_glu, bias)
    out = routed_mlp(x, weights, w_in, b_in, w_out, b_out, order, counts, activation, is_glu)
    reference = torch.zeros(T, D, dtype=f64)
    for a in order.tolist():
        t, e = a // K, int(flat[a])
        y = _mlp_reference(x[t:t + 1], w_in[e], None if b_in is None else b_in[e], w_out[e],
                           None if b_out is None else b_out[e], activation, is_glu)
        reference = reference.index_add(0, torch.tensor([t]), weights[t, a % K] * y)
    torch.testing.assert_close(out, reference, rtol=1e-13, atol=1e-13)
    inputs = [t for t in (x, weights, w_in, b_in, w_out, b_out) if t is not None]
    for got, want in zip(_grads(out, inputs), _grads(reference, inputs), strict=True):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    assert torch.autograd.gradcheck(
        lambda x, w, wi, wo: routed_mlp(x, w, wi, b_in, wo, b_out, order, counts, activation, is_glu),
        (x, weights, w_in, w_out))


@pytest.mark.parametrize("broadcast", [False, True])
def test_weighted_sum_is_the_sum_over_k_of_weight_times_row(broadcast):
    y = torch.randn(4, 3, 5, dtype=f64, requires_grad=True)
    w = torch.rand(4, 3, dtype=f64, requires_grad=True)
    out = weighted_sum_by(y, w, broadcast)
    reference = torch.einsum("tkd,tk->td", y, w)
    torch.testing.assert_close(out, reference, rtol=1e-14, atol=1e-14)
    for got, want in zip(_grads(out, [y, w]), _grads(reference, [y, w]), strict=True):
        torch.testing.assert_close(got, want, rtol=1e-14, atol=1e-14)
    assert weighted_sum(y.float(), w.float(), torch.bfloat16).dtype == torch.bfloat16
