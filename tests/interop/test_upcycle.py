"""Sparse upcycling: the upcycled layer computes exactly what the dense FFN did."""

from __future__ import annotations

import pytest
import torch

from moekit import MoE
from moekit.interop.surgery import upcycle


def _llama_mlp():
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaMLP

    return LlamaMLP(LlamaConfig(hidden_size=16, intermediate_size=24, num_attention_heads=4, num_key_value_heads=4))


def _gpt2_mlp():
    from transformers import GPT2Config
    from transformers.models.gpt2.modeling_gpt2 import GPT2MLP

    mlp = GPT2MLP(24, GPT2Config(n_embd=16, n_head=4, resid_pdrop=0.0))
    with torch.no_grad():
        mlp.c_fc.bias.normal_()
        mlp.c_proj.bias.normal_()
    return mlp


def _moekit_dense():
    return MoE(d_model=16, d_ff=24, num_experts=1, top_k=1, expert="swiglu")


DENSE = {"llama": _llama_mlp, "gpt2": _gpt2_mlp, "moekit": _moekit_dense}


def _dense_forward(ffn, x):
    return ffn(x).y if isinstance(ffn, MoE) else ffn(x)


@pytest.mark.parametrize("kind", DENSE)
@pytest.mark.parametrize("router", ["topk", "softmax", "noisy_topk"])
def test_upcycled_output_equals_dense(kind, router):
    dense = DENSE[kind]().eval()
    moe = upcycle(dense, num_experts=4, router=router).eval()
    x = torch.randn(5, 7, 16)
    torch.testing.assert_close(moe(x).y, _dense_forward(dense, x), rtol=1e-5, atol=1e-5)


def test_perturb_and_reinit_break_symmetry_but_keep_expert_zero():
    dense = _llama_mlp()
    moe = upcycle(dense, num_experts=3, perturb=0.1, reinit_fraction=0.5, seed=1)
    w_in = moe.experts.w_in.detach()
    reference = torch.cat([dense.gate_proj.weight, dense.up_proj.weight])
    assert torch.equal(w_in[0], reference)
    for e in (1, 2):
        changed_units = (w_in[e, :24] != reference[:24]).all(dim=1)
        # Perturbation moves every unit; re-initialised ones are far from the original.
        assert changed_units.all()
        far = ((w_in[e, :24] - reference[:24]).abs().mean(dim=1) > 0.5 * reference[:24].abs().mean(dim=1))
        assert far.sum() == 12


def test_bad_inputs():
    with pytest.raises(TypeError, match="cannot read a dense FFN from Linear"):
        upcycle(torch.nn.Linear(4, 4), num_experts=2)
    with pytest.raises(ValueError, match="a dense FFN has one expert"):
        upcycle(MoE(d_model=4, d_ff=4, num_experts=2, top_k=1), num_experts=2)
    with pytest.raises(ValueError, match=r"reinit_fraction \(2.0\)"):
        upcycle(_moekit_dense(), num_experts=2, reinit_fraction=2.0)
