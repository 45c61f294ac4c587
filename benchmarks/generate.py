"""Decoding speed of the language model with and without the KV cache.

    python benchmarks/generate.py [--threads 1] [--repeats 5]

The model is the ``moekit train`` default (4 blocks, D = 128, 8 experts, top-2,
expert width 256, vocabulary 4096) with a context of 1024 tokens. For each
context length L, one prompt of L − N tokens is extended by N = 32 greedy
tokens, so the new tokens see about L tokens; tokens/s is N over the time of
the whole call (the prompt's prefill included), median of interleaved rounds.
Both ways produce the same tokens (checked before timing).

A third way, "cached, with losses", is cached generation as it ran before
``generate`` skipped the MoE layers' auxiliary losses (every layer call computes
them, as ``MoE.forward(..., aux_loss=True)``): what skipping them saves.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from contextlib import contextmanager

import torch

from moekit import MoE, MoEConfig
from moekit.models.lm import LanguageModel, LMConfig

NEW_TOKENS = 32


@contextmanager
def computing_aux_loss():
    """Every MoE call computes its auxiliary loss, whatever its caller asks."""
    forward = MoE.forward
    MoE.forward = lambda self, x, **kwargs: forward(self, x, **{**kwargs, "aux_loss": True})
    try:
        yield
    finally:
        MoE.forward = forward


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--contexts", default="128,512,1024")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    moe = MoEConfig(d_model=128, d_ff=256, num_experts=8, top_k=2)
    model = LanguageModel(LMConfig(vocab_size=4096, context_length=1024, n_layer=4, n_head=4, d_model=128,
                                   d_ff=512, moe=moe)).eval()
    results = []
    for L in map(int, args.contexts.split(",")):
        prompt = torch.randint(0, 4096, (1, L - NEW_TOKENS))

        def run(use_cache, prompt=prompt):
            return torch.cat(list(model.generate(prompt, NEW_TOKENS, temperature=0, use_cache=use_cache)), dim=1)

        def run_with_losses():
            with computing_aux_loss():
                return run(True)

        ways = {"cached": lambda: run(True), "cached, with losses": run_with_losses, "uncached": lambda: run(False)}
        tokens = {name: way() for name, way in ways.items()}
        assert all(torch.equal(t, tokens["cached"]) for t in tokens.values()), "the ways disagree on the tokens"
        times = {name: [] for name in ways}
        for round_ in range(args.repeats):
            for name in (list(ways) if round_ % 2 else list(ways)[::-1]):
                start = time.perf_counter()
                ways[name]()
                times[name].append(time.perf_counter() - start)
        speed = {name: NEW_TOKENS / statistics.median(t) for name, t in times.items()}
        results.append({"context": L, "cached_tokens_per_s": speed["cached"],
                        "cached_with_losses_tokens_per_s": speed["cached, with losses"],
                        "uncached_tokens_per_s": speed["uncached"], "speedup": speed["cached"] / speed["uncached"],
                        "skipping_losses_speedup": speed["cached"] / speed["cached, with losses"]})
        print(f"context {L:5d}: cached {speed['cached']:8.1f} tokens/s (with losses "
              f"{speed['cached, with losses']:7.1f}), uncached {speed['uncached']:7.1f} tokens/s, "
              f"{speed['cached'] / speed['uncached']:5.1f}×", flush=True)
    print(json.dumps({"threads": args.threads, "new_tokens": NEW_TOKENS, "results": results}))


if __name__ == "__main__":
    main()
