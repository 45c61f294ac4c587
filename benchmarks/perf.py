"""The performance suite: standard and fine-grained shapes (uniform and skewed
routing, forward and forward+backward), decode bandwidth, activation memory,
each against the dense ideal and transformers' blocks. Prints tables and writes
JSON; the same as ``moekit bench``.

    python benchmarks/perf.py                       # CPU fp32
    python benchmarks/perf.py --dtype bfloat16 --repeats 5
"""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict
from pathlib import Path

import torch

from moekit.bench import (
    default_cases,
    format_case,
    format_decode,
    machine_info,
    run_case,
    run_decode,
)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dtype", action="append", choices=["float32", "bfloat16"])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--only", default="", help="comma-separated substrings of case names to run")
    parser.add_argument("--no-decode", action="store_true")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--json", type=Path, default=Path("bench-results/perf.json"))
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    cases = default_cases(tuple(args.dtype or ["float32"]))
    if args.only:
        cases = [c for c in cases if any(s in c.name for s in args.only.split(","))]
    output = {"machine": machine_info(), "cases": [], "decode": []}
    print(output["machine"])
    for case in cases:
        result = run_case(case, repeats=args.repeats)
        print(format_case(result), flush=True)
        output["cases"].append(asdict(result))
    if not args.no_decode:
        output["decode"] = run_decode(repeats=args.repeats)
        print(format_decode(output["decode"]))
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(output, indent=2))
    return output


if __name__ == "__main__":
    main()
