"""The inference commands: ``moekit quantize`` and ``moekit cache-sim``, and what
``eval``/``generate`` need for ``--max-memory`` and ``--trace``."""

from __future__ import annotations

import contextlib
import json
import shutil
import sys
from pathlib import Path

from .common import QUANTIZATION_FILE, CLIError, load_model


def offload_result(offloaded) -> dict:
    """The expert caches' figures for a command's output (and the process's peak memory)."""
    stats = offloaded.stats()
    peak_mib = peak_rss_bytes() / 2**20
    return {"cache_hit_rate": stats["hit_rate"], "cache_misses": stats["misses"], "prefetches": stats["prefetches"],
            "peak_rss_mib": round(peak_mib, 1)}


def peak_rss_bytes() -> int:
    """This process's peak resident memory (Linux's VmHWM; getrusage's maxrss would carry
    the peak of a parent that started this process). 0 where /proc is missing."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError):
        pass
    return 0


def routing_recorder(model, path: str | None):
    """``record_routing(model)`` when a trace file is asked for, else a context giving None."""
    if path is None:
        return contextlib.nullcontext()
    from ..inference import record_routing

    return record_routing(model)


def cmd_quantize(args) -> int:
    """Write RUN's model with int8 or int4 experts as a new run folder, and report which
    experts an evaluation pass reaches."""
    import torch
    from safetensors.torch import save_model

    from ..data import load_corpus, validation_batches
    from ..data.dataset import encode_documents
    from ..inference import expert_coverage, quantize_model
    from ..train import evaluate, read_run_config
    from ..train.checkpoint import atomic_write, atomic_write_text, write_checksums

    run = Path(args.run_dir)
    out = Path(args.out or f"{str(run).rstrip('/')}-int{args.bits}")
    if (out / "config.json").exists():
        raise CLIError(f"{str(out)!r} already holds a run; choose another --out")
    model, tokenizer, _, state = load_model(args.run_dir)
    if (run / QUANTIZATION_FILE).exists():
        raise CLIError(f"{args.run_dir!r} is already quantized")
    if model.config.moe is None:
        raise CLIError(f"{args.run_dir!r} is a dense model: it has no experts to quantize")
    _, _, data_info = read_run_config(run)
    corpus = load_corpus(data_info["data"], data_info["val_fraction"])
    val_N = encode_documents(tokenizer, [d.text for d in corpus.val])
    batches = validation_batches(val_N, args.batch_size, model.config.context_length, args.batches)
    float_loss = evaluate(model, batches, "cpu")
    float_bytes = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    options = {"bits": args.bits, "group_size": args.group_size}
    with torch.no_grad():
        quantize_model(model, **options)
    coverage = expert_coverage(model, batches)
    quantized_loss = evaluate(model, batches, "cpu")
    quantized_bytes = sum(t.numel() * t.element_size() for t in model.state_dict().values())

    out.mkdir(parents=True, exist_ok=True)
    for name in ("config.json", "tokenizer.json"):
        shutil.copy2(run / name, out / name)
    folder = out / "checkpoints" / f"step-{state['step']:06d}"
    folder.mkdir(parents=True, exist_ok=True)
    atomic_write(folder / "model.safetensors", lambda tmp: save_model(model, str(tmp)))
    atomic_write_text(folder / "trainer_state.json", json.dumps({"step": state["step"], "quantized_from": str(run)}))
    write_checksums(folder, ("model.safetensors", "trainer_state.json"))
    atomic_write_text(out / QUANTIZATION_FILE, json.dumps(options))
    report = {"run": str(out), "from": str(run), **options, "val_loss_float": float_loss,
              "val_loss_quantized": quantized_loss, "loss_change": quantized_loss / float_loss - 1,
              "model_mib_float": float_bytes / 2**20, "model_mib_quantized": quantized_bytes / 2**20,
              "coverage": coverage.to_dict()}
    atomic_write_text(out / "coverage.json", json.dumps(report, indent=1))
    atomic_write_text(out / "checkpoints" / "latest.json", json.dumps({"step": state["step"], "folder": folder.name}))
    print(coverage.format(), file=sys.stderr)
    print(f"int{args.bits} experts: validation loss {float_loss:.4f} → {quantized_loss:.4f} "
          f"({100 * report['loss_change']:+.2f} %), model {report['model_mib_float']:.1f} → "
          f"{report['model_mib_quantized']:.1f} MiB; written to {out}", file=sys.stderr)
    return 0


def cmd_cache_sim(args) -> int:
    """Hit rates of expert caches on a recorded routing trace, per policy and size."""
    from ..inference import RoutingTrace, hit_rate_table

    trace = RoutingTrace.load(args.trace)
    most = max(trace.num_experts.values())
    sizes = args.sizes or list(range(1, most + 1))
    rows = hit_rate_table(trace, sizes)
    uses = sum(len(trace.uses(layer)) for layer in trace.accesses)
    print(f"{uses} expert uses over {len(trace.accesses)} MoE layers ({most} experts each at most)")
    print(f"{'experts cached per layer':>25s} {'lru':>7s} {'lfu':>7s} {'optimal':>8s}")
    for row in rows:
        print(f"{row['capacity']:>25d} {row['lru']:7.3f} {row['lfu']:7.3f} {row['optimal']:8.3f}")
    return 0
