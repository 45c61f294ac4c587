import numpy as np
import pytest

from moekit.analysis.compare import compare, seed_summary, steps_to_reach
from moekit.analysis.routing import coactivation, specialisation, top_tokens


def test_specialisation_is_each_categorys_split_over_experts():
    indices_NK = np.array([[0, 1], [0, 2], [1, 2], [0, 1]])
    categories_N = np.array([0, 0, 1, 1])
    share_EC = specialisation(indices_NK, categories_N, num_experts=3, num_categories=3)
    np.testing.assert_allclose(share_EC[:, 0], [2 / 4, 1 / 4, 1 / 4])
    np.testing.assert_allclose(share_EC[:, 1], [1 / 4, 2 / 4, 1 / 4])
    np.testing.assert_allclose(share_EC[:, 2], [0, 0, 0])  # absent category: no division by zero


def test_coactivation_is_the_conditional_share_of_pairs():
    indices_NK = np.array([[0, 1], [0, 1], [0, 2], [1, 2]])
    co_EE = coactivation(indices_NK, 3)
    # expert 0 is used by 3 tokens, 2 of which also use 1 and 1 also uses 2
    np.testing.assert_allclose(co_EE[0], [0, 2 / 3, 1 / 3])
    np.testing.assert_allclose(co_EE[2], [1 / 2, 1 / 2, 0])


def test_top_tokens_prefer_tokens_both_frequent_and_mostly_routed_to_the_expert():
    ids_N = np.array([5] * 10 + [7] * 10 + [9] * 2)
    experts = [0] * 10 + [0] * 5 + [1] * 5 + [0, 0]
    best = top_tokens(np.array(experts)[:, None], ids_N, num_experts=2, n=3, min_count=3)
    assert best[0] == [(5, 10, 1.0), (7, 5, 0.5)]  # token 9 is below min_count
    assert best[1] == [(7, 5, 0.5)]


def test_comparison_finds_the_first_step_at_the_dense_final_loss():
    moe = [{"step": s, "elapsed": s, "val_loss": v, "step_time": 0.3} for s, v in ((10, 5.0), (20, 4.0), (30, 3.5))]
    dense = [{"step": s, "elapsed": s, "val_loss": v, "step_time": 0.2} for s, v in ((10, 5.2), (20, 4.4), (30, 4.0))]
    c = compare(moe, dense)
    assert c["moe_steps_to_dense_loss"] == 20 and c["dense_steps"] == 30
    assert c["step_time_ratio"] == pytest.approx(1.5) and c["moe_val_loss"] == 3.5
    assert steps_to_reach(moe, 3.0) is None
    s = seed_summary([c, dict(c, moe_val_loss=3.7)])
    assert s["dense_minus_moe"]["moe_better_in"] == 2
    assert abs(s["moe_val_loss"]["mean"] - 3.6) < 1e-12
