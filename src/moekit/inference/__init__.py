"""Inference with less memory: quantized experts, offloaded experts behind an expert
cache, routing traces and a cache simulator (KV-cache generation is
``moekit.models.lm.LanguageModel.generate``)."""

from .offload import CachePlan, Offloaded, cache_plan, load_offloaded_run, offload_model, parse_size
from .quantize import Coverage, expert_coverage, quantize_model
from .traces import (
           RoutingTrace,
           SimulatedHits,
           hit_rate_table,
           record_cache_accesses,
           record_routing,
           simulate,
)

__all__ = ["CachePlan", "Coverage", "Offloaded", "RoutingTrace", "SimulatedHits", "cache_plan", "expert_coverage",
           "hit_rate_table", "load_offloaded_run", "offload_model", "parse_size", "quantize_model",
           "record_cache_accesses", "record_routing", "simulate"]
