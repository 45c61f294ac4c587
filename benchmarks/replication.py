"""Hot-expert replication under skewed routing: max/mean rank load and step time of an
expert-parallel MoE layer without and with replicas, at 4 gloo ranks.

    python benchmarks/replication.py [--ranks 4 --experts 16 --top-k 2 --zipf 1.2 --tokens 2048
                                      --d-model 256 --d-ff 512 --slots 1 2 --rounds 9]

Routing is forced to a Zipf law: each token picks K distinct experts with probability
∝ 1 / (rank of the expert)^s, the hottest experts first (experts 0, 1, … live on
rank 0, the worst case for expert parallelism). Every rank draws its own tokens.
A step is forward and backward of the layer on each rank's T tokens. The
replicas are placed by ``replan_replicas`` from the rows per expert of 3
measured steps, then every variant runs in turn each round (same noise for
all). Reported: the rows each rank's experts computed (max/mean over ranks,
measured), and the median over rounds of the slowest rank's step time. One
intra-op thread per rank. Prints a table and a JSON line.
"""

from __future__ import annotations

import argparse
import copy
import json
import time

import torch
import torch.distributed as dist

from ranks import init_rank, spawn_ranks


def zipf_choice(num_experts: int, top_k: int, s: float, seed: int):
    weights_E = 1.0 / torch.arange(1, num_experts + 1, dtype=torch.float64) ** s
    gen = torch.Generator().manual_seed(seed)

    def choose(routing):
        T = routing.indices_TK.shape[0]
        indices_TK = torch.multinomial(weights_E.expand(T, -1), top_k, replacement=False, generator=gen)
        return indices_TK, torch.full((T, top_k), 1.0 / top_k)

    return choose


def rank_main(rank, world, port, args, results):
    from moekit import MoE, MoEConfig
    from moekit.parallel import expert_parallel
    from moekit.parallel.replication import enable_replication, replan_replicas

    init_rank(rank, world, port)
    torch.manual_seed(0)
    base = MoE(MoEConfig(d_model=args.d_model, d_ff=args.d_ff, num_experts=args.experts, top_k=args.top_k))
    x = torch.randn(args.tokens, args.d_model, generator=torch.Generator().manual_seed(rank))
    variants = {}
    for slots in [0, *args.slots]:
        moe = expert_parallel(copy.deepcopy(base))
        moe.force_routing(zipf_choice(args.experts, args.top_k, args.zipf, seed=1000 * rank + slots))
        rows = []
        plain_dispatch = moe.dispatcher.dispatch

        def counting_dispatch(x_TD, plan, plain=plain_dispatch, rows=rows):
            x_ND, counts = plain(x_TD, plan)
            rows.append(x_ND.shape[0])
            return x_ND, counts

        moe.dispatcher.dispatch = counting_dispatch
        if slots:
            enable_replication(moe, slots)
            for _ in range(3):  # measure the loads, then place the replicas
                moe(x).y.sum().backward()
            replan_replicas(moe)
            rows.clear()
        variants[slots] = (moe, rows)
    times = {slots: [] for slots in variants}
    for round_ in range(args.rounds + 1):
        for slots, (moe, _) in variants.items():
            dist.barrier()
            start = time.perf_counter()
            out = moe(x)
            (out.y.square().mean() + out.aux_loss).backward()
            elapsed = torch.tensor([time.perf_counter() - start])
            dist.all_reduce(elapsed, op=dist.ReduceOp.MAX)
            if round_ > 0:
                times[slots].append(float(elapsed))
    loads = {}
    for slots, (_, rows) in variants.items():
        mine = torch.tensor([float(sum(rows[1:]))])  # rows this rank's experts computed (after warm-up)
        every = [torch.zeros(1) for _ in range(world)]
        dist.all_gather(every, mine)
        loads[slots] = [float(t) for t in every]
    placements = {slots: moe.dispatcher.placement.replicas if slots else [] for slots, (moe, _) in variants.items()}
    results.put((rank, {"times": times, "loads": loads, "replicas": placements}))
    dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ranks", type=int, default=4)
    parser.add_argument("--experts", type=int, default=16)
    parser.add_argument("--top-k", type=int, default=2)
    parser.add_argument("--zipf", type=float, default=1.2)
    parser.add_argument("--tokens", type=int, default=2048, help="tokens per rank")
    parser.add_argument("--d-model", type=int, default=256)
    parser.add_argument("--d-ff", type=int, default=512)
    parser.add_argument("--slots", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--rounds", type=int, default=9)
    args = parser.parse_args()
    report = spawn_ranks(rank_main, args.ranks, args, timeout_s=3600)[0]
    rows = []
    base_time = sorted(report["times"][0])[len(report["times"][0]) // 2]
    print(f"{'replica slots':>14}{'max/mean rank load':>20}{'median step ms':>16}{'vs no replicas':>16}")
    for slots, times in report["times"].items():
        loads = report["loads"][slots]
        ratio = max(loads) / (sum(loads) / len(loads))
        median = sorted(times)[len(times) // 2]
        rows.append({"slots": slots, "max_over_mean": round(ratio, 3), "rank_rows": loads,
                     "median_ms": round(1e3 * median, 1), "vs_none": round(median / base_time, 3),
                     "replicas": report["replicas"][slots]})
        print(f"{slots:>14}{ratio:>20.3f}{1e3 * median:>16.1f}{median / base_time:>16.3f}")
    print(json.dumps({"args": vars(args), "rows": rows}))


if __name__ == "__main__":
    main()
