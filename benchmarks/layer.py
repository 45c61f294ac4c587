"""How fast is one MoE layer against the ideal and against its peers?

Side by side in one process, on the same inputs and the same routing: moekit's
compute paths, a dense SwiGLU with the same active FLOPs (hidden K·F on the
same T tokens: the ideal), and Hugging Face transformers' MixtralSparseMoeBlock
holding the same weights (eager and grouped_mm experts). Efficiency
η = t_dense / t_moe. Prints a table and writes JSON.

    python benchmarks/layer.py                      # the standard shape, fwd+bwd
    python benchmarks/layer.py --mode fwd --repeats 9
"""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict
from pathlib import Path

import torch

from moekit.apps.bench import Case, format_case, machine_info, run_case


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--d-model", type=int, default=512)
    parser.add_argument("--d-ff", type=int, default=1024)
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--top-k", type=int, default=2)
    parser.add_argument("--mode", choices=["fwd", "fwdbwd"], default="fwdbwd")
    parser.add_argument("--routing", choices=["router", "uniform", "skewed"], default="router")
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--paths", default="fused,grouped_mm,segment,loop")
    parser.add_argument("--peers", default="mixtral:eager,mixtral:grouped_mm",
                        help="transformers blocks as FAMILY:IMPLEMENTATION, comma-separated, or ''")
    parser.add_argument("--threads", type=int, default=None, help="intra-op threads (default: torch's)")
    parser.add_argument("--json", type=Path, default=Path("bench-results/layer.json"))
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    case = Case(name="layer", tokens=args.tokens, d_model=args.d_model, d_ff=args.d_ff, num_experts=args.experts,
                top_k=args.top_k, mode=args.mode, routing=args.routing, dtype=args.dtype,
                paths=tuple(p for p in args.paths.split(",") if p),
                peers=tuple(p for p in args.peers.split(",") if p))
    result = run_case(case, repeats=args.repeats)
    print(format_case(result))
    output = {"machine": machine_info(), **asdict(result)}
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(output, indent=2))
    return output


if __name__ == "__main__":
    main()
