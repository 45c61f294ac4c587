"""Decoding speed of the language model with and without the KV cache.

    python benchmarks/generate.py [--threads 1] [--repeats 5]

The model is the ``moekit train`` default (4 blocks, D = 128, 8 experts, top-2,
expert width 256, vocabulary 4096) with a context of 1024 tokens. For each
context length L, one prompt of L − N tokens is extended by N = 32 greedy
tokens, so the new tokens see about L tokens; tokens/s is N over the time of
the whole call (the prompt's prefill included), median of interleaved rounds.
Both ways produce the same tokens (checked before timing).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from moekit import MoEConfig
from moekit.models.lm import LanguageModel, LMConfig

NEW_TOKENS = 32


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

        assert torch.equal(run(True), run(False)), "cached and uncached decoding disagree"
        times = {True: [], False: []}
        for round_ in range(args.repeats):
            for use_cache in ((True, False) if round_ % 2 else (False, True)):
                start = time.perf_counter()
                run(use_cache)
                times[use_cache].append(time.perf_counter() - start)
        cached, uncached = (NEW_TOKENS / statistics.median(times[c]) for c in (True, False))
        results.append({"context": L, "cached_tokens_per_s": cached, "uncached_tokens_per_s": uncached,
                        "speedup": cached / uncached})
        print(f"context {L:5d}: cached {cached:8.1f} tokens/s, uncached {uncached:7.1f} tokens/s, "
              f"{cached / uncached:5.1f}×", flush=True)
    print(json.dumps({"threads": args.threads, "new_tokens": NEW_TOKENS, "results": results}))


if __name__ == "__main__":
    main()
