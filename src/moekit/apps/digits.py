"""A short end-to-end demo: an MoE classifier on scikit-learn's digits images.

Trains an MoE network (E experts, top-K routing) and a dense MLP with the same
active parameters per example on the 8×8 digit images that ship with
scikit-learn, then prints the test accuracy of both, the load of each expert
and which digits each expert handles. Runs in well under a minute on 2 cores.

    python -m moekit.demos.digits
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch import nn
from tqdm import tqdm

from moekit import MoE, MoEConfig


class DigitsNet(nn.Module):
    """embed → (MoE or dense SwiGLU FFN) with a residual → classify."""

    def __init__(self, d_model: int, d_ff: int, num_experts: int, top_k: int, moe: bool):
        super().__init__()
        self.embed = nn.Linear(64, d_model)
        self.norm = nn.LayerNorm(d_model)
        if moe:
            self.ffn = MoE(MoEConfig(d_model=d_model, d_ff=d_ff, num_experts=num_experts, top_k=top_k,
                                     load_balance_coef=0.01))
        else:
            # Dense baseline: one expert as wide as the K active experts together.
            self.ffn = MoE(MoEConfig(d_model=d_model, d_ff=top_k * d_ff, num_experts=1, top_k=1,
                                     load_balance_coef=0.0))
        self.head = nn.Linear(d_model, 10)

    def forward(self, x):
        h = self.embed(x)
        out = self.ffn(self.norm(h))
        return self.head(h + out.y), out


def active_parameters(net: DigitsNet) -> int:
    """Parameters one example touches: everything but the experts it is not routed to."""
    total = sum(p.numel() for p in net.parameters())
    experts = net.ffn.experts
    per_expert = sum(p.numel() for p in experts.parameters()) // experts.num_experts
    return total - per_expert * (experts.num_experts - net.ffn.config.top_k)


def train(net, x_train, y_train, epochs, batch_size, lr, seed, label):
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=0.01)
    steps = epochs * ((len(x_train) + batch_size - 1) // batch_size)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=steps)
    net.train()
    bar = tqdm(total=steps, desc=label, leave=False, disable=None)
    for _ in range(epochs):
        order = torch.randperm(len(x_train), generator=generator)
        for start in range(0, len(x_train), batch_size):
            idx = order[start : start + batch_size]
            logits, out = net(x_train[idx])
            loss = F.cross_entropy(logits, y_train[idx]) + out.aux_loss
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            bar.update()
            bar.set_postfix(loss=f"{loss.item():.3f}")
    bar.close()


@torch.no_grad()
def evaluate(net, x, y):
    net.eval()
    logits, out = net(x)
    return (logits.argmax(-1) == y).float().mean().item(), out.routing


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description="MoE vs dense MLP on scikit-learn's digits.")
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--top-k", type=int, default=2)
    parser.add_argument("--d-model", type=int, default=64)
    parser.add_argument("--d-ff", type=int, default=32)
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    digits = load_digits()
    x = torch.tensor(digits.data / 16.0, dtype=torch.float32)
    y = torch.tensor(digits.target)
    x_train, x_test, y_train, y_test = train_test_split(x, y, test_size=0.25, random_state=args.seed, stratify=y)

    results = {}
    for label, use_moe in (("MoE", True), ("dense", False)):
        torch.manual_seed(args.seed)
        net = DigitsNet(args.d_model, args.d_ff, args.experts, args.top_k, moe=use_moe)
        start = time.perf_counter()
        train(net, x_train, y_train, args.epochs, args.batch_size, args.lr, args.seed, label)
        accuracy, routing = evaluate(net, x_test, y_test)
        results[label] = {"net": net, "accuracy": accuracy, "routing": routing,
                          "seconds": time.perf_counter() - start,
                          "active": active_parameters(net), "total": sum(p.numel() for p in net.parameters())}

    print(f"\nMoE vs dense on scikit-learn digits ({len(x_train)} train / {len(x_test)} test images)")
    print(f"{'model':8s} {'test acc':>9s} {'active params':>14s} {'total params':>13s} {'train s':>8s}")
    for label, r in results.items():
        print(f"{label:8s} {r['accuracy']:9.3f} {r['active']:14d} {r['total']:13d} {r['seconds']:8.1f}")

    routing = results["MoE"]["routing"]
    load = routing.tokens_per_expert_E.float()
    share = load / load.sum()
    print(f"\nExpert load on the test set (share of {int(load.sum())} assignments; uniform = {1 / args.experts:.3f})")
    first_choice = routing.indices_TK[:, 0]
    y_np, first_np = y_test.numpy(), first_choice.numpy()
    print(f"{'expert':>6s} {'share':>6s}  digits it handles most (share of the expert's first choices)")
    for e in range(args.experts):
        mine = y_np[first_np == e]
        if len(mine) == 0:
            print(f"{e:6d} {share[e]:6.3f}  -")
            continue
        counts = np.bincount(mine, minlength=10)
        top = np.argsort(-counts)[:3]
        text = ", ".join(f"{d} ({counts[d] / len(mine):.0%})" for d in top if counts[d] > 0)
        print(f"{e:6d} {share[e]:6.3f}  {text}")
    return {k: {kk: vv for kk, vv in v.items() if kk in ("accuracy", "active", "total")} for k, v in results.items()}


if __name__ == "__main__":
    main()
