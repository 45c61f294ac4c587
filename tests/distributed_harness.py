"""Run a function on N local processes joined by a gloo process group on 127.0.0.1.

Every run has a deadline: processes still alive after it are killed and the
test fails, so no test can hang. Workers report back only plain values
(assertions run inside the workers, their tracebacks come back as text).
"""

from __future__ import annotations

import queue
import socket
import time
import traceback
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

LOCALHOST = "127.0.0.1"


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((LOCALHOST, 0))
        return sock.getsockname()[1]


def _entry(worker, rank, world_size, port, pg_timeout_s, args, results):
    torch.set_num_threads(1)  # a shared 2-core machine; the tensors are tiny
    try:
        dist.init_process_group(
            "gloo", init_method=f"tcp://{LOCALHOST}:{port}", rank=rank, world_size=world_size,
            timeout=timedelta(seconds=pg_timeout_s),
        )
        value = worker(rank, world_size, *args)
        results.put((rank, "ok", value))
    except BaseException as err:  # report everything, including SystemExit, to the parent
        results.put((rank, "error", (type(err).__name__, str(err), traceback.format_exc())))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def run_ranks(worker, *args, world_size: int = 2, deadline_s: float = 60.0, pg_timeout_s: float = 20.0):
    """Run ``worker(rank, world_size, *args)`` on ``world_size`` processes.

    Returns ``{rank: ("ok", value) | ("error", (type name, message, traceback))}``;
    a rank that died without reporting is missing. Raises ``TimeoutError`` (after
    killing every process) when a rank is still running at the deadline.
    """
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    port = _free_port()
    procs = [
        ctx.Process(target=_entry, args=(worker, rank, world_size, port, pg_timeout_s, args, results), daemon=True)
        for rank in range(world_size)
    ]
    for proc in procs:
        proc.start()
    reports = {}
    stop_at = time.monotonic() + deadline_s
    try:
        while len(reports) < world_size:
            try:
                rank, status, value = results.get(timeout=0.2)
                reports[rank] = (status, value)
            except queue.Empty:
                if not any(proc.is_alive() for proc in procs):
                    break
                if time.monotonic() > stop_at:
                    raise TimeoutError(
                        f"ranks {sorted(set(range(world_size)) - set(reports))} still running after "
                        f"{deadline_s}s; killed (reports so far: {reports})"
                    ) from None
    finally:
        for proc in procs:
            if proc.is_alive():
                proc.kill()
            proc.join(timeout=5)
    return reports


def expect_ok(reports: dict, world_size: int = 2) -> list:
    """Every rank's value, or an AssertionError carrying the failing ranks' tracebacks."""
    failures = [
        f"rank {rank}: {value[2]}" for rank, (status, value) in sorted(reports.items()) if status != "ok"
    ]
    missing = sorted(set(range(world_size)) - set(reports))
    if failures or missing:
        raise AssertionError("\n".join(failures + [f"ranks {missing} died without reporting"] * bool(missing)))
    return [reports[rank][1] for rank in range(world_size)]


def check_sharded_equals_reference(reference, sharded, x, proj, rows, rank, world, tol, full_kwargs=None,
                                   local_kwargs=None):
    """An expert-parallel layer on this rank's ``rows`` of a batch against the single-process layer
    on all of it: outputs, aux loss, loads, the input gradient and every parameter gradient.

    Gradient convention (DDP's): the reference's loss is J = Σ y·proj + aux; rank r uses
    J_r = P·Σ_{rows of r} y·proj + aux, so J is the mean over ranks of J_r. After
    ``average_gradients`` the router's gradient equals the reference's, the expert shard's
    gradients equal the reference's for those experts, and the input gradient is P times
    the reference's. Returns (this rank's output, the reference's output)."""
    from moekit.parallel import average_gradients

    x_ref = x.clone().requires_grad_()
    ref = reference(x_ref, **(full_kwargs or {}))
    ((ref.y * proj).sum() + ref.aux_loss).backward()
    x_local = x[rows].clone().requires_grad_()
    out = sharded(x_local, **(local_kwargs or {}))
    (world * (out.y * proj[rows]).sum() + out.aux_loss).backward()
    average_gradients(sharded)
    torch.testing.assert_close(out.y, ref.y[rows], **tol)
    torch.testing.assert_close(out.aux_loss, ref.aux_loss, **tol)
    assert torch.equal(out.routing.tokens_per_expert_E, ref.routing.tokens_per_expert_E)
    torch.testing.assert_close(x_local.grad, world * x_ref.grad[rows], **tol)
    num_local = sharded.experts.num_experts
    ref_params = dict(reference.named_parameters())
    for name, param in sharded.named_parameters():
        # A parameter outside the loss (noise_weight in eval) has no grad in the reference;
        # average_gradients gives it zeros so that every rank runs the same all-reduces.
        expected = ref_params[name].grad
        if expected is None:
            expected = torch.zeros_like(ref_params[name])
        if name.startswith("experts."):
            expected = expected[rank * num_local:(rank + 1) * num_local]
        torch.testing.assert_close(param.grad, expected, **tol, msg=lambda m, n=name: f"grad {n}: {m}")
    return out, ref
