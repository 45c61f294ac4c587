"""Which dtype a computation runs in, under autocast or not: one helper for every floor.

- ``autocast_dtype``: the dtype autocast casts matrix multiplies to on a device, or None.
- ``compute_dtype``: the dtype x's matrix multiplies will run in (autocast's, else x's).
- ``gate_dtype``: routers compute gates in float32 whatever the input ("selective
  precision", Switch Transformer); float64 inputs stay float64 for exact tests.
- ``autocast_operands``: tensors cast to autocast's dtype, for hand-written ops that call
  matrix multiplies with ``out=``, which autocast does not cast.
- ``without_autocast``: autocast off inside, entered only when it is on (entering costs
  about 15 µs, 5 % of a small decoding step).
"""

from __future__ import annotations

import contextlib

import torch
from torch import Tensor


def autocast_dtype(device_type: str) -> torch.dtype | None:
    if device_type != "meta" and torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return None


def compute_dtype(x: Tensor) -> torch.dtype:
    return autocast_dtype(x.device.type) or x.dtype


def gate_dtype(x: Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def autocast_operands(device_type: str, *tensors: Tensor | None) -> tuple[Tensor | None, ...]:
    cast = autocast_dtype(device_type)
    if cast is None:
        return tensors
    return tuple(None if t is None else t.to(cast) for t in tensors)


def without_autocast(device_type: str):
    if autocast_dtype(device_type) is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device_type, enabled=False)
