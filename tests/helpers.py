"""Shared test helpers: run a layer on one compute path with fixed randomness."""

from __future__ import annotations

import copy
import dataclasses

import torch

from moekit import MoE


def run_path(moe: MoE, path: str, x: torch.Tensor, seed: int = 0, **kwargs):
    """Copy the layer onto ``path``, run forward + backward of a fixed random
    projection of y plus the aux loss; return output, aux, routing and all grads."""
    layer = copy.deepcopy(moe)
    layer.config = dataclasses.replace(layer.config, compute=path)
    x = x.detach().clone().requires_grad_(True)
    torch.manual_seed(seed)
    out = layer(x, **kwargs)
    probe = torch.Generator().manual_seed(123)
    proj = torch.randn(out.y.shape, generator=probe, dtype=out.y.dtype).to(out.y.device)
    ((out.y * proj).sum() + out.aux_loss).backward()
    # A parameter that got no rows has no grad on one path and a zero grad on another.
    grads = {
        name: p.grad if p.grad is not None else torch.zeros_like(p) for name, p in layer.named_parameters()
    }
    grads["input"] = x.grad
    return out, grads


def assert_close_dicts(a: dict, b: dict, **tol):
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], msg=lambda m, n=name: f"{n}: {m}", **tol)
