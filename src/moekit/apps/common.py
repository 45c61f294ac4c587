"""What the ``moekit`` commands share: settings from arguments, run folders, user errors."""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import time
from pathlib import Path


class CLIError(Exception):
    """A user mistake, reported as one line without a traceback."""


TRAIN_DEFAULTS = {"layers": 4, "d_model": 128, "heads": 4, "context_length": 128, "d_ff": 512, "experts": 8,
                  "top_k": 2, "steps": 300, "batch_size": 16, "lr": 3e-3, "eval_every": 50}


# Small enough that both models train in a few minutes on two CPU cores, long enough
# for the MoE model to pull ahead (see docs/lm.md for the measurements).
DEMO_DEFAULTS = dict(TRAIN_DEFAULTS, d_model=64, d_ff=256, steps=800, lr=5e-3, eval_every=40)
DEMO_VOCAB_SIZE = 2048
# A run written by ``moekit quantize`` records how its experts were quantized here.
QUANTIZATION_FILE = "quantization.json"


def default_threads(window_s: float = 0.1) -> int:
    """Intra-op threads for this process: the cores it may run on, less those other processes
    keep busy now (idle time over ``window_s`` from /proc/stat; the load average where that
    is missing). On a shared machine more threads than free cores make every step wait for
    the slowest thread (BENCHMARKS.md, "Threads")."""
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cores = os.cpu_count() or 1
    idle_share = _idle_share(window_s)
    if idle_share is not None:
        free = round(idle_share * (os.cpu_count() or cores))
    else:
        try:
            free = cores - round(os.getloadavg()[0])
        except (AttributeError, OSError):
            free = cores
    return max(1, min(cores, free))


def _idle_share(window_s: float) -> float | None:
    """The share of all CPUs' time spent idle over the next ``window_s`` seconds (Linux)."""
    def sample():
        fields = [int(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
        return fields[3] + fields[4], sum(fields)  # idle + iowait, total

    try:
        idle0, total0 = sample()
        time.sleep(window_s)
        idle1, total1 = sample()
    except (OSError, ValueError, IndexError):
        return None
    return (idle1 - idle0) / (total1 - total0) if total1 > total0 else None


def stored_threads(run_dir: str | Path | None) -> int | None:
    """The thread count a run recorded in its config.json (``runtime.threads``), if any."""
    if run_dir is None:
        return None
    try:
        value = json.loads((Path(run_dir) / "config.json").read_text()).get("runtime", {}).get("threads")
    except (OSError, ValueError, AttributeError):
        return None
    return value if isinstance(value, int) and value > 0 else None


def record_threads(run_dir: str | Path, threads: int) -> None:
    """Write ``runtime.threads`` into a run's config.json (what resume and eval reuse)."""
    from ..train.checkpoint import atomic_write_text

    path = Path(run_dir) / "config.json"
    config = json.loads(path.read_text())
    if config.get("runtime", {}).get("threads") != threads:
        config["runtime"] = dict(config.get("runtime", {}), threads=threads)
        atomic_write_text(path, json.dumps(config, indent=2))


def configs_from_args(args, vocab_size: int, *, moe: bool | None = None):
    from ..config import MoEConfig
    from ..models.lm import LMConfig
    from ..routing import router_class
    from ..train import TrainConfig

    use_moe = args.experts > 0 if moe is None else moe
    moe_config = None
    if use_moe:
        if args.experts < 1:
            raise CLIError(f"--experts ({args.experts}) must be >= 1 for an MoE model (0 gives a dense model)")
        expert_d_ff = args.expert_d_ff or max(args.d_ff // args.top_k, 1)
        router = router_class(args.router)
        extra = {}
        if "vocab_size" in {f.name for f in dataclasses.fields(router.Options)}:
            # A router that maps token ids (hash) covers the tokenizer's vocabulary.
            extra["router_options"] = router.Options(vocab_size=vocab_size)
        moe_config = MoEConfig(
            d_model=args.d_model, d_ff=expert_d_ff, num_experts=args.experts,
            top_k=None if router.top_k_fixed else args.top_k, router=args.router,
            capacity_factor=args.capacity_factor, load_balance_coef=args.load_balance_coef,
            z_loss_coef=args.z_loss_coef, num_shared_experts=getattr(args, "shared_experts", 0),
            shared_d_ff=getattr(args, "shared_d_ff", None), **extra,
        )
    model_config = LMConfig(
        vocab_size=vocab_size, context_length=args.context_length, n_layer=args.layers, n_head=args.heads,
        d_model=args.d_model, d_ff=args.d_ff, moe=moe_config, moe_every=args.moe_every,
        router_init_std=args.router_init_std,
    )
    train_config = TrainConfig(
        steps=args.steps, batch_size=args.batch_size, lr=args.lr,
        min_lr=args.lr / 10 if args.min_lr is None else args.min_lr,
        warmup_steps=max(args.steps // 10, 0) if args.warmup_steps is None else args.warmup_steps,
        weight_decay=args.weight_decay, grad_clip=args.grad_clip, seed=args.seed, eval_every=args.eval_every,
        eval_batches=args.eval_batches, log_every=min(args.log_every, args.steps),
        checkpoint_every=args.checkpoint_every, bf16=args.bf16, device=args.device,
        stage=getattr(args, "stage", "full"), grad_accumulation=getattr(args, "grad_accumulation", 1),
    )
    return model_config, train_config


def data_config_from_args(args):
    from ..train import DataConfig

    if not 0 < args.val_fraction < 1:
        raise CLIError(f"--val-fraction ({args.val_fraction}) must be between 0 and 1")
    return DataConfig(data=args.data, tokenizer=args.tokenizer, vocab_size=args.vocab_size, val_fraction=args.val_fraction)


def check_router(name: str) -> None:
    """A router a language model can train with: known, and causal."""
    from ..models.lm import causal_routers, router_is_causal
    from ..routing import ROUTERS

    causal = ", ".join(causal_routers())
    if name not in ROUTERS:
        raise CLIError(f"--router {name!r} is not a known router; choose one of {causal}")
    if not router_is_causal(name):
        raise CLIError(f"--router {name!r} is not causal (it routes a token using later tokens), so it cannot "
                       f"train a language model; choose one of {causal}")


def new_run_folder(out: str | None) -> Path:
    # A run started from another one never replaces a folder: nothing trained is lost.
    folder = Path(out or f"runs/{time.strftime('%Y%m%d-%H%M%S')}")
    if (folder / "config.json").exists():
        raise CLIError(f"{str(folder)!r} already holds a run; choose another --out")
    return folder


def load_model(run_dir: str):
    from ..data import load_tokenizer
    from ..models.lm import LanguageModel, LMConfig
    from ..train import latest_checkpoint, load_checkpoint, read_run_config

    model_config, train_config, data_info = read_run_config(Path(run_dir))
    if not isinstance(model_config, LMConfig):
        raise CLIError(f"{run_dir!r} fine-tunes the Hugging Face model in {model_config.folder!r}; use its adapter "
                       f"({run_dir}/adapter, peft's format) or its merged folder with transformers")
    folder = latest_checkpoint(Path(run_dir))
    if folder is None:
        raise CLIError(f"{run_dir!r} has no checkpoint yet; train it first (moekit train --out {run_dir})")
    model = LanguageModel(model_config)
    quantization = Path(run_dir) / QUANTIZATION_FILE
    if quantization.exists():
        from ..inference import quantize_model

        quantize_model(model, **json.loads(quantization.read_text()))
    state = load_checkpoint(folder, model)
    model.eval()
    return model, load_tokenizer(Path(run_dir) / "tokenizer.json"), train_config, state


def load_model_for_inference(args):
    """``load_model``, or with ``--max-memory`` the run's model with its experts offloaded to
    its checkpoint file. Returns (model, tokenizer, trainer state, ``Offloaded`` or None)."""
    if getattr(args, "max_memory", None) is None:
        model, tokenizer, _, state = load_model(args.run_dir)
        return model, tokenizer, state, None
    from ..inference import load_offloaded_run

    if (Path(args.run_dir) / QUANTIZATION_FILE).exists():
        raise CLIError(f"{args.run_dir!r} holds quantized experts; --max-memory offloads float experts only")
    model, tokenizer, state, offloaded, plan = load_offloaded_run(
        args.run_dir, args.max_memory, policy=args.cache_policy, prefetch=args.prefetch)
    print(plan.describe(), file=sys.stderr)
    return model, tokenizer, state, offloaded

