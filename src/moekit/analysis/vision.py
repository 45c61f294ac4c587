"""Vision MoE on scikit-learn's digits: a dense ViT, V-MoE and Soft MoE at equal active
parameters per patch (``moekit demo vision``).

Every model is ``moekit.models.vision.ViT`` (4 blocks, D = 64, 2×2 patches of the 8×8
images: 16 patches), the MoE in every other block. Dense: MLP width 128. V-MoE: 8
experts of width 64, top-2, capacity factor 1.25, batch prioritized routing (each patch
runs 2 experts of half the width: the dense MLP's parameters per patch). Soft MoE: 8
experts of width 128 with 2 slots each (16 slots for 16 patches: one expert pass per
patch). Each trains with AdamW on the same batches; test accuracy is recorded against
images seen. For the first seed's V-MoE the report shows which classes each expert takes,
and its test accuracy when the capacity shrinks after training, with batch prioritized
routing against dropping by position (first choices first, earlier patches first).

Shapes: B images, E experts, S patches.
"""

from __future__ import annotations

import dataclasses
import statistics
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from tqdm.auto import tqdm  # noqa: E402

from ..config import MoEConfig  # noqa: E402
from ..models.vision import ViT, ViTConfig  # noqa: E402
from ..routing import router_class  # noqa: E402
from .plots import style_plots  # noqa: E402
from .report import html_table, write_page  # noqa: E402

TEST_IMAGES = 500
CAPACITY_FACTORS = (0.25, 0.5, 0.75, 1.0, 1.25, 1.5)
MODELS = ("dense", "V-MoE", "Soft MoE")


def model_config(name: str) -> ViTConfig:
    if name == "dense":
        return ViTConfig()
    if name == "V-MoE":
        return ViTConfig(moe=MoEConfig(d_model=64, d_ff=64, num_experts=8, top_k=2, expert="ffn",
                                       capacity_factor=1.25, drop_priority="batch_priority"))
    if name == "Soft MoE":
        return ViTConfig(moe=MoEConfig(d_model=64, d_ff=128, num_experts=8, router="soft", expert="ffn",
                                       load_balance_coef=0.0,
                                       router_options=router_class("soft").Options(slots_per_expert=2)))
    raise ValueError(f"model {name!r}: choose from {', '.join(MODELS)}")


def digits(seed: int = 0):
    """The 1,797 digits (pixels scaled to [0, 1]), shuffled; the last ``TEST_IMAGES`` held out."""
    from sklearn.datasets import load_digits

    data = load_digits()
    images = torch.tensor(data.images / 16.0, dtype=torch.float32)
    labels = torch.tensor(data.target)
    order = torch.randperm(len(images), generator=torch.Generator().manual_seed(seed))
    images, labels = images[order], labels[order]
    return images[:-TEST_IMAGES], labels[:-TEST_IMAGES], images[-TEST_IMAGES:], labels[-TEST_IMAGES:]


@torch.no_grad()
def accuracy(model: ViT, images: torch.Tensor, labels: torch.Tensor) -> float:
    model.eval()
    correct = (model(images).logits.argmax(1) == labels).float().mean().item()
    model.train()
    return correct


def train(name: str, seed: int, steps: int, *, batch_size: int = 64, lr: float = 2e-3, eval_every: int = 50):
    """The trained model and its test accuracy every ``eval_every`` steps: [(images seen, accuracy)]."""
    x_train, y_train, x_test, y_test = digits()
    torch.manual_seed(seed)
    model = ViT(model_config(name))
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.05)
    generator = torch.Generator().manual_seed(seed)
    curve = []
    for step in range(1, steps + 1):
        rows = torch.randint(0, len(x_train), (batch_size,), generator=generator)
        out = model(x_train[rows])
        loss = F.cross_entropy(out.logits, y_train[rows]) + out.aux_loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if step % eval_every == 0 or step == steps:
            curve.append((step * batch_size, accuracy(model, x_test, y_test)))
    return model, curve


@torch.no_grad()
def classes_per_expert(model: ViT, images: torch.Tensor, labels: torch.Tensor) -> list[list[float]]:
    """Last MoE layer: each class's share of its patches' kept assignments at each expert
    (rows: classes, columns: experts; a row sums to one)."""
    model.eval()
    routing = model(images).routings[-1]
    patches = model.config.num_patches
    label_T = labels.repeat_interleave(patches)
    indices_TK = routing.indices_TK
    kept_TK = routing.kept_TK if routing.kept_TK is not None else torch.ones_like(indices_TK, dtype=torch.bool)
    counts = torch.zeros(model.config.num_classes, routing.num_experts)
    for k in range(indices_TK.shape[1]):
        keep = kept_TK[:, k]
        counts.index_put_((label_T[keep], indices_TK[keep, k]), torch.ones(int(keep.sum())), accumulate=True)
    return (counts / counts.sum(1, keepdim=True).clamp_min(1)).tolist()


def capacity_sweep(model: ViT, images: torch.Tensor, labels: torch.Tensor) -> dict[str, list[float]]:
    """Test accuracy of a trained V-MoE at each capacity factor, per drop priority."""
    layers = [block.mlp for block in model.blocks if block.is_moe]
    saved = [layer.config for layer in layers]
    result = {}
    for priority in ("batch_priority", "position"):
        result[priority] = []
        for factor in CAPACITY_FACTORS:
            for layer, config in zip(layers, saved, strict=True):
                layer.config = dataclasses.replace(config, capacity_factor=factor, drop_priority=priority)
            result[priority].append(accuracy(model, images, labels))
    for layer, config in zip(layers, saved, strict=True):
        layer.config = config
    return result


def run(seeds: list[int], steps: int, progress: bool = True) -> dict:
    runs, analysis = [], {}
    bar = tqdm(total=len(seeds) * len(MODELS), desc="vision", unit="model", disable=not progress)
    _, _, x_test, y_test = digits()
    for seed in seeds:
        for name in MODELS:
            model, curve = train(name, seed, steps)
            runs.append({"model": name, "seed": seed, "accuracy": curve[-1][1], "curve": curve,
                         "parameters": sum(p.numel() for p in model.parameters())})
            if name == "V-MoE" and seed == seeds[0]:
                analysis = {"classes_per_expert": classes_per_expert(model, x_test, y_test),
                            "capacity": capacity_sweep(model, x_test, y_test)}
            bar.update(1)
    bar.close()
    return {"settings": {"seeds": seeds, "steps": steps, "batch_size": 64, "test_images": TEST_IMAGES},
            "runs": runs, **analysis}


def accuracy_table(results: dict) -> str:
    lines = ["| model | parameters | test accuracy, mean ± sd | per seed |", "|---|---:|---:|---|"]
    for name in MODELS:
        runs = [r for r in results["runs"] if r["model"] == name]
        values = [r["accuracy"] for r in runs]
        sd = statistics.stdev(values) if len(values) > 1 else 0.0
        lines.append(f"| {name} | {runs[0]['parameters']:,} | {statistics.fmean(values):.4f} ± {sd:.4f} | "
                     + ", ".join(f"{v:.3f}" for v in values) + " |")
    return "\n".join(lines)


def capacity_table(results: dict) -> str:
    lines = ["| capacity factor | " + " | ".join(f"{c:g}" for c in CAPACITY_FACTORS) + " |",
             "|---|" + "---:|" * len(CAPACITY_FACTORS)]
    for priority, label in (("batch_priority", "batch prioritized"), ("position", "by position")):
        lines.append(f"| {label} | " + " | ".join(f"{a:.3f}" for a in results["capacity"][priority]) + " |")
    return "\n".join(lines)


def _plots(results: dict, out: Path) -> list[str]:
    style_plots()
    fig, ax = plt.subplots(figsize=(6.0, 3.4))
    for name in MODELS:
        curves = np.array([[a for _, a in r["curve"]] for r in results["runs"] if r["model"] == name])
        seen = [s for s, _ in next(r for r in results["runs"] if r["model"] == name)["curve"]]
        ax.plot(seen, curves.mean(0), label=name)
        ax.fill_between(seen, curves.min(0), curves.max(0), alpha=0.15)
    ax.set_xlabel("training images seen")
    ax.set_ylabel("test accuracy")
    ax.set_ylim(0.5, 1.0)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "accuracy.png")
    plt.close(fig)
    fig, (left, right) = plt.subplots(1, 2, figsize=(9.0, 3.4))
    shares = np.array(results["classes_per_expert"])
    image = left.imshow(shares, cmap="Reds", vmin=0, aspect="auto")
    left.set_xlabel("expert")
    left.set_ylabel("digit")
    left.set_yticks(range(shares.shape[0]))
    left.set_title("Where each digit's patches go (last MoE layer)")
    fig.colorbar(image, ax=left, fraction=0.046)
    for priority, label in (("batch_priority", "batch prioritized"), ("position", "by position")):
        right.plot(CAPACITY_FACTORS, results["capacity"][priority], marker="o", label=label)
    right.set_xlabel("capacity factor at test time")
    right.set_ylabel("test accuracy")
    right.set_title("Shrinking capacity after training")
    right.legend()
    fig.tight_layout()
    fig.savefig(out / "experts.png")
    plt.close(fig)
    return ["accuracy.png", "experts.png"]


def write_vision_report(results: dict, out: Path) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    accuracy_png, experts_png = _plots(results, out)
    s = results["settings"]
    lead = (f"scikit-learn's 8×8 digits, {TEST_IMAGES} held out; {s['steps']} AdamW steps of {s['batch_size']} "
            f"images per model, {len(s['seeds'])} seed(s); equal parameters per patch in the MLP blocks.")
    sections = [
        ("Accuracy", lead, html_table(accuracy_table(results))
         + f'<img src="{accuracy_png}" alt="accuracy against images seen">'),
        ("Experts and capacity", "The first seed's V-MoE: the share of each digit's patch assignments each expert "
         "keeps, and test accuracy when every MoE layer's capacity factor is changed after training.",
         html_table(capacity_table(results)) + f'<img src="{experts_png}" alt="classes per expert and capacity">'),
    ]
    return write_page(out, "moekit demo vision: V-MoE and Soft MoE", "Every figure from moekit demo vision.",
                      sections, results)
