"""The compute-path registry: one record per path, ``auto``'s choice, errors that name the path."""

from __future__ import annotations

import pytest
import torch

from moekit import MoE
from moekit.compute import switches
from moekit.compute.paths import COMPUTE_PATHS, FUSED_MIN_ROW_BYTES, resolve_path
from moekit.experts.quantized import QuantizedExperts


def _auto(moe, x, **kwargs) -> str:
    return resolve_path("auto", moe.experts, x, top_k=moe.config.top_k, **kwargs).name


def _switches(freed_memory_kept: bool) -> switches.Switches:
    return switches.Switches(freed_memory_kept=freed_memory_kept, fused_glu=None, compiling=False)


def test_auto_runs_fused_on_cpu_when_routed_rows_would_be_page_faulted_in():
    moe = MoE(d_model=64, d_ff=32, num_experts=8, top_k=2)
    big = torch.empty(FUSED_MIN_ROW_BYTES // (2 * 64 * 4), 64)
    # The process switches are passed in, so CLI tests that kept freed memory change nothing here.
    fresh, kept = _switches(False), _switches(True)
    assert _auto(moe, big, switches=fresh) == "fused"
    assert _auto(moe, big[:-1], switches=fresh) == "grouped_mm"
    assert _auto(moe, big.bfloat16(), switches=fresh) == "grouped_mm"
    assert _auto(moe, big, switches=kept) == "grouped_mm"
    # Expert parallelism cannot run routed forms: fused would only add work there.
    assert _auto(moe, big, switches=fresh, fuses=False) == "grouped_mm"


def test_auto_runs_small_batches_on_the_small_batch_path():
    moe = MoE(d_model=16, d_ff=32, num_experts=8, top_k=2)
    assert _auto(moe, torch.randn(1, 16)) == "small_batch"
    assert _auto(moe, torch.randn(1, 16), fuses=False) == "grouped_mm"
    assert _auto(moe, torch.randn(2, 16)) == "grouped_mm"
    assert _auto(moe, torch.randn(64, 16)) == "grouped_mm"
    assert _auto(moe, torch.randn(64, 16, dtype=torch.float64)) == "segment"


def test_auto_decodes_up_to_64_tokens_without_gradients_on_gemv():
    moe = MoE(d_model=512, d_ff=1024, num_experts=4, top_k=2)  # 4 MiB per expert's w_in
    with torch.no_grad():
        # From 65 tokens, segment's inference form (faster than grouped_mm without gradients).
        assert [_auto(moe, torch.randn(T, 512)) for T in (1, 4, 64, 65)] == ["gemv"] * 3 + ["segment"]
        assert _auto(moe, torch.randn(4, 512), fuses=False) == "gemv"  # its rows form, under expert parallelism
        assert _auto(moe, torch.randn(4, 512, dtype=torch.bfloat16)) == "grouped_mm"
    assert _auto(moe, torch.randn(4, 512)) == "grouped_mm"  # a gradient-taking call: the kernel has no backward
    fine_grained = MoE(d_model=512, d_ff=128, num_experts=8, top_k=2)  # 256 KiB per expert's w_in
    small = MoE(d_model=64, d_ff=64, num_experts=4, top_k=2)  # stays on the BLAS paths, bitwise as transformers
    quantized = QuantizedExperts.from_stacked(small.experts, bits=8)
    with torch.no_grad():
        assert _auto(fine_grained, torch.randn(4, 512)) == "gemv"
        assert _auto(small, torch.randn(4, 64)) == "grouped_mm"
        assert resolve_path("auto", quantized, torch.randn(4, 64), top_k=2).name == "gemv"
        assert resolve_path("auto", quantized, torch.randn(1, 64), top_k=2).name == "gemv"


def test_without_numba_auto_decodes_large_experts_on_small_batch(monkeypatch):
    from moekit.compute.kernels import cpu_gemv

    monkeypatch.setattr(cpu_gemv, "HAS_NUMBA", False)
    moe = MoE(d_model=512, d_ff=1024, num_experts=4, top_k=2)  # 4 MiB per expert's w_in
    with torch.no_grad():
        assert [_auto(moe, torch.randn(T, 512)) for T in (1, 4, 16, 17)] == ["small_batch"] * 3 + ["segment"]
    small = MoE(d_model=64, d_ff=64, num_experts=4, top_k=2)
    with torch.no_grad():
        assert _auto(small, torch.randn(4, 64)) == "grouped_mm"
    with pytest.raises(ValueError, match="compute path 'gemv' needs the numba package"):
        resolve_path("gemv", moe.experts, torch.randn(2, 512))


def test_auto_reads_the_process_switches_in_one_snapshot():
    moe = MoE(d_model=64, d_ff=32, num_experts=8, top_k=2)
    big = torch.empty(FUSED_MIN_ROW_BYTES // (2 * 64 * 4), 64)
    expected = "grouped_mm" if switches.current().freed_memory_kept else "fused"
    assert _auto(moe, big) == expected


def test_every_path_has_a_rows_form_and_names_what_it_lacks():
    modules = MoE(d_model=4, d_ff=1, top_k=2, experts=[torch.nn.Linear(4, 4) for _ in range(3)])
    for name, path in COMPUTE_PATHS.items():
        assert path.rows is not None, name
    with pytest.raises(ValueError, match=r"compute path 'grouped_mm' needs stacked MLP experts \(got ModuleExperts\)"):
        resolve_path("grouped_mm", modules.experts, torch.randn(3, 4))
    stacked = MoE(d_model=6, d_ff=5, num_experts=3)
    with pytest.raises(ValueError, match="rows are multiples of 16 bytes"):
        resolve_path("grouped_mm", stacked.experts, torch.randn(3, 6))
    with pytest.raises(ValueError, match="unknown compute path 'nope'; valid paths: auto, loop"):
        resolve_path("nope", stacked.experts, torch.randn(3, 6))


def test_benchmark_reads_its_default_paths_from_the_registry():
    from moekit.apps.bench import default_paths

    assert default_paths("cpu") == ("fused", "grouped_mm", "segment")
    assert default_paths("cuda") == ("grouped_mm",)


def test_decoding_large_experts_on_small_batch_equals_grouped_mm():
    torch.manual_seed(0)
    fast = MoE(d_model=512, d_ff=1024, num_experts=4, top_k=2, compute="small_batch").eval()
    reference = MoE(d_model=512, d_ff=1024, num_experts=4, top_k=2, compute="grouped_mm").eval()
    reference.load_state_dict(fast.state_dict())
    with torch.no_grad():
        for T in (1, 4, 16):
            x = torch.randn(T, 512)
            torch.testing.assert_close(fast(x).y, reference(x).y, rtol=1e-5, atol=1e-5)
