"""Expert adapters in peft's format, both ways, on tiny Mixtral, Qwen3-MoE and OLMoE models:
moekit writes a folder that peft loads onto the original transformers model with the same
logits, and moekit loads the folder peft writes with peft's logits (float32, 1e-5)."""

from __future__ import annotations

import copy
import json

import pytest
import torch

pytest.importorskip("transformers")
peft = pytest.importorskip("peft")
from tests.interop.test_hf import _model  # noqa: E402

from moekit.finetune import add_lora  # noqa: E402
from moekit.finetune.peft import load_peft_adapter, save_peft_adapter  # noqa: E402
from moekit.interop.hf import convert_model  # noqa: E402

FAMILIES = ["mixtral", "qwen3_moe", "olmoe"]
TOL = {"rtol": 1e-5, "atol": 1e-5}


def _ids():
    return torch.randint(0, 101, (2, 9), generator=torch.Generator().manual_seed(3))


def _adapted_moekit(original, projections=("in", "out"), rank=4):
    converted = convert_model(copy.deepcopy(original))
    add_lora(converted, rank=rank, alpha=8, projections=projections)
    torch.manual_seed(1)
    with torch.no_grad():
        for name, p in converted.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.2)
    return converted


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("projections", [("in", "out"), ("out",)])
def test_peft_loads_moekits_folder_onto_the_original_model_with_the_same_logits(family, projections, tmp_path):
    original = _model(family)
    adapted = _adapted_moekit(original, projections)
    ids = _ids()
    with torch.no_grad():
        expected = adapted(ids).logits
        assert not torch.allclose(expected, original(ids).logits, **TOL)  # the adapters change the output
    save_peft_adapter(adapted, tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["r"] == 4 and config["target_modules"] == []
    peft_model = peft.PeftModel.from_pretrained(copy.deepcopy(original), tmp_path).eval()
    with torch.no_grad():
        torch.testing.assert_close(peft_model(ids).logits, expected, **TOL)


@pytest.mark.parametrize("family", FAMILIES)
def test_moekit_loads_the_folder_peft_writes_with_peft_logits(family, tmp_path):
    original = _model(family)
    torch.manual_seed(2)
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=[], init_lora_weights=False,
                             target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj"])
    peft_model = peft.get_peft_model(copy.deepcopy(original), config).eval()
    ids = _ids()
    with torch.no_grad():
        expected = peft_model(ids).logits
    peft_model.save_pretrained(tmp_path)
    converted = convert_model(copy.deepcopy(original)).eval()
    load_peft_adapter(converted, tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(converted(ids).logits, expected, **TOL)


def test_round_trip_through_peft_format_keeps_every_adapter_exactly(tmp_path):
    adapted = _adapted_moekit(_model("mixtral"))
    save_peft_adapter(adapted, tmp_path)
    loaded = load_peft_adapter(convert_model(_model("mixtral")), tmp_path)
    theirs = dict(loaded.named_parameters())
    for name, p in adapted.named_parameters():
        if "lora_" in name:
            assert torch.equal(theirs[name], p), name


def test_bad_adapter_folders_get_named_errors(tmp_path):
    converted = convert_model(_model("mixtral"))
    with pytest.raises(ValueError, match="not a peft adapter folder"):
        load_peft_adapter(converted, tmp_path / "missing")
    (tmp_path / "adapter_config.json").write_text(json.dumps(
        {"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["q_proj"], "target_parameters": []}))
    with pytest.raises(ValueError, match=r"also targets modules \['q_proj'\].*load the rest with peft"):
        load_peft_adapter(converted, tmp_path)
    (tmp_path / "adapter_config.json").write_text(json.dumps(
        {"peft_type": "LORA", "r": 4, "lora_alpha": 8, "use_dora": True}))
    with pytest.raises(ValueError, match="use_dora"):
        load_peft_adapter(converted, tmp_path)
    with pytest.raises(ValueError, match="no LoRA adapters"):
        save_peft_adapter(converted, tmp_path / "out")


def test_a_converted_model_with_adapters_saves_its_base_in_transformers_layout_and_loads_back():
    adapted = _adapted_moekit(_model("olmoe"))
    state = adapted.state_dict()
    assert "model.layers.0.mlp.experts.gate_up_proj" in state
    assert "model.layers.0.mlp.moe.experts.lora_A_in" in state
    fresh = convert_model(_model("olmoe"))
    add_lora(fresh, rank=4, alpha=8)
    with torch.no_grad():  # nothing may survive from before the load
        for p in fresh.parameters():
            p.normal_()
    fresh.load_state_dict(state)
    ids = _ids()
    with torch.no_grad():
        torch.testing.assert_close(fresh(ids).logits, adapted(ids).logits, rtol=0, atol=0)


@pytest.mark.parametrize("family", FAMILIES)
def test_router_adapters_travel_both_ways_through_peft(family, tmp_path):
    original = _model(family)
    converted = convert_model(copy.deepcopy(original))
    add_lora(converted, rank=4, alpha=8, targets=("experts", "router"))
    torch.manual_seed(1)
    with torch.no_grad():
        for name, p in converted.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.2)
    ids = _ids()
    with torch.no_grad():
        expected = converted(ids).logits
    save_peft_adapter(converted, tmp_path / "moekit")
    config = json.loads((tmp_path / "moekit" / "adapter_config.json").read_text())
    assert "mlp.gate.weight" in config["target_parameters"]
    peft_model = peft.PeftModel.from_pretrained(copy.deepcopy(original), tmp_path / "moekit").eval()
    loaded = load_peft_adapter(convert_model(copy.deepcopy(original)), tmp_path / "moekit").eval()
    with torch.no_grad():
        torch.testing.assert_close(peft_model(ids).logits, expected, **TOL)
        torch.testing.assert_close(loaded(ids).logits, expected, **TOL)
    # And the folder peft writes for the router alone.
    torch.manual_seed(2)
    peft_config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=[], init_lora_weights=False,
                                  target_parameters=["mlp.gate.weight"])
    theirs = peft.get_peft_model(copy.deepcopy(original), peft_config).eval()
    theirs.save_pretrained(tmp_path / "peft")
    ours = load_peft_adapter(convert_model(copy.deepcopy(original)), tmp_path / "peft").eval()
    with torch.no_grad():
        torch.testing.assert_close(ours(ids).logits, theirs(ids).logits, **TOL)
