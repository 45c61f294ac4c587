"""Bad input gets a clear error that names the value and what was expected."""

from __future__ import annotations

import pytest
import torch

from moekit import MoE, MoEConfig


@pytest.mark.parametrize(
    "kwargs,error,pattern",
    [
        (dict(top_k=9), ValueError, r"top_k \(9\) must be <= num_experts \(8\)"),
        (dict(top_k=0), ValueError, r"top_k \(0\) must be >= 1"),
        (dict(top_k=1.5), TypeError, r"top_k \(1.5\)"),
        (dict(capacity_factor=0.0), ValueError, r"capacity_factor \(0.0\)"),
        (dict(capacity_factor=-1), ValueError, r"capacity_factor \(-1\)"),
        (dict(num_experts=0), ValueError, r"num_experts \(0\)"),
        (dict(d_model=-3), ValueError, r"d_model \(-3\)"),
        (dict(drop_priority="random"), ValueError, r"drop_priority \('random'\).*probability, position"),
        (dict(z_loss_coef=-1.0), ValueError, r"z_loss_coef \(-1.0\)"),
        (dict(router="switch", top_k=2), ValueError, r"router 'switch' uses top_k = 1"),
    ],
)
def test_config_errors_name_the_value(kwargs, error, pattern):
    base = dict(d_model=16, d_ff=32, num_experts=8)
    with pytest.raises(error, match=pattern):
        MoEConfig(**{**base, **kwargs})


@pytest.mark.parametrize(
    "kwargs,pattern",
    [
        (dict(router="bogus"), r"unknown router 'bogus'; valid routers: .*noisy_topk.*softmax.*switch.*topk"),
        (dict(expert="moe"), r"unknown expert 'moe'; valid experts: swiglu, geglu, ffn"),
        (dict(expert="ffn", activation="tanh"), r"unknown activation 'tanh'; valid activations: relu, gelu, gelu_tanh, silu"),
        (dict(compute="cuda_magic"), r"unknown compute path 'cuda_magic'; valid paths: auto, loop, small_batch, segment, fused, grouped_mm"),
        (dict(d_model=6, compute="grouped_mm"), r"compute path 'grouped_mm' needs d_model and d_ff whose rows"),
    ],
)
def test_unknown_names_list_the_valid_ones(kwargs, pattern):
    base = dict(d_model=16, d_ff=32, num_experts=8)
    with pytest.raises(ValueError, match=pattern):
        MoE(**{**base, **kwargs})


def test_input_errors():
    moe = MoE(d_model=16, d_ff=32, num_experts=4, name="layers.3.moe")
    with pytest.raises(ValueError, match=r"layers.3.moe: input last dim \(15\) must equal d_model \(16\)"):
        moe(torch.randn(4, 15))
    with pytest.raises(TypeError, match=r"input dtype torch.int64 is not floating point"):
        moe(torch.ones(4, 16, dtype=torch.long))
    with pytest.raises(ValueError, match=r"mask shape \(2, 4\) must equal the input's leading shape \(2, 3\)"):
        moe(torch.randn(2, 3, 16), mask=torch.ones(2, 4, dtype=torch.bool))
    with pytest.raises(TypeError, match=r"mask must be a bool tensor"):
        moe(torch.randn(2, 3, 16), mask=torch.ones(2, 3))


def test_check_finite_names_the_layer():
    moe = MoE(d_model=4, d_ff=8, num_experts=2, check_finite=True, name="block7.moe")
    x = torch.randn(3, 4)
    moe(x)
    x[1, 2] = float("nan")
    with pytest.raises(FloatingPointError, match="block7.moe: input contains NaN or Inf"):
        moe(x)
    x[1, 2] = float("inf")
    with pytest.raises(FloatingPointError, match="block7.moe"):
        moe(x)


def test_config_and_kwargs_together_is_an_error():
    config = MoEConfig(d_model=4, d_ff=8, num_experts=2)
    with pytest.raises(TypeError, match="either a config or keyword fields"):
        MoE(config, top_k=1)


# --- per-router options, the flat adapter and records older run folders hold ----------

# What MoEConfig records looked like before router options were nested (dataclasses.asdict
# of the flat config, as config.json and demo.json hold them).
_FLAT_COMMON = {"expert": "swiglu", "activation": "gelu", "expert_bias": False, "normalize_weights": True,
                "capacity_factor": None, "expert_capacity": None, "capacity_per_sequence": False,
                "drop_priority": "probability", "router_jitter": 0.0, "load_balance_coef": 0.01, "z_loss_coef": 0.0,
                "importance_coef": 0.0, "load_coef": 0.0, "second_expert_policy": "all", "num_expert_groups": 1,
                "topk_groups": 1, "routed_scaling_factor": 1.0, "bias_update_rate": 0.001,
                "sequence_balance_coef": 0.0, "slots_per_expert": 1, "soft_normalize": True, "hash_vocab_size": None,
                "hash_seed": 0, "num_shared_experts": 0, "shared_d_ff": 8, "shared_expert_gate": False,
                "router_logit_bias": False, "compute": "auto", "check_finite": False, "debug_balanced_routing": False}
OLD_RECORDS = {
    "topk": ({**_FLAT_COMMON, "d_model": 64, "d_ff": 128, "num_experts": 8, "top_k": 2, "router": "topk",
              "z_loss_coef": 0.001, "shared_d_ff": 128},
             dict(d_model=64, d_ff=128, num_experts=8, top_k=2, z_loss_coef=0.001)),
    "sigmoid": ({**_FLAT_COMMON, "d_model": 16, "d_ff": 8, "num_experts": 8, "top_k": 2, "router": "sigmoid",
                 "num_expert_groups": 4, "topk_groups": 2, "routed_scaling_factor": 2.5, "num_shared_experts": 1},
                dict(d_model=16, d_ff=8, num_experts=8, router="sigmoid", num_expert_groups=4, topk_groups=2,
                     routed_scaling_factor=2.5, num_shared_experts=1)),
    "expert_choice": ({**_FLAT_COMMON, "d_model": 16, "d_ff": 8, "num_experts": 4, "top_k": 2,
                       "router": "expert_choice", "capacity_factor": 1.5},
                      dict(d_model=16, d_ff=8, num_experts=4, router="expert_choice", capacity_factor=1.5)),
    "grown_topk": ({**_FLAT_COMMON, "d_model": 16, "d_ff": 8, "num_experts": 6, "top_k": 2, "router": "topk",
                    "router_logit_bias": True},
                   dict(d_model=16, d_ff=8, num_experts=6, top_k=2, router_logit_bias=True)),
    "hash": ({**_FLAT_COMMON, "d_model": 16, "d_ff": 8, "num_experts": 4, "top_k": 1, "router": "hash",
              "hash_vocab_size": 50},
             dict(d_model=16, d_ff=8, num_experts=4, router="hash", hash_vocab_size=50)),
}


@pytest.mark.parametrize("name", sorted(OLD_RECORDS))
def test_records_of_older_run_folders_load_as_the_same_config(name):
    import dataclasses

    from moekit.models.lm import LMConfig

    old, flat_kwargs = OLD_RECORDS[name]
    config = MoEConfig.from_dict(old)
    assert config == MoEConfig(**flat_kwargs)
    assert MoEConfig.from_dict(dataclasses.asdict(config)) == config  # and the nested record round-trips
    if name != "expert_choice":  # not causal: no language model takes it
        model = LMConfig(vocab_size=50, d_model=config.d_model, n_head=2, d_ff=32, moe=dict(old))
        assert model.moe == config


def test_state_dict_names_are_those_older_checkpoints_hold():
    # As the layer named them before router options were nested (from that version's code).
    layer = MoE(MoEConfig(d_model=16, d_ff=8, num_experts=8, router="sigmoid", num_expert_groups=4, topk_groups=2,
                          routed_scaling_factor=2.5, num_shared_experts=1, shared_expert_gate=True,
                          router_logit_bias=True, expert_bias=True))
    assert sorted(layer.state_dict()) == [
        "experts.b_in", "experts.b_out", "experts.w_in", "experts.w_out", "router.expert_bias_E", "router.logit_bias",
        "router.weight", "shared_experts.ffn.b_in", "shared_experts.ffn.b_out", "shared_experts.ffn.w_in",
        "shared_experts.ffn.w_out", "shared_experts.gate.weight"]
    for router, options, names in [("noisy_topk", {}, ["router.noise_weight", "router.weight"]),
                                   ("soft", {"slots_per_expert": 2}, ["router.scale", "router.weight"]),
                                   ("hash", {"hash_vocab_size": 50}, ["router.expert_of_token_V"])]:
        layer = MoE(MoEConfig(d_model=16, d_ff=8, num_experts=4, router=router, **options))
        assert sorted(layer.state_dict()) == ["experts.w_in", "experts.w_out", *names], router


def test_router_options_nest_and_the_flat_form_fills_them():
    from moekit.routing import SigmoidOptions, SwitchOptions, TopKOptions

    flat = MoEConfig(d_model=16, d_ff=8, num_experts=8, router="sigmoid", num_expert_groups=4, topk_groups=2,
                     router_logit_bias=True)
    nested = MoEConfig(d_model=16, d_ff=8, num_experts=8, router="sigmoid",
                       router_options=SigmoidOptions(num_expert_groups=4, topk_groups=2, logit_bias=True))
    assert flat == nested and flat.router_options.kept_groups == 2
    assert MoEConfig(d_model=4, d_ff=4, num_experts=4).router_options == TopKOptions()
    assert MoEConfig(d_model=4, d_ff=4, num_experts=4, router="switch").router_options == SwitchOptions(jitter=0.01)
    with pytest.raises(TypeError, match="in router_options or as keywords \\(topk_groups\\), not both"):
        MoEConfig(d_model=16, d_ff=8, num_experts=8, router="sigmoid", router_options=SigmoidOptions(), topk_groups=2)
    with pytest.raises(TypeError, match="router 'switch' takes router_options of type SwitchOptions, got TopKOptions"):
        MoEConfig(d_model=4, d_ff=4, num_experts=4, router="switch", router_options=TopKOptions())


@pytest.mark.parametrize(
    "kwargs,error,pattern",
    [
        (dict(router="sigmoid", num_expert_groups=3), ValueError, r"num_experts \(8\) must be divisible by num_expert_groups \(3\)"),
        (dict(router="sigmoid", num_expert_groups=4, topk_groups=5), ValueError, r"topk_groups \(5\) must be an int in \[1, 4\]"),
        (dict(router="sigmoid", num_expert_groups=4, topk_groups=1, top_k=3), ValueError, r"top_k \(3\) must be <= topk_groups"),
        (dict(router="sigmoid", routed_scaling_factor=0), ValueError, r"routed_scaling_factor \(0\) must be a finite number > 0"),
        (dict(router="soft", slots_per_expert=0), ValueError, r"slots_per_expert \(0\) must be a positive integer"),
        (dict(router="hash"), ValueError, r"router 'hash' needs hash_vocab_size"),
        (dict(router="switch", router_jitter=1.5), ValueError, r"router_jitter \(1.5\) must be a finite number >= 0 and < 1"),
        (dict(router="expert_choice", capacity_factor=-2.0), ValueError, r"capacity_factor \(-2.0\) must be a finite number > 0"),
        (dict(router="expert_choice", expert_capacity=3), ValueError, r"expert_capacity \(3\) applies to token-choice routers"),
        # An option of another router changes nothing when left at its default, and is refused otherwise.
        (dict(router="switch", normalize_weights=False), ValueError, r"normalize_weights \(False\) is an option of router 'topk' / 'sigmoid', not of 'switch'"),
        (dict(router="topk", slots_per_expert=3), ValueError, r"slots_per_expert \(3\) is an option of router 'soft', not of 'topk'"),
        (dict(router="topk", frobnicate=1), TypeError, r"unexpected keyword argument 'frobnicate'"),
    ],
)
def test_each_router_validates_its_own_options(kwargs, error, pattern):
    with pytest.raises(error, match=pattern):
        MoEConfig(**{"d_model": 16, "d_ff": 8, "num_experts": 8, **kwargs})
    assert MoEConfig(d_model=16, d_ff=8, num_experts=8, router="switch", normalize_weights=True).top_k == 1


def test_router_traits_replace_name_lists():
    from moekit import ROUTERS

    traits = {name: (cls.causal, cls.needs_token_ids, cls.default_top_k, cls.top_k_fixed, cls.token_choice,
                     cls.growable) for name, cls in ROUTERS.items()}
    assert traits["topk"] == (True, False, 2, False, True, True)
    assert traits["softmax"] == (True, False, None, True, True, False)
    assert traits["switch"] == (True, False, 1, True, True, False)
    assert traits["hash"] == (True, True, 1, True, True, False)
    assert traits["expert_choice"][0] is False and traits["expert_choice"][4] is False
    assert traits["soft"][0] is False and traits["soft"][4] is False
    for name, cls in ROUTERS.items():
        assert cls.global_losses <= set(cls.losses), name
