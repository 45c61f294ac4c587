"""The training loop: AdamW, warmup + cosine schedule, clipping, evaluation, checkpoints.

A run lives in one folder (see DESIGN.md): ``config.json``, ``tokenizer.json``,
``metrics.jsonl``, ``tensorboard/``, ``checkpoints/`` and later ``report/``.
Everything random in a step is a function of the seed and the step, or of the
torch RNG state saved in the checkpoint, so ``resume`` continues the same curve
(bitwise on CPU in float32).
"""

from __future__ import annotations

import contextlib
import math
import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor
from tqdm.auto import tqdm

from ..data import TokenData, training_batch, validation_batches
from ..models.hf_spec import HFModelSpec
from ..models.lm import LanguageModel, LMConfig
from ..parallel import (
    ParallelContext,
    clip_grad_norm,
    is_sharded,
    parallelize,
    reduce_gradients,
    reduce_routing_sums,
)
from ..parallel.replication import replan_replicas
from .accumulation import micro_batch_sums, needs_global_sums, other_micro_batches
from .checkpoint import (
    CheckpointError,
    NonFiniteError,
    check_finite_state,
    latest_checkpoint,
    load_checkpoint,
    load_parallel_checkpoint,
    rank_rng_state,
    rank_seed,
    restore_rng_state,
    save_checkpoint,
    save_parallel_checkpoint,
)
from .metrics import IntervalStats, MetricsLog, routing_sums
from .settings import (  # noqa: F401  (re-exported: the trainer's public names)
    TRAINING_STAGES,
    TrainConfig,
    build_optimizer,
    learning_rate,
    read_run_config,
    write_run_config,
)
from .sharded import is_sharded_checkpoint, load_sharded_checkpoint, save_sharded_checkpoint
from .stages import ClusterRouting, configure_trainable


@torch.no_grad()
def evaluate(model: LanguageModel, batches, device: str, bf16: bool = False, parallel=None) -> float:
    """Mean next-token cross-entropy over the batches (weighted by tokens).

    With ``parallel`` (a ``ParallelContext``), every rank evaluates its share of each
    batch (every rank runs every forward: the MoE layers exchange tokens) and the
    sums are all-reduced, so every rank returns the single-process value."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for x_BS, y_BS in batches:
        if parallel is not None:
            x_BS, y_BS = parallel.share(x_BS), parallel.share(y_BS)
        with torch.autocast(device_type=torch.device(device).type, dtype=torch.bfloat16, enabled=bf16):
            loss = model(x_BS.to(device), y_BS.to(device)).loss
        if y_BS.numel():  # a rank may get no rows of a short last batch; its mean loss is NaN
            total += float(loss) * y_BS.numel()
            count += y_BS.numel()
    model.train(was_training)
    if parallel is not None:
        total, count = (value * parallel.world_size for value in parallel.mean([total, count]))
    return total / count


class Trainer:
    """Trains one language model in one run folder; ``fit()`` runs to the end or to Ctrl-C.

    The model is ``LanguageModel(model_config)``, or ``model`` when the caller built it
    (any module whose ``forward(idx, targets)`` returns an ``LMOutput`` and that counts its
    ``num_parameters(active=...)``: a converted Hugging Face model, ``moekit.interop.hf_lm``)."""

    def __init__(
        self,
        run_dir: Path,
        model_config: LMConfig,
        train_config: TrainConfig,
        data: TokenData,
        *,
        resume: bool = False,
        tensorboard: bool = True,
        progress: bool = True,
        description: str | None = None,
        parallel: ParallelContext | None = None,
        model: torch.nn.Module | None = None,
        activation_checkpointing: bool = False,
        sharded_checkpoints: bool = False,
    ):
        self.run_dir = Path(run_dir)
        self.model_config, self.config = model_config, train_config
        self.data = data
        data.check_fits(model_config.context_length)
        self.parallel = parallel
        # Checkpoints written by torch.distributed.checkpoint, each rank its shards (moekit.train.sharded).
        self.sharded_checkpoints = sharded_checkpoints
        self.is_main = parallel is None or parallel.is_main
        self.progress, self.description = progress and self.is_main, description or self.run_dir.name
        torch.manual_seed(train_config.seed)
        if model is None and isinstance(model_config, HFModelSpec):
            raise ValueError(f"{str(run_dir)!r} fine-tunes the Hugging Face model in {model_config.folder!r}; "
                             "continue it with the moekit finetune command that started it")
        # A model built by the caller (a converted Hugging Face model: moekit finetune), or ours.
        self.model = (model if model is not None else LanguageModel(model_config)).to(train_config.device)
        if activation_checkpointing:
            if not hasattr(self.model, "activation_checkpointing"):
                raise ValueError(f"activation checkpointing: {type(self.model).__name__} does not support it")
            self.model.activation_checkpointing = True
        if parallel is not None and (train_config.stage != "full" or train_config.freeze_old_experts):
            # The row masks and forced routing index all E experts; a rank holds a shard of them.
            raise ValueError(f"stage ({train_config.stage!r}) and freeze_old_experts "
                             f"({train_config.freeze_old_experts}) are not supported with several processes yet")
        configure_trainable(self.model, train_config)
        if train_config.stage == "experts":
            self.cluster_routing = ClusterRouting.fit(data.train_N, model_config, train_config.seed)
            self.cluster_routing.attach(self.model)
        self.num_parameters = self.model.num_parameters()  # before the experts are sharded
        self.num_active_parameters = self.model.num_parameters(active=True)  # every model kind counts both
        # What a training step calls: the model itself, or its DDP wrapper around sharded experts.
        self.train_model: torch.nn.Module = self.model
        if parallel is not None:
            if train_config.batch_size % parallel.world_size:
                raise ValueError(f"batch_size ({train_config.batch_size}) must be divisible by the number of "
                                 f"processes ({parallel.world_size}): each trains on an equal share of every batch")
            parallel.check_same("the training data (tokens, checksum)",
                                (data.train_N.numel(), int(data.train_N.sum()), int(data.val_N.sum())))
            self.train_model = parallelize(self.model, parallel)
            if parallel.rank > 0:
                # Router noise: rank 0 draws the single-process stream, the others streams of their own.
                torch.manual_seed(rank_seed(train_config.seed, 0, parallel.rank))
        self.sharded = parallel is not None and is_sharded(self.model)
        self.optimizer = build_optimizer(self.model, train_config)  # after sharding: it holds this rank's experts
        self.step = 0
        self.elapsed = 0.0  # training seconds, summed over resumed sessions
        self.interval = IntervalStats()
        self.last_val_loss: float | None = None
        resume_step = None
        if resume:
            folder = latest_checkpoint(self.run_dir)
            if folder is None:
                raise FileNotFoundError(f"{str(self.run_dir)!r} has no checkpoint to resume from")
            if parallel is None:
                state = load_checkpoint(folder, self.model, self.optimizer)
                self._rng_state = state["rng"]
            else:
                state = (load_sharded_checkpoint(folder, self.model, self.optimizer, parallel)
                         if is_sharded_checkpoint(folder) else load_parallel_checkpoint(folder, self.model, self.optimizer))
                self._rng_state = rank_rng_state(state, parallel.rank, parallel.world_size)
                if self._rng_state is None:
                    self._rng_seed = rank_seed(train_config.seed, state["step"], parallel.rank)
            if state["step"] > train_config.steps:
                raise CheckpointError(f"{str(folder)!r} is at step {state['step']}, past this run's {train_config.steps} "
                                      "steps; resume with a larger --resume-steps")
            self.step, self.elapsed = state["step"], state["elapsed"]
            self.interval = IntervalStats(**state["interval"])
            self.last_val_loss = state.get("last_val_loss")
            resume_step = self.step
        self.val_batches = validation_batches(
            data.val_N, train_config.batch_size, model_config.context_length, train_config.eval_batches
        )
        # Only rank 0 writes the run folder (metrics, TensorBoard, checkpoints).
        self.metrics = MetricsLog(self.run_dir, resume_step, tensorboard=tensorboard) if self.is_main else None
        self._stop_requested = False
        self._shown: dict[str, str] = {}  # progress-bar fields
        # What an interrupted run tells the user to type (the demo continues its own way).
        self.resume_command = f"moekit train --resume {self.run_dir}"

    def request_stop(self) -> None:
        """Finish the current step, save a checkpoint and return from fit()."""
        self._stop_requested = True

    def _trainer_state(self) -> dict:
        return {
            "elapsed": self.elapsed,
            "interval": self.interval.to_json(),
            "last_val_loss": self.last_val_loss,
        }

    def save(self) -> Path:
        check_finite_state(list(self.model.named_parameters()), f"the weights at step {self.step}")
        if self.sharded_checkpoints:  # collective under self.parallel
            return save_sharded_checkpoint(self.run_dir, self.step, self.model, self.optimizer,
                                           self._trainer_state(), self.parallel)
        if self.parallel is not None:  # collective: every rank calls it, rank 0 writes
            return save_parallel_checkpoint(self.run_dir, self.step, self.model, self.optimizer,
                                            self._trainer_state(), self.parallel)
        return save_checkpoint(self.run_dir, self.step, self.model, self.optimizer, self._trainer_state())

    def train_step(self) -> tuple[float, float, list, float]:
        """One optimizer step; returns (loss, aux_loss, each MoE layer's routing sums over every
        rank's tokens, gradient norm before clipping)."""
        cfg, device = self.config, self.config.device
        x_BS, y_BS = training_batch(self.data.train_N, cfg.batch_size, self.model_config.context_length, cfg.seed, self.step)
        parallel = self.parallel
        if parallel is not None:
            # Each rank trains on its share of the global batch; its loss is the mean over that share, so
            # the mean over ranks (DDP's gradient convention) is the single-process loss of the global batch.
            x_BS, y_BS = parallel.share(x_BS), parallel.share(y_BS)
        for group in self.optimizer.param_groups:
            group["lr"] = learning_rate(self.step, cfg)
        loss, aux_loss, sums_L = self.accumulate_gradients(x_BS.to(device), y_BS.to(device))
        if parallel is not None:
            reduce_gradients(self.model, parallel)
        grad_norm = clip_grad_norm(self.model, cfg.grad_clip if cfg.grad_clip > 0 else float("inf"), parallel)
        self._check_finite(loss, aux_loss, grad_norm.item())
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        if parallel is None:
            return loss, aux_loss, sums_L, grad_norm.item()
        loss, aux_loss = parallel.mean([loss, aux_loss])
        return loss, aux_loss, reduce_routing_sums(sums_L, parallel, self.sharded), grad_norm.item()

    def accumulate_gradients(self, x_BS: Tensor, y_BS: Tensor) -> tuple[float, float, list]:
        """Backward of the step's loss over ``grad_accumulation`` micro-batches, the balancing
        losses over all of them; returns (loss, aux_loss, routing sums per MoE layer)."""
        n = self.config.grad_accumulation
        pieces = list(zip(x_BS.chunk(n), y_BS.chunk(n), strict=True))
        autocast = torch.autocast(device_type=x_BS.device.type, dtype=torch.bfloat16, enabled=self.config.bf16)
        offsets = None
        if n > 1 and needs_global_sums(self.model):
            def forward(j):
                with autocast:
                    self.train_model(*pieces[j])
            offsets = micro_batch_sums(self.model, forward, n)
        loss = aux_loss = 0.0
        sums_L = None
        for j, (x, y) in enumerate(pieces):
            with other_micro_batches(self.model, offsets, j) if offsets else contextlib.nullcontext(), autocast:
                out = self.train_model(x, y)
            # The loss is a mean over tokens (1/n per micro-batch); the aux loss is already the whole batch's.
            (out.loss / n + out.aux_loss / (1 if offsets else n)).backward()
            loss, aux_loss = loss + out.loss.item() / n, aux_loss + out.aux_loss.item() / n
            step_sums = [routing_sums(routing) for routing in out.routings]
            sums_L = step_sums if sums_L is None else [a + b for a, b in zip(sums_L, step_sums, strict=True)]
        return loss, aux_loss, sums_L

    def _check_finite(self, loss: float, aux_loss: float, grad_norm: float) -> None:
        """Stop before a non-finite loss or gradient reaches the weights (every rank alike)."""
        diverged = not (math.isfinite(loss) and math.isfinite(aux_loss) and math.isfinite(grad_norm))
        if self.parallel is not None:
            diverged = self.parallel.any(diverged)
        if diverged:
            self.optimizer.zero_grad(set_to_none=True)
            raise NonFiniteError(
                f"training diverged at step {self.step + 1}: loss {loss}, auxiliary loss {aux_loss}, gradient norm "
                f"{grad_norm}; the weights were not updated and no checkpoint was written. {self._last_good()}")

    def _last_good(self) -> str:
        folder = latest_checkpoint(self.run_dir)
        if folder is None:
            return "No checkpoint was written before it: start again with a lower --lr or with --grad-clip."
        return (f"The last good checkpoint is {folder} (step {int(folder.name.split('-')[1])}); start a new run "
                f"from it with a lower --lr or with --grad-clip (moekit train --init-from {self.run_dir} ...).")

    def fit(self, on_step: Callable[[Trainer], None] | None = None) -> bool:
        """Train to config.steps; return False when stopped early (Ctrl-C or request_stop)."""
        cfg = self.config
        if getattr(self, "_rng_state", None) is not None:
            restore_rng_state(self._rng_state)
        elif hasattr(self, "_rng_seed"):  # a rank the checkpoint holds no RNG state for
            torch.manual_seed(self._rng_seed)
        self.__dict__.pop("_rng_state", None)
        self.__dict__.pop("_rng_seed", None)
        self.model.train()
        previous_handler = None
        in_main_thread = threading.current_thread() is threading.main_thread()
        if in_main_thread and signal.getsignal(signal.SIGINT) is signal.default_int_handler:

            def on_sigint(signum, frame):
                # First Ctrl-C: stop after this step with a checkpoint; a second one aborts.
                self.request_stop()
                signal.signal(signal.SIGINT, signal.default_int_handler)

            previous_handler = signal.signal(signal.SIGINT, on_sigint)
        tokens_per_step = cfg.batch_size * self.model_config.context_length
        bar = tqdm(
            total=cfg.steps, initial=self.step, desc=self.description, unit="step",
            disable=not self.progress, dynamic_ncols=True, leave=True,
        )
        try:
            while self.step < cfg.steps and not self._should_stop():
                started = time.perf_counter()
                loss, aux_loss, routings, grad_norm = self.train_step()
                step_time = time.perf_counter() - started
                self.elapsed += step_time
                self.interval.add(loss, aux_loss, step_time, tokens_per_step, routings)
                self.step += 1
                last = self.step == cfg.steps
                record = None
                if self.parallel is not None and self.parallel.replicate_every and \
                        self.step % self.parallel.replicate_every == 0:
                    record = {"step": self.step, "replication": replan_replicas(self.model)}
                if self.step % cfg.log_every == 0 or last:
                    record = {"step": self.step, "tokens": self.step * tokens_per_step, "elapsed": self.elapsed,
                              "lr": learning_rate(self.step - 1, cfg), "grad_norm": grad_norm,
                              **(record or {}), **self.interval.summary()}
                    self.interval = IntervalStats()
                if self.step % cfg.eval_every == 0 or last:
                    self.last_val_loss = evaluate(self.model, self.val_batches, cfg.device, cfg.bf16, self.parallel)
                    if not math.isfinite(self.last_val_loss):
                        raise NonFiniteError(f"the validation loss at step {self.step} is {self.last_val_loss}; no "
                                             f"checkpoint was written. {self._last_good()}")
                    record = record or {"step": self.step, "tokens": self.step * tokens_per_step, "elapsed": self.elapsed}
                    record["val_loss"] = self.last_val_loss
                if record is not None and self.metrics is not None:
                    self.metrics.write(record)
                    bar.set_postfix(self._postfix(record), refresh=False)
                bar.update(1)
                if self.step % cfg.checkpoint_every == 0 or last:
                    self.save()
                if on_step is not None:
                    on_step(self)
            if self._stop_requested and self.step < cfg.steps:
                self.save()
                if self.is_main:
                    bar.write(
                        f"stopped at step {self.step}/{cfg.steps}; checkpoint saved. "
                        f"Continue with: {self.resume_command}"
                    )
                return False
            return True
        except RuntimeError as err:
            # FSDP's and DDP's own collectives raise the backend's error when a peer rank dies: name it.
            named = None if self.parallel is None else self.parallel.named_failure(err)
            if named is None:
                raise
            raise named from err
        finally:
            bar.close()
            if self.metrics is not None:
                self.metrics.close()
            if previous_handler is not None:
                signal.signal(signal.SIGINT, previous_handler)

    def _should_stop(self) -> bool:
        if self.parallel is not None:
            # Every rank must stop after the same step (Ctrl-C may reach one rank only), or the
            # ranks desynchronise: one all-reduce of a flag per step.
            self._stop_requested = self.parallel.any(self._stop_requested)
        return self._stop_requested

    def _postfix(self, record: dict) -> dict:
        # Keep the last training numbers on screen when a line carries only a validation loss.
        shown = self._shown
        if "loss" in record:
            shown["loss"] = f"{record['loss']:.3f}"
        if self.last_val_loss is not None:
            shown["val"] = f"{self.last_val_loss:.3f}"
        if "tokens_per_s" in record:
            shown["tok/s"] = f"{record['tokens_per_s']:.0f}"
        if "balance" in record:
            shown["max/mean load"] = f"{record['balance']:.2f}"
        return dict(shown)
