"""The run-folder commands: ``moekit train | eval | generate | report | bench``."""

from __future__ import annotations

import contextlib
import json
import os
import sys
import time
from pathlib import Path

from .common import (
    CLIError,
    check_router,
    configs_from_args,
    data_config_from_args,
    load_model,
    load_model_for_inference,
    new_run_folder,
    record_threads,
)
from .inference import offload_result, routing_recorder


def _setup_parallel(args):
    """A ParallelContext when torchrun started several processes or --expert-parallel asks for them."""
    from ..parallel import setup_parallel

    if args.mixed_precision != "fp32" and not args.fsdp:
        raise CLIError(f"--mixed-precision {args.mixed_precision} is FSDP's policy: add --fsdp N (or use --bf16)")
    if args.replicate_every < 0:
        raise CLIError(f"--replicate-every ({args.replicate_every}) must be >= 0 (0: no replicas)")
    if args.expert_parallel == 1 and not args.fsdp and int(os.environ.get("WORLD_SIZE", "1")) == 1:
        return None
    if args.dist_timeout <= 0:
        raise CLIError(f"--dist-timeout ({args.dist_timeout}) must be a positive number of seconds")
    return setup_parallel(args.expert_parallel, args.dist_timeout, args.device, fsdp_size=args.fsdp or 0,
                          mixed_precision=args.mixed_precision, overlap_chunks=args.overlap_chunks,
                          replicate_every=args.replicate_every, replica_slots=args.replica_slots)


def _runtime_options(args) -> dict:
    """Trainer options of this invocation only (not saved in the run's config)."""
    return dict(activation_checkpointing=args.activation_checkpointing, sharded_checkpoints=args.sharded_checkpoints)


def cmd_convert_checkpoint(args) -> int:
    from ..train import latest_checkpoint
    from ..train.settings import build_optimizer
    from ..train.sharded import convert_checkpoint

    model, _, train_config, _ = load_model(args.run_dir)
    folder = latest_checkpoint(Path(args.run_dir))
    model.train()
    convert_checkpoint(folder, model, build_optimizer(model, train_config), args.to)
    print(f"{folder}: {args.to}", file=sys.stderr)
    return 0


def cmd_train(args) -> int:
    parallel = _setup_parallel(args)
    try:
        return _train(args, parallel)
    finally:
        if parallel is not None:
            parallel.close()


def _train(args, parallel) -> int:
    from ..train import fork_run, new_run, prepare_data, resume_run

    is_main = parallel is None or parallel.is_main
    if args.resume:
        trainer = resume_run(args.resume, steps=args.steps_override, parallel=parallel, **_runtime_options(args))
        if is_main:
            print(f"resuming {args.resume} at step {trainer.step}/{trainer.config.steps}", file=sys.stderr)
    elif args.init_from:
        if parallel is not None:
            raise CLIError("--init-from runs in one process: start the new run with it, then continue it "
                           "under torchrun with --resume")
        out = new_run_folder(args.out)
        model, tokenizer, _, _ = load_model(args.init_from)
        _, train_config = configs_from_args(args, tokenizer.vocab_size, moe=False)
        fork_run(Path(args.init_from), out, model, train_config, **({"data": args.data} if args.data else {}))
        trainer = resume_run(out, **_runtime_options(args))
        print(f"run folder {out}: from {args.init_from}, stage {args.stage}", file=sys.stderr)
    else:
        if args.stage == "gate":
            raise CLIError("--stage gate trains the router of trained experts: pass --init-from RUN_DIR "
                           "(the --stage experts run)")
        if args.experts > 0:
            check_router(args.router)
        data_config = data_config_from_args(args)
        out = Path(args.out or f"runs/{time.strftime('%Y%m%d-%H%M%S')}")
        if (out / "config.json").exists() and not args.overwrite:
            raise CLIError(f"{str(out)!r} already holds a run; continue it with --resume {out}, "
                           "or choose another --out (or --overwrite)")
        prepared = prepare_data(data_config)  # a new tokenizer; new_run saves it in the run folder
        model_config, train_config = configs_from_args(args, prepared.tokenizer.vocab_size)
        trainer = new_run(out, model_config, train_config, data_config, prepared=prepared, overwrite=args.overwrite,
                          parallel=parallel, **_runtime_options(args))
        if is_main:
            print(f"run folder {out}: {trainer.num_parameters / 1e6:.2f} M parameters, "
                  f"{trainer.num_active_parameters / 1e6:.2f} M active per token; "
                  f"{prepared.tokens.train_N.numel():,} training tokens", file=sys.stderr)
    if is_main and parallel is not None:
        print(parallel.describe(), file=sys.stderr)
    if is_main:
        record_threads(trainer.run_dir, args.threads)  # resume, eval and generate reuse it
    finished = trainer.fit()
    if finished and is_main:
        print(f"done: final validation loss {trainer.last_val_loss:.4f}; report with: moekit report {trainer.run_dir}",
              file=sys.stderr)
    return 0 if finished else 130


def cmd_eval(args) -> int:
    from ..data import load_corpus, load_tokenizer, validation_batches
    from ..data.dataset import encode_documents
    from ..train import evaluate, read_run_config

    _refuse_demo_folder(args.run_dir)
    model_config, _, _ = read_run_config(Path(args.run_dir))
    _, _, data_info = read_run_config(Path(args.data_of or args.run_dir))
    tokenizer = load_tokenizer(Path(args.run_dir) / "tokenizer.json")
    corpus = load_corpus(data_info["data"], data_info["val_fraction"])
    val_N = encode_documents(tokenizer, [d.text for d in corpus.val])  # the training split is not needed
    batches = validation_batches(val_N, args.batch_size, model_config.context_length, args.batches)
    del corpus, val_N
    # The data first: a --max-memory budget then counts what reading it left in memory.
    model, tokenizer, state, offloaded = load_model_for_inference(args)
    loss = evaluate(model, batches, "cpu")
    num_tokens = sum(y.numel() for _, y in batches)
    result = {"run": args.run_dir, "step": state["step"], "val_loss": loss, "tokens": num_tokens}
    if args.data_of:
        result["data_of"] = args.data_of
    if offloaded is not None:
        result.update(offload_result(offloaded))
    print(json.dumps(result))
    return 0


@contextlib.contextmanager
def _end_line_on_error():
    """An error during generation starts on its own line, not after the text printed so far."""
    try:
        yield
    except BaseException:
        sys.stdout.write("\n")
        sys.stdout.flush()
        raise


def _refuse_demo_folder(run_dir: str) -> None:
    folder = Path(run_dir)
    if not (folder / "config.json").exists() and (folder / "demo.json").exists():
        runs = sorted(p.name for p in folder.iterdir() if (p / "config.json").exists())
        raise CLIError(f"{run_dir!r} is a demo folder; pass one of its runs: "
                       + ", ".join(str(folder / name) for name in runs))


def cmd_generate(args) -> int:
    import torch

    _refuse_demo_folder(args.run_dir)
    model, tokenizer, _, offloaded = load_model_for_inference(args)
    ids = tokenizer.encode(args.prompt)
    if not ids:
        ids = [tokenizer.eot_id]  # an empty prompt starts a new document
    generator = torch.Generator().manual_seed(args.seed)
    sys.stdout.write(args.prompt)
    sys.stdout.flush()
    new_ids: list[int] = []
    printed = ""
    with routing_recorder(model, args.trace) as trace, _end_line_on_error():
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
    if trace is not None:
        trace.save(args.trace)
        print(f"routing trace: {args.trace} (simulate expert caches with: moekit cache-sim {args.trace})",
              file=sys.stderr)
    if offloaded is not None:
        print("expert cache: " + ", ".join(f"{k} {v:.3f}" if isinstance(v, float) else f"{k} {v}"
                                           for k, v in offload_result(offloaded).items()), file=sys.stderr)
    return 0


def cmd_report(args) -> int:
    from ..analysis.report import write_report

    run_dir = Path(args.run_dir)
    demo_file = run_dir / "demo.json"
    if demo_file.exists():
        demo = json.loads(demo_file.read_text())
        runs = {"MoE": run_dir / demo["report_runs"]["MoE"], "dense": run_dir / demo["report_runs"]["dense"]}
        seeds, finetune = demo.get("seeds"), demo.get("finetune")
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
        seeds, finetune, title = None, None, f"moekit report: {run_dir.name}"
    out = Path(args.out) if args.out else run_dir / "report"
    index = write_report(runs, out, seeds=seeds, title=title, finetune=finetune)
    print(f"report: {index}")
    return 0


def _is_moe(run_dir: Path) -> bool:
    return json.loads((run_dir / "config.json").read_text())["model"].get("moe") is not None


def cmd_bench(args) -> int:
    import torch

    from ..train.checkpoint import atomic_write_text
    from .bench import run_suite

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
