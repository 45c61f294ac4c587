"""Expert adapters in the ``peft`` library's format, both ways.

``save_peft_adapter(model, folder)`` writes the LoRA adapters of a converted
transformers model (``convert_model`` then ``add_lora``) as ``peft`` writes them for
the original model: ``adapter_config.json`` with ``target_parameters`` naming the
stacked expert weights (``mlp.experts.gate_up_proj``, ``mlp.experts.down_proj``) and
``adapter_model.safetensors``. ``peft.PeftModel.from_pretrained(original, folder)``
then computes what the adapted moekit model computes. ``load_peft_adapter(model,
folder)`` reads such a folder (written by moekit or by ``peft``) onto a converted model.
moekit's own models are written the same way, with their own module and weight names
(``target_parameters``: ``ffn.experts.w_in``, ``ffn.experts.w_out``), and read back by
``load_peft_adapter``; peft itself cannot run them (its wrapper hides the stacked-MLP
contract the compute paths read).

peft's layout for a stacked weight (E, out, in) at rank r: ``lora_A.weight`` is (r·E,
in) with expert e's rows at e·r … e·r + r − 1, ``lora_B.weight`` is (out, r·E) with
expert e's rank-i column at i·E + e; the update is (alpha / r)·B_e·A_e. When both
weights of one experts module are adapted, peft nests its wrappers in the order the
module registers its parameters: ``gate_up_proj``'s wrapper is the inner one, whose
tensors sit under ``base_layer.`` (whatever order ``target_parameters`` lists them in).

Shapes: E experts, r rank, D model dim, F expert hidden dim.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import Tensor, nn

from ..experts.lora import LoRAExperts
from ..layer import MoE, moe_layers
from ..models.adapters import router_update
from .lora import add_lora

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
PREFIX = "base_model.model."
# moekit projection → the stacked weight it adapts, in transformers' MoE blocks and in moekit's.
HF_WEIGHTS = {"in": "gate_up_proj", "out": "down_proj"}
MOEKIT_WEIGHTS = {"in": "w_in", "out": "w_out"}
# The router's module: transformers' MoE blocks call it ``gate`` (its ``weight`` is (E, D)).
HF_ROUTER, MOEKIT_ROUTER = "gate", "router"
_UNSUPPORTED_OPTIONS = ("use_dora", "lora_bias", "fan_in_fan_out", "modules_to_save", "rank_pattern",
                        "alpha_pattern", "layers_to_transform", "trainable_token_indices")


def _adapted_layers(model: nn.Module) -> tuple[list[tuple[str, MoE]], dict[str, str], str]:
    """The model's MoE layers under the names peft gives the modules holding their experts'
    stacked weights, those weights' names by moekit projection, and the router's module name."""
    from ..interop.hf_models import HFMoEBlock

    blocks = [(name, m.moe) for name, m in model.named_modules() if isinstance(m, HFMoEBlock)]
    if blocks:  # a converted transformers model: its own module and weight names
        return blocks, HF_WEIGHTS, HF_ROUTER
    layers = moe_layers(model)
    if not layers:
        raise ValueError(f"{type(model).__name__} has no MoE layer; peft adapters are written for moekit models "
                         "and converted transformers models (moekit.interop.hf.convert_model)")
    return layers, MOEKIT_WEIGHTS, MOEKIT_ROUTER


def _peft_factors(A: Tensor, B: Tensor) -> tuple[Tensor, Tensor]:
    """moekit's A (E, r, in), B (E, out, r) → peft's lora_A (r·E, in), lora_B (out, r·E)."""
    E, r, width_in = A.shape
    return A.reshape(E * r, width_in), B.permute(1, 2, 0).reshape(B.shape[1], r * E)


def _moekit_factors(lora_A: Tensor, lora_B: Tensor, num_experts: int) -> tuple[Tensor, Tensor]:
    """peft's lora_A (r·E, in), lora_B (out, r·E) → moekit's A (E, r, in), B (E, out, r)."""
    E = num_experts
    r = lora_A.shape[0] // E
    return lora_A.reshape(E, r, lora_A.shape[1]), lora_B.reshape(lora_B.shape[0], r, E).permute(2, 0, 1)


def _key_prefixes(block_name: str, projections: tuple[str, ...]) -> dict[str, str]:
    """Where peft keeps each projection's tensors (``projections`` in parameter order)."""
    experts = f"{PREFIX}{block_name}.experts."
    if len(projections) == 1:
        return {projections[0]: experts}
    return {projections[0]: experts + "base_layer.", projections[1]: experts}


def save_peft_adapter(model: nn.Module, folder, *, base_model_name_or_path: str | None = None) -> Path:
    """Write the model's expert adapters as a peft LoRA folder for the original transformers model."""
    from safetensors.torch import save_file

    blocks, weights, router_name = _adapted_layers(model)
    adapted = [(name, moe.experts) for name, moe in blocks if isinstance(moe.experts, LoRAExperts)]
    routers = [(name, router_update(moe.router)) for name, moe in blocks if router_update(moe.router) is not None]
    if not adapted and not routers:
        raise ValueError("the model has no LoRA adapters on its experts or routers; call add_lora first")
    if any(lora.shared_base for _, lora in adapted):
        raise ValueError("mixtures of LoRA experts have no peft form (peft has no router over adapters); "
                         "the run's checkpoint holds them, merge_lora turns them into plain experts")
    if any(isinstance(m, LoRAExperts) for _, moe in blocks if moe.shared_experts is not None
           for m in moe.shared_experts.modules()):
        raise ValueError("adapters on shared experts have no peft target_parameters form; add_lora with "
                         "targets=('experts',) for a peft folder")
    settings = {(m.rank, m.alpha, m.rslora) for _, m in adapted + routers}
    projections = {lora.projections for _, lora in adapted}
    if len(settings) > 1 or len(projections) > 1 or len(adapted) not in (0, len(blocks)) \
            or len(routers) not in (0, len(blocks)):
        raise ValueError("peft's format holds one rank, alpha and target list for every layer; the model's "
                         f"adapters differ: {sorted(settings)}, projections {sorted(projections)}, on "
                         f"{len(adapted)} and {len(routers)} (routers) of {len(blocks)} MoE layers")
    (rank, alpha, rslora), = settings
    tensors, targets = {}, set()
    for name, lora in adapted:
        prefixes = _key_prefixes(name, lora.projections)
        for projection in lora.projections:
            A, B = getattr(lora, f"lora_A_{projection}"), getattr(lora, f"lora_B_{projection}")
            peft_A, peft_B = _peft_factors(A.detach(), B.detach())
            tensors[prefixes[projection] + "lora_A.weight"] = peft_A.contiguous().cpu()
            tensors[prefixes[projection] + "lora_B.weight"] = peft_B.contiguous().cpu()
            targets.add(f"{name.rsplit('.', 1)[-1]}.experts.{weights[projection]}")
    for name, update in routers:  # a 2-D weight: peft's plain (r, in) and (out, r) factors
        prefix = f"{PREFIX}{name}.{router_name}."
        tensors[prefix + "lora_A.weight"] = update.lora_A.detach().contiguous().cpu()
        tensors[prefix + "lora_B.weight"] = update.lora_B.detach().contiguous().cpu()
        targets.add(f"{name.rsplit('.', 1)[-1]}.{router_name}.weight")
    config = {
        "peft_type": "LORA", "task_type": None, "base_model_name_or_path": base_model_name_or_path,
        "r": rank, "lora_alpha": alpha, "use_rslora": rslora, "lora_dropout": 0.0,
        "bias": "none", "fan_in_fan_out": False, "init_lora_weights": True, "inference_mode": True,
        "target_modules": [], "target_parameters": sorted(targets),
    }
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(folder / WEIGHTS_FILE), metadata={"format": "pt"})
    (folder / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
    return folder


def _read_config(folder: Path) -> dict:
    path = folder / CONFIG_FILE
    if not folder.is_dir() or not path.is_file():
        raise ValueError(f"{str(folder)!r} is not a peft adapter folder: no {CONFIG_FILE}")
    try:
        config = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise ValueError(f"{path}: not valid JSON ({error.msg}, line {error.lineno})") from None
    if config.get("peft_type") != "LORA":
        raise ValueError(f"{path}: peft_type is {config.get('peft_type')!r}; moekit reads LORA adapters")
    set_options = [k for k in _UNSUPPORTED_OPTIONS if config.get(k)]
    if set_options:
        raise ValueError(f"{path}: options moekit's expert adapters do not have: {', '.join(set_options)}")
    if config.get("target_modules"):
        raise ValueError(f"{path}: the adapter also targets modules {config['target_modules']}; moekit loads the "
                         "expert adapters (target_parameters): load the rest with peft")
    return config


def _targets(config: dict, path: Path, weights: dict[str, str], router_name: str) -> tuple[tuple[str, ...], bool]:
    """The expert projections the folder adapts, and whether it adapts the routers."""
    by_weight = {w: p for p, w in weights.items()}
    projections, router = [], False
    for target in config.get("target_parameters") or []:
        parts = str(target).split(".")
        if parts[-2:] == [router_name, "weight"]:
            router = True
            continue
        if parts[-1] not in by_weight or "experts" not in parts:
            raise ValueError(f"{path}: target parameter {target!r} is neither a stacked expert weight "
                             f"(experts.{' or experts.'.join(weights.values())}) nor a router's ({router_name}.weight)")
        projections.append(by_weight[parts[-1]])
    if not projections and not router:
        raise ValueError(f"{path}: no target_parameters; nothing for moekit's expert adapters to load")
    # peft may save the list in any order; its nesting follows the block's parameter order.
    return tuple(p for p in weights if p in projections), router


def _take(tensors: dict[str, Tensor], keys: tuple[str, str], path: Path) -> tuple[Tensor, Tensor]:
    missing = [k for k in keys if k not in tensors]
    if missing:
        raise ValueError(f"{path}: no {missing[0]} (the folder does not fit this model)")
    return tensors[keys[0]], tensors[keys[1]]


def _copy_factors(name: str, pairs, key: str) -> None:
    for target, value in pairs:
        if value.shape != target.shape:
            raise ValueError(f"{name}: {key} gives a factor of shape {tuple(value.shape)}; the model needs "
                             f"{tuple(target.shape)}")
        target.copy_(value)


@torch.no_grad()
def load_peft_adapter(model: nn.Module, folder) -> nn.Module:
    """Load a peft LoRA folder targeting the stacked expert weights (and routers) onto a moekit
    or converted model (adding the adapters when the model has none); returns the model."""
    from safetensors.torch import load_file

    folder = Path(folder)
    config = _read_config(folder)
    blocks, weights, router_name = _adapted_layers(model)
    projections, router = _targets(config, folder / CONFIG_FILE, weights, router_name)
    path = folder / WEIGHTS_FILE
    if not path.is_file():
        raise ValueError(f"{str(folder)!r} has no {WEIGHTS_FILE}")
    tensors = load_file(str(path))
    rank = int(config["r"])
    has_experts = any(isinstance(moe.experts, LoRAExperts) for _, moe in blocks)
    has_routers = any(router_update(moe.router) is not None for _, moe in blocks)
    if not has_experts and not has_routers:
        add_lora(model, rank, float(config["lora_alpha"]), targets=("experts",) * bool(projections)
                 + ("router",) * router, projections=projections or ("in", "out"),
                 rslora=bool(config.get("use_rslora", False)))
    used = set()
    for name, moe in blocks:
        if projections:
            lora = moe.experts
            if not isinstance(lora, LoRAExperts) or lora.rank != rank:
                raise ValueError(f"{name}: the model's expert adapters ({getattr(lora, 'rank', 'none')}) differ "
                                 f"from the folder's rank {rank}")
            for projection, prefix in _key_prefixes(name, projections).items():
                keys = (prefix + "lora_A.weight", prefix + "lora_B.weight")
                A, B = _moekit_factors(*_take(tensors, keys, path), lora.num_experts)
                _copy_factors(name, [(getattr(lora, f"lora_A_{projection}"), A),
                                     (getattr(lora, f"lora_B_{projection}"), B)], keys[0])
                used.update(keys)
        if router:
            update = router_update(moe.router)
            if update is None or update.rank != rank:
                raise ValueError(f"{name}: the model's router has no rank-{rank} adapter to load into")
            prefix = f"{PREFIX}{name}.{router_name}."
            keys = (prefix + "lora_A.weight", prefix + "lora_B.weight")
            A, B = _take(tensors, keys, path)
            _copy_factors(name, [(update.lora_A, A), (update.lora_B, B)], keys[0])
            used.update(keys)
    unused = sorted(set(tensors) - used)
    if unused:
        raise ValueError(f"{path}: tensors the model has no place for: {', '.join(unused[:4])}")
    return model
