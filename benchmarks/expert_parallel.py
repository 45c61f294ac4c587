"""Expert parallelism: step time and all-to-all share at EP = 1 vs EP = 2, and bytes moved.

    python benchmarks/expert_parallel.py [--tokens 2048 --d-model 256 --d-ff 512 --experts 8 --top-k 2]

Spawns the ranks itself on 127.0.0.1 (gloo, one intra-op thread per process).
EP = 1 runs the single-process layer on the global batch; EP = 2 runs two
processes with half of the batch each. A step is forward + backward of the
layer. The all-to-all time is the wall time spent inside the dispatcher's
all-to-alls (counts and rows, forward and backward, including waiting for the
other rank), measured by wrapping them in this script only. Bytes moved count
rows sent to the other rank (not to itself), forward and backward; the minimum
for the forward is T·K·D·bytes·2·(EP−1)/EP (dispatch + combine, uniform routing).
Prints a table and a JSON line.

Shapes: T tokens (global), D model dim, E experts, K experts per token.
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from datetime import timedelta

import torch
import torch.distributed as dist

from moekit import MoE, MoEConfig
from moekit.parallel import expert_parallel
from two_ranks import clock_all_to_alls, report, reset, run_two_ranks


def _layer(args) -> MoE:
    torch.manual_seed(0)
    return MoE(MoEConfig(d_model=args.d_model, d_ff=args.d_ff, num_experts=args.experts, top_k=args.top_k))


def _timed_steps(moe: MoE, x_TD: torch.Tensor, steps: int, warmup: int) -> list[float]:
    times = []
    for i in range(warmup + steps):
        start = time.perf_counter()
        out = moe(x_TD)
        (out.y.square().mean() + out.aux_loss).backward()
        if i >= warmup:
            times.append(time.perf_counter() - start)
    return times


def _rank_main(rank, world, port, args, results):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=timedelta(seconds=120))
    moe = expert_parallel(copy.deepcopy(_layer(args)))
    x_TD = torch.randn(args.tokens, args.d_model, generator=torch.Generator().manual_seed(1)).chunk(world)[rank]

    clock = clock_all_to_alls(rank)
    _timed_steps(moe, x_TD, 0, args.warmup)
    reset(clock)
    times = _timed_steps(moe, x_TD, args.steps, 0)
    results.put(report(rank, times, clock, args.steps))
    dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument("--d-model", type=int, default=256)
    parser.add_argument("--d-ff", type=int, default=512)
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--top-k", type=int, default=2)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    args = parser.parse_args()

    torch.set_num_threads(1)
    x_TD = torch.randn(args.tokens, args.d_model, generator=torch.Generator().manual_seed(1))
    single = sorted(_timed_steps(_layer(args), x_TD, args.steps, args.warmup))[args.steps // 2]

    ranks = run_two_ranks(_rank_main, args, timeout_s=600)
    step_s, a2a_s = ranks["step_s"], ranks["all_to_all_s"]
    forward_bytes, backward_bytes = ranks["forward_bytes"], ranks["backward_bytes"]
    elem = torch.empty((), dtype=torch.float32).element_size()
    minimum_fwd = args.tokens * args.top_k * args.d_model * elem * 2 * (2 - 1) / 2
    summary = {
        "shape": vars(args),
        "ep1_step_ms": round(single * 1e3, 2),
        "ep2_step_ms": round(step_s * 1e3, 2),
        "ep2_all_to_all_ms": round(a2a_s * 1e3, 2),
        "ep2_all_to_all_share": round(a2a_s / step_s, 3),
        "ep2_all_to_all_calls_per_step_per_rank": ranks["calls"],
        "bytes_moved_fwd_per_step": int(forward_bytes),
        "bytes_moved_bwd_per_step": int(backward_bytes),
        "minimum_fwd_bytes": int(minimum_fwd),
    }
    print(f"{'':28}{'EP=1':>10}{'EP=2':>10}")
    print(f"{'step (fwd+bwd), ms':28}{summary['ep1_step_ms']:>10}{summary['ep2_step_ms']:>10}")
    print(f"{'all-to-all, ms (share)':28}{'-':>10}{summary['ep2_all_to_all_ms']:>10} ({summary['ep2_all_to_all_share']:.0%})")
    print(f"bytes to the other rank per step: forward {summary['bytes_moved_fwd_per_step']:,} "
          f"(minimum {summary['minimum_fwd_bytes']:,}), backward {summary['bytes_moved_bwd_per_step']:,}")
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
