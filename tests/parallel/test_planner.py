"""The cost model of ``moekit plan``: parameter counts against a built model, each time term
against its formula on small numbers, and the planner's search."""

from __future__ import annotations

import pytest
import torch

from moekit import MoEConfig
from moekit.models.lm import LanguageModel, LMConfig
from moekit.parallel.planner import (
    HARDWARE,
    MODELS,
    PRECISIONS,
    Hardware,
    Layout,
    ModelShape,
    layouts,
    max_over_mean,
    plan,
    predict,
    zipf_loads,
)

# Round rates, so that each term can be checked by hand.
FLAT = Hardware("flat", gemm_flops=1e12, memory_bytes=1e12, memory_bandwidth=1e11, devices_per_node=4,
                intra_bandwidth=1e10, intra_latency=1e-5, inter_bandwidth=1e9, inter_latency=1e-4)


def _shape(**changes) -> ModelShape:
    settings = dict(name="tiny", n_layer=2, d_model=32, n_head=2, head_dim=16, vocab=100, seq=64, num_experts=4,
                    top_k=2, expert_d_ff=48, tied_embeddings=True)
    return ModelShape(**{**settings, **changes})


def test_parameter_counts_are_those_of_the_built_model():
    shape = _shape()
    model = LanguageModel(LMConfig(vocab_size=100, context_length=64, n_layer=2, n_head=2, d_model=32, d_ff=64,
                                   moe=MoEConfig(d_model=32, d_ff=48, num_experts=4, top_k=2)))
    counts = shape.counts()
    assert counts["dense"] + counts["experts"] == model.num_parameters()
    # Active: what a token computes with (the output head, not the embedding lookup).
    assert counts["active"] == model.num_parameters(active=True) - 100 * 32


def test_one_device_step_is_compute_plus_optimizer():
    shape, tokens = _shape(), 256
    prediction = predict(shape, FLAT, Layout(1, 1), tokens, precision=PRECISIONS["fp32"])
    flops = shape.flops_per_token()
    expert = 6 * 2 * 2 * 3 * 32 * 48  # 6 · layers · K · (3·D·F)
    scores = 12 * 2 * 16 * 2 * 32  # 12 · heads · head_dim · Σ_layers S/2
    assert flops["experts"] == expert and flops["rest"] == 6 * shape.counts()["active"] - expert + scores
    assert prediction.seconds["compute"] == pytest.approx(tokens * (flops["rest"] + flops["experts"]) / 1e12)
    total = shape.counts()["dense"] + shape.counts()["experts"]
    assert prediction.seconds["optimizer"] == pytest.approx(2 * total * 16 / 1e11)
    assert prediction.seconds["all_to_all"] == prediction.seconds["gradients"] == 0.0
    assert prediction.tokens_per_s == pytest.approx(tokens / prediction.step_s)


def test_all_to_all_and_gradient_terms_follow_their_formulas():
    shape, tokens = _shape(), 256
    prediction = predict(shape, FLAT, Layout(4, 4), tokens, precision=PRECISIONS["fp32"])
    # 4 exchanges per MoE layer of T·K·D·4 bytes·(EP − 1)/EP, on NVLink-like links (EP 4 fits a node).
    a2a = 2 * 4 * (tokens * 2 * 32 * 4 * 3 / 4 / 1e10 + 1e-5)
    assert prediction.seconds["all_to_all"] == pytest.approx(a2a)
    dense = shape.counts()["dense"] * 4
    ring = 2 * (3 / 4 * dense / 1e10 + 3 * 1e-5)  # all-reduce over 4; each expert has one holder
    assert prediction.seconds["gradients"] == pytest.approx(ring)
    # 8 devices: the data-parallel pairs of experts span nodes, and so does the dense all-reduce.
    wide = predict(shape, FLAT, Layout(8, 4), tokens, precision=PRECISIONS["fp32"])
    experts = shape.counts()["experts"] / 4 * 4
    expected = 2 * (7 / 8 * dense / 1e9 + 7 * 1e-4) + 2 * (1 / 2 * experts / 1e9 + 1e-4)
    assert wide.seconds["gradients"] == pytest.approx(expected)


def test_skew_slows_the_busiest_rank_and_replicas_relieve_it():
    shape = _shape(num_experts=16)
    assert max_over_mean(torch.ones(4)) == 1.0
    loads = zipf_loads(16, 1.2)
    plain = predict(shape, FLAT, Layout(8, 8), 512, loads_E=loads)
    replicated = predict(shape, FLAT, Layout(8, 8, slots=1), 512, loads_E=loads)
    uniform = predict(shape, FLAT, Layout(8, 8), 512)
    assert uniform.max_over_mean == 1.0 < replicated.max_over_mean < plain.max_over_mean
    assert plain.seconds["compute"] > replicated.seconds["compute"] > uniform.seconds["compute"]
    assert replicated.seconds["replicas"] > 0 and plain.seconds["replicas"] == 0


def test_fsdp_shards_the_states_and_the_planner_ranks_what_fits():
    shape = MODELS["mixtral-8x7b"]
    ddp = predict(shape, HARDWARE["h100"], Layout(64, 8), 4096)
    fsdp = predict(shape, HARDWARE["h100"], Layout(64, 8, fsdp=True), 4096)
    counts = shape.counts()
    assert ddp.memory["states"] == pytest.approx((counts["dense"] + counts["experts"] / 8) * 18)
    assert fsdp.memory["states"] == pytest.approx((counts["dense"] / 64 + counts["experts"] / 8 / 8) * 18)
    assert not ddp.fits and fsdp.fits  # 47 B parameters: 18 bytes each over EP 8 do not fit 80 GB
    result = plan(shape, HARDWARE["h100"], [8, 64], 4096, zipf=1.2)
    assert not any(p.fits for p in result[8])  # 47 B parameters do not fit 8 × 80 GB with AdamW
    assert all(p.layout.devices == 64 for p in result[64])
    best = result[64][0]
    assert best.fits and best.tokens_per_s == max(p.tokens_per_s for p in result[64] if p.fits)
    assert all(not (layout.slots and layout.fsdp) for layout in layouts(8, 64))
    with pytest.raises(ValueError, match="EP size 3 must divide"):
        predict(shape, FLAT, Layout(6, 3), 128)


def test_moekit_plan_prints_the_best_layouts(capsys, tmp_path):
    from moekit.cli import main

    assert main(["plan", "--model", "gpt-oss-120b", "--hardware", "b200", "--devices", "8", "64", "--zipf", "1.2",
                 "--top", "1"]) == 0
    out = capsys.readouterr().out
    assert "gpt-oss-120b: 2.13 B non-expert + 114.66 B expert parameters, 5.13 B active" in out
    assert [line.split()[0] for line in out.splitlines()[2:]] == ["8", "16", "32", "64"]
    assert main(["plan", "--devices", "64", "8"]) == 2


def test_moekit_plan_reads_the_shapes_of_a_run(tmp_path, prepared, tiny_data_config, capsys):
    from lm_fixtures import tiny_model_config, tiny_train_config
    from moekit.apps.plan import model_from_run
    from moekit.cli import main
    from moekit.train import new_run

    config = tiny_model_config(prepared.tokenizer.vocab_size)
    new_run(tmp_path / "run", config, tiny_train_config(steps=2), tiny_data_config, prepared=prepared, progress=False)
    shape = model_from_run(str(tmp_path / "run"))
    built = LanguageModel(config)
    counts = shape.counts()
    assert counts["dense"] + counts["experts"] == built.num_parameters()
    assert main(["plan", "--run", str(tmp_path / "run"), "--devices", "8", "8", "--top", "1"]) == 0
    assert capsys.readouterr().out.startswith("run: ")
