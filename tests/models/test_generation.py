"""KV-cache generation: the cache changes the cost, never the tokens.

Float64 models, so that a greedy choice cannot flip on the last bit of a near tie.
Shapes: B batch, S sequence length, V vocabulary.
"""

from __future__ import annotations

import pytest
import torch

from moekit import MoEConfig
from moekit.models.lm import KVCache, LanguageModel, LMConfig

V = 61


def _model(context_length=16, router="topk", moe_every=1) -> LanguageModel:
    torch.manual_seed(0)
    moe = MoEConfig(d_model=32, d_ff=24, num_experts=4, top_k=None if router == "hash" else 2, router=router,
                    **({"hash_vocab_size": V} if router == "hash" else {}))
    model = LanguageModel(LMConfig(vocab_size=V, context_length=context_length, n_layer=2, n_head=4, d_model=32,
                                   d_ff=48, moe=moe, moe_every=moe_every))
    with torch.no_grad():  # large weights, so that what a token attends to decides the next token
        for name, param in model.named_parameters():
            if name.endswith(("qkv.weight", "proj.weight", "w_in", "w_out", "w_in.weight", "w_out.weight")):
                param.mul_(12.0)
    return model.double().eval()


def _tokens(model, idx, n, **kwargs) -> torch.Tensor:
    return torch.cat(list(model.generate(idx, n, **kwargs)), dim=1)


def test_prefill_then_steps_give_the_logits_of_the_whole_sequence():
    model = _model(context_length=32)
    idx = torch.randint(0, V, (2, 12))
    with torch.no_grad():
        whole = model(idx).logits
        cache = KVCache(len(model.blocks))
        pieces = [model(idx[:, :5], cache=cache).logits]
        pieces += [model(idx[:, t:t + 1], cache=cache).logits for t in range(5, 9)]
        pieces.append(model(idx[:, 9:], cache=cache).logits)  # several new tokens after a cache
    assert cache.length == 12
    torch.testing.assert_close(torch.cat(pieces, dim=1), whole, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("router", ["topk", "sigmoid", "hash"])
def test_cached_greedy_equals_uncached_greedy_past_the_context_length(router):
    model = _model(context_length=12, router=router, moe_every=2)
    prompt = torch.randint(0, V, (2, 5))
    cached = _tokens(model, prompt, 20, temperature=0)  # the sequence outgrows 12 after 7 steps
    uncached = _tokens(model, prompt, 20, temperature=0, use_cache=False)
    assert torch.equal(cached, uncached)


def test_sampling_with_a_seed_is_the_same_with_and_without_the_cache():
    model = _model()
    prompt = torch.randint(0, V, (3, 4))
    runs = [_tokens(model, prompt, 15, temperature=0.9, top_k=20, top_p=0.95,
                    generator=torch.Generator().manual_seed(7), use_cache=use_cache) for use_cache in (True, False)]
    assert torch.equal(runs[0], runs[1])


@pytest.mark.parametrize("use_cache", [True, False])
def test_left_padded_prompts_generate_what_each_prompt_generates_alone(use_cache):
    model = _model(context_length=20)
    prompts = [torch.randint(0, V, (n,)) for n in (3, 7, 5)]
    width = max(len(p) for p in prompts)
    idx = torch.zeros(len(prompts), width, dtype=torch.long)
    mask = torch.zeros(len(prompts), width, dtype=torch.bool)
    for row, prompt in enumerate(prompts):
        idx[row, width - len(prompt):] = prompt
        mask[row, width - len(prompt):] = True
    batched = _tokens(model, idx, 16, temperature=0, attention_mask=mask, use_cache=use_cache)
    for row, prompt in enumerate(prompts):
        alone = _tokens(model, prompt[None], 16, temperature=0, use_cache=False)
        assert torch.equal(batched[row:row + 1], alone), f"prompt {row}"


def test_left_padded_rows_compute_the_logits_of_each_prompt_alone_with_and_without_the_cache():
    model = _model(context_length=20)
    prompts = [torch.randint(0, V, (n,)) for n in (3, 7, 5)]
    steps = torch.randint(0, V, (3, 4))
    width = max(len(p) for p in prompts)
    idx = torch.zeros(3, width, dtype=torch.long)
    mask = torch.zeros(3, width, dtype=torch.bool)
    for row, prompt in enumerate(prompts):
        idx[row, width - len(prompt):], mask[row, width - len(prompt):] = prompt, True
    with torch.no_grad():
        whole = model(torch.cat((idx, steps), 1), attention_mask=torch.cat((mask, torch.ones_like(steps, dtype=torch.bool)), 1)).logits
        cache = KVCache(len(model.blocks))
        cached = [model(idx, attention_mask=mask, cache=cache).logits]
        for t in range(4):
            mask = torch.cat((mask, torch.ones(3, 1, dtype=torch.bool)), 1)
            cached.append(model(steps[:, t:t + 1], attention_mask=mask, cache=cache).logits)
        cached = torch.cat(cached, 1)
        for row, prompt in enumerate(prompts):
            alone = model(torch.cat((prompt, steps[row]))[None]).logits[0]
            real = slice(width - len(prompt), None)
            torch.testing.assert_close(whole[row, real], alone, rtol=1e-9, atol=1e-9, msg=f"row {row}, no cache")
            torch.testing.assert_close(cached[row, real], alone, rtol=1e-9, atol=1e-9, msg=f"row {row}, cache")


def test_padding_reaches_no_expert_and_counts_in_no_statistic():
    model = _model(context_length=20)
    idx = torch.randint(0, V, (2, 6))
    mask = torch.ones(2, 6, dtype=torch.bool)
    mask[0, :4] = False
    with torch.no_grad():
        out = model(idx, attention_mask=mask)
    for routing in out.routings:
        assert int(routing.tokens_per_expert_E.sum()) == 2 * (2 + 6)  # K = 2 per real token


def test_generate_refuses_right_padding_and_a_mask_of_another_shape():
    model = _model()
    idx = torch.randint(0, V, (2, 4))
    right = torch.tensor([[True, True, True, False], [True] * 4])
    with pytest.raises(ValueError, match="pad prompts on the left"):
        next(model.generate(idx, 1, attention_mask=right))
    holes = torch.tensor([[False, True, False, True], [True] * 4])
    with pytest.raises(ValueError, match="padding only before a row's first real token"):
        next(model.generate(idx, 1, attention_mask=holes))
    with pytest.raises(ValueError, match=r"the prompts' shape \(2, 4\)"):
        next(model.generate(idx, 1, attention_mask=torch.ones(2, 5, dtype=torch.bool)))
    with pytest.raises(ValueError, match=r"sequence length \(17\) exceeds context_length \(16\)"):
        cache = KVCache(len(model.blocks))
        model(torch.randint(0, V, (1, 16)), cache=cache)
        model(torch.randint(0, V, (1, 1)), cache=cache)


def test_a_forward_without_the_auxiliary_loss_gives_the_same_logits_and_generate_skips_it(monkeypatch):
    from moekit import MoE

    model = _model()
    idx = torch.randint(0, V, (2, 6))
    with torch.no_grad():
        full, lean = model(idx), model(idx, aux_loss=False)
    assert full.aux_loss.item() > 0 and lean.aux_loss is None
    assert torch.equal(lean.logits, full.logits)
    assert [r.indices_TK.tolist() for r in lean.routings] == [
        r.indices_TK.tolist() for r in full.routings]
    expected = _tokens(model, idx, 5, temperature=0)

    def unwanted(*args):  # nothing in a generation step reads the loss
        raise AssertionError("generate computed an auxiliary loss")

    monkeypatch.setattr(MoE, "_aux_loss", unwanted)
    assert torch.equal(_tokens(model, idx, 5, temperature=0), expected)
