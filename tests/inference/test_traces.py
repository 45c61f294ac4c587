"""Routing traces and the cache simulator: the simulator predicts the hits the real cache
measures on the same generation, for every policy and size, with and without prefetch."""

from __future__ import annotations

import copy

import pytest
import torch
from test_offload import V, _generate, _model, _segment

from moekit.inference import (
    RoutingTrace,
    offload_model,
    record_cache_accesses,
    record_routing,
    simulate,
)


def _trace(accesses, num_experts=4):
    return RoutingTrace({"layer": num_experts}, {"layer": [("use", e) for e in accesses]})


def test_simulated_policies_on_a_hand_made_trace():
    trace = _trace([0, 1, 0, 2, 1, 0, 3, 0])
    # LRU, 2 slots: 0m 1m 0h 2m(evict 1) 1m(evict 0) 0m(evict 2) 3m(evict 1) 0h
    assert (simulate(trace, "lru", 2).hits, simulate(trace, "lru", 2).misses) == (2, 6)
    # LFU keeps 0 (used most): 0m 1m 0h 2m(evict 1) 1m(evict 2) 0h 3m(evict 1) 0h
    assert (simulate(trace, "lfu", 2).hits, simulate(trace, "lfu", 2).misses) == (3, 5)
    # Belady: 0m 1m 0h 2m(evict 1? next 1 at 4, next 0 at 5: evict 0) ... no policy does better
    optimal = simulate(trace, "optimal", 2)
    assert optimal.hits >= max(simulate(trace, p, 2).hits for p in ("lru", "lfu"))
    assert simulate(trace, "lru", 4).misses == 4  # only first uses miss when everything fits


def test_a_trace_round_trips_through_its_file_and_a_bad_file_is_named(tmp_path):
    trace = _trace([0, 2, 1])
    trace.save(tmp_path / "trace.json")
    assert RoutingTrace.load(tmp_path / "trace.json") == trace
    (tmp_path / "bad.json").write_text("{")
    with pytest.raises(ValueError, match="is not a routing trace"):
        RoutingTrace.load(tmp_path / "bad.json")
    with pytest.raises(ValueError, match="unknown cache policy"):
        simulate(trace, "fifo", 2)


@pytest.mark.parametrize("policy", ["lru", "lfu"])
@pytest.mark.parametrize("capacity", [1, 2, 4])
def test_simulator_equals_the_measured_hits_on_the_recorded_trace(policy, capacity):
    resident = _segment(_model())
    prompt = torch.randint(0, V, (1, 5))
    with record_routing(resident) as trace:
        expected = _generate(resident, prompt, 20)
    for prefetch in (False, True):
        model = copy.deepcopy(resident)
        offloaded = offload_model(model, experts_per_layer=capacity, policy=policy, prefetch=prefetch)
        with record_cache_accesses(offloaded) as own:
            assert torch.equal(_generate(model, prompt, 20), expected)
        measured = offloaded.stats()
        assert [e for kind, e in own.accesses["blocks.1.ffn"] if kind == "use"] == trace.uses("blocks.1.ffn")
        simulated = simulate(own if prefetch else trace, policy, capacity)
        assert (simulated.hits, simulated.misses) == (measured["hits"], measured["misses"])
        assert 0 < measured["hits"] and 0 < measured["misses"]
        offloaded.close()
