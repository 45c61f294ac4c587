"""The ``moekit`` command: argument parsing, and dispatch to ``moekit.apps``.

The commands themselves live in ``moekit.apps`` (``commands``: train, eval,
generate, report, bench; ``demo``: the main job; ``surgery``: upcycle, grow,
prune; ``inference``: quantize, cache-sim; ``finetune``); this module only turns a command line into a call of one of them.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from .apps.arguments import THREADS_HELP
from .apps.arguments import add_offload_args as _add_offload_args
from .apps.arguments import add_parallel_args as _add_parallel_args
from .apps.arguments import add_surgery_args as _add_surgery_args
from .apps.arguments import positive_int as _positive_int
from .apps.common import DEMO_DEFAULTS, DEMO_VOCAB_SIZE, TRAIN_DEFAULTS, CLIError

DEMO_OUT = "runs/demo"


def _command(module: str, name: str):
    """The command ``moekit.apps.<module>.<name>``, imported when it runs (the parser stays light)."""

    def run(args) -> int:
        import importlib

        return getattr(importlib.import_module(f"moekit.apps.{module}"), name)(args)

    return run


# --- argument groups shared by train and demo ---------------------------------------


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
    g.add_argument("--shared-experts", type=int, default=0, metavar="N",
                   help="experts every token goes through besides its routed ones (DeepSeekMoE; default: %(default)s)")
    g.add_argument("--shared-d-ff", type=_positive_int, default=None,
                   help="hidden width of the shared experts (default: the routed experts' width)")
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
    g.add_argument("--grad-accumulation", type=_positive_int, default=1, metavar="N",
                   help="split each step's batch into N micro-batches (less memory; the balancing losses stay "
                        "the whole batch's; default: %(default)s)")
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
    g.add_argument("--threads", type=_positive_int, default=None, help=THREADS_HELP)


# --- parser ---------------------------------------------------------------------------


def _sizes(text: str) -> list[int]:
    try:
        sizes = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated positive integers, got {text!r}") from None
    if not sizes or min(sizes) < 1:
        raise argparse.ArgumentTypeError(f"expected comma-separated positive integers, got {text!r}")
    return sizes


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="moekit",
        description="Mixture-of-Experts toolkit: train MoE and dense language models, sample from them, "
        "report what their experts learned, reshape trained MoEs (upcycle, grow, prune) and time MoE layers.",
        epilog="Start with `moekit demo`; see docs/lm.md.",
    )
    from . import __version__

    parser.add_argument("--version", action="version", version=f"moekit {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    p = sub.add_parser("train", help="train a language model (MoE or dense) into a run folder",
                       description="Train a decoder-only language model whose FFN is a moekit MoE (or dense with "
                       "--experts 0). Ctrl-C saves a checkpoint; --resume continues the same loss curve.")
    p.add_argument("--out", metavar="RUN_DIR", help="run folder to create (default: runs/<date-time>)")
    p.add_argument("--resume", metavar="RUN_DIR", help="continue the run in RUN_DIR from its latest checkpoint "
                   "(its saved settings apply, its recorded --threads too unless given; other options are ignored, "
                   "except the parallelism ones)")
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
    _add_parallel_args(p)
    p.set_defaults(func=_command("commands", "cmd_train"))

    p = sub.add_parser("plan", help="predict step time and memory of layouts on 8 to 4096 devices",
                       description="The cost model of moekit.parallel.planner: for each number of devices, the "
                       "fastest (expert parallel, data parallel, DDP or FSDP, replica slots) layouts that fit, with "
                       "predicted tokens/s, step time and memory per device (docs/distributed.md).")
    p.add_argument("--model", choices=("gpt-oss-120b", "mixtral-8x7b", "demo"), default="mixtral-8x7b",
                   help="the model's shapes (default: %(default)s)")
    p.add_argument("--run", metavar="RUN_DIR", default=None, help="the shapes of a moekit run's model instead")
    p.add_argument("--hardware", choices=("h100", "b200"), default="h100", help="device and links (default: %(default)s)")
    p.add_argument("--devices", type=_positive_int, nargs=2, default=(8, 4096), metavar=("LOW", "HIGH"),
                   help="device counts, powers of two from LOW to HIGH (default: 8 4096)")
    p.add_argument("--tokens-per-device", type=_positive_int, default=None,
                   help="tokens per device and micro-batch (default: one sequence)")
    p.add_argument("--grad-accumulation", type=_positive_int, default=1, help="micro-batches per step")
    p.add_argument("--zipf", type=float, default=0.0, help="routing skew: Zipf exponent of expert loads (0: uniform)")
    p.add_argument("--precision", choices=("bf16", "fp32"), default="bf16", help="(default: %(default)s)")
    p.add_argument("--top", type=_positive_int, default=3, help="layouts shown per device count (default: %(default)s)")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=_command("plan", "cmd_plan"))

    p = sub.add_parser("convert-checkpoint", help="rewrite a run's latest checkpoint as one file or as shards",
                       description="Rewrite a run's latest checkpoint in the single-file safetensors layout "
                       "(canonical) or as torch.distributed.checkpoint shards (sharded), in one process.")
    p.add_argument("run_dir", metavar="RUN_DIR", help="a run folder written by moekit train")
    p.add_argument("--to", choices=("canonical", "sharded"), required=True, help="the layout to write")
    p.set_defaults(func=_command("commands", "cmd_convert_checkpoint"))

    p = sub.add_parser("eval", help="validation loss of a run's latest checkpoint",
                       description="Evaluate a run's latest checkpoint on its validation split; prints JSON.")
    p.add_argument("run_dir", metavar="RUN_DIR", help="a run folder written by moekit train")
    p.add_argument("--batches", type=_positive_int, default=64, help="validation batches at most (default: %(default)s)")
    p.add_argument("--batch-size", type=_positive_int, default=16, help="sequences per batch (default: %(default)s)")
    p.add_argument("--data-of", metavar="OTHER_RUN", default=None,
                   help="evaluate on the validation split of OTHER_RUN's corpus (e.g. the data a grown model "
                   "was trained on before growing)")
    p.add_argument("--threads", type=_positive_int, default=None, help=THREADS_HELP)
    _add_offload_args(p)
    p.set_defaults(func=_command("commands", "cmd_eval"))

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
    p.add_argument("--trace", metavar="FILE", default=None,
                   help="record which experts each MoE layer computes into FILE (JSON), for moekit cache-sim")
    p.add_argument("--threads", type=_positive_int, default=None, help=THREADS_HELP)
    _add_offload_args(p)
    p.set_defaults(func=_command("commands", "cmd_generate"))

    p = sub.add_parser("quantize", help="write a run with int8 or int4 experts, with an expert coverage report",
                       description="Quantize the experts of a run's latest checkpoint (weight-only, no calibration "
                       "data; router, attention and norms stay in full precision) into a new run folder that eval "
                       "and generate load. Reports the validation-loss change and the tokens each expert saw.")
    p.add_argument("run_dir", metavar="RUN_DIR", help="a run folder written by moekit train")
    p.add_argument("--bits", type=int, choices=(8, 4), default=8, help="int8 per output channel or int4 per group "
                   "(default: %(default)s)")
    p.add_argument("--group-size", type=_positive_int, default=64,
                   help="inputs per int4 scale: 32, 64, 128 or 256, dividing the layer widths (default: %(default)s)")
    p.add_argument("--out", default=None, help="the new run folder (default: RUN_DIR-int8 or RUN_DIR-int4)")
    p.add_argument("--batches", type=_positive_int, default=16,
                   help="validation batches for the loss change and the coverage report (default: %(default)s)")
    p.add_argument("--batch-size", type=_positive_int, default=16, help="sequences per batch (default: %(default)s)")
    p.add_argument("--threads", type=_positive_int, default=None, help=THREADS_HELP)
    p.set_defaults(func=_command("inference", "cmd_quantize"))

    p = sub.add_parser("cache-sim", help="hit rates of expert caches on a routing trace from generate --trace",
                       description="Replay a routing trace on an expert cache per MoE layer: hit rate per policy "
                       "(lru, lfu, and the optimal policy that knows the future) and cache size.")
    p.add_argument("trace", metavar="TRACE", help="a trace written by moekit generate --trace")
    p.add_argument("--sizes", type=_sizes, default=None,
                   help="comma-separated experts cached per layer (default: 1 to the number of experts)")
    p.set_defaults(func=_command("inference", "cmd_cache_sim"))

    p = sub.add_parser("report", help="write the HTML report of a run or a demo folder",
                       description="Write RUN_DIR/report/index.html with PNG plots: loss curves, expert load, routing "
                       "entropy, specialisation, top tokens, co-activation, drop rate and samples. A demo folder gives "
                       "the MoE-vs-dense comparison.")
    p.add_argument("run_dir", metavar="RUN_DIR", help="a run folder (moekit train) or a demo folder (moekit demo)")
    p.add_argument("--baseline", metavar="RUN_DIR", help="a second run to compare with (e.g. a dense model)")
    p.add_argument("--out", metavar="DIR", help="where to write the report (default: RUN_DIR/report)")
    p.add_argument("--threads", type=_positive_int, default=None, help=THREADS_HELP)
    p.set_defaults(func=_command("commands", "cmd_report"))

    p = sub.add_parser("demo", help="train an MoE and a dense model on the same tokens and compare them",
                       description="The main job: train an MoE language model and a dense model with the same active "
                       "parameters per token for the same tokens on the embedded corpus, then write a comparative "
                       "report. Re-running with the same options reuses finished runs and resumes interrupted ones.")
    p.add_argument("app", nargs="?", choices=("lm", "multitask", "timeseries", "vision"), default="lm",
                   help="lm: the language models (default); multitask: MMoE and PLE against one-gate MoE and a "
                   "shared bottom on generated multi-task data (runs/demo-multitask); timeseries: a mixture of "
                   "linear experts on a regime-switching series (runs/demo-timeseries); vision: a ViT, V-MoE and "
                   "Soft MoE on scikit-learn's digits (runs/demo-vision)")
    p.add_argument("--out", default=DEMO_OUT, help="demo folder (default: %(default)s)")
    p.add_argument("--seeds", type=_positive_int, default=None,
                   help="train this many seeds of each model, for the run-to-run spread (default: 1; "
                   "multitask: 3)")
    _add_model_args(p, DEMO_DEFAULTS)
    _add_data_args(p, DEMO_VOCAB_SIZE)
    _add_train_args(p, DEMO_DEFAULTS)
    g = p.add_argument_group("fine-tuning (after training: the first seed's models adapted to held-out text)")
    g.add_argument("--finetune-steps", type=int, default=150, metavar="N",
                   help="steps of each fine-tuning run: LoRA r=8 and 32 and full on the MoE, MixLoRA on the dense "
                   "model; 0 skips them (default: %(default)s)")
    g.add_argument("--finetune-data", default="stdlib-tests", metavar="PATH",
                   help="text to adapt to (default: %(default)s, the standard library's test suites, which the "
                   "embedded corpus leaves out)")
    p.set_defaults(func=_command("demo", "cmd_demo"))

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
    p.set_defaults(func=_command("surgery", "cmd_upcycle"))

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
    p.set_defaults(func=_command("surgery", "cmd_grow"))

    p = sub.add_parser("prune", help="remove experts from a trained MoE run and report the loss change",
                       description="Remove K experts from every MoE layer of RUN_DIR's model: those that route the "
                       "fewest validation tokens (--by load), or by merging the pair whose outputs agree most, K times "
                       "(--by similarity). The router renormalises over the experts left.")
    _add_surgery_args(p)
    p.add_argument("--remove", type=_positive_int, required=True, help="experts to remove per MoE layer")
    p.add_argument("--by", choices=("load", "similarity"), default="load",
                   help="which experts go (default: %(default)s)")
    p.set_defaults(func=_command("surgery", "cmd_prune"))

    p = sub.add_parser("finetune", help="adapt a trained run to new text: LoRA, mixture of LoRA experts or full",
                       description="Fine-tune SOURCE (a moekit run folder, or a Hugging Face MoE model's local "
                       "folder: Mixtral, Qwen-MoE, OLMoE, DeepSeek-V3) on --data (default: the embedded corpus) "
                       "into the run folder OUT: LoRA on the MoE layers' experts, a mixture of LoRA experts in place "
                       "of each dense FFN (mixlora), or every weight (full). The same command again continues OUT "
                       "from its latest checkpoint. At the end OUT/adapter holds the LoRA adapters in peft's format, "
                       "and with --merge OUT/merged the model with the updates folded into its weights.")
    p.add_argument("source", metavar="SOURCE", help="the trained run folder, or a Hugging Face MoE model's "
                   "save_pretrained folder (with its tokenizer.json), to start from (only read)")
    p.add_argument("--out", required=True, metavar="OUT", help="the fine-tuning run folder")
    p.add_argument("--method", choices=("lora", "mixlora", "full"), default="lora",
                   help="what trains (default: %(default)s)")
    g = p.add_argument_group("adapters")
    g.add_argument("--rank", type=_positive_int, default=8, help="LoRA rank r (default: %(default)s)")
    g.add_argument("--alpha", type=float, default=None, help="LoRA alpha; the update is scaled by alpha / r "
                   "(default: 2·rank)")
    g.add_argument("--rslora", action="store_true", help="scale by alpha / √r (rank-stabilised LoRA)")
    g.add_argument("--targets", default="experts", help="lora: experts and/or shared, comma-separated "
                   "(default: %(default)s)")
    g.add_argument("--mixlora-experts", type=_positive_int, default=4, help="mixlora: experts per FFN (default: 4)")
    g.add_argument("--mixlora-top-k", type=_positive_int, default=2, help="mixlora: experts per token (default: 2)")
    g = p.add_argument_group("training")
    g.add_argument("--data", default=None, metavar="PATH", help="text to adapt to: a file, folder or glob, or "
                   "stdlib-tests (the standard library's test suites, which the embedded corpus leaves out); "
                   "default: the embedded corpus")
    g.add_argument("--val-fraction", type=float, default=0.2, help="share of that text held out (default: %(default)s)")
    g.add_argument("--context-length", type=_positive_int, default=128,
                   help="tokens per window for a Hugging Face model (a moekit run keeps its own; default: %(default)s)")
    g.add_argument("--steps", type=_positive_int, default=200, help="optimizer steps (default: %(default)s)")
    g.add_argument("--lr", type=float, default=None, help="peak learning rate (default: 3e-3 for adapters, "
                   "5e-4 for full)")
    g.add_argument("--batch-size", type=_positive_int, default=16, help="sequences per step (default: %(default)s)")
    g.add_argument("--grad-accumulation", type=_positive_int, default=1, metavar="N",
                   help="micro-batches per step (default: %(default)s)")
    g.add_argument("--seed", type=int, default=1, help="seed of the adapters and batches (default: %(default)s)")
    g.add_argument("--eval-every", type=_positive_int, default=50, help="steps between evaluations (default: 50)")
    g.add_argument("--checkpoint-every", type=_positive_int, default=100, help="steps between checkpoints (default: 100)")
    p.add_argument("--merge", action="store_true", help="also write OUT/merged: the updates folded into the weights")
    p.add_argument("--report", action=argparse.BooleanOptionalAction, default=True,
                   help="write OUT/report at the end (default: on)")
    p.add_argument("--threads", type=_positive_int, default=None, help=THREADS_HELP)
    p.set_defaults(func=_command("finetune", "cmd_finetune"))

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
    p.add_argument("--threads", type=_positive_int, default=None, help=THREADS_HELP)
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
    p.set_defaults(func=_command("commands", "cmd_bench"))
    return parser


def _set_threads(args) -> None:
    """--threads, else what the run recorded, else the cores not busy now (one decision per process)."""
    import torch

    from .apps.common import default_threads, stored_threads

    run = getattr(args, "resume", None) or getattr(args, "run_dir", None)
    args.threads = args.threads or stored_threads(run) or default_threads()
    torch.set_num_threads(args.threads)


def main(argv: list[str] | None = None) -> int:
    from .data import DataError
    from .train.checkpoint import NonFiniteError

    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "experts", 1) < 0:
        parser.error(f"--experts ({args.experts}) must be >= 0")
    if args.command == "demo" and args.experts < 1:
        parser.error("the demo compares an MoE with a dense model; --experts must be >= 1")
    if args.command == "demo":
        args.seeds = args.seeds or (1 if args.app == "lm" else 3)
        args.default_out, args.default_steps = DEMO_OUT, DEMO_DEFAULTS["steps"]
    if args.command == "demo" and args.finetune_steps < 0:
        parser.error(f"--finetune-steps ({args.finetune_steps}) must be >= 0")
    keep = args.command != "bench" or args.keep_freed_memory
    if keep and os.environ.get("MOEKIT_KEEP_FREED_MEMORY", "1") != "0":
        from .compute.memory import keep_freed_memory

        keep_freed_memory()
    if hasattr(args, "threads"):
        _set_threads(args)
    device = str(getattr(args, "device", "cpu") or "cpu")
    if device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():  # before any work (the demo would train a tokenizer first)
            print(f"moekit {args.command}: error: --device {device}: this machine has no CUDA device "
                  "torch can use; use --device cpu", file=sys.stderr)
            return 2
    try:
        return args.func(args)
    except KeyboardInterrupt:
        if os.environ.get("MOEKIT_DEBUG"):
            raise
        print(f"\nmoekit {args.command}: interrupted", file=sys.stderr)
        return 130
    except (CLIError, DataError, FileNotFoundError, FileExistsError, ValueError, NonFiniteError) as err:
        if os.environ.get("MOEKIT_DEBUG"):
            raise
        print(f"moekit {args.command}: error: {err}", file=sys.stderr)
        return 2
    except RuntimeError as err:
        if os.environ.get("MOEKIT_DEBUG") or not str(err).startswith("expert parallel:"):
            raise
        print(f"moekit {args.command}: error: {err}", file=sys.stderr)  # a peer rank failed or disagreed
        return 2


if __name__ == "__main__":
    sys.exit(main())


__all__ = ["build_parser", "main"]
