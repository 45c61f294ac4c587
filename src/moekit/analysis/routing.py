"""What a trained model's routers do on held-out text: specialisation, top tokens, co-activation.

Shapes: N tokens analysed, K experts per token, E experts, C token categories,
L MoE layers.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ..data import CategorizedTokens
from ..models.lm import LanguageModel


@dataclass
class RoutingRecord:
    """The experts every analysed token was sent to, layer by layer."""

    ids_N: np.ndarray
    categories_N: np.ndarray
    category_names: tuple[str, ...]
    indices_LNK: list[np.ndarray]  # one (N, K) array per MoE layer
    moe_layers: list[int]  # block index of each MoE layer
    num_experts: int


@torch.no_grad()
def collect_routing(model: LanguageModel, tokens: CategorizedTokens, batch_size: int = 16) -> RoutingRecord:
    """Run the model over the tokens in context-length windows and keep each layer's choices."""
    if model.config.moe is None:
        raise ValueError("the model has no MoE layer to analyse; train with --experts > 1")
    model.eval()
    S = model.config.context_length
    device = next(model.parameters()).device
    n = (tokens.ids_N.numel() // S) * S
    if n == 0:
        raise ValueError(f"need at least context_length ({S}) tokens to analyse, got {tokens.ids_N.numel()}")
    windows_BS = tokens.ids_N[:n].view(-1, S)
    per_layer: list[list[np.ndarray]] = [[] for _ in model.moe_layers]
    for chunk in windows_BS.split(batch_size):
        routings = model(chunk.to(device)).routings
        for layer, routing in enumerate(routings):
            per_layer[layer].append(routing.indices_TK.cpu().numpy())
    return RoutingRecord(
        ids_N=tokens.ids_N[:n].numpy(),
        categories_N=tokens.categories_N[:n].numpy(),
        category_names=tokens.names,
        indices_LNK=[np.concatenate(chunks) for chunks in per_layer],
        moe_layers=model.moe_layers,
        num_experts=model.config.moe.num_experts,
    )


def specialisation(indices_NK: np.ndarray, categories_N: np.ndarray, num_experts: int, num_categories: int) -> np.ndarray:
    """(E, C): share of each category's expert assignments that went to each expert.

    Columns sum to one; a router blind to categories gives every column its
    overall load, so rows that vary across columns mean specialisation.
    """
    counts_EC = np.zeros((num_experts, num_categories))
    K = indices_NK.shape[1]
    np.add.at(counts_EC, (indices_NK.ravel(), np.repeat(categories_N, K)), 1)
    return counts_EC / np.maximum(counts_EC.sum(axis=0, keepdims=True), 1)


def coactivation(indices_NK: np.ndarray, num_experts: int) -> np.ndarray:
    """(E, E): P(token also uses expert j | it uses expert i); zero diagonal. Needs K >= 2."""
    chosen_NE = np.zeros((indices_NK.shape[0], num_experts))
    np.put_along_axis(chosen_NE, indices_NK, 1.0, axis=1)
    together_EE = chosen_NE.T @ chosen_NE
    uses_E = np.diag(together_EE).copy()
    np.fill_diagonal(together_EE, 0)
    return together_EE / np.maximum(uses_E[:, None], 1)


def top_tokens(
    indices_NK: np.ndarray, ids_N: np.ndarray, num_experts: int, n: int = 8, min_count: int = 3
) -> list[list[tuple[int, int, float]]]:
    """For each expert, up to n (token id, times routed there, share of that token's occurrences).

    Ranked by count × share, so that a token counts when it is both frequent at
    the expert and mostly sent there (plain frequency would list " " and "\\n"
    everywhere).
    """
    K = indices_NK.shape[1]
    vocab = int(ids_N.max()) + 1
    counts_EV = np.zeros((num_experts, vocab))
    np.add.at(counts_EV, (indices_NK.ravel(), np.repeat(ids_N, K)), 1)
    occurrences_V = np.bincount(ids_N, minlength=vocab)
    share_EV = counts_EV / np.maximum(occurrences_V, 1)
    score_EV = np.where(counts_EV >= min_count, counts_EV * share_EV, 0)
    result = []
    for e in range(num_experts):
        best = [v for v in np.argsort(-score_EV[e], kind="stable")[:n] if score_EV[e, v] > 0]
        result.append([(int(v), int(counts_EV[e, v]), float(share_EV[e, v])) for v in best])
    return result
