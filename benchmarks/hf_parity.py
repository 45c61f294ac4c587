"""Numerical parity of moekit's conversions of transformers MoE models.

For each family, a tiny random model built from a local config (no download):
the largest absolute difference between the transformers block and its moekit
conversion on random inputs, and between the whole model's logits before and
after ``convert_model``. fp32, CPU.

    python benchmarks/hf_parity.py
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tests.interop.test_hf import FAMILIES, _blocks, _model, _switch_model  # noqa: E402

from moekit.interop.hf import convert_model, from_hf_block  # noqa: E402


def main() -> None:
    torch.set_num_threads(1)
    print(f"{'family':20s} {'block max |Δ|':>14s} {'model logits max |Δ|':>21s}")
    for family in [*FAMILIES, "switch_transformers"]:
        model = _switch_model() if family == "switch_transformers" else _model(family)
        blocks = [m for m in model.modules() if type(m).__name__ == "SwitchTransformersSparseMLP"] \
            if family == "switch_transformers" else _blocks(model)
        torch.manual_seed(1)
        block_error = 0.0
        for block in blocks:
            x = torch.randn(3, 8, block_width(block))
            moe = from_hf_block(block, model.config).eval()
            block_error = max(block_error, (moe(x).y - block(x)).abs().max().item())
        ids = torch.randint(0, 101, (2, 9))
        kwargs = {"decoder_input_ids": torch.randint(0, 101, (2, 5))} if family == "switch_transformers" else {}
        with torch.no_grad():
            reference = model(ids, **kwargs).logits
            convert_model(model)
            model_error = (model(ids, **kwargs).logits - reference).abs().max().item()
        print(f"{family:20s} {block_error:14.2e} {model_error:21.2e}")


def block_width(block) -> int:
    return next(block.parameters()).shape[-1]


if __name__ == "__main__":
    main()
