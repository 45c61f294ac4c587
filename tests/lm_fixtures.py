"""Fixtures for the language-model tests: a small real Python corpus and tiny settings."""

from __future__ import annotations

import shutil
import sysconfig
from pathlib import Path

import pytest

from moekit import MoEConfig
from moekit.models.lm import LMConfig
from moekit.train import DataConfig, TrainConfig

# Small, stable standard-library modules: real Python text, a few hundred KB in all.
CORPUS_MODULES = ("bisect.py", "colorsys.py", "fnmatch.py", "keyword.py", "shlex.py", "textwrap.py",
                  "glob.py", "sched.py", "queue.py", "heapq.py")


@pytest.fixture(scope="session")
def corpus_dir(tmp_path_factory) -> Path:
    """A folder of ten Python files copied from the running interpreter."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    folder = tmp_path_factory.mktemp("corpus")
    for name in CORPUS_MODULES:
        shutil.copy(stdlib / name, folder / name)
    return folder


def tiny_model_config(vocab_size: int, *, experts: int = 4, top_k: int = 2, router: str = "topk",
                      capacity_factor: float | None = None, n_layer: int = 2) -> LMConfig:
    moe = None
    if experts:
        moe = MoEConfig(d_model=32, d_ff=32, num_experts=experts, top_k=top_k, router=router,
                        capacity_factor=capacity_factor, z_loss_coef=1e-3)
    return LMConfig(vocab_size=vocab_size, context_length=32, n_layer=n_layer, n_head=2, d_model=32, d_ff=64, moe=moe)


def tiny_train_config(**changes) -> TrainConfig:
    settings = dict(steps=8, batch_size=4, lr=3e-3, min_lr=3e-4, warmup_steps=2, eval_every=4, eval_batches=2,
                    log_every=1, checkpoint_every=4, seed=0)
    settings.update(changes)
    return TrainConfig(**settings)


@pytest.fixture(scope="session")
def tiny_data_config(corpus_dir) -> DataConfig:
    return DataConfig(data=str(corpus_dir), tokenizer="bpe", vocab_size=320, val_fraction=0.2)


@pytest.fixture(scope="session")
def prepared(tiny_data_config):
    from moekit.train import prepare_data

    return prepare_data(tiny_data_config)


@pytest.fixture(autouse=True)
def _one_torch_thread():
    # Tiny tensors gain nothing from threads, and on a busy machine OpenMP threads
    # waiting for each other make every op slow.
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
