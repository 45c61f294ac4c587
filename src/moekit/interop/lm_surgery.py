"""Expert surgery on the language model: upcycle, grow and prune every MoE block.

Each function takes a ``LanguageModel`` and returns a new one (the input is not
modified) whose config says what it now is, so the result can be saved into a
run folder and trained on with the ordinary trainer. The layer-level work is
``moekit.interop.surgery``; this module finds the blocks, captures the
inputs their routers see, and rebuilds the model around the new layers.

Shapes: B batch, S sequence length, N rows, D model dim, E experts.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import Tensor

from ..config import MoEConfig
from ..layer import MoE
from ..models.lm import LanguageModel, LMConfig
from .surgery import grow, keep_experts, measure_load, merge_most_similar, prune_least_used, upcycle


@torch.no_grad()
def capture_moe_inputs(model: LanguageModel, batches, max_rows: int | None = None) -> dict[int, Tensor]:
    """The inputs (N, D) each MoE block's layer sees on ``batches`` of (x_BS, y_BS), by block index
    (the first ``max_rows`` of them; None keeps all, so that ``grow`` is exact on every batch)."""
    captured: dict[int, list[Tensor]] = {i: [] for i in model.moe_layers}
    handles = [
        model.blocks[i].ffn.register_forward_pre_hook(
            lambda module, args, kwargs, i=i: captured[i].append(args[0].reshape(-1, args[0].shape[-1]).cpu()),
            with_kwargs=True,
        )
        for i in model.moe_layers
    ]
    was_training = model.training
    model.eval()
    try:
        for x_BS, _ in batches:
            model(x_BS)
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    return {i: torch.cat(rows)[:max_rows] for i, rows in captured.items()}


def _rebuild(model: LanguageModel, config: LMConfig, new_ffns: dict[int, MoE]) -> LanguageModel:
    """A LanguageModel with ``config``: ``model``'s weights, and ``new_ffns`` in those blocks."""
    new_model = LanguageModel(config)
    state = {name: value for name, value in model.state_dict().items()
             if not any(name.startswith(f"blocks.{i}.ffn.") for i in new_ffns)}
    for i, ffn in new_ffns.items():
        state.update({f"blocks.{i}.ffn.{name}": value for name, value in ffn.state_dict().items()})
    new_model.load_state_dict(state, strict=True)
    return new_model.to(next(model.parameters()).device)


def _same_for_every_block(configs: list[MoEConfig]) -> MoEConfig:
    # LMConfig has one MoE config for all blocks: the surgery must treat them alike.
    first = configs[0]
    for other in configs[1:]:
        if other != first:
            raise ValueError(f"the MoE blocks ended up with different configs ({first} vs {other})")
    return first


@torch.no_grad()
def upcycle_lm(model: LanguageModel, num_experts: int, top_k: int = 2, *, seed: int = 0, perturb: float = 0.0,
               **moe_fields) -> LanguageModel:
    """A copy of a dense model whose every FFN is an MoE of ``num_experts`` copies of it.

    The router rows are drawn with the model's ``router_init_std``; with
    identical experts and renormalised top-k weights the output equals the
    dense model's whatever the router says (up to float rounding).
    """
    if model.config.moe is not None:
        raise ValueError(f"upcycling needs a dense model; this one already has {model.config.moe.num_experts} experts")
    if num_experts < 2:
        raise ValueError(f"num_experts ({num_experts}) must be >= 2 to upcycle")
    if not 1 <= top_k <= num_experts:
        raise ValueError(f"top_k ({top_k}) must be in [1, num_experts ({num_experts})]")
    new_ffns = {}
    generator = torch.Generator().manual_seed(seed)
    for i, block in enumerate(model.blocks):
        moe = upcycle(block.ffn, num_experts, top_k, perturb=perturb, seed=seed + i, **moe_fields)
        moe.router.weight.copy_(torch.randn(moe.router.weight.shape, generator=generator)
                                * model.config.router_init_std)
        moe.name = f"block {i} MoE"
        new_ffns[i] = moe
    moe_config = _same_for_every_block([m.config for m in new_ffns.values()])
    config = dataclasses.replace(model.config, moe=moe_config, moe_every=1)
    return _rebuild(model, config, new_ffns)


@torch.no_grad()
def grow_lm(model: LanguageModel, num_new: int, inputs: dict[int, Tensor], *, margin: float = 1.0,
            seed: int = 0) -> LanguageModel:
    """Add ``num_new`` experts to every MoE block (see ``surgery.grow``); ``inputs`` from ``capture_moe_inputs``."""
    if model.config.moe is None:
        raise ValueError("grow needs an MoE model; this one is dense (upcycle it first)")
    new_ffns = {i: grow(model.blocks[i].ffn, num_new, inputs[i], margin=margin, seed=seed + i)
                for i in model.moe_layers}
    config = dataclasses.replace(model.config, moe=_same_for_every_block([m.config for m in new_ffns.values()]))
    return _rebuild(model, config, new_ffns)


@torch.no_grad()
def prune_lm(model: LanguageModel, num_remove: int, inputs: dict[int, Tensor], *, by: str = "load"
             ) -> tuple[LanguageModel, dict[int, list]]:
    """Remove ``num_remove`` experts from every MoE block.

    ``by="load"`` drops the experts that routed the fewest of ``inputs``;
    ``by="similarity"`` merges, ``num_remove`` times, the pair whose outputs on
    ``inputs`` agree most (weights and router rows averaged). Either way the
    router's softmax renormalises over the experts that remain. Returns the
    model and, per block, the removed ids (load) or the merged pairs (similarity).
    """
    if model.config.moe is None:
        raise ValueError("prune needs an MoE model; this one is dense")
    E = model.config.moe.num_experts
    if not 1 <= num_remove < E:
        raise ValueError(f"num_remove ({num_remove}) must be in [1, {E - 1}] for {E} experts")
    if by not in ("load", "similarity"):
        raise ValueError(f"by ({by!r}) must be 'load' or 'similarity'")
    new_ffns, removed = {}, {}
    for i in model.moe_layers:
        layer, x_ND = model.blocks[i].ffn, inputs[i]
        if by == "load":
            load_E = measure_load(layer, [x_ND])
            new_ffns[i], removed[i] = prune_least_used(layer, load_E, num_remove)
        else:
            removed[i] = []
            for _ in range(num_remove):
                layer, pair = merge_most_similar(layer, x_ND)
                removed[i].append(pair)
            new_ffns[i] = layer
    config = dataclasses.replace(model.config, moe=_same_for_every_block([m.config for m in new_ffns.values()]))
    return _rebuild(model, config, new_ffns), removed


__all__ = ["capture_moe_inputs", "grow_lm", "keep_experts", "prune_lm", "upcycle_lm"]
