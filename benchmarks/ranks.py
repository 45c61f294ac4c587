"""Shared by the multi-process benchmarks: N gloo ranks on 127.0.0.1, and one timed training step."""

from __future__ import annotations

import socket
import time
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def spawn_ranks(target, world: int, *args, timeout_s: float = 1800) -> dict:
    """Run ``target(rank, world, port, *args, results)`` on ``world`` processes; each puts
    ``(rank, report)`` on ``results``. Returns {rank: report}."""
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    procs = [ctx.Process(target=target, args=(rank, world, port, *args, results)) for rank in range(world)]
    for proc in procs:
        proc.start()
    reports = dict(results.get(timeout=timeout_s) for _ in procs)
    for proc in procs:
        proc.join()
    return reports


def init_rank(rank: int, world: int, port: int, timeout_s: float = 600) -> None:
    """One intra-op thread, and the gloo process group of ``spawn_ranks``."""
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=timedelta(seconds=timeout_s))


def timed_train_step(train_model, model, parallel, optimizer, idx_BS, after_forward=None) -> float:
    """One training step as the trainer runs it (forward, backward, gradient reduction, clipping,
    AdamW) on this rank's share of ``idx_BS``; the slowest rank's seconds. ``after_forward()`` runs
    between forward and backward, when the activations are held (memory probes)."""
    from moekit.parallel import clip_grad_norm, reduce_gradients

    dist.barrier()
    start = time.perf_counter()
    out = train_model(parallel.share(idx_BS), parallel.share(idx_BS.roll(-1, 1)))
    if after_forward is not None:
        after_forward()
    (out.loss + out.aux_loss).backward()
    reduce_gradients(model, parallel)
    clip_grad_norm(model, 1.0, parallel)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    elapsed = torch.tensor([time.perf_counter() - start])
    dist.all_reduce(elapsed, op=dist.ReduceOp.MAX)  # the step ends when the slowest rank's does
    return float(elapsed)
