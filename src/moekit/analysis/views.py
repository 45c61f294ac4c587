"""One run as the report sees it: its configs, metrics, model and tokenizer."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..data import load_tokenizer
from ..models.lm import LanguageModel
from ..train import latest_checkpoint, load_checkpoint, read_metrics, read_run_config
from .routing import RoutingRecord


@dataclass
class RunView:
    """One run as the report sees it."""

    label: str
    run_dir: Path
    model: LanguageModel
    model_config: object
    train_config: object
    data_info: dict
    metrics: list[dict]
    tokenizer: object
    routing: RoutingRecord | None = None

    @property
    def is_moe(self) -> bool:
        return self.model_config.moe is not None

    @property
    def slug(self) -> str:
        return "".join(ch if ch.isalnum() else "_" for ch in self.label.lower())


def load_run(label: str, run_dir: Path) -> RunView:
    run_dir = Path(run_dir)
    model_config, train_config, data_info = read_run_config(run_dir)
    folder = latest_checkpoint(run_dir)
    if folder is None:
        raise FileNotFoundError(f"{str(run_dir)!r} has no checkpoint; train it first (moekit train)")
    model = LanguageModel(model_config)
    load_checkpoint(folder, model)
    model.eval()
    tokenizer = load_tokenizer(run_dir / "tokenizer.json")
    return RunView(label, run_dir, model, model_config, train_config, data_info, read_metrics(run_dir), tokenizer)
