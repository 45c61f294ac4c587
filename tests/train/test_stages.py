"""Two-stage training (experts on their clusters, then the gate) and training with frozen old experts."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from lm_fixtures import tiny_model_config, tiny_train_config
from moekit.interop.lm_surgery import capture_moe_inputs, grow_lm
from moekit.models.lm import LanguageModel
from moekit.train import evaluate, fork_run, new_run, resume_run
from moekit.train.stages import spherical_kmeans, token_histograms


def _losses(run_dir, key="loss"):
    return [r[key] for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines()) if key in r]


def test_kmeans_of_token_histograms_separates_disjoint_vocabularies():
    generator = torch.Generator().manual_seed(0)
    labels = torch.arange(60) % 3
    # Group g writes only tokens [10·g, 10·g + 10): three topics with no shared words.
    windows_BS = torch.randint(0, 10, (60, 24), generator=generator) + 10 * labels[:, None]
    centroids = spherical_kmeans(token_histograms(windows_BS, 30), 3, generator)
    assigned = (token_histograms(windows_BS, 30) @ centroids.t()).argmax(1)
    for g in range(3):
        assert assigned[labels == g].unique().numel() == 1  # each group in one cluster...
    assert assigned.unique().numel() == 3  # ...and the groups in different ones


@pytest.fixture(scope="module")
def experts_stage_run(tmp_path_factory, prepared, tiny_data_config):
    run_dir = tmp_path_factory.mktemp("stages") / "experts"
    model_config = tiny_model_config(prepared.tokenizer.vocab_size, experts=4)
    trainer = new_run(run_dir, model_config, tiny_train_config(steps=30, lr=1e-2, min_lr=1e-3, log_every=5,
                                                                eval_every=30, stage="experts"),
                      tiny_data_config, prepared=prepared, progress=False, tensorboard=False)
    initial = _snapshot(trainer.model)
    assert trainer.fit()
    return run_dir, trainer, initial


def _snapshot(model) -> dict:
    return {name: p.detach().clone() for name, p in model.named_parameters()}


def test_stage_experts_routes_each_sequence_to_its_cluster_and_learns(experts_stage_run, prepared):
    run_dir, trainer, initial = experts_stage_run
    losses = _losses(run_dir)
    assert losses[-1] < losses[0] - 0.5, losses
    model = trainer.model.eval()
    for name, p in model.named_parameters():
        if ".router." in name:
            assert torch.equal(p, initial[name]), name  # routers frozen
    x_BS = torch.stack([prepared.tokens.train_N[i * 100: i * 100 + 32] for i in range(8)])
    expected_B = trainer.cluster_routing.clusters(x_BS)
    for routing in model(x_BS).routings:
        assert torch.equal(routing.indices_TK.view(8, 32), expected_B[:, None].expand(8, 32))
        assert torch.all(routing.weights_TK == 1)


def test_stage_gate_trains_only_the_routers(experts_stage_run, tmp_path):
    experts_dir, trainer, _ = experts_stage_run
    gate_config = dataclasses.replace(trainer.config, steps=30, stage="gate", lr=1e-2, eval_every=30)
    # The experts stage's model without its cluster hooks: the routers now decide.
    model = LanguageModel(trainer.model_config)
    model.load_state_dict(trainer.model.state_dict())
    fork_run(experts_dir, tmp_path / "gate", model, gate_config)
    gate = resume_run(tmp_path / "gate", progress=False, tensorboard=False)
    before = _snapshot(gate.model)
    val_before = evaluate(gate.model, gate.val_batches, "cpu")
    assert gate.fit()
    for name, p in gate.model.named_parameters():
        if ".router." in name:
            assert not torch.equal(p, before[name]), name
        else:
            assert torch.equal(p, before[name]), name  # bitwise: experts, attention, embeddings
    assert gate.last_val_loss < val_before, (val_before, gate.last_val_loss)


def test_freeze_old_experts_trains_only_the_new_experts_and_their_router_rows(tmp_path, prepared, tiny_data_config):
    vocab = prepared.tokenizer.vocab_size
    base = new_run(tmp_path / "base", tiny_model_config(vocab, experts=4), tiny_train_config(steps=4),
                   tiny_data_config, prepared=prepared, progress=False, tensorboard=False)
    assert base.fit()
    grown = grow_lm(base.model, 2, capture_moe_inputs(base.model, base.val_batches))
    config = tiny_train_config(steps=40, lr=1e-2, freeze_old_experts=4, seed=1)
    fork_run(tmp_path / "base", tmp_path / "grown", grown, config)
    trainer = resume_run(tmp_path / "grown", progress=False, tensorboard=False)
    before = _snapshot(trainer.model)
    assert trainer.fit()
    for name, p in trainer.model.named_parameters():
        if ".experts." in name or ".router." in name:
            assert torch.equal(p[:4], before[name][:4]), name  # old experts and their router rows
            assert not torch.equal(p[4:], before[name][4:]), name  # the new experts were chosen and trained
        else:
            assert torch.equal(p, before[name]), name


def test_stage_settings_are_checked():
    with pytest.raises(ValueError, match=r"stage \('both'\)"):
        tiny_train_config(stage="both")
    with pytest.raises(ValueError, match=r"freeze_old_experts \(2\) applies to stage 'full', not 'gate'"):
        tiny_train_config(stage="gate", freeze_old_experts=2)
