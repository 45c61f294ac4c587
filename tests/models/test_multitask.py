"""MMoE, PLE and the shared-bottom baseline against their formulas in float64 (outputs and
gradients), sparse gates, arbitrary expert modules, and the errors."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from moekit.models.multitask import PLE, MMoE, SharedBottom, multitask_loss


def _expert(experts, e, x):
    """Expert e of stacked ReLU MLP experts, from its weights: W2·relu(W1·x + b1) + b2."""
    return F.relu(x @ experts.w_in[e].t() + experts.b_in[e]) @ experts.w_out[e].t() + experts.b_out[e]


def _tower(tower, h):
    return tower[2](F.relu(tower[0](h)))


def _gate(gate, x):
    return torch.softmax(x @ gate.router.weight.t(), dim=-1)


def _mmoe_reference(model, x):
    outputs = torch.stack([_expert(model.experts, e, x) for e in range(model.experts.num_experts)], dim=1)
    predictions = []
    for t, tower in enumerate(model.towers):
        g = _gate(model.gates[0 if model.one_gate else t], x)
        predictions.append(_tower(tower, (g[:, :, None] * outputs).sum(1)))
    return predictions


def _ple_reference(model, x):
    task_inputs, shared_input = [x] * model.num_tasks, x
    for layer in model.layers:
        shared = [_expert(layer.shared, e, shared_input) for e in range(layer.shared.num_experts)]
        own = [[_expert(experts, e, xi) for e in range(experts.num_experts)]
               for experts, xi in zip(layer.tasks, task_inputs, strict=True)]
        new_inputs = []
        for t, xi in enumerate(task_inputs):
            g = _gate(layer.task_gates[t], xi)
            new_inputs.append(sum(g[:, i, None] * out for i, out in enumerate(own[t] + shared)))
        if layer.shared_gate is not None:
            g = _gate(layer.shared_gate, shared_input)
            every = [out for outs in own for out in outs] + shared
            shared_input = sum(g[:, i, None] * out for i, out in enumerate(every))
        task_inputs = new_inputs
    return [_tower(tower, xi) for tower, xi in zip(model.towers, task_inputs, strict=True)]


def _check_against(model, reference, x):
    out = model(x)
    expected = reference(model, x)
    for got, want in zip(out.outputs, expected, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    params = [p for p in model.parameters()]
    grads = torch.autograd.grad(sum(o.square().sum() for o in out.outputs), params, allow_unused=True)
    expected_grads = torch.autograd.grad(sum(o.square().sum() for o in expected), params, allow_unused=True)
    for got, want in zip(grads, expected_grads, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    return out


@pytest.mark.parametrize("one_gate", [False, True])
def test_mmoe_follows_its_formula_with_gradients(one_gate):
    torch.manual_seed(0)
    model = MMoE(6, num_tasks=3, num_experts=4, d_ff=5, task_out=[1, 2, 1], tower_hidden=3,
                 one_gate=one_gate).double()
    out = _check_against(model, _mmoe_reference, torch.randn(7, 6, dtype=torch.float64))
    assert [o.shape for o in out.outputs] == [(7, 1), (7, 2), (7, 1)]
    assert set(out.gates) == ({"shared"} if one_gate else {"task0", "task1", "task2"})
    torch.testing.assert_close(out.gates[next(iter(out.gates))].sum(1), torch.ones(7, dtype=torch.float64))


@pytest.mark.parametrize("num_layers", [1, 2, 3])
def test_ple_follows_its_formula_with_gradients(num_layers):
    torch.manual_seed(0)
    model = PLE(6, num_tasks=2, num_layers=num_layers, shared_experts=2, task_experts=3, d_ff=5,
                tower_hidden=3).double()
    out = _check_against(model, _ple_reference, torch.randn(7, 6, dtype=torch.float64))
    assert f"layer{num_layers - 1}/shared" not in out.gates  # the top layer has no shared gate
    assert out.gates[f"layer{num_layers - 1}/task0"].shape == (7, 5)
    if num_layers > 1:
        assert out.gates["layer0/shared"].shape == (7, 8)


def test_shared_bottom_is_one_network_under_the_towers():
    torch.manual_seed(0)
    model = SharedBottom(6, num_tasks=2, d_ff=5, tower_hidden=3).double()
    x = torch.randn(4, 6, dtype=torch.float64)
    shared = F.relu(model.bottom[0](x))
    for t, prediction in enumerate(model(x).outputs):
        torch.testing.assert_close(prediction, _tower(model.towers[t], shared))


def test_a_sparse_gate_keeps_its_top_k_renormalised_and_adds_its_losses():
    torch.manual_seed(0)
    model = MMoE(6, num_tasks=2, num_experts=4, d_ff=5, router="topk", top_k=2, z_loss_coef=0.1).double()
    x = torch.randn(9, 6, dtype=torch.float64)
    out = model(x)
    for t in range(2):
        weights = out.gates[f"task{t}"]
        assert ((weights > 0).sum(1) == 2).all()
        probs = _gate(model.gates[t], x)
        top = probs.topk(2, dim=1)
        expected = torch.zeros_like(probs).scatter(1, top.indices, top.values / top.values.sum(1, keepdim=True))
        torch.testing.assert_close(weights, expected)
    expected_aux = sum(0.1 * torch.logsumexp(x @ g.router.weight.t(), dim=1).square().mean() for g in model.gates)
    torch.testing.assert_close(out.aux_loss, expected_aux)


def test_arbitrary_expert_modules_of_another_width():
    torch.manual_seed(0)
    experts = [torch.nn.Linear(6, 3) for _ in range(4)]
    model = MMoE(6, num_tasks=2, num_experts=4, experts=experts).double()
    x = torch.randn(5, 6, dtype=torch.float64)
    out = model(x)
    mixed = sum(out.gates["task1"][:, e, None] * experts[e](x) for e in range(4))
    torch.testing.assert_close(out.outputs[1], _tower(model.towers[1], mixed))


def test_the_multitask_loss_and_its_errors():
    torch.manual_seed(0)
    model = MMoE(6, num_tasks=2, num_experts=3, d_ff=4)
    x = torch.randn(8, 6)
    out = model(x)
    y_click, y_value = torch.randint(0, 2, (8,)).float(), torch.randn(8)
    loss = multitask_loss(out, [y_click, y_value], ["bce", "mse"], task_weights=[1.0, 0.5])
    expected = (F.binary_cross_entropy_with_logits(out.outputs[0][:, 0], y_click)
                + 0.5 * F.mse_loss(out.outputs[1][:, 0], y_value))
    torch.testing.assert_close(loss, expected)
    with pytest.raises(ValueError, match="got 1 target tensors for a model with 2 tasks"):
        multitask_loss(out, [y_click])
    with pytest.raises(ValueError, match="task 1: 4 target values for a prediction of shape"):
        multitask_loss(out, [y_click, y_value[:4]])
    with pytest.raises(ValueError, match="loss 'hinge' must be"):
        multitask_loss(out, [y_click, y_value], "hinge")
    with pytest.raises(ValueError, match="task_out lists 3 widths for 2 tasks"):
        MMoE(6, num_tasks=2, task_out=[1, 1, 1])
    with pytest.raises(ValueError, match="got 2 expert modules for num_experts"):
        MMoE(6, num_experts=3, experts=[torch.nn.Linear(6, 6)] * 2)
    with pytest.raises(ValueError, match=r"num_tasks \(0\) must be a positive integer"):
        PLE(6, num_tasks=0)


def test_the_generated_tasks_have_the_correlation_asked_for():
    from moekit.data.multitask import clicks_and_conversions, correlated_regressions

    x, (y1, y2) = correlated_regressions(20_000, 1.0, d=10, seed=0)
    assert x.shape == (20_000, 10) and x.dtype.name == "float32"
    torch.testing.assert_close(torch.from_numpy(y1), torch.from_numpy(y2), atol=0.6, rtol=0)  # noise only
    correlations = [float(torch.corrcoef(torch.from_numpy(__import__("numpy").stack(
        correlated_regressions(20_000, p, d=10, seed=0)[1])))[0, 1]) for p in (0.9, 0.5, 0.0)]
    assert correlations[0] > correlations[1] > correlations[2]
    with pytest.raises(ValueError, match=r"correlation \(1.5\) must be in \[-1, 1\]"):
        correlated_regressions(10, 1.5)
    features, (click, conversion) = clicks_and_conversions(5000, seed=0)
    assert features.shape[0] == 5000 and set(click.tolist()) == {0.0, 1.0}
    assert 0.05 < conversion.mean() < click.mean() < 0.95


def test_a_sparse_gate_takes_a_load_balancing_weight():
    torch.manual_seed(0)
    x = torch.randn(9, 6)
    unweighted = MMoE(6, num_tasks=2, num_experts=4, d_ff=5, router="topk", top_k=2)
    torch.manual_seed(0)
    weighted = MMoE(6, num_tasks=2, num_experts=4, d_ff=5, router="topk", top_k=2, load_balance_coef=0.1)
    assert float(unweighted(x).aux_loss) == 0.0
    routings = [gate.router(x) for gate in weighted.gates]
    torch.testing.assert_close(weighted(x).aux_loss, sum(0.1 * r.losses["load_balance"] for r in routings))
