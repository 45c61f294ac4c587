import json
import math
import signal

import pytest
import torch

from lm_fixtures import tiny_model_config, tiny_train_config
from moekit.train import latest_checkpoint, learning_rate, new_run, read_metrics, resume_run


def _losses(run_dir):
    return [r["loss"] for r in read_metrics(run_dir) if "loss" in r]


def test_a_few_steps_bring_the_loss_down(tmp_path, prepared, tiny_data_config):
    vocab = prepared.tokenizer.vocab_size
    trainer = new_run(tmp_path / "run", tiny_model_config(vocab), tiny_train_config(steps=40, lr=1e-2, min_lr=1e-3, log_every=5, eval_every=20),
                      tiny_data_config, prepared=prepared, progress=False)
    assert trainer.fit()
    losses = _losses(tmp_path / "run")
    assert losses[0] > 5.0  # about log(320) = 5.77 at the start
    assert losses[-1] < losses[0] - 1.0
    vals = [r["val_loss"] for r in read_metrics(tmp_path / "run") if "val_loss" in r]
    assert len(vals) == 2 and vals[1] < vals[0]


@pytest.mark.parametrize("router", ["noisy_topk", "switch"])  # both draw random numbers in training
def test_resume_after_an_interruption_continues_with_bitwise_equal_losses(tmp_path, prepared, tiny_data_config, router):
    vocab = prepared.tokenizer.vocab_size
    model_config = tiny_model_config(vocab, router=router, top_k=1 if router == "switch" else 2)
    # log_every=3 with a stop at step 5 also checks that a half-filled logging interval survives.
    train_config = tiny_train_config(steps=9, log_every=3, checkpoint_every=100)

    straight = new_run(tmp_path / "straight", model_config, train_config, tiny_data_config, prepared=prepared,
                       progress=False, tensorboard=False)
    assert straight.fit()

    interrupted = new_run(tmp_path / "resumed", model_config, train_config, tiny_data_config, prepared=prepared,
                          progress=False, tensorboard=False)
    finished = interrupted.fit(on_step=lambda t: t.request_stop() if t.step == 5 else None)
    assert not finished and interrupted.step == 5
    assert latest_checkpoint(tmp_path / "resumed").name == "step-000005"
    torch.manual_seed(1234)  # the resumed run must not depend on the RNG state of the process
    resumed = resume_run(tmp_path / "resumed", progress=False, tensorboard=False)
    assert resumed.step == 5
    assert resumed.fit()

    assert _losses(tmp_path / "resumed") == _losses(tmp_path / "straight")
    val = [r.get("val_loss") for r in read_metrics(tmp_path / "straight")]
    assert [r.get("val_loss") for r in read_metrics(tmp_path / "resumed")] == val
    for (name, a), (_, b) in zip(straight.model.state_dict().items(), resumed.model.state_dict().items(), strict=True):
        assert torch.equal(a, b), name


@pytest.fixture
def default_sigint():
    """Python's own Ctrl-C handler for the test's duration: the trainer installs its own
    handler only over that one, and other code in the same process (process launchers,
    for one) may have replaced it."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, previous)


def test_ctrl_c_saves_a_checkpoint_and_returns_cleanly(tmp_path, prepared, tiny_data_config, default_sigint):
    trainer = new_run(tmp_path / "run", tiny_model_config(prepared.tokenizer.vocab_size), tiny_train_config(),
                      tiny_data_config, prepared=prepared, progress=False, tensorboard=False)
    # raise_signal delivers to this (the main) thread at once; os.kill may land on a worker thread
    # and reach the handler only after the next step has run.
    finished = trainer.fit(on_step=lambda t: signal.raise_signal(signal.SIGINT) if t.step == 3 else None)
    assert not finished and trainer.step == 3
    state = json.loads((latest_checkpoint(tmp_path / "run") / "trainer_state.json").read_text())
    assert state["step"] == 3
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_checkpoints_are_complete_and_older_ones_pruned(tmp_path, prepared, tiny_data_config):
    trainer = new_run(tmp_path / "run", tiny_model_config(prepared.tokenizer.vocab_size),
                      tiny_train_config(steps=8, checkpoint_every=2), tiny_data_config, prepared=prepared, progress=False)
    trainer.fit()
    folders = sorted(p.name for p in (tmp_path / "run" / "checkpoints").glob("step-*"))
    assert folders == ["step-000006", "step-000008"]
    files = sorted(p.name for p in (tmp_path / "run" / "checkpoints" / "step-000008").iterdir())
    assert files == ["checksums.json", "model.safetensors", "optimizer.safetensors", "trainer_state.json"]
    assert not list((tmp_path / "run").rglob("*.tmp-*"))
    assert list((tmp_path / "run" / "tensorboard").glob("events.out.tfevents.*"))
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert config["data"]["python_version"] and config["data"]["file_list_sha256"]
    assert config["model"]["moe"]["num_experts"] == 4


def test_starting_over_an_existing_run_is_refused(tmp_path, prepared, tiny_data_config):
    args = (tiny_model_config(prepared.tokenizer.vocab_size), tiny_train_config(), tiny_data_config)
    new_run(tmp_path / "run", *args, prepared=prepared, progress=False)
    with pytest.raises(FileExistsError, match="already holds a run"):
        new_run(tmp_path / "run", *args, prepared=prepared, progress=False)


def test_schedule_warms_up_linearly_then_decays_by_cosine_to_min_lr():
    cfg = tiny_train_config(steps=100, warmup_steps=10, lr=1.0, min_lr=0.1)
    assert [learning_rate(s, cfg) for s in (0, 4, 9)] == pytest.approx([0.1, 0.5, 1.0])
    assert learning_rate(10, cfg) == pytest.approx(1.0)
    assert learning_rate(55, cfg) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert learning_rate(100, cfg) == pytest.approx(0.1)


def test_bf16_autocast_trains_and_keeps_float32_weights(tmp_path, prepared, tiny_data_config):
    trainer = new_run(tmp_path / "run", tiny_model_config(prepared.tokenizer.vocab_size),
                      tiny_train_config(steps=12, lr=1e-2, bf16=True, log_every=4), tiny_data_config,
                      prepared=prepared, progress=False, tensorboard=False)
    assert trainer.fit()
    losses = _losses(tmp_path / "run")
    assert all(math.isfinite(x) for x in losses) and losses[-1] < losses[0]
    assert all(p.dtype == torch.float32 for p in trainer.model.parameters())


def test_a_cached_tokenizer_of_another_kind_is_refused(tmp_path, tiny_data_config):
    from moekit.data import ByteTokenizer
    from moekit.train import prepare_data

    ByteTokenizer().save(tmp_path / "tokenizer.json")
    with pytest.raises(ValueError, match="holds a bytes tokenizer but 'bpe' was asked for"):
        prepare_data(tiny_data_config, tmp_path / "tokenizer.json")
