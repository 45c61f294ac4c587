"""An older source tree's MoE layer against this checkout's, in one process, on the same weights.

    git worktree add /tmp/moekit-old <commit>
    python benchmarks/ab_layer.py --old /tmp/moekit-old/src [--threads 1] [--runs 4]
        [--shape 512,1024,8,2] [--decode 1,4,16] [--no-train]

Separate processes place a layer's tensors differently, which at decode sizes
(12 MB of expert weights read per token) moves a step's time by tens of
percent from one process to the next. Here both versions run in one process
on the very same parameter tensors: the old package is imported under the name
``moekit_old``, and the two layers alternate which goes first in every round.
It prints, per case, the median time of each and new ÷ old, for ``--runs``
fresh processes (the spread across processes is the noise that remains).

Shapes: T tokens, D = 512, F = 1024, E = 8, K = 2 (the standard shape: T = 4096), or
``--shape D,F,E,K``; decode cases at the ``--decode`` token counts, and forward +
backward at T = 256 and 4096 unless ``--no-train``.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

TRAIN_CASES = [("fwd+bwd", 256), ("fwd+bwd", 4096)]


def measure(old_root: str, threads: int, shape: list[int], cases: list[tuple[str, int]]) -> dict:
    """In a fresh process: both layers on shared weights, alternating rounds."""
    import torch

    sys.path.insert(0, old_root)
    import moekit_old

    import moekit

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    fields = dict(zip(("d_model", "d_ff", "num_experts", "top_k"), shape, strict=True))
    new = moekit.MoE(moekit.MoEConfig(**fields))
    old = moekit_old.MoE(moekit_old.MoEConfig(**fields))
    old.router.weight = new.router.weight
    old.experts.w_in, old.experts.w_out = new.experts.w_in, new.experts.w_out
    results = {}
    for mode, T in cases:
        x = torch.randn(T, fields["d_model"], requires_grad=mode != "decode")
        layers = {"old": old.train(mode != "decode"), "new": new.train(mode != "decode")}

        def step(layer, x=x, mode=mode):
            if mode == "decode":
                with torch.no_grad():
                    layer(x)
            else:
                out = layer(x)
                (out.y.sum() + out.aux_loss).backward()

        calls = 40 if mode == "decode" else 4 if T < 1024 else 1
        for layer in layers.values():
            for _ in range(2 if T >= 1024 else 5):
                step(layer)
        times = {name: [] for name in layers}
        for round_ in range(10 if T >= 1024 else 26):
            for name in (("old", "new") if round_ % 2 else ("new", "old")):
                start = time.perf_counter()
                for _ in range(calls):
                    step(layers[name])
                times[name].append((time.perf_counter() - start) / calls)
        results[f"{mode} T={T}"] = {name: statistics.median(ts) * 1e6 for name, ts in times.items()}
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--old", type=Path, help="the old checkout's src folder")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--runs", type=int, default=4, help="fresh processes (default: %(default)s)")
    parser.add_argument("--shape", default="512,1024,8,2", help="D,F,E,K (default: %(default)s)")
    parser.add_argument("--decode", default="1,4,16", help="decode token counts (default: %(default)s)")
    parser.add_argument("--no-train", action="store_true", help="leave out the forward + backward cases")
    parser.add_argument("--measure", help=argparse.SUPPRESS)  # the child: the folder holding moekit_old
    args = parser.parse_args()
    shape = [int(v) for v in args.shape.split(",")]
    cases = [("decode", int(T)) for T in args.decode.split(",") if T] + ([] if args.no_train else TRAIN_CASES)
    if args.measure:
        print(json.dumps(measure(args.measure, args.threads, shape, cases)))
        return
    if args.old is None:
        parser.error("--old (the old checkout's src folder) is needed")
    with tempfile.TemporaryDirectory() as tmp:
        package = Path(tmp) / "moekit_old"
        shutil.copytree(args.old / "moekit", package)
        for path in package.rglob("*.py"):  # absolute self-imports, if any, to the new name
            path.write_text(path.read_text().replace("from moekit.", "from moekit_old.")
                            .replace("from moekit import", "from moekit_old import"))
        runs = []
        for _ in range(args.runs):
            out = subprocess.run([sys.executable, __file__, "--measure", tmp, "--threads", str(args.threads),
                                  "--shape", args.shape, "--decode", args.decode]
                                 + (["--no-train"] if args.no_train else []),
                                 capture_output=True, text=True, check=True).stdout
            runs.append(json.loads(out.strip().splitlines()[-1]))
    print(f"{'case':14s} {'old µs (median of runs)':>24s} {'new µs':>10s}  new ÷ old per run")
    for case in runs[0]:
        ratios = [r[case]["new"] / r[case]["old"] for r in runs]
        old = statistics.median(r[case]["old"] for r in runs)
        new = statistics.median(r[case]["new"] for r in runs)
        print(f"{case:14s} {old:24.1f} {new:10.1f}  {' '.join(f'{q:.3f}' for q in ratios)}")


if __name__ == "__main__":
    main()
