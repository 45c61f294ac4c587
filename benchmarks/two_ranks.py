"""Shared by the expert-parallel benchmarks: two gloo ranks on 127.0.0.1, and a
clock around the dispatcher's all-to-alls (time, calls, bytes to the other rank)."""

from __future__ import annotations

import socket
import time

import torch.multiprocessing as mp

import moekit.parallel.collectives as collectives
import moekit.parallel.dispatcher as dispatcher


def clock_all_to_alls(rank: int) -> dict:
    """Wrap the dispatcher's all-to-all in this process; returns the running totals.
    Row all-to-alls count the bytes sent to other ranks (not to itself)."""
    clock = {"seconds": 0.0, "forward_bytes": 0, "backward_bytes": 0, "calls": 0}
    plain_all_to_all = collectives.all_to_all

    def timed_all_to_all(out, inp, recv_splits, send_splits, group, what):
        start = time.perf_counter()
        result = plain_all_to_all(out, inp, recv_splits, send_splits, group, what)
        clock["seconds"] += time.perf_counter() - start
        clock["calls"] += 1
        if send_splits is not None:  # a row all-to-all (the count exchange has equal splits)
            row_bytes = inp.shape[1] * inp.element_size()
            key = "backward_bytes" if what.startswith("backward") else "forward_bytes"
            clock[key] += sum(n for p, n in enumerate(send_splits) if p != rank) * row_bytes
        return result

    # The row exchange calls it from collectives, the count exchange from the dispatcher.
    collectives.all_to_all = dispatcher.all_to_all = timed_all_to_all
    return clock


def reset(clock: dict) -> None:
    clock.update(seconds=0.0, forward_bytes=0, backward_bytes=0, calls=0)


def report(rank: int, times: list[float], clock: dict, steps: int) -> tuple:
    """(rank, median step s, all-to-all s, forward bytes, backward bytes, calls), per step."""
    return (rank, sorted(times)[len(times) // 2], clock["seconds"] / steps, clock["forward_bytes"] / steps,
            clock["backward_bytes"] / steps, clock["calls"] / steps)


def run_two_ranks(rank_main, args, timeout_s: float) -> dict:
    """Start ``rank_main(rank, 2, port, args, results)`` on two processes; the slowest
    rank's step and all-to-all time, and the bytes both ranks sent, per step."""
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    procs = [ctx.Process(target=rank_main, args=(rank, 2, port, args, results)) for rank in range(2)]
    for proc in procs:
        proc.start()
    reports = sorted(results.get(timeout=timeout_s) for _ in procs)
    for proc in procs:
        proc.join()
    return {
        "step_s": max(r[1] for r in reports),
        "all_to_all_s": max(r[2] for r in reports),
        "forward_bytes": sum(r[3] for r in reports),
        "backward_bytes": sum(r[4] for r in reports),
        "calls": reports[0][5],
    }
