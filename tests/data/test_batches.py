import torch

from moekit.data import training_batch, validation_batches


def test_training_batch_depends_only_on_seed_and_step_and_targets_are_shifted():
    stream = torch.arange(1000)
    x1, y1 = training_batch(stream, 4, 16, seed=3, step=7)
    x2, y2 = training_batch(stream, 4, 16, seed=3, step=7)
    x3, _ = training_batch(stream, 4, 16, seed=3, step=8)
    assert torch.equal(x1, x2) and torch.equal(y1, y2) and not torch.equal(x1, x3)
    assert torch.equal(y1[:, :-1], x1[:, 1:]) and torch.equal(y1[:, -1], x1[:, -1] + 1)


def test_validation_windows_are_fixed_and_do_not_overlap():
    stream = torch.arange(1001)
    batches = validation_batches(stream, 4, 10, max_batches=3)
    starts = torch.cat([x[:, 0] for x, _ in batches]).tolist()
    assert len(starts) == 12 and starts == sorted(set(starts))
    assert all(s % 10 == 0 for s in starts) and starts[0] == 0 and starts[-1] == 990
    assert [x.shape[0] for x, _ in batches] == [4, 4, 4]
