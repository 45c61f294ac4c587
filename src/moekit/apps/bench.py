"""Speed and memory of MoE layers, side by side with the ideal and with peers.

The measure is efficiency η = t_dense / t_moe: a dense SwiGLU with the same
active FLOPs (hidden K·F on the same T tokens, same dtype and process) against
the MoE layer. Peers are Hugging Face transformers' MoE blocks holding the
same weights and routing the same tokens. All cases run interleaved in one
process (medians over rounds), so the ratios hold on a noisy machine.

Used by ``moekit bench`` and ``benchmarks/*.py``.

Shapes: T tokens, D model dim, F expert hidden dim, E experts, K experts per token.
"""

from __future__ import annotations

import math
import platform
import re
import statistics
import subprocess
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..compute import switches
from ..compute.paths import COMPUTE_PATHS
from ..config import MoEConfig
from ..layer import MoE
from ..routing import FixedRouting


@dataclass(kw_only=True)
class Case:
    """One benchmark shape. ``routing``: ``uniform`` (forced balanced), ``skewed``
    (forced Zipf, s = 1.2; see ``fixed_assignment``) or ``router`` (as initialised)."""

    name: str
    tokens: int
    d_model: int
    d_ff: int
    num_experts: int
    top_k: int
    mode: str = "fwdbwd"
    routing: str = "uniform"
    dtype: str = "float32"
    device: str = "cpu"
    paths: tuple[str, ...] = field(default_factory=lambda: default_paths("cpu"))
    peers: tuple[str, ...] = ("mixtral:eager", "mixtral:grouped_mm", "mixtral:batched_mm")

    @property
    def flops(self) -> float:
        forward = 6 * self.d_model * self.d_ff * self.tokens * self.top_k
        return forward * (3 if self.mode == "fwdbwd" else 1)


STANDARD = dict(tokens=4096, d_model=512, d_ff=1024, num_experts=8, top_k=2)
FINE_GRAINED = dict(tokens=4096, d_model=512, d_ff=128, num_experts=64, top_k=8)
# The standard shape scaled to GPU size: there the GEMMs, not the launches, must dominate.
SCALED = dict(tokens=16384, d_model=2048, d_ff=4096, num_experts=8, top_k=2)


def default_paths(device: str) -> tuple[str, ...]:
    """The compute paths timed on a device by default: those whose registry record names the
    device (``ComputePath.benchmark_devices``), in ``auto``'s order."""
    named = [p for p in COMPUTE_PATHS.values() if device in p.benchmark_devices]
    return tuple(p.name for p in sorted(named, key=lambda p: (p.auto_rank is None, p.auto_rank or 0)))


def default_cases(dtypes=("float32",), device: str = "cpu", paths: tuple[str, ...] | None = None) -> list[Case]:
    cases = []
    paths = paths or default_paths(device)
    gpu = device != "cpu"
    for dtype in dtypes:
        common = dict(dtype=dtype, device=device, paths=paths)
        # On a GPU: the target's shape first, and no batched_mm peer (it copies the
        # weights for every routed row: 30× slower, and out of memory at the scaled shape).
        mixtral = ("mixtral:eager", "mixtral:grouped_mm") if gpu else Case.peers
        if gpu:
            for routing in ("uniform", "skewed"):
                cases.append(Case(name=f"scaled {routing}", routing=routing, peers=mixtral, **common, **SCALED))
        for routing in ("uniform", "skewed"):
            cases.append(Case(name=f"standard {routing}", routing=routing, peers=mixtral, **common, **STANDARD))
        cases.append(Case(name="standard uniform fwd", mode="fwd", peers=mixtral, **common, **STANDARD))
        cases.append(Case(name="fine-grained uniform", peers=("qwen3:grouped_mm", "qwen3:eager"), **common,
                          **FINE_GRAINED))
        if gpu:
            cases.append(Case(name="fine-grained skewed", routing="skewed", peers=("qwen3:grouped_mm",),
                              **common, **FINE_GRAINED))
    return cases


def synchronize(device: str | torch.device) -> None:
    """Wait for queued device work, so host clocks time it (a no-op on CPU)."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def median_times(fns: dict[str, Callable[[], None]], repeats: int, warmup: int = 2, device: str = "cpu",
                 calls: int = 1) -> dict[str, list[float]]:
    """Every function ``warmup`` times, then ``repeats`` interleaved rounds; each
    round times ``calls`` back-to-back calls (device work included) and records the mean."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    synchronize(device)
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            for _ in range(calls):
                fn()
            synchronize(device)
            times[name].append((time.perf_counter() - start) / calls)
    return times


def machine_info() -> dict[str, str]:
    model = platform.processor()
    try:
        lscpu = subprocess.run(["lscpu"], capture_output=True, text=True, check=False).stdout
        model = next((ln.split(":", 1)[1].strip() for ln in lscpu.splitlines() if ln.startswith("Model name")), model)
    except OSError:
        pass
    info = {"cpu": model, "threads": str(torch.get_num_threads()), "torch": torch.__version__,
            "python": platform.python_version(), "keep_freed_memory": str(switches.current().freed_memory_kept)}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
        info["cuda"] = str(torch.version.cuda)
        try:
            import triton

            info["triton"] = triton.__version__
        except ImportError:
            pass
    return info


class DenseSwiGLU(nn.Module):
    """The ideal: one SwiGLU FFN of hidden K·F on all T tokens."""

    def __init__(self, d_model: int, hidden: int):
        super().__init__()
        self.w_in = nn.Linear(d_model, 2 * hidden, bias=False)
        self.w_out = nn.Linear(hidden, d_model, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        gate, up = self.w_in(x).chunk(2, dim=-1)
        return self.w_out(F.silu(gate) * up)


def fixed_assignment(tokens: int, num_experts: int, top_k: int, routing: str, zipf_s: float = 1.2) -> Tensor:
    """Expert ids (T, K) that every implementation in a case is made to use.

    ``uniform``: token t's k-th expert is (t·K + k) mod E, a perfectly even load;
    ``skewed``: K distinct experts per token drawn with probability ∝ rank^(−s), s = 1.2.
    """
    if routing == "uniform":
        t = torch.arange(tokens)
        return (t[:, None] * top_k + torch.arange(top_k)) % num_experts
    if routing == "skewed":
        generator = torch.Generator().manual_seed(1)
        zipf_E = torch.arange(1, num_experts + 1, dtype=torch.float64).pow(-zipf_s)
        return torch.multinomial(zipf_E.expand(tokens, -1), top_k, replacement=False, generator=generator)
    raise ValueError(f"routing ({routing!r}) must be 'uniform' or 'skewed' for a fixed assignment")


def _hf_peer(moe: MoE, spec: str, indices_TK: Tensor | None) -> nn.Module:
    from ..interop.hf import to_hf_block

    family, implementation = spec.split(":")
    c = moe.config
    if family == "mixtral":
        from transformers import MixtralConfig

        config = MixtralConfig(hidden_size=c.d_model, intermediate_size=c.d_ff, num_local_experts=c.num_experts,
                               num_experts_per_tok=c.top_k, router_jitter_noise=0.0)
        block_name = "MixtralSparseMoeBlock"
    elif family == "qwen3":
        from transformers import Qwen3MoeConfig

        config = Qwen3MoeConfig(hidden_size=c.d_model, moe_intermediate_size=c.d_ff, num_experts=c.num_experts,
                                num_experts_per_tok=c.top_k, norm_topk_prob=c.router_options.normalize_weights)
        block_name = "Qwen3MoeSparseMoeBlock"
    else:
        raise ValueError(f"unknown peer {spec!r}; expected mixtral:IMPL or qwen3:IMPL")
    config._experts_implementation = implementation
    block = to_hf_block(moe, config, block_name)
    if indices_TK is not None:
        gate_forward = block.gate.forward

        def forced_gate(hidden_states):
            logits, scores, _ = gate_forward(hidden_states)
            return logits, torch.full_like(scores, 1.0 / indices_TK.shape[1]), indices_TK.to(scores.device)

        block.gate.forward = forced_gate
    return block


def activation_bytes(fn: Callable[[], Tensor], exclude: list[Tensor]) -> int:
    """Bytes of the distinct storages autograd keeps for backward during ``fn()``,
    parameters and the given inputs excluded."""
    skip = {t.untyped_storage().data_ptr() for t in exclude}
    seen: dict[int, int] = {}

    def pack(t: Tensor):
        storage = t.untyped_storage()
        if storage.data_ptr() not in skip:
            seen[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    del out
    return sum(seen.values())


@dataclass
class CaseResult:
    case: dict
    rows: list[dict] = field(default_factory=list)
    load_max_over_mean: float = 1.0
    failed: dict[str, str] = field(default_factory=dict)


def failure_reason(error: BaseException) -> str:
    """One short line for why a case did not run (an allocator's refusal as the size it asked for)."""
    text = str(error)
    asked = re.search(r"tried to allocate (\d+) bytes", text)
    if asked:
        return f"out of memory: it asks for {int(asked.group(1)) / 2**30:.1f} GiB at once"
    first = text.strip().splitlines()[0] if text.strip() else type(error).__name__
    return first if len(first) <= 160 else first[:157] + "..."


def run_case(case: Case, repeats: int = 5, progress: Callable[[str], None] | None = None) -> CaseResult:
    dtype, device = getattr(torch, case.dtype), torch.device(case.device)
    torch.manual_seed(0)
    T, D, Fh, E, K = case.tokens, case.d_model, case.d_ff, case.num_experts, case.top_k
    backward = case.mode == "fwdbwd"
    forced = None if case.routing == "router" else fixed_assignment(T, E, K, case.routing).to(device)
    base = MoE(MoEConfig(d_model=D, d_ff=Fh, num_experts=E, top_k=K, load_balance_coef=0.0)).to(device, dtype)
    x = torch.randn(1, T, D, dtype=dtype, device=device, requires_grad=backward)
    grad_y = torch.randn(1, T, D, dtype=dtype, device=device)

    modules: dict[str, Callable[[Tensor], Tensor]] = {}
    dense = DenseSwiGLU(D, K * Fh).to(device, dtype)
    modules["dense (ideal)"] = dense
    layers = {}
    for path in case.paths:
        layer = MoE(MoEConfig(**{**base.config.__dict__, "compute": path})).to(device, dtype)
        layer.load_state_dict(base.state_dict())
        if forced is not None:
            layer.force_routing(FixedRouting(forced))
        layers[path] = layer
        modules[f"moekit {path}"] = lambda x, m=layer: m(x).y
    for spec in case.peers:
        try:
            block = _hf_peer(base, spec, forced)
        except ImportError:
            continue
        modules[f"transformers {spec}"] = block

    def step(module, params):
        def run():
            for p in params:
                p.grad = None
            if backward:
                x.grad = None
                module(x).backward(grad_y)
            else:
                with torch.no_grad():
                    module(x)

        return run

    fns, failed = {}, {}
    for name, module in list(modules.items()):
        owner = module if isinstance(module, nn.Module) else layers[name.split(" ", 1)[1]]
        fns[name] = step(module, list(owner.parameters()))
        if name.startswith("transformers"):
            try:  # some peers cannot run the shape at all (batched_mm copies weights per token)
                fns[name]()
                synchronize(device)
            except (RuntimeError, MemoryError) as error:
                failed[name] = failure_reason(error)
                del fns[name], modules[name]
    if progress:
        progress(case.name)
    # On a GPU one call can take tens of µs: time several back to back per round.
    calls = 1 if device.type == "cpu" else 10
    times = median_times(fns, repeats, device=case.device, calls=calls)
    memory = {}
    if backward:
        for name, module in modules.items():
            owner = module if isinstance(module, nn.Module) else layers[name.split(" ", 1)[1]]
            memory[name] = activation_bytes(lambda m=module: m(x), [x, *owner.parameters(), *owner.buffers()])
    with torch.no_grad():
        load = next(iter(layers.values()))(x).routing.tokens_per_expert_E.float()
    t_dense = statistics.median(times["dense (ideal)"])
    best = min(statistics.median(times[f"moekit {p}"]) for p in case.paths)
    result = CaseResult(case=asdict(case), load_max_over_mean=float(load.max() / load.mean()), failed=failed)
    for name, ts in times.items():
        t = statistics.median(ts)
        result.rows.append({
            "impl": name, "median_s": t, "min_s": min(ts), "max_s": max(ts), "eta": t_dense / t,
            "gflops": case.flops / t / 1e9, "vs_best_moekit": t / best,
            "activation_mb": memory.get(name, float("nan")) / 2**20,
        })
    return result


def copy_bandwidth(megabytes: int = 256, repeats: int = 5, device: str = "cpu") -> float:
    """Bytes per second moved by a large tensor copy (read + write counted)."""
    src = torch.empty(megabytes * 2**20 // 4, dtype=torch.float32, device=device).normal_()
    dst = torch.empty_like(src)
    times = median_times({"copy": lambda: dst.copy_(src)}, repeats, device=device)["copy"]
    return 2 * src.nbytes / statistics.median(times)


def run_decode(tokens=(1, 4, 16), repeats: int = 7, calls: int = 50, device: str = "cpu",
               dtype: str = "float32", **shape) -> list[dict]:
    """Forward time at tiny T against the bytes of expert weights that must be read."""
    shape = {**STANDARD, **shape}
    shape.pop("tokens")
    bandwidth = copy_bandwidth(device=device)
    rows = []
    torch.manual_seed(0)
    moe = MoE(MoEConfig(d_model=shape["d_model"], d_ff=shape["d_ff"], num_experts=shape["num_experts"],
                        top_k=shape["top_k"])).eval().to(device, getattr(torch, dtype))
    per_expert = sum(p[0].numel() * p.element_size() for p in (moe.experts.w_in, moe.experts.w_out))
    try:
        peer = _hf_peer(moe, "mixtral:grouped_mm", None)
    except ImportError:
        peer = None
    for T in tokens:
        x = torch.randn(T, shape["d_model"], device=device, dtype=getattr(torch, dtype))
        fns = {"moe": lambda x=x: moe(x)}
        if peer is not None:
            fns["peer"] = lambda x=x: peer(x[None])  # transformers blocks take (B, S, D)
        with torch.no_grad():
            hit = int((moe(x).routing.tokens_per_expert_E > 0).sum())
            times = median_times(fns, repeats, device=device, calls=calls)
        t = statistics.median(times["moe"])
        weight_bytes = hit * per_expert + moe.router.weight.numel() * moe.router.weight.element_size()
        rows.append({"tokens": T, "experts_hit": hit, "median_us": t * 1e6, "weight_mb": weight_bytes / 2**20,
                     "read_gb_s": weight_bytes / t / 1e9, "copy_gb_s": bandwidth / 1e9,
                     "fraction_of_copy": weight_bytes / t / bandwidth,
                     "transformers_grouped_mm_us": statistics.median(times["peer"]) * 1e6 if peer else None})
    return rows


def format_case(result: CaseResult) -> str:
    c = result.case
    lines = [f"{c['name']}: T={c['tokens']} D={c['d_model']} F={c['d_ff']} E={c['num_experts']} K={c['top_k']} "
             f"{c['dtype']} {c['mode']}, routing {c['routing']} (max/mean load {result.load_max_over_mean:.2f})",
             f"  {'impl':32s} {'median ms':>10s} {'η':>6s} {'GFLOP/s':>8s} {'× best moekit':>14s} {'act. MB':>8s}"]
    for r in result.rows:
        mb = "" if math.isnan(r["activation_mb"]) else f"{r['activation_mb']:8.1f}"
        lines.append(f"  {r['impl']:32s} {r['median_s'] * 1e3:10.1f} {r['eta']:6.2f} {r['gflops']:8.1f} "
                     f"{r['vs_best_moekit']:14.2f} {mb:>8s}")
    for name, reason in result.failed.items():
        lines.append(f"  {name:32s} did not run: {reason}")
    return "\n".join(lines)


def format_decode(rows: list[dict]) -> str:
    lines = [f"decode (forward, no grad): copy bandwidth {rows[0]['copy_gb_s']:.1f} GB/s (read + write)",
             f"  {'T':>3s} {'experts':>8s} {'µs':>9s} {'weights MB':>11s} {'GB/s':>7s} {'of copy':>8s} "
             f"{'transformers grouped_mm µs':>27s} {'speed-up':>9s}"]
    for r in rows:
        peer = r.get("transformers_grouped_mm_us")
        peer_text = f"{peer:27.1f} {peer / r['median_us']:9.2f}" if peer else ""
        lines.append(f"  {r['tokens']:3d} {r['experts_hit']:8d} {r['median_us']:9.1f} {r['weight_mb']:11.2f} "
                     f"{r['read_gb_s']:7.1f} {r['fraction_of_copy']:8.2f} {peer_text}")
    return "\n".join(lines)


def run_lm_step(repeats: int = 5, vocab_size: int = 4096, batch_size: int = 16, context_length: int = 128,
                d_model: int = 128, d_ff: int = 512, n_layer: int = 4, num_experts: int = 8,
                top_k: int = 2, device: str = "cpu", dtype: str = "float32") -> list[dict]:
    """One training step (forward, backward, AdamW) of the language model, MoE against
    dense with the same active parameters (experts of width d_ff / K), same tokens;
    float32 parameters, under autocast when ``dtype`` is a 16-bit type."""
    from ..models.lm import LanguageModel, LMConfig

    torch.manual_seed(0)
    idx = torch.randint(0, vocab_size, (batch_size, context_length + 1), device=device)
    inputs, targets = idx[:, :-1], idx[:, 1:]
    common = dict(vocab_size=vocab_size, context_length=context_length, n_layer=n_layer, d_model=d_model,
                  d_ff=d_ff)
    moe = MoEConfig(d_model=d_model, d_ff=d_ff // top_k, num_experts=num_experts, top_k=top_k)
    models = {"dense": LanguageModel(LMConfig(**common)).to(device),
              "MoE": LanguageModel(LMConfig(**common, moe=moe)).to(device)}
    steps = {}
    for name, model in models.items():
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)

        def step(model=model, optimizer=optimizer):
            with torch.autocast(torch.device(device).type, dtype=getattr(torch, dtype),
                                enabled=dtype != "float32"):
                out = model(inputs, targets)
            optimizer.zero_grad(set_to_none=True)
            (out.loss + out.aux_loss).backward()
            optimizer.step()

        steps[name] = step
    times = median_times(steps, repeats, device=device)
    t_dense = statistics.median(times["dense"])
    return [{"model": name, "median_s": statistics.median(ts), "ratio_to_dense": statistics.median(ts) / t_dense,
             "active_params": models[name].num_parameters(active=True),
             "total_params": models[name].num_parameters()} for name, ts in times.items()]


def format_lm_step(rows: list[dict]) -> str:
    lines = ["LM training step (fwd + bwd + AdamW), MoE vs dense with equal active parameters",
             f"  {'model':6s} {'median ms':>10s} {'× dense':>8s} {'active params':>14s} {'total params':>13s}"]
    for r in rows:
        lines.append(f"  {r['model']:6s} {r['median_s'] * 1e3:10.1f} {r['ratio_to_dense']:8.2f} "
                     f"{r['active_params']:14d} {r['total_params']:13d}")
    return "\n".join(lines)


def run_suite(dtypes=("float32",), repeats: int = 5, only: str = "", decode: bool = True,
              echo: Callable[[str], None] = print, device: str = "cpu",
              paths: tuple[str, ...] | None = None) -> dict:
    """Every default case (optionally those whose names contain one of the
    comma-separated ``only`` strings), then the decode and LM-step cases; returns the JSON record."""
    cases = default_cases(tuple(dtypes), device=device, paths=paths)
    if only:
        cases = [c for c in cases if any(s in c.name for s in only.split(","))]
    output = {"machine": machine_info(), "cases": [], "decode": []}
    echo(str(output["machine"]))
    for case in cases:
        result = run_case(case, repeats=repeats)
        echo(format_case(result))
        output["cases"].append(asdict(result))
    if decode:
        output["decode"] = run_decode(repeats=repeats, device=device, dtype=dtypes[0])
        echo(format_decode(output["decode"]))
    if not only or "lm" in only.split(","):
        output["lm_step"] = run_lm_step(repeats=repeats, device=device, dtype=dtypes[0])
        echo(format_lm_step(output["lm_step"]))
    return output
