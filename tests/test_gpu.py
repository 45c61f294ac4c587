"""Every compute path on a CUDA device against the loop reference on the same device,
outputs and gradients, fp32 and bf16; and the GPU run matches the CPU run.

Selected by ``make test-gpu`` (``pytest -m gpu``) on a machine with a CUDA device;
without one these tests fail rather than pass vacuously.
"""

from __future__ import annotations

import pytest
import torch
from tests.helpers import assert_close_dicts, run_path

from moekit import MoE, MoEConfig
from moekit.compute import switches
from moekit.compute.paths import COMPUTE_PATHS, resolve_path

pytestmark = pytest.mark.gpu


@pytest.fixture(autouse=True)
def _needs_cuda():
    if not torch.cuda.is_available():
        pytest.fail("the gpu tests need a CUDA device (torch.cuda.is_available() is False)")


def _paths(moe, x):
    return [p for p in COMPUTE_PATHS if p != "loop" and COMPUTE_PATHS[p].missing(moe.experts, x) is None]


@pytest.mark.parametrize("router", ["topk", "softmax", "switch", "sigmoid", "expert_choice", "soft"])
@pytest.mark.parametrize("expert", ["swiglu", "ffn"])
@pytest.mark.parametrize("capacity_factor", [None, 1.0])
def test_gpu_paths_match_loop_fp32(router, expert, capacity_factor):
    top_k = {"softmax": 8, "switch": 1}.get(router, 2)
    config = MoEConfig(d_model=64, d_ff=96, num_experts=8, top_k=top_k, router=router, expert=expert,
                       capacity_factor=capacity_factor if router in ("topk", "switch") else None,
                       z_loss_coef=1e-3, load_balance_coef=1e-2 if router != "soft" else 0.0)
    moe = MoE(config).cuda()
    x = torch.randn(4, 50, 64, device="cuda")
    ref, ref_grads = run_path(moe, "loop", x)
    paths = _paths(moe, x)
    assert "grouped_mm" in paths or torch.cuda.get_device_capability() < (9, 0)
    for path in paths:
        out, grads = run_path(moe, path, x)
        torch.testing.assert_close(out.y, ref.y, rtol=2e-4, atol=2e-4, msg=lambda m, p=path: f"{p}: {m}")
        torch.testing.assert_close(out.aux_loss, ref.aux_loss)
        assert_close_dicts(grads, ref_grads, rtol=2e-3, atol=2e-3)


@pytest.mark.parametrize("shape", [(512, 256, 512, 8, 2), (1024, 256, 128, 64, 8), (100, 64, 96, 6, 3)])
def test_gpu_paths_match_loop_bf16(shape):
    T, D, F, E, K = shape
    moe = MoE(MoEConfig(d_model=D, d_ff=F, num_experts=E, top_k=K)).cuda().to(torch.bfloat16)
    x = torch.randn(T, D, device="cuda", dtype=torch.bfloat16)
    ref, ref_grads = run_path(moe, "loop", x)
    for path in _paths(moe, x):
        out, grads = run_path(moe, path, x)
        # Paths sum in different orders; bf16 keeps 8 bits of mantissa.
        torch.testing.assert_close(out.y, ref.y, rtol=2e-2, atol=2e-2, msg=lambda m, p=path: f"{p}: {m}")
        for name in ref_grads:
            error = (grads[name].float() - ref_grads[name].float()).norm() / ref_grads[name].float().norm()
            assert error < 2e-2, f"{path} {name}: relative error {error:.3g}"


def test_gpu_matches_cpu_in_fp32():
    moe = MoE(MoEConfig(d_model=32, d_ff=64, num_experts=4, top_k=2, load_balance_coef=1e-2))
    x = torch.randn(3, 40, 32)
    cpu, cpu_grads = run_path(moe, "loop", x)
    gpu, gpu_grads = run_path(moe.cuda(), resolve_path("auto", moe.experts, x.cuda(), 2).name, x.cuda())
    torch.testing.assert_close(gpu.y.cpu(), cpu.y, rtol=1e-4, atol=1e-4)
    assert torch.equal(gpu.routing.indices_TK.cpu(), cpu.routing.indices_TK)
    assert_close_dicts({k: v.cpu() for k, v in gpu_grads.items()}, cpu_grads, rtol=1e-3, atol=1e-3)


def test_gpu_training_step_of_the_language_model_reduces_the_loss():
    from moekit.models.lm import LanguageModel, LMConfig

    torch.manual_seed(0)
    moe = MoEConfig(d_model=64, d_ff=128, num_experts=4, top_k=2)
    model = LanguageModel(LMConfig(vocab_size=97, context_length=32, n_layer=2, d_model=64, d_ff=256,
                                   moe=moe)).cuda()
    data = torch.randint(0, 97, (8, 33), device="cuda")
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(30):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out = model(data[:, :-1], data[:, 1:])
        optimizer.zero_grad()
        (out.loss + out.aux_loss).backward()
        optimizer.step()
        losses.append(out.loss.item())
    assert losses[-1] < 0.5 * losses[0], losses


def test_auto_avoids_host_syncs_on_the_gpu_even_for_a_handful_of_tokens():
    moe = MoE(MoEConfig(d_model=64, d_ff=128, num_experts=8, top_k=2)).cuda().to(torch.bfloat16)
    x = torch.randn(1, 64, device="cuda", dtype=torch.bfloat16)
    assert resolve_path("auto", moe.experts, x, top_k=2).name == "grouped_mm"
    moe(x)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        with torch.no_grad():
            moe(x)
        x_train = torch.randn(64, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        moe(x_train).y.sum().backward()
    finally:
        torch.cuda.set_sync_debug_mode(0)


@pytest.mark.parametrize("expert", ["swiglu", "geglu"])
def test_fused_glu_kernel_matches_the_torch_activation_inside_the_layer(expert):
    moe = MoE(MoEConfig(d_model=256, d_ff=512, num_experts=8, top_k=2, expert=expert)).cuda()
    x = torch.randn(2048, 256, device="cuda")
    results = {}
    for fused in (False, True):
        with switches.fused_glu(fused):
            results[fused] = run_path(moe, "grouped_mm", x)
    torch.testing.assert_close(results[True][0].y, results[False][0].y, rtol=1e-5, atol=1e-5)
    assert_close_dicts(results[True][1], results[False][1], rtol=1e-4, atol=1e-4)
