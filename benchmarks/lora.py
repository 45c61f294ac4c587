"""LoRA on experts: step time against the frozen base and against peft, and trainable-state memory.

    python benchmarks/lora.py --threads 2 --repeats 5

At the standard layer shape (T = 4096, D = 512, F = 1024, E = 8, K = 2, SwiGLU, CPU
float32), forward + backward of y·probe with the input requiring a gradient (as inside
a model), for ranks 8, 16 and 64:

- ``frozen``: the layer with every weight frozen (gradients of the input only);
- ``lora``: the same layer with ``add_lora`` (gradients of the input and the adapters),
  on the same compute path;
- ``peft``: transformers' Mixtral block with the same weights and peft's
  ``target_parameters`` LoRA holding the same adapters. The outputs are checked equal
  first (float32, 1e-4).

Memory: trainable state (parameters + gradients + AdamW's two moments) of LoRA against
full fine-tuning of the layer, and the bytes autograd saves for backward (activation
memory) of each variant, counted with ``saved_tensors_hooks``. Medians of interleaved rounds.
"""

from __future__ import annotations

import copy
import statistics

import torch

from moekit import MoE, MoEConfig
from moekit.apps.bench import machine_info, median_times
from moekit.finetune import add_lora
from timing import timing_arguments, write_json

SHAPE = dict(d_model=512, d_ff=1024, num_experts=8, top_k=2)
TOKENS = 4096


def _peft_block(moe: MoE, lora_moe: MoE):
    """transformers' Mixtral block with moe's weights and lora_moe's adapters through peft."""
    import peft
    from transformers import MixtralConfig

    from moekit.finetune.peft import _peft_factors
    from moekit.interop.hf import to_hf_block

    config = MixtralConfig(hidden_size=512, intermediate_size=1024, num_local_experts=8, num_experts_per_tok=2)
    block = to_hf_block(moe, config, "MixtralSparseMoeBlock")

    class Holder(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.mlp = block

        def forward(self, x):
            out = self.mlp(x)
            return out[0] if isinstance(out, tuple) else out

    lora = lora_moe.experts
    model = peft.get_peft_model(Holder(), peft.LoraConfig(
        r=lora.rank, lora_alpha=lora.alpha, target_modules=[],
        target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]))
    with torch.no_grad():
        wrappers = {m.parameter_name: m for m in model.modules() if type(m).__name__ == "ParamWrapper"}
        for projection, weight in (("in", "gate_up_proj"), ("out", "down_proj")):
            A, B = _peft_factors(getattr(lora, f"lora_A_{projection}"), getattr(lora, f"lora_B_{projection}"))
            wrappers[weight].lora_A["default"].weight.copy_(A)
            wrappers[weight].lora_B["default"].weight.copy_(B)
    return model


def _saved_bytes(fn) -> int:
    total = 0

    def pack(t):
        nonlocal total
        total += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn(backward=False)
    return total


def measure(repeats: int, ranks=(8, 16, 64)) -> dict:
    torch.manual_seed(0)
    base = MoE(MoEConfig(**SHAPE))
    x = torch.randn(TOKENS, 512)
    probe = torch.randn(TOKENS, 512)
    frozen = copy.deepcopy(base).requires_grad_(False)
    path = frozen.compute_path(x).name
    rows = []
    for rank in ranks:
        lora = add_lora(copy.deepcopy(base), rank=rank, alpha=2 * rank)
        with torch.no_grad():
            lora.experts.lora_B_in.normal_(std=0.02)
            lora.experts.lora_B_out.normal_(std=0.02)
        peft_model = _peft_block(base, lora)
        with torch.no_grad():
            difference = (peft_model(x.view(1, TOKENS, 512)).view(TOKENS, 512) - lora(x).y).abs().max().item()
        if difference > 1e-4:
            raise SystemExit(f"peft and moekit disagree by {difference:g} at rank {rank}")

        def step(model, hf=False, backward=True):
            xi = x.detach().requires_grad_(True)
            y = model(xi.view(1, TOKENS, 512)).view(TOKENS, 512) if hf else model(xi).y
            if backward:
                (y * probe).sum().backward()
            for p in model.parameters():
                p.grad = None

        fns = {"frozen": lambda: step(frozen), "lora": lambda m=lora: step(m),
               "peft": lambda m=peft_model: step(m, True)}
        times = {name: statistics.median(t) for name, t in median_times(fns, repeats).items()}
        adapters = sum(p.numel() for p in lora.parameters() if p.requires_grad)
        full = sum(p.numel() for p in base.parameters())
        # parameters + gradients + AdamW's two moments, float32
        state = {"lora_mib": 4 * adapters * 4 / 2**20, "full_mib": 4 * full * 4 / 2**20}
        rows.append({
            "rank": rank, "path": path, "max_abs_difference_vs_peft": difference,
            "frozen_ms": times["frozen"] * 1e3, "lora_ms": times["lora"] * 1e3, "peft_ms": times["peft"] * 1e3,
            "lora_over_frozen": times["lora"] / times["frozen"], "peft_over_lora": times["peft"] / times["lora"],
            "trainable_parameters": adapters, "full_parameters": full, **state,
            "state_ratio": state["lora_mib"] / state["full_mib"],
            "saved_mib": {name: _saved_bytes(lambda backward, m=m, hf=hf: step(m, hf, backward)) / 2**20
                          for name, m, hf in (("frozen", frozen, False), ("lora", lora, False),
                                              ("peft", peft_model, True))},
        })
    return {"machine": machine_info(), "tokens": TOKENS, "shape": SHAPE, "repeats": repeats, "rows": rows}


def main() -> None:
    args = timing_arguments(__doc__, repeats=5, more=lambda parser: parser.add_argument(
        "--ranks", type=int, nargs="+", default=[8, 16, 64]))
    result = measure(args.repeats, tuple(args.ranks))
    print(f"{'rank':>4} {'path':>10} {'frozen ms':>10} {'lora ms':>9} {'peft ms':>9} {'lora/frozen':>11} "
          f"{'peft/lora':>9} {'state %':>8}  saved MiB frozen/lora/peft")
    for r in result["rows"]:
        saved = r["saved_mib"]
        print(f"{r['rank']:>4} {r['path']:>10} {r['frozen_ms']:>10.1f} {r['lora_ms']:>9.1f} {r['peft_ms']:>9.1f} "
              f"{r['lora_over_frozen']:>11.3f} {r['peft_over_lora']:>9.2f} {100 * r['state_ratio']:>7.2f}%  "
              f"{saved['frozen']:.0f}/{saved['lora']:.0f}/{saved['peft']:.0f}")
    write_json(args.json, result)


if __name__ == "__main__":
    main()
