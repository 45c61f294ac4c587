"""Expert parallelism in the LM training step: step time and all-to-all share at EP = 1 vs EP = 2,
and bytes moved against the minimum.

    python benchmarks/expert_parallel_lm.py [--layers 4 --d-model 128 --experts 8 --top-k 2
                                             --batch-size 16 --context-length 128]

One step is the trainer's ``train_step``: forward and backward of the language
model, gradient reduction (DDP for the replicated parameters, the expert
reduction), global-norm clipping, AdamW, and the metrics' statistics. EP = 1 is
one process on the global batch; EP = 2 is two processes (gloo on 127.0.0.1,
one intra-op thread each, spawned by this script) with half of the batch each.
Tokens are random ids: routing is whatever the freshly initialised router does.

The all-to-all time is the wall time inside the MoE dispatcher's all-to-alls
(counts and rows, forward and backward, waiting for the other rank included),
measured by wrapping them in this script only. Bytes moved count rows sent to
the other rank (not to itself); the minimum per MoE layer and direction is
T·K·D·bytes·2·(EP−1)/EP (dispatch + combine, uniform routing), T the global
tokens per step. Prints a table and a JSON line.

Shapes: T tokens per step (global), D model dim, E experts, K experts per token.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist

from moekit import MoEConfig
from moekit.data.dataset import TokenData
from moekit.models.lm import LMConfig
from moekit.train import TrainConfig, Trainer
from two_ranks import clock_all_to_alls, report, reset, run_two_ranks


def _configs(args) -> tuple[LMConfig, TrainConfig]:
    moe = MoEConfig(d_model=args.d_model, d_ff=args.d_ff // args.top_k, num_experts=args.experts, top_k=args.top_k,
                    z_loss_coef=1e-3)
    model = LMConfig(vocab_size=args.vocab_size, context_length=args.context_length, n_layer=args.layers,
                     n_head=args.heads, d_model=args.d_model, d_ff=args.d_ff, moe=moe)
    train = TrainConfig(steps=10_000, batch_size=args.batch_size, lr=1e-3, warmup_steps=0)
    return model, train


def _tokens(args) -> TokenData:
    gen = torch.Generator().manual_seed(0)
    return TokenData(torch.randint(0, args.vocab_size, (200_000,), generator=gen),
                     torch.randint(0, args.vocab_size, (20_000,), generator=gen))


def _timed_steps(trainer: Trainer, steps: int, warmup: int, on_warm=None) -> list[float]:
    times = []
    for i in range(warmup + steps):
        if i == warmup and on_warm is not None:
            on_warm()
        start = time.perf_counter()
        trainer.train_step()
        if i >= warmup:
            times.append(time.perf_counter() - start)
        trainer.step += 1  # a new batch each step
    return times


def _rank_main(rank, world, port, args, results):
    from moekit.parallel import setup_parallel

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=timedelta(seconds=300))
    parallel = setup_parallel(ep_size=world, timeout_s=300)
    model_config, train_config = _configs(args)
    with tempfile.TemporaryDirectory() as run_dir:
        trainer = Trainer(Path(run_dir), model_config, train_config, _tokens(args), tensorboard=False,
                          progress=False, parallel=parallel)
        clock = clock_all_to_alls(rank)
        times = _timed_steps(trainer, args.steps, args.warmup, on_warm=lambda: reset(clock))
    results.put(report(rank, times, clock, args.steps))
    dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--d-model", type=int, default=128)
    parser.add_argument("--d-ff", type=int, default=512, help="dense FFN width; each expert gets d_ff / top_k")
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--top-k", type=int, default=2)
    parser.add_argument("--vocab-size", type=int, default=4096)
    parser.add_argument("--context-length", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    args = parser.parse_args()

    torch.set_num_threads(1)
    model_config, train_config = _configs(args)
    with tempfile.TemporaryDirectory() as run_dir:
        single = Trainer(Path(run_dir), model_config, train_config, _tokens(args), tensorboard=False, progress=False)
        ep1_times = sorted(_timed_steps(single, args.steps, args.warmup))
    ep1_step = ep1_times[len(ep1_times) // 2]

    ranks = run_two_ranks(_rank_main, args, timeout_s=900)
    step_s, a2a_s = ranks["step_s"], ranks["all_to_all_s"]
    forward_bytes, backward_bytes = ranks["forward_bytes"], ranks["backward_bytes"]
    tokens = args.batch_size * args.context_length
    moe_layers = sum(model_config.is_moe_layer(layer) for layer in range(model_config.n_layer))
    elem = torch.empty((), dtype=torch.float32).element_size()
    minimum_fwd = moe_layers * tokens * args.top_k * args.d_model * elem * 2 * (2 - 1) / 2
    summary = {
        "settings": vars(args),
        "tokens_per_step": tokens,
        "moe_layers": moe_layers,
        "ep1_step_ms": round(ep1_step * 1e3, 1),
        "ep2_step_ms": round(step_s * 1e3, 1),
        "ep2_all_to_all_ms": round(a2a_s * 1e3, 1),
        "ep2_all_to_all_share": round(a2a_s / step_s, 3),
        "ep2_all_to_all_calls_per_step_per_rank": ranks["calls"],
        "bytes_moved_fwd_per_step": int(forward_bytes),
        "bytes_moved_bwd_per_step": int(backward_bytes),
        "minimum_fwd_bytes": int(minimum_fwd),
    }
    print(f"LM training step, T = {tokens} tokens, {moe_layers} MoE layers (D = {args.d_model}, E = {args.experts}, "
          f"K = {args.top_k}), fp32, one thread per process")
    print(f"{'':28}{'EP=1':>10}{'EP=2':>10}")
    print(f"{'train step, ms':28}{summary['ep1_step_ms']:>10}{summary['ep2_step_ms']:>10}")
    print(f"{'all-to-all, ms (share)':28}{'-':>10}{summary['ep2_all_to_all_ms']:>10} "
          f"({summary['ep2_all_to_all_share']:.0%})")
    print(f"bytes to the other rank per step: forward {summary['bytes_moved_fwd_per_step']:,} "
          f"(minimum {summary['minimum_fwd_bytes']:,}), backward {summary['bytes_moved_bwd_per_step']:,}")
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
