"""Expert parallelism's all-to-alls overlapped with compute: LM training step time, synchronous
exchange against the exchange in C chunks (``--overlap-chunks``), at 2 and 4 gloo ranks.

    python benchmarks/overlap.py [--ranks 2 4 --chunks 1 2 4 --rounds 7 --layers 4 --d-model 128
                                  --experts 8 --shared-experts 1 --batch-size 16 --context-length 128]

Every rank builds one model per chunk count (the same weights), expert-parallel over all
ranks with DDP for the rest, as ``moekit train --expert-parallel P`` does; a round
runs one training step (forward, backward, gradient reduction, clipping, AdamW) of
each variant in turn on the same random batch, so that the machine's noise falls
on all of them alike. The figure is the median over rounds of the slowest rank's
step time, and its ratio to the synchronous exchange (C = 1). One intra-op thread
per rank. Prints a table and a JSON line.
"""

from __future__ import annotations

import argparse
import json

import torch
import torch.distributed as dist

from ranks import init_rank, spawn_ranks, timed_train_step


def rank_main(rank, world, port, args, results):
    from moekit import MoEConfig
    from moekit.models.lm import LanguageModel, LMConfig
    from moekit.parallel import parallelize, setup_parallel

    init_rank(rank, world, port)
    config = LMConfig(vocab_size=4096, context_length=args.context_length, n_layer=args.layers, n_head=4,
                      d_model=args.d_model, d_ff=2 * args.d_model,
                      moe=MoEConfig(d_model=args.d_model, d_ff=2 * args.d_model, num_experts=args.experts, top_k=2,
                                    num_shared_experts=args.shared_experts))
    variants = []
    for chunks in args.chunks:
        torch.manual_seed(0)
        model = LanguageModel(config)
        parallel = setup_parallel(world, 300, overlap_chunks=chunks)
        variants.append((chunks, parallel, model, parallelize(model, parallel),
                         torch.optim.AdamW(model.parameters(), lr=1e-3)))
    gen = torch.Generator().manual_seed(1)
    idx = torch.randint(0, 4096, (args.batch_size, args.context_length), generator=gen)
    times = {chunks: [] for chunks in args.chunks}
    for round_ in range(args.rounds + 1):
        for chunks, parallel, model, train_model, optimizer in variants:
            elapsed = timed_train_step(train_model, model, parallel, optimizer, idx)
            if round_ > 0:  # the first round warms up
                times[chunks].append(elapsed)
    results.put((rank, times))
    dist.destroy_process_group()


def run(world: int, args) -> dict:
    return spawn_ranks(rank_main, world, args)[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ranks", type=int, nargs="+", default=[2, 4])
    parser.add_argument("--chunks", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--d-model", type=int, default=128)
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--shared-experts", type=int, default=1)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--context-length", type=int, default=128)
    args = parser.parse_args()
    rows = []
    print(f"{'ranks':>6}{'chunks':>8}{'median step ms':>16}{'vs synchronous':>16}")
    for world in args.ranks:
        times = run(world, args)
        medians = {chunks: sorted(t)[len(t) // 2] for chunks, t in times.items()}
        for chunks, median in medians.items():
            ratio = median / medians[args.chunks[0]]
            rows.append({"ranks": world, "chunks": chunks, "median_ms": round(1e3 * median, 1),
                         "ratio": round(ratio, 3), "times_ms": [round(1e3 * t, 1) for t in times[chunks]]})
            print(f"{world:>6}{chunks:>8}{1e3 * median:>16.1f}{ratio:>16.3f}")
    print(json.dumps({"args": vars(args), "rows": rows}))


if __name__ == "__main__":
    main()
