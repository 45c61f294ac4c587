"""Per-rank parameter, gradient and optimizer memory: FSDP2 + expert parallelism against
expert parallelism + DDP, at 2 and 4 gloo ranks.

    python benchmarks/fsdp_memory.py [--layers 4 --d-model 256 --d-ff 512 --experts 8 --vocab 8192]

Each layout builds the language model on every rank, shards it as ``moekit train``
does (``setup_parallel`` + ``parallelize``), runs one training step (forward,
backward, gradient reduction, AdamW) on random tokens and counts the bytes each
rank holds in parameters, gradients and AdamW's two moments, split into the
experts and the rest (``DTensor`` shards counted by their local part). The
figures are exact byte counts, not timings: one run suffices.

Prints a table and a JSON line.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
import torch.distributed as dist

from ranks import init_rank, spawn_ranks

FIGURES = Path(__file__).resolve().parent.parent / "docs" / "figures" / "fsdp_memory.json"

LAYOUTS = [  # (name, world, expert parallel, fsdp size or 0 for DDP)
    ("EP 2 + DDP", 2, 2, 0), ("EP 2 + FSDP 2", 2, 2, 2),
    ("EP 4 + DDP", 4, 4, 0), ("EP 4 + FSDP 4", 4, 4, 4),
    ("EP 2 + DDP (2 replicas)", 4, 2, 0), ("EP 2 + FSDP 4", 4, 2, 4),
]


def _local_bytes(tensor) -> int:
    from torch.distributed.tensor import DTensor

    local = tensor.to_local() if isinstance(tensor, DTensor) else tensor
    return local.numel() * local.element_size()


def rank_main(rank, world, port, args, layout, results):
    from moekit import MoEConfig
    from moekit.models.lm import LanguageModel, LMConfig
    from moekit.parallel import moe_layers, parallelize, reduce_gradients, setup_parallel

    init_rank(rank, world, port)
    _, _, ep, fsdp = layout
    config = LMConfig(vocab_size=args.vocab, context_length=64, n_layer=args.layers, n_head=4,
                      d_model=args.d_model, d_ff=args.d_ff,
                      moe=MoEConfig(d_model=args.d_model, d_ff=args.d_ff, num_experts=args.experts, top_k=2))
    torch.manual_seed(0)
    model = LanguageModel(config)
    parallel = setup_parallel(ep, 120, fsdp_size=fsdp)
    train_model = parallelize(model, parallel)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    idx = torch.randint(0, args.vocab, (world * 2, 64), generator=torch.Generator().manual_seed(1))
    out = train_model(parallel.share(idx), parallel.share(idx.roll(-1, 1)))
    (out.loss + out.aux_loss).backward()
    reduce_gradients(model, parallel)
    optimizer.step()
    experts = {id(p) for _, moe in moe_layers(model) for p in moe.experts.parameters()}
    held = {"params": [0, 0], "grads": [0, 0], "adam": [0, 0]}  # [rest, experts]
    for param in model.parameters():
        part = int(id(param) in experts)
        held["params"][part] += _local_bytes(param)
        if param.grad is not None:
            held["grads"][part] += _local_bytes(param.grad)
        for value in optimizer.state[param].values():
            if value.dim() > 0:
                held["adam"][part] += _local_bytes(value)
    results.put((rank, held))
    dist.destroy_process_group()


def run_layout(args, layout) -> list[dict]:
    reports = spawn_ranks(rank_main, layout[1], args, layout, timeout_s=600)
    return [reports[rank] for rank in sorted(reports)]


def markdown_table(figures: dict) -> str:
    """The table docs/distributed.md quotes."""
    lines = ["| layout | ranks | non-expert MiB/rank | expert MiB/rank | total MiB/rank |", "|---|---|---|---|---|"]
    for row in figures["rows"]:
        total = row["rest_mib"] + row["experts_mib"]
        lines.append(f"| {row['layout']} | {row['ranks']} | {row['rest_mib']:.2f} | {row['experts_mib']:.2f} | "
                     f"{total:.2f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--d-model", type=int, default=256)
    parser.add_argument("--d-ff", type=int, default=512)
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--vocab", type=int, default=8192)
    parser.add_argument("--record", action="store_true", help=f"write the figures to {FIGURES}")
    parser.add_argument("--out", type=Path, default=None, help="write the figures to this JSON file")
    args = parser.parse_args()
    rows = []
    print(f"{'layout':<26}{'ranks':>6}{'rest MiB/rank':>15}{'experts MiB/rank':>18}{'total MiB/rank':>16}")
    for layout in LAYOUTS:
        per_rank = run_layout(args, layout)
        worst = max(per_rank, key=lambda h: sum(sum(v) for v in h.values()))
        rest = sum(v[0] for v in worst.values()) / 2**20
        expert = sum(v[1] for v in worst.values()) / 2**20
        rows.append({"layout": layout[0], "ranks": layout[1], "ep": layout[2], "fsdp": layout[3],
                     "rest_mib": round(rest, 3), "experts_mib": round(expert, 3)})
        print(f"{layout[0]:<26}{layout[1]:>6}{rest:>15.2f}{expert:>18.2f}{rest + expert:>16.2f}")
    shape = {key: getattr(args, key) for key in ("layers", "d_model", "d_ff", "experts", "vocab")}
    figures = {"args": shape, "rows": rows}
    print(json.dumps(figures))
    for path in [FIGURES] * args.record + [args.out] * (args.out is not None):
        path.write_text(json.dumps(figures, indent=1) + "\n")


if __name__ == "__main__":
    main()
