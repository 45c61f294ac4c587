"""Fine-tuning runs: a trained run adapted to new text, as a run folder of its own.

``start_finetune(source, out, plan)`` loads the source run, adds the adapters the
``FinetunePlan`` names (``lora``: LoRA on the MoE layers' experts; ``mixlora``: each
dense FFN becomes a mixture of LoRA experts; ``full``: nothing added, everything
trains) and writes ``out`` as a new run at step 0 (``moekit.train.fork_run``): the
trainer then gives it the progress bar, checkpoints, exact resume and metrics of
any run, and ``moekit eval | generate | report`` read it, adapters included (its
config names them: ``LMConfig.adapter``). ``start_hf_finetune`` does the same from a
Hugging Face ``save_pretrained`` folder: the converted model (``HFCausalLM``) trains
through the same trainer, its run config an ``HFModelSpec``, its text tokenized by the
folder's tokenizer. ``finetune.json`` records the plan and
what the run measured; ``write_outputs`` writes the adapter folder (peft's format
for LoRA) and, on request, a run folder with the updates merged into the weights.

Shapes: B batch, S sequence length.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import statistics
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ..layer import moe_layers
from ..models.adapters import AdapterConfig, apply_adapter
from ..models.hf_spec import HFModelSpec
from ..models.lm import LanguageModel, LMConfig
from ..train import (
    DataConfig,
    TrainConfig,
    fork_run,
    latest_checkpoint,
    load_checkpoint,
    new_run,
    read_metrics,
    read_run_config,
)
from ..train.checkpoint import atomic_write_text
from ..train.run import TOKENIZER_FILE
from .lora import merge_lora, trainable_parameters

FINETUNE_FILE = "finetune.json"
METHODS = ("lora", "mixlora", "full")


@dataclass(kw_only=True)
class FinetunePlan:
    """What a fine-tuning run adds and how it trains.

    Args:
        method: ``lora``, ``mixlora`` or ``full``.
        rank, alpha, rslora, targets: the adapters (``AdapterConfig``).
        experts, top_k: ``mixlora``'s experts per dense FFN and experts per token.
        data: the text to adapt to (a --data path or glob, ``stdlib-tests``, or None:
            the embedded corpus).
        val_fraction: share of that text held out for the held-out loss.
        steps, lr, batch_size, seed, grad_accumulation, eval_every, checkpoint_every: training.
    """

    method: str = "lora"
    rank: int = 8
    alpha: float = 16.0
    rslora: bool = False
    targets: tuple[str, ...] = ("experts",)
    experts: int = 4
    top_k: int = 2
    data: str | None = None
    val_fraction: float = 0.2
    steps: int = 200
    lr: float = 3e-3
    batch_size: int = 16
    seed: int = 1
    grad_accumulation: int = 1
    eval_every: int = 50
    checkpoint_every: int = 100

    def __post_init__(self) -> None:
        self.targets = tuple(self.targets)
        if self.method not in METHODS:
            raise ValueError(f"method ({self.method!r}) must be one of {', '.join(METHODS)}")

    def adapter(self) -> AdapterConfig | None:
        if self.method == "full":
            return None
        return AdapterConfig(method=self.method, rank=self.rank, alpha=self.alpha, rslora=self.rslora,
                             targets=self.targets, num_experts=self.experts, top_k=self.top_k)

    def to_json(self) -> dict:
        return json.loads(json.dumps(dataclasses.asdict(self)))


def build_model(model_config: LMConfig | HFModelSpec, seed: int = 0) -> nn.Module:
    """The model a run's config describes, its adapters drawn from ``seed``: moekit's
    ``LanguageModel``, or the converted Hugging Face model of an ``HFModelSpec``."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if isinstance(model_config, HFModelSpec):
            from ..interop.hf_lm import build_hf_model

            return build_hf_model(model_config)
        return LanguageModel(model_config)


def _load_run(run_dir: Path) -> nn.Module:
    model_config, train_config, _ = read_run_config(run_dir)
    folder = latest_checkpoint(run_dir)
    if folder is None:
        raise FileNotFoundError(f"{str(run_dir)!r} has no checkpoint yet; train it first")
    model = build_model(model_config, train_config.seed)
    load_checkpoint(folder, model)
    return model


def _train_config(plan: FinetunePlan, source_train: TrainConfig) -> TrainConfig:
    adapted = plan.method != "full"
    return dataclasses.replace(
        source_train, steps=plan.steps, lr=plan.lr, min_lr=plan.lr / 10, warmup_steps=max(plan.steps // 10, 1),
        batch_size=plan.batch_size, seed=plan.seed, grad_accumulation=plan.grad_accumulation,
        eval_every=min(plan.eval_every, plan.steps), checkpoint_every=min(plan.checkpoint_every, plan.steps),
        log_every=min(source_train.log_every, plan.steps), stage="full", freeze_old_experts=0,
        # Decay would pull the adapters towards zero, i.e. back to the base: peft's default is none too.
        weight_decay=0.0 if adapted else source_train.weight_decay)


def start_hf_finetune(folder: Path, out: Path, plan: FinetunePlan, context_length: int = 128) -> None:
    """Write ``out``: the converted model of the Hugging Face ``folder`` with the plan's
    adapters, at step 0, tokenizing the plan's text with the folder's tokenizer."""
    from transformers import AutoConfig

    folder, out = Path(folder).resolve(), Path(out)
    if plan.method == "mixlora":
        raise ValueError("mixlora turns dense FFNs into mixtures of LoRA experts; on a Hugging Face MoE model "
                         "use lora (its experts and routers) or full")
    tokenizer_file = folder / TOKENIZER_FILE
    if not tokenizer_file.is_file():
        raise ValueError(f"{str(folder)!r} has no {TOKENIZER_FILE} (the `tokenizers` file save_pretrained writes "
                         "for fast tokenizers); moekit tokenizes the fine-tuning text with it")
    vocab_size = int(AutoConfig.from_pretrained(folder, local_files_only=True).vocab_size)
    spec = HFModelSpec(folder=str(folder), vocab_size=vocab_size, context_length=context_length,
                       adapter=plan.adapter())
    model = build_model(spec, plan.seed)
    out.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(tokenizer_file, out / TOKENIZER_FILE)
    train_config = _train_config(plan, TrainConfig(log_every=10))
    data_config = DataConfig(data=plan.data, tokenizer="bpe", vocab_size=vocab_size, val_fraction=plan.val_fraction)
    trainer = new_run(out, spec, train_config, data_config, model=model, tensorboard=False, progress=False)
    trainer.save()  # step 0: a rerun continues from here
    trainer.metrics.close()
    record = {"source": str(folder), "kind": "hf", "plan": plan.to_json(),
              "trainable_parameters": trainable_parameters(model), "parameters": model.num_parameters()}
    atomic_write_text(out / FINETUNE_FILE, json.dumps(record, indent=2))


def adapt(model: LanguageModel, plan: FinetunePlan) -> LanguageModel:
    """``model`` with the plan's adapters added in place (its config says so)."""
    adapter = plan.adapter()
    if model.config.adapter is not None:
        raise ValueError(f"the model already carries {model.config.adapter.method!r} adapters; fine-tune its "
                         "source run, or merge them first (moekit finetune --merge)")
    if adapter is not None:
        with torch.random.fork_rng(devices=[]):  # the plan's seed draws the adapters: a rerun starts the same
            torch.manual_seed(plan.seed)
            apply_adapter(model, adapter, model.config.router_init_std)
        model.config = dataclasses.replace(model.config, adapter=adapter)
    return model


def start_finetune(source: Path, out: Path, plan: FinetunePlan) -> None:
    """Write ``out``: the source run's model with the plan's adapters, at step 0."""
    source, out = Path(source), Path(out)
    _, source_train, _ = read_run_config(source)
    model = adapt(_load_run(source), plan)
    fork_run(source, out, model, _train_config(plan, source_train), data=plan.data, val_fraction=plan.val_fraction)
    record = {"source": str(source), "plan": plan.to_json(), "trainable_parameters": trainable_parameters(model),
              "parameters": sum(p.numel() for p in model.parameters())}
    atomic_write_text(out / FINETUNE_FILE, json.dumps(record, indent=2))


def read_finetune(run_dir: Path) -> dict | None:
    path = Path(run_dir) / FINETUNE_FILE
    return json.loads(path.read_text()) if path.exists() else None


def update_finetune(run_dir: Path, **fields) -> dict:
    record = dict(read_finetune(run_dir) or {}, **fields)
    atomic_write_text(Path(run_dir) / FINETUNE_FILE, json.dumps(record, indent=2))
    return record


def training_state_bytes(model: nn.Module, x_BS: torch.Tensor, y_BS: torch.Tensor) -> dict[str, int]:
    """Bytes one AdamW training step holds: weights, gradients and optimizer moments of
    the trainable parameters, and the activations saved for backward (counted as the
    forward saves them, each storage once)."""
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    trainable = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
    parameter_storages = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict[int, int] = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in parameter_storages:
            seen[storage.data_ptr()] = storage.nbytes()
        return tensor

    was_training = model.training
    model.train()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = model(x_BS, y_BS)
    (out.loss + out.aux_loss).backward()
    model.zero_grad(set_to_none=True)
    model.train(was_training)
    activations = sum(seen.values())
    return {"weights": weights, "gradients": trainable, "optimizer": 2 * trainable, "activations": activations,
            "total": weights + 3 * trainable + activations}


def median_step_time(run_dir: Path) -> float | None:
    """Median seconds per step over the run's metrics lines (the first, with warm-up, left out)."""
    times = [r["step_time"] for r in read_metrics(run_dir) if "step_time" in r]
    times = times[1:] if len(times) > 1 else times
    return statistics.median(times) if times else None


def _merged_config(model: LanguageModel):
    """The config of the model once its adapters are folded in (a plain model)."""
    config, adapter = model.config, model.config.adapter
    if adapter is None or adapter.method == "lora":
        return dataclasses.replace(config, adapter=None)
    if config.moe is not None:
        raise ValueError("this model mixes MoE blocks with mixtures of LoRA experts of another shape; merged, "
                         "it has no single-config form: keep the adapted run")
    layer = next(moe for _, moe in moe_layers(model))
    return dataclasses.replace(config, adapter=None, moe=layer.config, moe_every=1)


def write_outputs(run_dir: Path, *, merge: bool = False) -> dict[str, str]:
    """The adapter folder (``RUN/adapter``: peft's format for LoRA) and, with ``merge``, the
    merged model as a run folder (``RUN/merged``). Returns the paths written, by kind."""
    from .peft import save_peft_adapter

    run_dir = Path(run_dir)
    model = _load_run(run_dir)
    written = {}
    adapter = model.config.adapter
    hf_model = getattr(model, "hf_model", None)  # a converted Hugging Face model (HFCausalLM)
    if adapter is not None and adapter.method == "lora":
        written["adapter"] = str(save_peft_adapter(model if hf_model is None else hf_model, run_dir / "adapter",
                                                   base_model_name_or_path=(read_finetune(run_dir) or {}).get("source")))
    if merge and hf_model is not None:
        from ..interop.hf_models import export_model

        merge_lora(hf_model)
        merged = run_dir / "merged"
        export_model(hf_model).save_pretrained(merged)
        shutil.copyfile(run_dir / TOKENIZER_FILE, merged / TOKENIZER_FILE)
        written["merged"] = str(merged)
    elif merge:
        merged_config = _merged_config(model)
        merge_lora(model)
        model.config = merged_config
        model.requires_grad_(True)
        _, train_config, _ = read_run_config(run_dir)
        merged = run_dir / "merged"
        if (merged / "config.json").exists():  # derived from this run's weights: written afresh
            shutil.rmtree(merged)
        plan = (read_finetune(run_dir) or {}).get("plan", {})
        fork_run(run_dir, merged, model, train_config, data=plan.get("data"), val_fraction=plan.get("val_fraction"))
        written["merged"] = str(merged)
    return written

