"""``moekit plan``: the cost model's best layouts for a model on 8 to 4096 devices."""

from __future__ import annotations

import json
from pathlib import Path

from .common import CLIError


def model_from_run(run_dir: str):
    """The shapes of a moekit run's language model, for the cost model."""
    from ..models.lm import LMConfig
    from ..parallel.planner import ModelShape
    from ..train import read_run_config

    config, _, _ = read_run_config(Path(run_dir))
    if not isinstance(config, LMConfig) or config.moe is None:
        raise CLIError(f"{run_dir!r} is not a moekit MoE language model run")
    moe = config.moe
    return ModelShape(Path(run_dir).name, n_layer=config.n_layer, d_model=config.d_model, n_head=config.n_head,
                      head_dim=config.d_model // config.n_head, vocab=config.vocab_size, seq=config.context_length,
                      num_experts=moe.num_experts, top_k=moe.top_k, expert_d_ff=moe.d_ff,
                      glu=moe.expert in ("swiglu", "geglu"), moe_every=config.moe_every, dense_d_ff=config.d_ff,
                      shared_experts=moe.num_shared_experts, shared_d_ff=moe.shared_d_ff or 0, tied_embeddings=True)


def cmd_plan(args) -> int:
    from ..parallel.planner import HARDWARE, MODELS, PRECISIONS, format_plan, plan, powers_of_two

    model = model_from_run(args.run) if args.run else MODELS[args.model]
    low, high = args.devices
    if low < 1 or high < low:
        raise CLIError(f"--devices {low} {high}: expected 1 <= LOW <= HIGH")
    tokens = args.tokens_per_device or model.seq
    result = plan(model, HARDWARE[args.hardware], powers_of_two(low, high), tokens,
                  grad_accumulation=args.grad_accumulation, zipf=args.zipf, precision=PRECISIONS[args.precision])
    if args.json:
        print(json.dumps({count: [p.to_json() for p in predictions[:args.top]]
                          for count, predictions in result.items()}, indent=1))
        return 0
    counts = model.counts()
    print(f"{model.name}: {counts['dense'] / 1e9:.2f} B non-expert + {counts['experts'] / 1e9:.2f} B expert "
          f"parameters, {counts['active'] / 1e9:.2f} B active; {HARDWARE[args.hardware].name}; {tokens} tokens per "
          f"device and micro-batch × {args.grad_accumulation}; routing Zipf s = {args.zipf}; {args.precision}")
    print(format_plan(result, args.top))
    return 0
