"""Offloaded experts: the same tokens and logits as the resident model, under every policy,
with and without prefetch, down to a cache of one expert; the cache counts what it does."""

from __future__ import annotations

import copy

import pytest
import torch
from safetensors.torch import save_model

from moekit import MoEConfig
from moekit.experts.offloaded import DiskStore, ExpertCache, MemoryStore
from moekit.inference import cache_plan, offload_model, parse_size, record_routing
from moekit.layer import moe_layers
from moekit.models.lm import LanguageModel, LMConfig

V = 61


def _model(num_experts=6) -> LanguageModel:
    """Float64 so that routing cannot flip on a last-bit difference; large weights so that
    tokens spread over the experts."""
    torch.manual_seed(0)
    moe = MoEConfig(d_model=32, d_ff=24, num_experts=num_experts, top_k=2)
    model = LanguageModel(LMConfig(vocab_size=V, context_length=32, n_layer=3, n_head=4, d_model=32, d_ff=48,
                                   moe=moe, router_init_std=1.0))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith(("qkv.weight", "proj.weight", "w_in", "w_out")):
                param.mul_(8.0)
    return model.double().eval()


def _segment(model):
    """The resident model on the path offloaded experts take: bitwise comparable."""
    for _, layer in moe_layers(model):
        layer.config.compute = "segment"
    return model


def _generate(model, prompt, n=12):
    return torch.cat(list(model.generate(prompt, n, temperature=0)), dim=1)


@pytest.mark.parametrize("policy", ["lru", "lfu"])
@pytest.mark.parametrize("prefetch", [False, True])
@pytest.mark.parametrize("capacity", [1, 3, 6])
def test_offloaded_model_gives_the_resident_logits_and_tokens(policy, prefetch, capacity):
    resident = _segment(_model())
    prompt = torch.randint(0, V, (2, 7))
    offloaded_model = copy.deepcopy(resident)
    offloaded = offload_model(offloaded_model, experts_per_layer=capacity, policy=policy, prefetch=prefetch)
    with torch.no_grad():
        assert torch.equal(offloaded_model(prompt).logits, resident(prompt).logits)
    with record_routing(resident) as trace:
        expected = _generate(resident, prompt)
    offloaded.reset_stats()
    assert torch.equal(_generate(offloaded_model, prompt), expected)
    stats = offloaded.stats()
    uses = sum(len(trace.uses(layer)) for layer in trace.accesses)
    assert stats["hits"] + stats["misses"] == uses
    assert (stats["prefetches"] > 0) == prefetch
    if capacity == 6:  # every expert stays once loaded: the same generation again misses nothing
        offloaded.reset_stats()
        _generate(offloaded_model, prompt)
        assert offloaded.stats()["misses"] == 0
    else:
        assert stats["misses"] > 0
    offloaded.close()


def test_offloaded_model_matches_the_resident_model_on_its_auto_path():
    resident = _model()
    prompt = torch.randint(0, V, (1, 5))
    offloaded_model = copy.deepcopy(resident)
    offload_model(offloaded_model, experts_per_layer=2)
    assert torch.equal(_generate(offloaded_model, prompt, 16), _generate(resident, prompt, 16))


def test_disk_store_reads_the_experts_of_a_saved_model(tmp_path):
    resident = _segment(_model())
    file = tmp_path / "model.safetensors"
    save_model(resident, str(file))
    offloaded_model = copy.deepcopy(resident)
    offload_model(offloaded_model, experts_per_layer=2, store=file)
    for _, layer in moe_layers(offloaded_model):  # nothing of the experts is kept but the cache
        assert isinstance(layer.experts.cache.store, DiskStore)
        assert sum(p.numel() for p in layer.experts.parameters()) == 0
    prompt = torch.randint(0, V, (2, 6))
    with torch.no_grad():
        assert torch.equal(offloaded_model(prompt).logits, resident(prompt).logits)


def test_misses_computed_where_the_experts_live_give_the_same_output():
    resident = _segment(_model())
    offloaded_model = copy.deepcopy(resident)
    offloaded = offload_model(offloaded_model, experts_per_layer=1, prefetch=False, compute_misses_in_place=True)
    prompt = torch.randint(0, V, (2, 6))
    with torch.no_grad():
        assert torch.equal(offloaded_model(prompt).logits, resident(prompt).logits)
    assert sum(layer.experts.in_place_computes for _, layer in offloaded.layers) > 0


def _store(num_experts=5):
    return MemoryStore({"w": torch.arange(num_experts, dtype=torch.float32)[:, None].repeat(1, 3)}, pin=False)


def test_lru_evicts_the_expert_used_longest_ago_and_lfu_the_least_used():
    lru, lfu = ExpertCache(_store(), 2, "lru"), ExpertCache(_store(), 2, "lfu")
    for cache in (lru, lfu):
        for e in (0, 0, 0, 1, 2):
            assert torch.equal(cache.use(e)["w"], torch.full((3,), float(e)))
    assert sorted(lru.resident) == [1, 2]  # 0 was used longest ago
    assert sorted(lfu.resident) == [0, 2]  # 1 was used least often
    assert (lru.hits, lru.misses) == (2, 3) == (lfu.hits, lfu.misses)


def test_a_prefetch_loads_ahead_and_its_use_is_a_hit():
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(1) as loader:
        cache = ExpertCache(_store(), 2, "lru", loader=loader)
        cache.prefetch(3)
        assert torch.equal(cache.use(3)["w"], torch.full((3,), 3.0))
        assert (cache.hits, cache.misses, cache.prefetches) == (1, 0, 1)
        cache.prefetch(3)  # resident: nothing to load
        assert cache.prefetches == 1


def test_memory_sizes_parse_and_bad_ones_are_named():
    assert parse_size("300MB") == 300 * 10**6 and parse_size("1.5GiB") == 3 * 2**29 and parse_size("4096") == 4096
    with pytest.raises(ValueError, match="'lots' is not a number"):
        parse_size("lots")


def test_a_budget_below_the_resident_weights_or_one_expert_is_a_one_line_error():
    with pytest.raises(ValueError, match="below the non-expert weights"):
        cache_plan(10 * 2**20, 2**20, 4, 8, "5MB")
    with pytest.raises(ValueError, match="cache smaller than one expert per MoE layer; it needs at least 14.0 MiB"):
        cache_plan(10 * 2**20, 2**20, 4, 8, "12MiB")
    plan = cache_plan(10 * 2**20, 2**20, 4, 8, "22MiB")
    assert plan.experts_per_layer == 3
    assert cache_plan(10 * 2**20, 2**20, 4, 8, "1GiB").experts_per_layer == 8  # never more than all experts
    with pytest.raises(ValueError, match="at least one slot"):
        ExpertCache(_store(), 0)
    with pytest.raises(ValueError, match="at least 1"):
        offload_model(_model(), experts_per_layer=0)


def test_a_max_memory_budget_sizes_the_caches():
    model = _model()
    expert = 3 * 32 * 24 * 8  # swiglu w_in (48, 32) and w_out (32, 24), float64
    resident = sum(t.numel() * t.element_size() for n, t in [*model.named_parameters(), *model.named_buffers()]
                   if ".experts." not in n)  # buffers (the rotary tables) stay in memory too
    offloaded = offload_model(model, max_memory=resident + 3 * 2 * expert + 10)
    assert [cache.capacity for cache in offloaded.caches] == [2, 2, 2]
