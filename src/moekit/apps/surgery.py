"""The expert-surgery commands: ``moekit upcycle | grow | prune`` on a trained run.

Each loads RUN_DIR, reshapes its model, measures the validation loss before and
after, and writes a new run folder that ``moekit train --resume`` continues.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from .common import CLIError, load_model, new_run_folder


def _validation_batches_of(run_dir: Path, tokenizer, context_length: int, batch_size: int, max_batches: int):
    """Fixed validation windows of the corpus run_dir was trained on."""
    from ..data import load_corpus, validation_batches
    from ..data.dataset import encode_documents
    from ..train import read_run_config

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

    from ..train import evaluate, fork_run

    source = Path(args.run_dir)
    out = new_run_folder(args.out)
    model, tokenizer, source_train, _ = load_model(args.run_dir)
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
    from ..interop.lm_surgery import upcycle_lm

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
    from ..interop.lm_surgery import capture_moe_inputs, grow_lm

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
    from ..interop.lm_surgery import capture_moe_inputs, prune_lm

    def operate(model, batches):
        if model.config.moe is None:
            raise CLIError(f"{args.run_dir!r} is a dense model: it has no experts to prune")
        inputs = capture_moe_inputs(model, batches)
        pruned, removed = prune_lm(model, args.remove, inputs, by=args.by)
        return pruned, {}, {"by": args.by, "removed": {str(k): v for k, v in removed.items()}}

    return _surgery(args, operate)
