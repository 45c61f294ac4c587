import pytest
import torch

from moekit import MoEConfig
from moekit.models.lm import LanguageModel, LMConfig, router_is_causal, sample_next


def make(vocab=50, moe=None, **kw):
    settings = dict(vocab_size=vocab, context_length=16, n_layer=2, n_head=2, d_model=16, d_ff=32, moe=moe)
    settings.update(kw)
    return LanguageModel(LMConfig(**settings))


def test_one_expert_moe_model_equals_the_dense_model_with_the_same_weights():
    # E = K = 1: the MoE layer must reduce to the dense SwiGLU it replaces (the weight is 1).
    moe_model = make(moe=MoEConfig(d_model=16, d_ff=32, num_experts=1, top_k=1, load_balance_coef=0.0))
    dense_model = make()
    state = {}
    for name, value in moe_model.state_dict().items():
        if "router" in name:
            continue
        if name.endswith("experts.w_in") or name.endswith("experts.w_out"):
            name = name.replace("experts.", "") + ".weight"
            value = value[0]
        state[name] = value
    dense_model.load_state_dict(state)
    idx = torch.randint(0, 50, (3, 16))
    moe_out, dense_out = moe_model(idx, idx), dense_model(idx, idx)
    torch.testing.assert_close(moe_out.logits, dense_out.logits)
    torch.testing.assert_close(moe_out.loss, dense_out.loss)
    assert float(dense_out.aux_loss) == 0.0 and dense_out.routings == []


@pytest.mark.parametrize("router", ["topk", "noisy_topk", "switch", "softmax"])
def test_future_tokens_do_not_change_earlier_outputs(router):
    moe = MoEConfig(d_model=16, d_ff=16, num_experts=4, top_k=None if router in ("switch", "softmax") else 2,
                    router=router)
    model = make(moe=moe).eval()
    idx = torch.randint(0, 50, (2, 16))
    changed = idx.clone()
    changed[:, 10:] = (changed[:, 10:] + 7) % 50
    torch.testing.assert_close(model(idx).logits[:, :10], model(changed).logits[:, :10])
    assert not torch.allclose(model(idx).logits[:, 10:], model(changed).logits[:, 10:])


@pytest.mark.parametrize("router", ["expert_choice", "soft"])
def test_non_causal_routers_are_refused_with_a_clear_error(router):
    assert not router_is_causal(router)
    with pytest.raises(ValueError, match=f"router '{router}' is not causal"):
        LMConfig(vocab_size=10, d_model=16, n_head=2, moe=MoEConfig(d_model=16, d_ff=16, num_experts=4, router=router))


def test_aux_loss_is_the_sum_of_the_moe_layers_aux_losses():
    model = make(moe=MoEConfig(d_model=16, d_ff=16, num_experts=4, top_k=2, z_loss_coef=1e-2), n_layer=3, moe_every=2)
    assert model.moe_layers == [1]
    model3 = make(moe=MoEConfig(d_model=16, d_ff=16, num_experts=4, top_k=2, z_loss_coef=1e-2), n_layer=3)
    seen = []
    for block in model3.blocks:
        block.ffn.register_forward_hook(lambda mod, args, out: seen.append(out.aux_loss))
    out = model3(torch.randint(0, 50, (2, 16)))
    assert len(seen) == 3 and len(out.routings) == 3
    torch.testing.assert_close(out.aux_loss, torch.stack(seen).sum())
    assert out.aux_loss.item() > 0


def test_active_parameters_match_the_dense_model_when_experts_are_a_kth_as_wide():
    dense = make(d_ff=64)
    moe = make(d_ff=64, moe=MoEConfig(d_model=16, d_ff=32, num_experts=8, top_k=2))
    router_params = 2 * 8 * 16  # two MoE layers, (E, D) router weight each
    assert moe.num_parameters(active=True) == dense.num_parameters() + router_params
    assert moe.num_parameters() == dense.num_parameters() - 2 * 3 * 16 * 64 + 2 * 8 * 3 * 16 * 32 + router_params


def test_embeddings_are_tied():
    model = make()
    assert model.head.weight is model.embed.weight


def test_greedy_generation_follows_the_argmax_of_a_full_forward():
    model = make(moe=MoEConfig(d_model=16, d_ff=16, num_experts=4, top_k=2)).eval()
    prompt = torch.randint(0, 50, (1, 5))
    generated = torch.cat(list(model.generate(prompt, 6, temperature=0)), dim=1)
    idx = prompt
    for _ in range(6):
        idx = torch.cat([idx, model(idx[:, -16:]).logits[:, -1:].argmax(-1)], dim=1)
    assert torch.equal(generated, idx[:, 5:])


def test_generation_past_the_context_length_keeps_going():
    model = make().eval()
    tokens = list(model.generate(torch.zeros(1, 3, dtype=torch.long), 20, top_k=5))
    assert len(tokens) == 20 and all(0 <= int(t) < 50 for t in tokens)


def test_top_k_and_top_p_restrict_the_sampled_tokens():
    logits = torch.tensor([[4.0, 3.0, 2.0, 1.0, 0.0, -1.0]]).repeat(400, 1)
    g = torch.Generator().manual_seed(0)
    assert set(sample_next(logits, 2, None, g).flatten().tolist()) == {0, 1}
    # softmax of these logits: 0.64, 0.24, 0.09, ... -> top_p 0.8 keeps tokens 0 and 1 only
    assert set(sample_next(logits, None, 0.8, g).flatten().tolist()) == {0, 1}
    assert set(sample_next(logits, None, 0.5, g).flatten().tolist()) == {0}
    assert len(set(sample_next(logits, None, None, g).flatten().tolist())) >= 4


def test_bad_settings_name_the_value():
    with pytest.raises(ValueError, match=r"n_head \(3\) must divide d_model \(16\)"):
        make(n_head=3)
    with pytest.raises(ValueError, match=r"moe.d_model \(8\) must equal d_model \(16\)"):
        make(moe=MoEConfig(d_model=8, d_ff=8, num_experts=2))
    with pytest.raises(ValueError, match=r"sequence length \(17\) exceeds context_length \(16\)"):
        make()(torch.zeros(1, 17, dtype=torch.long))
    with pytest.raises(ValueError, match="temperature"):
        next(make().generate(torch.zeros(1, 1, dtype=torch.long), 1, temperature=-1))


def test_router_weights_start_at_the_configured_scale():
    moe = MoEConfig(d_model=128, d_ff=16, num_experts=8, top_k=2)
    model = LanguageModel(LMConfig(vocab_size=10, d_model=128, n_head=4, d_ff=16, moe=moe, router_init_std=0.3))
    routers = torch.cat([block.ffn.router.weight.flatten() for block in model.blocks])
    assert abs(routers.std().item() - 0.3) < 0.02 and abs(routers.mean().item()) < 0.02
