"""Argument groups several ``moekit`` commands share, and the argument types they use."""

from __future__ import annotations

import argparse

THREADS_HELP = ("torch CPU threads (default: the count the run recorded, else the cores other processes "
                "do not keep busy now)")


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def add_surgery_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("run_dir", metavar="RUN_DIR", help="the trained run to start from (only read)")
    p.add_argument("--out", required=True, metavar="NEW_RUN", help="the new run folder (must not hold a run)")
    g = p.add_argument_group("training the new run (moekit train --resume NEW_RUN)")
    g.add_argument("--steps", type=positive_int, default=200, help="steps of the new run's schedule (default: %(default)s)")
    g.add_argument("--lr", type=float, default=None, help="peak learning rate (default: the source run's)")
    g.add_argument("--seed", type=int, default=None,
                   help="seed of the new weights and the new run's batches (default: the source's seed + 1)")
    g = p.add_argument_group("measuring")
    g.add_argument("--eval-batches", type=positive_int, default=16,
                   help="validation batches for the losses and the captured router inputs (default: %(default)s)")
    g.add_argument("--batch-size", type=positive_int, default=16, help="sequences per batch (default: %(default)s)")
    g.add_argument("--threads", type=positive_int, default=None, help=THREADS_HELP)


def add_offload_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("offloading (experts read from the checkpoint on demand)")
    g.add_argument("--max-memory", metavar="SIZE", default=None,
                   help="memory for the whole process, e.g. 600MB or 1.5GiB: the runtime, activations and "
                   "non-expert weights stay resident, the rest caches experts per MoE layer, and the experts are "
                   "read from the checkpoint file as needed (default: load every weight)")
    g.add_argument("--cache-policy", choices=("lru", "lfu"), default="lru",
                   help="which cached expert a miss replaces (default: %(default)s)")
    g.add_argument("--prefetch", action=argparse.BooleanOptionalAction, default=False,
                   help="load the next layer's likely experts ahead of use on a background thread; off by default: "
                   "on CPU a miss costs one memory copy and wrong guesses evict useful experts (BENCHMARKS.md)")


def add_parallel_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("parallelism (start the processes with torchrun; these apply with --resume too)")
    g.add_argument("--expert-parallel", type=positive_int, default=1, metavar="EP",
                   help="shard each MoE layer's experts over EP processes; the processes torchrun starts must be "
                   "a multiple of EP, and the rest is data parallel (default: %(default)s)")
    g.add_argument("--fsdp", type=positive_int, default=None, metavar="N",
                   help="shard the non-expert parameters, gradients and optimizer state over N processes with FSDP2 "
                   "(replicated over the rest: HSDP), and each expert over the processes that hold it; N must "
                   "divide the number of processes and EP must divide N (default: DDP, nothing sharded but experts)")
    g.add_argument("--overlap-chunks", type=positive_int, default=1, metavar="C",
                   help="with expert parallelism: exchange each MoE layer's rows in C chunks, each chunk's "
                   "all-to-all running behind the previous chunk's experts and the shared experts (default: "
                   "%(default)s, no overlap)")
    g.add_argument("--replicate-every", type=int, default=0, metavar="N",
                   help="with expert parallelism: every N steps, give the most loaded experts replicas on the "
                   "least loaded ranks (from the rows each expert got since), their rows dealt over the holders; "
                   "the model computes the same (default: 0, no replicas)")
    g.add_argument("--replica-slots", type=positive_int, default=1, metavar="S",
                   help="replicas each rank may hold per MoE layer, with --replicate-every (default: %(default)s)")
    g.add_argument("--mixed-precision", choices=("fp32", "bf16"), default="fp32",
                   help="with --fsdp: 'bf16' gathers and computes the weights in bfloat16 and reduces gradients in "
                   "float32; the weights and optimizer state stay float32 (default: %(default)s)")
    g.add_argument("--activation-checkpointing", action="store_true",
                   help="recompute each block's activations in backward instead of keeping them")
    g.add_argument("--sharded-checkpoints", action="store_true",
                   help="write checkpoints with torch.distributed.checkpoint, each process its own shards (a folder "
                   "per step that loads at any process count; moekit convert-checkpoint makes it one file)")
    g.add_argument("--dist-timeout", type=float, default=300.0, metavar="SECONDS",
                   help="process-group timeout: a rank that dies or hangs makes the others fail after this "
                   "long (default: %(default)s)")
