"""``moekit finetune SOURCE --out OUT``: adapt a trained run, or a Hugging Face MoE model
saved in a local folder, to new text.

LoRA on the experts, a mixture of LoRA experts in place of the dense FFNs, or full
fine-tuning (``moekit.finetune.runs``). OUT is a run folder like any other: the same
command run again continues it from its latest checkpoint (exactly: the trainer's
resume), ``moekit eval | generate | report OUT`` read it. At the end it writes the
adapters in peft's format (OUT/adapter, LoRA) and, with ``--merge``, the model with the
updates folded into its weights as a run folder (OUT/merged).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from .common import CLIError


def _source_kind(source: Path) -> str:
    """``moekit`` (a run folder) or ``hf`` (a transformers save_pretrained folder); a one-line
    error for anything else."""
    expected = "a moekit run folder (moekit train --out DIR) or a Hugging Face model folder (save_pretrained)"
    if not source.exists():
        raise CLIError(f"{str(source)!r} does not exist; expected {expected}")
    if not source.is_dir():
        raise CLIError(f"{str(source)!r} is a file; expected {expected}")
    config_path = source / "config.json"
    if not config_path.exists():
        raise CLIError(f"{str(source)!r} holds no config.json; expected {expected}")
    try:
        config = json.loads(config_path.read_text())
    except json.JSONDecodeError as error:
        raise CLIError(f"{config_path}: not valid JSON ({error.msg})") from None
    if "model_type" in config:
        return "hf"
    if "model" not in config or "train" not in config:
        raise CLIError(f"{config_path} is neither a moekit run's config (model, train) nor a Hugging Face config "
                       "(model_type)")
    return "moekit"


def plan_from_args(args):
    from ..finetune.runs import FinetunePlan

    lr = args.lr if args.lr is not None else (5e-4 if args.method == "full" else 3e-3)
    return FinetunePlan(method=args.method, rank=args.rank, alpha=args.alpha if args.alpha is not None else 2.0 * args.rank,
                        rslora=args.rslora, targets=tuple(args.targets.split(",")), experts=args.mixlora_experts,
                        top_k=args.mixlora_top_k, data=args.data, val_fraction=args.val_fraction, steps=args.steps,
                        lr=lr, batch_size=args.batch_size, seed=args.seed, grad_accumulation=args.grad_accumulation,
                        eval_every=args.eval_every, checkpoint_every=args.checkpoint_every)


def run_finetune(source: Path, out: Path, plan, *, merge: bool = False, progress: bool = True,
                 description: str | None = None, resume_command: str | None = None,
                 context_length: int = 128) -> dict | None:
    """Start or continue the fine-tuning run in ``out``; at its end write its outputs and return
    its record (``finetune.json``), or None when it was stopped early."""
    from ..data import training_batch
    from ..finetune.runs import (
        build_model,
        median_step_time,
        read_finetune,
        start_finetune,
        start_hf_finetune,
        training_state_bytes,
        update_finetune,
        write_outputs,
    )
    from ..train import evaluate, read_run_config, resume_run

    kind = _source_kind(source)
    record = read_finetune(out)
    if (out / "config.json").exists():
        if record is None:
            raise CLIError(f"{str(out)!r} holds a run that is not a fine-tuning run; choose another --out")
        if record["plan"] != plan.to_json() or Path(record["source"]).resolve() != source.resolve():
            raise CLIError(f"{str(out)!r} holds a fine-tuning run with other settings ({record['source']}, "
                           f"{record['plan']['method']}); choose another --out, or delete it")
    elif kind == "hf":
        start_hf_finetune(source, out, plan, context_length)
    else:
        start_finetune(source, out, plan)
    model_config, train_config, _ = read_run_config(out)
    # A converted Hugging Face model is built here; moekit's own model, by the trainer from its config.
    model = build_model(model_config, train_config.seed) if kind == "hf" else None
    trainer = resume_run(out, progress=progress, description=description or out.name, model=model)
    trainer.resume_command = resume_command or trainer.resume_command
    record = read_finetune(out)
    if "val_loss_start" not in record and trainer.step == 0:
        record = update_finetune(out, val_loss_start=evaluate(trainer.model, trainer.val_batches, "cpu"))
    if not trainer.fit():
        return None
    outputs = write_outputs(out, merge=merge)
    x_BS, y_BS = training_batch(trainer.data.train_N, trainer.config.batch_size, trainer.model_config.context_length,
                                trainer.config.seed, 0)
    return update_finetune(out, val_loss_end=trainer.last_val_loss, step_time=median_step_time(out),
                           memory=training_state_bytes(trainer.model, x_BS, y_BS), outputs=outputs)


def cmd_finetune(args) -> int:
    source, out = Path(args.source), Path(args.out)
    plan = plan_from_args(args)
    command = "moekit " + " ".join(sys.argv[1:]) if sys.argv[1:] else None
    print(f"moekit finetune: {source} → {out} ({plan.method}"
          + (f", rank {plan.rank}" if plan.method != "full" else "") + ")", file=sys.stderr)
    record = run_finetune(source, out, plan, merge=args.merge, resume_command=command,
                          context_length=args.context_length)
    if record is None:
        return 130
    if args.report and _source_kind(source) == "moekit":  # the report reads moekit's own models
        from ..analysis.report import write_report

        label = "MoE" if _has_routers(out) else "dense"
        index = write_report({label: out}, out / "report", title=f"moekit finetune: {out.name}")
        record["outputs"]["report"] = str(index)
    print(json.dumps({k: record[k] for k in ("source", "trainable_parameters", "parameters", "val_loss_start",
                                              "val_loss_end", "step_time", "outputs") if k in record}))
    print(f"done: held-out loss {record['val_loss_start']:.4f} → {record['val_loss_end']:.4f}; "
          + ", ".join(f"{kind}: {path}" for kind, path in record["outputs"].items()), file=sys.stderr)
    return 0


def _has_routers(run_dir: Path) -> bool:
    from ..train import read_run_config

    model_config, _, _ = read_run_config(run_dir)
    adapter = model_config.adapter
    return getattr(model_config, "moe", None) is not None or (adapter is not None and adapter.method == "mixlora")


# The fine-tuning comparison of ``moekit demo``: the demo's MoE adapted three ways, and
# its dense twin given mixtures of LoRA experts (MixLoRA adapts dense FFNs).
DEMO_VARIANTS = (
    ("LoRA r=8", "MoE", {"method": "lora", "rank": 8}),
    ("LoRA r=32", "MoE", {"method": "lora", "rank": 32}),
    ("full", "MoE", {"method": "full"}),
    ("MixLoRA E=8 K=2 r=8", "dense", {"method": "mixlora", "experts": 8, "top_k": 2, "rank": 8}),
)


def finetune_comparison(runs: dict[str, Path], out: Path, *, steps: int, data: str | None,
                        batch_size: int = 16) -> list[dict] | None:
    """Fine-tune the demo's runs (label → run folder) on ``data`` as ``DEMO_VARIANTS`` says, into
    ``out``; one row per variant, after a frozen row per base model. None when interrupted."""
    from ..finetune.runs import FinetunePlan
    from ..train import read_run_config

    rows, frozen = [], {}
    for label, base, fields in DEMO_VARIANTS:
        model_config, _, _ = read_run_config(runs[base])
        widths = [model_config.d_model, model_config.moe.d_ff if base == "MoE" else model_config.d_ff]
        if fields.get("rank", 0) > min(widths):  # a model narrower than the demo's: the widest rank it takes
            fields = dict(fields, rank=min(widths))
            label = label.split(" r=")[0] + f" r={min(widths)}"
        rank = fields.get("rank", 8)
        lr = 5e-4 if fields["method"] == "full" else 3e-3
        plan = FinetunePlan(data=data, steps=steps, lr=lr, alpha=2.0 * rank, batch_size=batch_size,
                            eval_every=max(steps // 5, 1), checkpoint_every=max(steps // 2, 1), **fields)
        slug = label.split(" ")[0].lower() + ("" if "rank" not in fields else f"-r{rank}")
        folder = f"{base.lower()}-{slug}"
        record = run_finetune(runs[base], out / folder, plan, description=f"finetune {label}")
        if record is None:
            return None
        if base not in frozen:
            memory = record["memory"]
            frozen[base] = {"label": f"{base}, frozen", "base": base, "method": "frozen", "trainable_parameters": 0,
                            "parameters": record["parameters"], "val_loss": record["val_loss_start"],
                            "step_time": None, "memory": None, "weights_bytes": memory["weights"]}
            rows.append(frozen[base])
        rows.append({"label": f"{base}, {label}", "base": base, "method": fields["method"],
                     "trainable_parameters": record["trainable_parameters"], "parameters": record["parameters"],
                     "val_loss": record["val_loss_end"], "val_loss_start": record["val_loss_start"],
                     "step_time": record["step_time"], "memory": record["memory"], "run": folder})
    return rows
