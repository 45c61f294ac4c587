"""Hash routing (Roller et al. 2021): a fixed random map from token id to expert."""

from __future__ import annotations

import pytest
import torch

from moekit import MoE, MoEConfig
from moekit.routing.hash import hash_table


def _hash_moe(**fields) -> MoE:
    fields = {"d_model": 4, "d_ff": 4, "num_experts": 3, "router": "hash", "hash_vocab_size": 10, **fields}
    torch.manual_seed(0)
    return MoE(MoEConfig(**fields))


def test_same_token_id_always_goes_to_the_same_expert():
    moe = _hash_moe()
    table = moe.router.expert_of_token_V
    ids = torch.tensor([[3, 7, 3, 0], [9, 3, 7, 1]])
    r1 = moe(torch.randn(2, 4, 4), token_ids=ids).routing
    r2 = moe(torch.randn(2, 4, 4), token_ids=ids.flip(0)).routing
    assert r1.indices_TK[:, 0].tolist() == table[ids.flatten()].tolist()
    assert r2.indices_TK[:, 0].tolist() == table[ids.flip(0).flatten()].tolist()
    # Same seed, same map in a fresh layer; it is saved with the layer.
    assert torch.equal(_hash_moe().router.expert_of_token_V, table)
    assert "router.expert_of_token_V" in moe.state_dict()
    assert not torch.equal(_hash_moe(hash_seed=1).router.expert_of_token_V, table)


def test_map_is_balanced_over_the_vocabulary():
    counts = torch.bincount(hash_table(10, 3, seed=0), minlength=3)
    assert sorted(counts.tolist()) == [3, 3, 4]


def test_output_is_the_hashed_expert_with_weight_one_and_nothing_is_learned():
    moe = _hash_moe()
    x = torch.randn(5, 4)
    ids = torch.tensor([0, 1, 2, 3, 4])
    out = moe(x, token_ids=ids)
    table = moe.router.expert_of_token_V
    expected = torch.stack([moe.experts.forward_expert(int(table[i]), x[i : i + 1])[0] for i in range(5)])
    torch.testing.assert_close(out.y, expected)
    assert list(moe.router.parameters()) == []
    assert out.routing.losses == {}
    assert out.routing.stats["entropy"].item() == 0.0


def test_missing_or_bad_token_ids_raise_clear_errors():
    moe = _hash_moe()
    x = torch.randn(2, 4)
    with pytest.raises(ValueError, match="token_ids"):
        moe(x)
    with pytest.raises(ValueError, match="token_ids shape \\(3,\\) must equal .*\\(2,\\)"):
        moe(x, token_ids=torch.tensor([1, 2, 3]))
    with pytest.raises(TypeError, match="int64/int32"):
        moe(x, token_ids=torch.tensor([1.0, 2.0]))
    with pytest.raises(ValueError, match="token id 10 is outside .*\\[0, 10\\)"):
        moe(x, token_ids=torch.tensor([1, 10]))
    # Padding may carry any id, e.g. an ignore index.
    out = moe(x, token_ids=torch.tensor([1, -100]), mask=torch.tensor([True, False]))
    assert torch.all(out.y[1] == 0)


def test_hash_config_needs_a_vocabulary_and_uses_one_expert():
    with pytest.raises(ValueError, match="hash_vocab_size"):
        MoEConfig(d_model=4, d_ff=4, num_experts=3, router="hash")
    with pytest.raises(ValueError, match="top_k = 1"):
        MoEConfig(d_model=4, d_ff=4, num_experts=3, router="hash", hash_vocab_size=5, top_k=2)
