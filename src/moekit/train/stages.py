"""What trains in each stage: frozen parameters, and routing forced by data clusters.

Two-stage training (REFERENCES.md, "Two-stage training"): first each expert
learns its own subset of the data with the routing fixed, then the gate learns
to choose among the frozen experts.

- stage ``experts``: the training windows are clustered into E groups by
  k-means of their token histograms (spherical k-means on the square roots of
  token frequencies, a cheap document-similarity feature that needs no
  trained model). Every token of a window goes to its cluster's expert with
  weight 1, in every MoE layer, in training and evaluation alike; the routers
  are frozen and their auxiliary losses dropped (they decide nothing).
- stage ``gate``: only the routers train.
- ``freeze_old_experts = n``: only experts n.. and their router rows train (growing).

Shapes: B batch, S sequence length, V vocabulary, E experts (= clusters), T = B·S.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..freezing import freeze_experts, freeze_router_rows
from ..routing import Routing

# Windows sampled to fit the clusters, and Lloyd iterations: enough for stable
# centroids on corpora of a few hundred thousand tokens, and a second of CPU.
CLUSTER_WINDOWS = 1024
KMEANS_ITERATIONS = 25


def configure_trainable(model: nn.Module, config) -> None:
    """Set requires_grad (and row masks) for ``config.stage`` / ``config.freeze_old_experts``."""
    if config.stage == "full" and not config.freeze_old_experts:
        return
    if model.config.moe is None:
        raise ValueError(f"stage {config.stage!r} / freeze_old_experts need an MoE model; this one is dense")
    num_experts = model.config.moe.num_experts
    if config.freeze_old_experts >= num_experts:
        raise ValueError(f"freeze_old_experts ({config.freeze_old_experts}) must be below the number of experts "
                         f"({num_experts}), or nothing is left to train")
    for name, param in model.named_parameters():
        is_router = ".router." in name
        is_expert = ".experts." in name
        if config.stage == "experts":
            param.requires_grad_(not is_router)
        elif config.stage == "gate":
            param.requires_grad_(is_router)
        else:  # freeze_old_experts
            param.requires_grad_(is_router or is_expert)
    if config.freeze_old_experts:
        for i in model.moe_layers:
            old = list(range(config.freeze_old_experts))
            freeze_experts(model.blocks[i].ffn, old)
            # Old rows fixed too: an old token's logits for the old experts stay as they were,
            # so its routing changes only where a new expert outbids them.
            freeze_router_rows(model.blocks[i].ffn, old)


def token_histograms(x_BS: Tensor, vocab_size: int) -> Tensor:
    """Unit-norm square roots of each window's token frequencies (B, V)."""
    counts_BV = torch.zeros(x_BS.shape[0], vocab_size, device=x_BS.device)
    counts_BV.scatter_add_(1, x_BS, torch.ones_like(x_BS, dtype=counts_BV.dtype))
    return F.normalize(counts_BV.sqrt(), dim=1)


def spherical_kmeans(features_ND: Tensor, k: int, generator: torch.Generator,
                     iterations: int = KMEANS_ITERATIONS) -> Tensor:
    """Centroids (k, D) of unit-norm rows, by cosine similarity; k-means++ seeding."""
    N = features_ND.shape[0]
    if N < k:
        raise ValueError(f"cannot form {k} clusters from {N} windows")
    centroids = [features_ND[torch.randint(N, (1,), generator=generator)].squeeze(0)]
    for _ in range(1, k):
        distance_N = (1 - features_ND @ torch.stack(centroids).t()).min(dim=1).values.clamp_min(0)
        weights = distance_N if distance_N.sum() > 0 else torch.ones(N)
        centroids.append(features_ND[torch.multinomial(weights, 1, generator=generator)].squeeze(0))
    centroids_KD = torch.stack(centroids)
    for _ in range(iterations):
        assignment_N = (features_ND @ centroids_KD.t()).argmax(dim=1)
        for c in range(k):
            members = features_ND[assignment_N == c]
            if len(members):  # an empty cluster keeps its centroid
                centroids_KD[c] = F.normalize(members.mean(0), dim=0)
    return centroids_KD


class ClusterRouting:
    """Routes every token of a window to the expert of the window's cluster, through each MoE
    layer's forced routing (``MoE.force_routing``)."""

    def __init__(self, centroids_EV: Tensor):
        self.centroids_EV = centroids_EV
        self._expert_T: Tensor | None = None

    @classmethod
    def fit(cls, train_N: Tensor, model_config, seed: int) -> ClusterRouting:
        if model_config.moe is None:
            raise ValueError("stage 'experts' needs an MoE model; this one is dense")
        S, E = model_config.context_length, model_config.moe.num_experts
        generator = torch.Generator().manual_seed(seed)
        starts = torch.randint(len(train_N) - S, (CLUSTER_WINDOWS,), generator=generator)
        windows_BS = torch.stack([train_N[s: s + S] for s in starts.tolist()])
        features = token_histograms(windows_BS, model_config.vocab_size)
        return cls(spherical_kmeans(features, E, generator))

    def clusters(self, x_BS: Tensor) -> Tensor:
        """Cluster (= expert) id of each window (B,)."""
        features = token_histograms(x_BS, self.centroids_EV.shape[1])
        return (features @ self.centroids_EV.to(features.device).t()).argmax(dim=1)

    def attach(self, model: nn.Module) -> list:
        """The model records each batch's clusters (a forward pre-hook, whose handle is returned);
        every MoE layer routes by them."""
        for i in model.moe_layers:
            model.blocks[i].ffn.force_routing(self)
        return [model.register_forward_pre_hook(self._on_model_input)]

    def _on_model_input(self, model, args) -> None:
        x_BS = args[0]
        self._expert_T = self.clusters(x_BS).repeat_interleave(x_BS.shape[1])

    def __call__(self, routing: Routing) -> tuple[Tensor, Tensor]:
        expert_T = self._expert_T.to(routing.indices_TK.device)
        if expert_T.shape[0] != routing.indices_TK.shape[0]:
            raise RuntimeError(f"cluster routing saw {expert_T.shape[0]} tokens but the router {routing.indices_TK.shape[0]}")
        return expert_T[:, None], torch.ones_like(routing.weights_TK[:, :1])
