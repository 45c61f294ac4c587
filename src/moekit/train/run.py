"""Setting up a run folder: corpus, tokenizer (cached in the folder), token streams, configs."""

from __future__ import annotations

import shutil
import warnings
from dataclasses import dataclass
from pathlib import Path

from ..data import Corpus, TokenData, build_tokenizer, load_corpus, load_tokenizer, tokenize_corpus
from ..models.hf_spec import HFModelSpec
from ..models.lm import LanguageModel, LMConfig
from ..parallel import ParallelContext
from .trainer import TrainConfig, Trainer, read_run_config, write_run_config

TOKENIZER_FILE = "tokenizer.json"
# BPE merges are learned from this much training text: plenty for a few thousand merges.
BPE_TRAINING_CHARS = 3_000_000


@dataclass(kw_only=True)
class DataConfig:
    """Where the text comes from and how it becomes tokens.

    Args:
        data: a text file, a folder of text files or a glob; None for the embedded
            corpus (the Python standard library of the running interpreter).
        tokenizer: ``bpe`` (byte-level BPE trained on the training split) or ``bytes``.
        vocab_size: BPE vocabulary size (ignored for bytes, which have 257).
        val_fraction: share of files (or of the text, for one file) held out.
    """

    data: str | None = None
    tokenizer: str = "bpe"
    vocab_size: int = 4096
    val_fraction: float = 0.05

    def __post_init__(self) -> None:
        if self.tokenizer not in ("bpe", "bytes"):
            raise ValueError(f"tokenizer ({self.tokenizer!r}) must be 'bpe' or 'bytes'")


@dataclass
class PreparedData:
    corpus: Corpus
    tokenizer: object
    tokens: TokenData

    @property
    def info(self) -> dict:
        return dict(self.corpus.info, tokenizer=self.tokenizer.kind, vocab_size=self.tokenizer.vocab_size,
                    train_tokens=self.tokens.train_N.numel(), val_tokens=self.tokens.val_N.numel())


def prepare_data(config: DataConfig, tokenizer_path: Path | None = None) -> PreparedData:
    """Read and split the corpus; load the tokenizer from tokenizer_path or train and save it there."""
    corpus = load_corpus(config.data, config.val_fraction)
    if tokenizer_path is not None and Path(tokenizer_path).exists():
        tokenizer = load_tokenizer(tokenizer_path)
        if tokenizer.kind != config.tokenizer:
            raise ValueError(
                f"{str(tokenizer_path)!r} holds a {tokenizer.kind} tokenizer but {config.tokenizer!r} was asked "
                "for; use another output folder"
            )
    else:
        tokenizer = build_tokenizer(
            config.tokenizer, [d.text for d in corpus.train], config.vocab_size, max_chars=BPE_TRAINING_CHARS
        )
        if tokenizer_path is not None:
            Path(tokenizer_path).parent.mkdir(parents=True, exist_ok=True)
            tokenizer.save(Path(tokenizer_path))
    return PreparedData(corpus, tokenizer, tokenize_corpus(corpus, tokenizer))


def new_run(
    run_dir: Path,
    model_config: LMConfig,
    train_config: TrainConfig,
    data_config: DataConfig,
    *,
    prepared: PreparedData | None = None,
    overwrite: bool = False,
    parallel: ParallelContext | None = None,
    **trainer_kwargs,
) -> Trainer:
    """Create a run folder and a Trainer for it. ``prepared`` shares data between runs (the demo).

    With ``parallel``, every rank calls this and only rank 0 writes the folder (every rank
    prepares its own tokens; the Trainer checks that they agree)."""
    run_dir = Path(run_dir)
    if (run_dir / "config.json").exists() and not overwrite:
        raise FileExistsError(
            f"{str(run_dir)!r} already holds a run; resume it with --resume, or pick a new --out "
            "(or pass --overwrite to replace it)"
        )
    if parallel is not None:
        parallel.barrier()  # every rank has looked for an existing run before rank 0 writes one
        if not parallel.is_main:
            if prepared is None:
                prepared = prepare_data(data_config)
            return Trainer(run_dir, model_config, train_config, prepared.tokens, parallel=parallel, **trainer_kwargs)
    if overwrite and (run_dir / "config.json").exists():
        for name in ("checkpoints", "tensorboard", "report"):
            shutil.rmtree(run_dir / name, ignore_errors=True)
        for name in ("metrics.jsonl", "config.json", TOKENIZER_FILE):
            (run_dir / name).unlink(missing_ok=True)
    run_dir.mkdir(parents=True, exist_ok=True)
    if prepared is None:
        prepared = prepare_data(data_config, run_dir / TOKENIZER_FILE)
    else:
        prepared.tokenizer.save(run_dir / TOKENIZER_FILE)
    if isinstance(model_config, HFModelSpec):  # transformers models often pad their vocabulary
        if prepared.tokenizer.vocab_size > model_config.vocab_size:
            raise ValueError(f"the tokenizer's {prepared.tokenizer.vocab_size} tokens do not fit the model's "
                             f"vocabulary ({model_config.vocab_size})")
    elif model_config.vocab_size != prepared.tokenizer.vocab_size:
        raise ValueError(
            f"model vocab_size ({model_config.vocab_size}) must equal the tokenizer's ({prepared.tokenizer.vocab_size})"
        )
    info = dict(prepared.info, data=data_config.data, val_fraction=data_config.val_fraction)
    write_run_config(run_dir, model_config, train_config, info)
    return Trainer(run_dir, model_config, train_config, prepared.tokens, parallel=parallel, **trainer_kwargs)


def resume_run(
    run_dir: Path, *, steps: int | None = None, parallel: ParallelContext | None = None, **trainer_kwargs
) -> Trainer:
    """A Trainer continuing the run in run_dir from its latest checkpoint (optionally to more steps).
    The run may have been saved at any expert-parallel size; with ``parallel`` only rank 0 writes."""
    run_dir = Path(run_dir)
    is_main = parallel is None or parallel.is_main
    model_config, train_config, data_info = read_run_config(run_dir)
    if steps is not None:
        if steps < train_config.steps:
            raise ValueError(f"--resume-steps ({steps}) cannot shorten the run below its {train_config.steps} steps")
        train_config.steps = steps
        data_config_info = dict(data_info)
        if is_main:
            write_run_config(run_dir, model_config, train_config, data_config_info)
    data_config = DataConfig(data=data_info["data"], tokenizer=data_info["tokenizer"],
                             vocab_size=data_info["vocab_size"], val_fraction=data_info["val_fraction"])
    prepared = prepare_data(data_config, run_dir / TOKENIZER_FILE)
    if prepared.corpus.info["file_list_sha256"] != data_info["file_list_sha256"]:
        warnings.warn(
            f"the corpus changed since the run started (file list hash {prepared.corpus.info['file_list_sha256']} "
            f"vs {data_info['file_list_sha256']}, Python {prepared.corpus.info['python_version']} vs "
            f"{data_info['python_version']}); training continues on the new text",
            stacklevel=2,
        )
    return Trainer(run_dir, model_config, train_config, prepared.tokens, resume=True, parallel=parallel,
                   **trainer_kwargs)



# fork_run's default corpus: the source run's (None would mean the embedded corpus).
SOURCE_CORPUS = object()


def fork_run(
    source_dir: Path,
    run_dir: Path,
    model: LanguageModel,
    train_config: TrainConfig,
    *,
    data: str | None | object = SOURCE_CORPUS,
    val_fraction: float | None = None,
) -> Path:
    """Start a new run folder from ``model`` (a copy or a surgery of ``source_dir``'s weights).

    The new run reuses the source's tokenizer (the model's vocabulary) and, unless
    ``data`` names other text, its corpus (split by ``val_fraction``, default the
    source's); its config is ``model.config`` and
    ``train_config``, and its step-0 checkpoint holds ``model`` with a fresh
    optimizer. Continue it with ``resume_run`` (``moekit train --resume``). The
    source folder is only read; an existing ``run_dir`` is refused.
    """
    source_dir, run_dir = Path(source_dir), Path(run_dir)
    if run_dir.resolve() == source_dir.resolve():
        raise ValueError(f"the new run folder ({str(run_dir)!r}) must differ from the source ({str(source_dir)!r})")
    if (run_dir / "config.json").exists():
        raise FileExistsError(f"{str(run_dir)!r} already holds a run; choose another --out")
    _, _, source_info = read_run_config(source_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(source_dir / TOKENIZER_FILE, run_dir / TOKENIZER_FILE)
    data_config = DataConfig(data=source_info["data"] if data is SOURCE_CORPUS else data, tokenizer=source_info["tokenizer"],
                             vocab_size=source_info["vocab_size"],
                             val_fraction=source_info["val_fraction"] if val_fraction is None else val_fraction)
    prepared = prepare_data(data_config, run_dir / TOKENIZER_FILE)
    info = dict(prepared.info, data=data_config.data, val_fraction=data_config.val_fraction)
    write_run_config(run_dir, model.config, train_config, info)
    trainer = Trainer(run_dir, model.config, train_config, prepared.tokens, tensorboard=False, progress=False)
    trainer.model.load_state_dict(model.state_dict())
    trainer.save()
    trainer.metrics.close()
    return run_dir
