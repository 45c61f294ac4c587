"""The ``moekit`` command: train, eval, generate, report and the demo."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

DEMO_OUT = "runs/demo"


class CLIError(Exception):
    """A user mistake, reported as one line without a traceback."""


# --- argument groups shared by train and demo ---------------------------------------


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def _add_model_args(p: argparse.ArgumentParser, defaults: dict) -> None:
    g = p.add_argument_group("model")
    g.add_argument("--layers", type=_positive_int, default=defaults["layers"], help="transformer blocks (default: %(default)s)")
    g.add_argument("--d-model", type=_positive_int, default=defaults["d_model"], help="model width D (default: %(default)s)")
    g.add_argument("--heads", type=_positive_int, default=defaults["heads"], help="attention heads (default: %(default)s)")
    g.add_argument("--context-length", type=_positive_int, default=defaults["context_length"],
                   help="tokens per training sequence (default: %(default)s)")
    g.add_argument("--d-ff", type=_positive_int, default=defaults["d_ff"],
                   help="hidden width of the dense SwiGLU FFN (default: %(default)s)")
    g.add_argument("--experts", type=int, default=defaults["experts"],
                   help="experts per MoE layer; 0 gives a dense model (default: %(default)s)")
    g.add_argument("--top-k", type=_positive_int, default=defaults["top_k"], help="experts per token K (default: %(default)s)")
    g.add_argument("--router", default="topk",
                   help="routing rule; any causal router of moekit.ROUTERS, e.g. topk, noisy_topk, switch, softmax (default: %(default)s)")
    g.add_argument("--expert-d-ff", type=_positive_int, default=None,
                   help="hidden width of each expert (default: d_ff / top_k, so a token uses as many FFN weights as in the dense model)")
    g.add_argument("--moe-every", type=_positive_int, default=1, help="MoE in every n-th block, dense FFN elsewhere (default: %(default)s)")
    g.add_argument("--capacity-factor", type=float, default=None,
                   help="expert capacity factor; assignments over capacity are dropped (default: dropless)")
    g.add_argument("--router-init-std", type=float, default=0.1,
                   help="std of the router weights at init; larger routes more decisively from the start (default: %(default)s)")
    g.add_argument("--load-balance-coef", type=float, default=0.01, help="Switch load-balancing loss weight (default: %(default)s)")
    g.add_argument("--z-loss-coef", type=float, default=0.001, help="router z-loss weight (default: %(default)s)")


def _add_data_args(p: argparse.ArgumentParser, vocab_size: int) -> None:
    g = p.add_argument_group("data")
    g.add_argument("--data", default=None, metavar="PATH",
                   help="a UTF-8 text file, a folder of text files or a glob (default: the Python standard library's source)")
    g.add_argument("--tokenizer", choices=("bpe", "bytes"), default="bpe",
                   help="byte-level BPE trained on the training split, or raw bytes (default: %(default)s)")
    g.add_argument("--vocab-size", type=_positive_int, default=vocab_size, help="BPE vocabulary size (default: %(default)s)")
    g.add_argument("--val-fraction", type=float, default=0.05, help="share of files held out for validation (default: %(default)s)")


def _add_train_args(p: argparse.ArgumentParser, defaults: dict) -> None:
    g = p.add_argument_group("training")
    g.add_argument("--steps", type=_positive_int, default=defaults["steps"], help="optimizer steps (default: %(default)s)")
    g.add_argument("--batch-size", type=_positive_int, default=defaults["batch_size"], help="sequences per step (default: %(default)s)")
    g.add_argument("--lr", type=float, default=defaults["lr"], help="peak learning rate (default: %(default)s)")
    g.add_argument("--min-lr", type=float, default=None, help="final learning rate of the cosine decay (default: lr / 10)")
    g.add_argument("--warmup-steps", type=int, default=None, help="linear warmup steps (default: steps / 10)")
    g.add_argument("--weight-decay", type=float, default=0.1, help="AdamW weight decay (default: %(default)s)")
    g.add_argument("--grad-clip", type=float, default=1.0, help="clip the gradient norm to this; 0 disables (default: %(default)s)")
    g.add_argument("--seed", type=int, default=0, help="random seed for weights, batches and router noise (default: %(default)s)")
    g.add_argument("--eval-every", type=_positive_int, default=defaults["eval_every"],
                   help="steps between validation evaluations (default: %(default)s)")
    g.add_argument("--eval-batches", type=_positive_int, default=8, help="validation batches per evaluation (default: %(default)s)")
    g.add_argument("--log-every", type=_positive_int, default=10, help="steps per metrics.jsonl line (default: %(default)s)")
    g.add_argument("--checkpoint-every", type=_positive_int, default=100, help="steps between checkpoints (default: %(default)s)")
    g.add_argument("--bf16", action="store_true", help="autocast matrix multiplies to bfloat16")
    g.add_argument("--device", default="cpu", help="cpu or cuda (default: %(default)s)")
    g.add_argument("--threads", type=_positive_int, default=None, help="torch CPU threads (default: torch's choice)")


TRAIN_DEFAULTS = {"layers": 4, "d_model": 128, "heads": 4, "context_length": 128, "d_ff": 512, "experts": 8,
                  "top_k": 2, "steps": 300, "batch_size": 16, "lr": 3e-3, "eval_every": 50}


def _configs_from_args(args, vocab_size: int, *, moe: bool | None = None):
    from .config import MoEConfig
    from .models.lm import LMConfig
    from .train import TrainConfig

    use_moe = args.experts > 0 if moe is None else moe
    moe_config = None
    if use_moe:
        if args.experts < 1:
            raise CLIError(f"--experts ({args.experts}) must be >= 1 for an MoE model (0 gives a dense model)")
        expert_d_ff = args.expert_d_ff or max(args.d_ff // args.top_k, 1)
        moe_config = MoEConfig(
            d_model=args.d_model, d_ff=expert_d_ff, num_experts=args.experts,
            top_k=None if args.router in ("softmax", "switch") else args.top_k, router=args.router,
            capacity_factor=args.capacity_factor, load_balance_coef=args.load_balance_coef,
            z_loss_coef=args.z_loss_coef,
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
        stage=getattr(args, "stage", "full"),
    )
    return model_config, train_config


def _data_config(args):
    from .train import DataConfig

    if not 0 < args.val_fraction < 1:
        raise CLIError(f"--val-fraction ({args.val_fraction}) must be between 0 and 1")
    return DataConfig(data=args.data, tokenizer=args.tokenizer, vocab_size=args.vocab_size, val_fraction=args.val_fraction)


def _check_router(name: str) -> None:
    from .models.lm import router_is_causal
    from .routing import ROUTERS

    causal = ", ".join(sorted(n for n in ROUTERS if router_is_causal(n)))
    if not router_is_causal(name):
        raise CLIError(f"--router {name!r} is not causal (it routes a token using later tokens), so it cannot "
                       f"train a language model; choose one of {causal}")
    if name not in ROUTERS:
        raise CLIError(f"--router {name!r} is not a known router; choose one of {causal}")


# --- commands ------------------------------------------------------------------------


def _new_run_folder(out: str | None) -> Path:
    # A run started from another one never replaces a folder: nothing trained is lost.
    folder = Path(out or f"runs/{time.strftime('%Y%m%d-%H%M%S')}")
    if (folder / "config.json").exists():
        raise CLIError(f"{str(folder)!r} already holds a run; choose another --out")
    return folder


def _setup_parallel(args):
    """A ParallelContext when torchrun started several processes or --expert-parallel asks for them."""
    from .train.parallel import setup_parallel

    if args.expert_parallel == 1 and int(os.environ.get("WORLD_SIZE", "1")) == 1:
        return None
    if args.dist_timeout <= 0:
        raise CLIError(f"--dist-timeout ({args.dist_timeout}) must be a positive number of seconds")
    return setup_parallel(args.expert_parallel, args.dist_timeout, args.device)


def cmd_train(args) -> int:
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    parallel = _setup_parallel(args)
    try:
        return _train(args, parallel)
    finally:
        if parallel is not None:
            parallel.close()


def _train(args, parallel) -> int:
    from .train import fork_run, new_run, prepare_data, resume_run

    is_main = parallel is None or parallel.is_main
    if args.resume:
        trainer = resume_run(args.resume, steps=args.steps_override, parallel=parallel)
        if is_main:
            print(f"resuming {args.resume} at step {trainer.step}/{trainer.config.steps}", file=sys.stderr)
    elif args.init_from:
        if parallel is not None:
            raise CLIError("--init-from runs in one process: start the new run with it, then continue it "
                           "under torchrun with --resume")
        out = _new_run_folder(args.out)
        model, tokenizer, _, _ = _load_model(args.init_from)
        _, train_config = _configs_from_args(args, tokenizer.vocab_size, moe=False)
        fork_run(Path(args.init_from), out, model, train_config, **({"data": args.data} if args.data else {}))
        trainer = resume_run(out)
        print(f"run folder {out}: from {args.init_from}, stage {args.stage}", file=sys.stderr)
    else:
        if args.stage == "gate":
            raise CLIError("--stage gate trains the router of trained experts: pass --init-from RUN_DIR "
                           "(the --stage experts run)")
        if args.experts > 0:
            _check_router(args.router)
        data_config = _data_config(args)
        out = Path(args.out or f"runs/{time.strftime('%Y%m%d-%H%M%S')}")
        if (out / "config.json").exists() and not args.overwrite:
            raise CLIError(f"{str(out)!r} already holds a run; continue it with --resume {out}, "
                           "or choose another --out (or --overwrite)")
        prepared = prepare_data(data_config)  # a new tokenizer; new_run saves it in the run folder
        model_config, train_config = _configs_from_args(args, prepared.tokenizer.vocab_size)
        trainer = new_run(out, model_config, train_config, data_config, prepared=prepared, overwrite=args.overwrite,
                          parallel=parallel)
        if is_main:
            print(f"run folder {out}: {trainer.num_parameters / 1e6:.2f} M parameters, "
                  f"{trainer.num_active_parameters / 1e6:.2f} M active per token; "
                  f"{prepared.tokens.train_N.numel():,} training tokens", file=sys.stderr)
    if is_main and parallel is not None:
        print(f"{parallel.world_size} processes: experts sharded over {parallel.ep_size} (expert parallel), "
              f"{parallel.world_size // parallel.ep_size} data-parallel replica(s) of each expert", file=sys.stderr)
    finished = trainer.fit()
    if finished and is_main:
        print(f"done: final validation loss {trainer.last_val_loss:.4f}; report with: moekit report {trainer.run_dir}",
              file=sys.stderr)
    return 0 if finished else 130


def _load_model(run_dir: str):
    from .data import load_tokenizer
    from .models.lm import LanguageModel
    from .train import latest_checkpoint, load_checkpoint, read_run_config

    model_config, train_config, data_info = read_run_config(Path(run_dir))
    folder = latest_checkpoint(Path(run_dir))
    if folder is None:
        raise CLIError(f"{run_dir!r} has no checkpoint yet; train it first (moekit train --out {run_dir})")
    model = LanguageModel(model_config)
    state = load_checkpoint(folder, model)
    model.eval()
    return model, load_tokenizer(Path(run_dir) / "tokenizer.json"), train_config, state


def cmd_eval(args) -> int:
    from .data import load_corpus, validation_batches
    from .data.dataset import encode_documents
    from .train import evaluate, read_run_config

    model, tokenizer, _, state = _load_model(args.run_dir)
    _, _, data_info = read_run_config(Path(args.data_of or args.run_dir))
    corpus = load_corpus(data_info["data"], data_info["val_fraction"])
    val_N = encode_documents(tokenizer, [d.text for d in corpus.val])  # the training split is not needed
    batches = validation_batches(val_N, args.batch_size, model.config.context_length, args.batches)
    loss = evaluate(model, batches, "cpu")
    num_tokens = sum(y.numel() for _, y in batches)
    result = {"run": args.run_dir, "step": state["step"], "val_loss": loss, "tokens": num_tokens}
    if args.data_of:
        result["data_of"] = args.data_of
    print(json.dumps(result))
    return 0


def cmd_generate(args) -> int:
    import torch

    model, tokenizer, _, _ = _load_model(args.run_dir)
    ids = tokenizer.encode(args.prompt)
    if not ids:
        ids = [tokenizer.eot_id]  # an empty prompt starts a new document
    generator = torch.Generator().manual_seed(args.seed)
    sys.stdout.write(args.prompt)
    sys.stdout.flush()
    new_ids: list[int] = []
    printed = ""
    for token in model.generate(torch.tensor([ids]), args.max_new_tokens, temperature=args.temperature,
                                top_k=args.top_k, top_p=args.top_p, generator=generator):
        if int(token) == tokenizer.eot_id and not args.ignore_eot:
            break
        new_ids.append(int(token))
        text = tokenizer.decode(new_ids)
        if not text.endswith("\ufffd"):  # wait for the rest of a multi-byte character
            sys.stdout.write(text[len(printed):])
            sys.stdout.flush()
            printed = text
    sys.stdout.write("\n")
    return 0


def cmd_report(args) -> int:
    from .analysis.report import write_report

    run_dir = Path(args.run_dir)
    demo_file = run_dir / "demo.json"
    if demo_file.exists():
        demo = json.loads(demo_file.read_text())
        runs = {"MoE": run_dir / demo["report_runs"]["MoE"], "dense": run_dir / demo["report_runs"]["dense"]}
        seeds = demo.get("seeds")
        title = "moekit demo: MoE vs dense language model"
    else:
        if not (run_dir / "config.json").exists():
            raise CLIError(f"{args.run_dir!r} is neither a run folder (config.json) nor a demo folder (demo.json)")
        runs = {"MoE" if _is_moe(run_dir) else "dense": run_dir}
        if args.baseline:
            baseline = Path(args.baseline)
            if not (baseline / "config.json").exists():
                raise CLIError(f"--baseline {args.baseline!r} is not a run folder (it has no config.json)")
            label = "dense" if "MoE" in runs and not _is_moe(baseline) else "baseline"
            runs[label] = baseline
        seeds, title = None, f"moekit report: {run_dir.name}"
    out = Path(args.out) if args.out else run_dir / "report"
    index = write_report(runs, out, seeds=seeds, title=title)
    print(f"report: {index}")
    return 0


def _is_moe(run_dir: Path) -> bool:
    return json.loads((run_dir / "config.json").read_text())["model"].get("moe") is not None


# Small enough that both models train in a few minutes on two CPU cores, long enough
# for the MoE model to pull ahead (see docs/lm.md for the measurements).
DEMO_DEFAULTS = dict(TRAIN_DEFAULTS, d_model=64, d_ff=256, steps=800, lr=5e-3, eval_every=40)
DEMO_VOCAB_SIZE = 2048


def cmd_demo(args) -> int:
    import torch

    from .analysis.compare import compare, seed_summary
    from .analysis.report import write_report
    from .train import (
        latest_checkpoint,
        new_run,
        prepare_data,
        read_metrics,
        read_run_config,
        resume_run,
    )
    from .train.checkpoint import atomic_write_text

    if args.threads:
        torch.set_num_threads(args.threads)
    _check_router(args.router)
    out = Path(args.out)
    started = time.perf_counter()
    data_config = _data_config(args)
    print(f"moekit demo → {out}  (MoE vs dense, {args.seeds} seed(s), {args.steps} steps each)", file=sys.stderr)
    prepared = prepare_data(data_config, out / "tokenizer.json")
    print(f"corpus: {prepared.corpus.info['train_files']} training / {prepared.corpus.info['val_files']} validation "
          f"files, {prepared.tokens.train_N.numel():,} training tokens, vocabulary {prepared.tokenizer.vocab_size}",
          file=sys.stderr)
    comparisons = []
    report_runs = {}
    for seed in range(args.seed, args.seed + args.seeds):
        args.seed_value = seed
        run_dirs = {}
        for label, use_moe in (("MoE", True), ("dense", False)):
            seed_args = argparse.Namespace(**vars(args))
            seed_args.seed = seed
            model_config, train_config = _configs_from_args(seed_args, prepared.tokenizer.vocab_size, moe=use_moe)
            run_dir = out / f"{label.lower()}-seed{seed}"
            run_dirs[label] = run_dir
            description = f"{label:5s} seed {seed}"
            if (run_dir / "config.json").exists():
                saved_model, saved_train, _ = read_run_config(run_dir)
                if saved_model != model_config or saved_train != train_config:
                    raise CLIError(f"{str(run_dir)!r} holds a run with other settings; pass another --out "
                                   "to keep it, or delete it")
                folder = latest_checkpoint(run_dir)
                done = folder is not None and json.loads((folder / "trainer_state.json").read_text())["step"] >= train_config.steps
                if done:
                    print(f"{description}: already trained, reusing {run_dir}", file=sys.stderr)
                    continue
                trainer = resume_run(run_dir, description=description) if folder else new_run(
                    run_dir, model_config, train_config, data_config, prepared=prepared, overwrite=True,
                    description=description)
            else:
                trainer = new_run(run_dir, model_config, train_config, data_config, prepared=prepared,
                                  description=description)
            if not trainer.fit():
                print(f"demo interrupted; run `moekit demo --out {out}` again with the same options to continue",
                      file=sys.stderr)
                return 130
        comparison = compare(read_metrics(run_dirs["MoE"]), read_metrics(run_dirs["dense"]))
        comparison["seed"] = seed
        comparisons.append(comparison)
        if not report_runs:
            report_runs = {label: path.name for label, path in run_dirs.items()}
    seeds = {"runs": comparisons, "summary": seed_summary(comparisons)} if len(comparisons) > 1 else None
    demo = {"report_runs": report_runs, "seeds": seeds, "comparisons": comparisons,
            "settings": {k: v for k, v in vars(args).items() if k not in ("func", "seed_value")},
            "data": prepared.info}
    atomic_write_text(out / "demo.json", json.dumps(demo, indent=2))
    index = write_report({label: out / name for label, name in report_runs.items()}, out / "report",
                         seeds=seeds, title="moekit demo: MoE vs dense language model")
    _print_demo_summary(comparisons, seeds)
    print(f"report: {index}  ({time.perf_counter() - started:.0f} s in all)", file=sys.stderr)
    return 0


def _print_demo_summary(comparisons: list[dict], seeds: dict | None) -> None:
    print("\nseed  MoE val  dense val  dense-MoE  MoE steps to dense loss  step-time ratio", file=sys.stderr)
    for c in comparisons:
        reach = c["moe_steps_to_dense_loss"]
        reach_text = "not reached" if reach is None else f"{reach} / {c['dense_steps']}"
        print(f"{c['seed']:>4}  {c['moe_val_loss']:.4f}   {c['dense_val_loss']:.4f}    "
              f"{c['dense_val_loss'] - c['moe_val_loss']:+.4f}    "
              f"{reach_text:>22}   "
              f"{c['step_time_ratio']:.2f}x", file=sys.stderr)
    if seeds:
        s = seeds["summary"]
        d = s["dense_minus_moe"]
        print(f"over {s['seeds']} seeds: MoE {s['moe_val_loss']['mean']:.4f} ± {s['moe_val_loss']['std']:.4f}, "
              f"dense {s['dense_val_loss']['mean']:.4f} ± {s['dense_val_loss']['std']:.4f}, "
              f"dense − MoE {d['mean']:+.4f} ± {d['std']:.4f} (MoE better in {d['moe_better_in']}/{d['n']})",
              file=sys.stderr)


def cmd_bench(args) -> int:
    import torch

    from .bench import run_suite
    from .train.checkpoint import atomic_write_text

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("error: --device cuda, but torch sees no CUDA device", file=sys.stderr)
        return 2
    output = run_suite(tuple(args.dtype or ["float32"]), repeats=args.repeats, only=args.only,
                       decode=not args.no_decode, echo=lambda text: print(text, flush=True), device=args.device,
                       paths=tuple(args.paths.split(",")) if args.paths else None)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(args.json, json.dumps(output, indent=2))
    print(f"results: {args.json}", file=sys.stderr)
    return 0


# --- expert surgery: upcycle, grow, prune ------------------------------------------


def _validation_batches_of(run_dir: Path, tokenizer, context_length: int, batch_size: int, max_batches: int):
    """Fixed validation windows of the corpus run_dir was trained on."""
    from .data import load_corpus, validation_batches
    from .data.dataset import encode_documents
    from .train import read_run_config

    _, _, data_info = read_run_config(run_dir)
    corpus = load_corpus(data_info["data"], data_info["val_fraction"])
    val_N = encode_documents(tokenizer, [d.text for d in corpus.val])
    return validation_batches(val_N, batch_size, context_length, max_batches)


def _derived_train_config(args, source_train, **changes):
    """The source run's training settings with this command's steps, lr and seed."""
    import dataclasses

    lr = args.lr if args.lr is not None else source_train.lr
    # Another seed than the source's, so the new run does not replay the source's first batches.
    seed = args.seed if args.seed is not None else source_train.seed + 1
    settings = dict(
        steps=args.steps, lr=lr, min_lr=lr / 10, warmup_steps=args.steps // 10, seed=seed,
        log_every=min(source_train.log_every, args.steps), eval_every=min(source_train.eval_every, args.steps),
        checkpoint_every=min(source_train.checkpoint_every, args.steps), stage="full", freeze_old_experts=0)
    return dataclasses.replace(source_train, **dict(settings, **changes))


def _surgery(args, operate) -> int:
    """Load RUN_DIR, apply ``operate(model, val_batches) -> (new_model, train_changes, info)``,
    measure the validation loss before and after, and write the new run folder."""
    import torch

    from .train import evaluate, fork_run

    if args.threads:
        torch.set_num_threads(args.threads)
    source = Path(args.run_dir)
    out = _new_run_folder(args.out)
    model, tokenizer, source_train, _ = _load_model(args.run_dir)
    batches = _validation_batches_of(source, tokenizer, model.config.context_length, args.batch_size,
                                     args.eval_batches)
    new_model, train_changes, info = operate(model, batches)
    new_model.eval()
    before, after = evaluate(model, batches, "cpu"), evaluate(new_model, batches, "cpu")
    train_config = _derived_train_config(args, source_train, **train_changes)
    fork_run(source, out, new_model, train_config, **({"data": args.data} if getattr(args, "data", None) else {}))
    experts = [m.config.moe.num_experts if m.config.moe else 0 for m in (model, new_model)]
    report = {"command": args.command, "source": str(source), "out": str(out), "experts_before": experts[0],
              "experts_after": experts[1], "val_loss_before": before, "val_loss_after": after,
              "val_loss_change": after - before, **info}
    print(json.dumps(report))
    print(f"{out}: {experts[0]} → {experts[1]} experts per MoE layer; validation loss on {source}'s data "
          f"{before:.4f} → {after:.4f} ({after - before:+.4f}). Train on with: moekit train --resume {out}",
          file=sys.stderr)
    return 0


def cmd_upcycle(args) -> int:
    from .interop.lm_surgery import upcycle_lm

    def operate(model, batches):
        if model.config.moe is not None:
            raise CLIError(f"{args.run_dir!r} is already an MoE model; upcycle a dense run (moekit train --experts 0)")
        moe_fields = dict(load_balance_coef=args.load_balance_coef, z_loss_coef=args.z_loss_coef)
        return upcycle_lm(model, args.experts, args.top_k, perturb=args.perturb, seed=args.seed or 0,
                          **moe_fields), {}, {"top_k": args.top_k}

    if args.experts < 2:
        raise CLIError(f"--experts ({args.experts}) must be >= 2 to upcycle")
    return _surgery(args, operate)


def cmd_grow(args) -> int:
    from .interop.lm_surgery import capture_moe_inputs, grow_lm

    def operate(model, batches):
        if model.config.moe is None:
            raise CLIError(f"{args.run_dir!r} is a dense model; upcycle it first (moekit upcycle)")
        old = model.config.moe.num_experts
        inputs = capture_moe_inputs(model, batches)
        grown = grow_lm(model, args.add, inputs, margin=args.margin, seed=args.seed or 0)
        changes = {"freeze_old_experts": old} if args.freeze_old else {}
        return grown, changes, {"added": args.add, "freeze_old": args.freeze_old, "data": args.data}

    return _surgery(args, operate)


def cmd_prune(args) -> int:
    from .interop.lm_surgery import capture_moe_inputs, prune_lm

    def operate(model, batches):
        if model.config.moe is None:
            raise CLIError(f"{args.run_dir!r} is a dense model: it has no experts to prune")
        inputs = capture_moe_inputs(model, batches)
        pruned, removed = prune_lm(model, args.remove, inputs, by=args.by)
        return pruned, {}, {"by": args.by, "removed": {str(k): v for k, v in removed.items()}}

    return _surgery(args, operate)


def _add_surgery_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("run_dir", metavar="RUN_DIR", help="the trained run to start from (only read)")
    p.add_argument("--out", required=True, metavar="NEW_RUN", help="the new run folder (must not hold a run)")
    g = p.add_argument_group("training the new run (moekit train --resume NEW_RUN)")
    g.add_argument("--steps", type=_positive_int, default=200, help="steps of the new run's schedule (default: %(default)s)")
    g.add_argument("--lr", type=float, default=None, help="peak learning rate (default: the source run's)")
    g.add_argument("--seed", type=int, default=None,
                   help="seed of the new weights and the new run's batches (default: the source's seed + 1)")
    g = p.add_argument_group("measuring")
    g.add_argument("--eval-batches", type=_positive_int, default=16,
                   help="validation batches for the losses and the captured router inputs (default: %(default)s)")
    g.add_argument("--batch-size", type=_positive_int, default=16, help="sequences per batch (default: %(default)s)")
    g.add_argument("--threads", type=_positive_int, default=None, help="torch CPU threads (default: torch's choice)")


# --- parser ---------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="moekit",
        description="Mixture-of-Experts toolkit: train MoE and dense language models, sample from them, "
        "report what their experts learned, reshape trained MoEs (upcycle, grow, prune) and time MoE layers.",
        epilog="Start with `moekit demo`; see docs/lm.md.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    p = sub.add_parser("train", help="train a language model (MoE or dense) into a run folder",
                       description="Train a decoder-only language model whose FFN is a moekit MoE (or dense with "
                       "--experts 0). Ctrl-C saves a checkpoint; --resume continues the same loss curve.")
    p.add_argument("--out", metavar="RUN_DIR", help="run folder to create (default: runs/<date-time>)")
    p.add_argument("--resume", metavar="RUN_DIR", help="continue the run in RUN_DIR from its latest checkpoint "
                   "(its saved settings apply; other options are ignored, except --threads and the parallelism ones)")
    p.add_argument("--resume-steps", dest="steps_override", type=_positive_int, default=None, metavar="N",
                   help="with --resume: train on to N steps in all (the cosine schedule is stretched to N)")
    p.add_argument("--overwrite", action="store_true", help="replace a run already in --out")
    p.add_argument("--stage", choices=("full", "experts", "gate"), default="full",
                   help="two-stage training: 'experts' trains each expert on its own cluster of the data with the "
                   "routing fixed by the cluster; 'gate' (with --init-from the experts run) trains only the routers "
                   "(default: full)")
    p.add_argument("--init-from", metavar="RUN_DIR", default=None,
                   help="start from RUN_DIR's latest weights (its model and tokenizer; its corpus unless --data is "
                   "given; model options are ignored) with a fresh optimizer and this command's training options")
    _add_model_args(p, TRAIN_DEFAULTS)
    _add_data_args(p, 4096)
    _add_train_args(p, TRAIN_DEFAULTS)
    g = p.add_argument_group("parallelism (start the processes with torchrun; these apply with --resume too)")
    g.add_argument("--expert-parallel", type=_positive_int, default=1, metavar="EP",
                   help="shard each MoE layer's experts over EP processes; the processes torchrun starts must be "
                   "a multiple of EP, and the rest is data parallel (default: %(default)s)")
    g.add_argument("--dist-timeout", type=float, default=300.0, metavar="SECONDS",
                   help="process-group timeout: a rank that dies or hangs makes the others fail after this "
                   "long (default: %(default)s)")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("eval", help="validation loss of a run's latest checkpoint",
                       description="Evaluate a run's latest checkpoint on its validation split; prints JSON.")
    p.add_argument("run_dir", metavar="RUN_DIR", help="a run folder written by moekit train")
    p.add_argument("--batches", type=_positive_int, default=64, help="validation batches at most (default: %(default)s)")
    p.add_argument("--batch-size", type=_positive_int, default=16, help="sequences per batch (default: %(default)s)")
    p.add_argument("--data-of", metavar="OTHER_RUN", default=None,
                   help="evaluate on the validation split of OTHER_RUN's corpus (e.g. the data a grown model "
                   "was trained on before growing)")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("generate", help="stream text sampled from a run's latest checkpoint",
                       description="Sample text from a trained model, printed as it is generated.")
    p.add_argument("run_dir", metavar="RUN_DIR", help="a run folder written by moekit train")
    p.add_argument("--prompt", default="def ", help="text to continue (default: %(default)r)")
    p.add_argument("--max-new-tokens", type=_positive_int, default=200, help="tokens to generate at most (default: %(default)s)")
    p.add_argument("--temperature", type=float, default=0.8, help="sampling temperature; 0 is greedy (default: %(default)s)")
    p.add_argument("--top-k", type=_positive_int, default=50, help="sample among the k likeliest tokens (default: %(default)s)")
    p.add_argument("--top-p", type=float, default=0.95, help="nucleus sampling threshold in (0, 1] (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="sampling seed (default: %(default)s)")
    p.add_argument("--ignore-eot", action="store_true", help="keep going past the end-of-text token")
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("report", help="write the HTML report of a run or a demo folder",
                       description="Write RUN_DIR/report/index.html with PNG plots: loss curves, expert load, routing "
                       "entropy, specialisation, top tokens, co-activation, drop rate and samples. A demo folder gives "
                       "the MoE-vs-dense comparison.")
    p.add_argument("run_dir", metavar="RUN_DIR", help="a run folder (moekit train) or a demo folder (moekit demo)")
    p.add_argument("--baseline", metavar="RUN_DIR", help="a second run to compare with (e.g. a dense model)")
    p.add_argument("--out", metavar="DIR", help="where to write the report (default: RUN_DIR/report)")
    p.set_defaults(func=cmd_report)

    p = sub.add_parser("demo", help="train an MoE and a dense model on the same tokens and compare them",
                       description="The main job: train an MoE language model and a dense model with the same active "
                       "parameters per token for the same tokens on the embedded corpus, then write a comparative "
                       "report. Re-running with the same options reuses finished runs and resumes interrupted ones.")
    p.add_argument("--out", default=DEMO_OUT, help="demo folder (default: %(default)s)")
    p.add_argument("--seeds", type=_positive_int, default=1,
                   help="train this many seeds of each model, for the run-to-run spread (default: %(default)s)")
    _add_model_args(p, DEMO_DEFAULTS)
    _add_data_args(p, DEMO_VOCAB_SIZE)
    _add_train_args(p, DEMO_DEFAULTS)
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("upcycle", help="turn a dense run into an MoE run whose experts start as its FFN",
                       description="Sparse upcycling: every dense FFN of RUN_DIR's model becomes an MoE whose experts "
                       "are copies of it, so the new model computes what the dense one did; NEW_RUN starts at step 0 "
                       "with a fresh optimizer. Continue with: moekit train --resume NEW_RUN.")
    _add_surgery_args(p)
    p.add_argument("--experts", type=_positive_int, required=True, help="experts per MoE layer E (>= 2)")
    p.add_argument("--top-k", type=_positive_int, default=2, help="experts per token K (default: %(default)s)")
    p.add_argument("--perturb", type=float, default=0.0,
                   help="multiply each copy but the first by (1 + perturb·noise) so experts diverge sooner "
                   "(default: exact copies)")
    p.add_argument("--load-balance-coef", type=float, default=0.01, help="Switch load-balancing loss weight (default: %(default)s)")
    p.add_argument("--z-loss-coef", type=float, default=0.001, help="router z-loss weight (default: %(default)s)")
    p.set_defaults(func=cmd_upcycle)

    p = sub.add_parser("grow", help="add experts to a trained MoE run without changing its output",
                       description="Add N experts to every MoE layer of RUN_DIR's model. The new experts start below "
                       "every validation token's top-k choice, so the model's output is unchanged at step 0; the "
                       "balancing loss then draws tokens to them. --data trains NEW_RUN on other text.")
    _add_surgery_args(p)
    p.add_argument("--add", type=_positive_int, required=True, help="experts to add per MoE layer")
    p.add_argument("--freeze-old", action="store_true",
                   help="train only the new experts and their router rows; every other weight keeps its value")
    p.add_argument("--data", default=None, metavar="PATH",
                   help="text the new run trains on (default: RUN_DIR's corpus); the tokenizer stays RUN_DIR's")
    p.add_argument("--margin", type=float, default=1.0,
                   help="logits by which new experts start below each token's k-th choice (default: %(default)s)")
    p.set_defaults(func=cmd_grow)

    p = sub.add_parser("prune", help="remove experts from a trained MoE run and report the loss change",
                       description="Remove K experts from every MoE layer of RUN_DIR's model: those that route the "
                       "fewest validation tokens (--by load), or by merging the pair whose outputs agree most, K times "
                       "(--by similarity). The router renormalises over the experts left.")
    _add_surgery_args(p)
    p.add_argument("--remove", type=_positive_int, required=True, help="experts to remove per MoE layer")
    p.add_argument("--by", choices=("load", "similarity"), default="load",
                   help="which experts go (default: %(default)s)")
    p.set_defaults(func=cmd_prune)

    p = sub.add_parser("bench", help="time MoE layers against the dense ideal and transformers' blocks",
                       description="Efficiency η = t_dense / t_moe of moekit's compute paths at the standard "
                       "(T=4096, D=512, F=1024, E=8, K=2), fine-grained (F=128, E=64, K=8) and, on a GPU, scaled "
                       "(T=16384, D=2048, F=4096) shapes, uniform and "
                       "skewed routing, with transformers' Mixtral/Qwen3 blocks on the same weights and tokens, "
                       "activation memory, and decode-time bandwidth. Medians of interleaved rounds.")
    p.add_argument("--dtype", action="append", choices=["float32", "bfloat16", "float16"],
                   help="dtype to run (repeatable; default: float32)")
    p.add_argument("--repeats", type=_positive_int, default=5, help="timed rounds per case (default: %(default)s)")
    p.add_argument("--only", default="", help="comma-separated parts of case names to run (default: all)")
    p.add_argument("--no-decode", action="store_true", help="skip the decode-bandwidth case")
    p.add_argument("--threads", type=_positive_int, default=None, help="torch intra-op threads (default: torch's)")
    p.add_argument("--keep-freed-memory", action="store_true",
                   help="let this process reuse freed memory instead of page-faulting it back in "
                   "(moekit.memory; the other commands always do, unless MOEKIT_KEEP_FREED_MEMORY=0)")
    p.add_argument("--paths", default="",
                   help="comma-separated moekit compute paths to time (default: fused,grouped_mm,segment on CPU, "
                   "grouped_mm on a GPU)")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu",
                   help="where to run; cuda adds the scaled shape T=16384 D=2048 F=4096 (default: %(default)s)")
    p.add_argument("--json", type=Path, default=Path("bench-results/bench.json"),
                   help="where to write the results (default: %(default)s)")
    p.set_defaults(func=cmd_bench)
    return parser


def main(argv: list[str] | None = None) -> int:
    from .data import DataError

    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "experts", 1) < 0:
        parser.error(f"--experts ({args.experts}) must be >= 0")
    if args.command == "demo" and args.experts < 1:
        parser.error("the demo compares an MoE with a dense model; --experts must be >= 1")
    keep = args.command != "bench" or args.keep_freed_memory
    if keep and os.environ.get("MOEKIT_KEEP_FREED_MEMORY", "1") != "0":
        from .memory import keep_freed_memory

        keep_freed_memory()
    try:
        return args.func(args)
    except (CLIError, DataError, FileNotFoundError, FileExistsError, ValueError) as err:
        if os.environ.get("MOEKIT_DEBUG"):
            raise
        print(f"moekit {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())


__all__ = ["build_parser", "main"]
