"""``moekit finetune``: LoRA, mixture of LoRA experts and full fine-tuning of a trained run,
exact resume, the peft adapter folder and the merged run, and the one-line errors."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

from moekit.cli import main
from moekit.finetune.peft import load_peft_adapter
from moekit.finetune.runs import _load_run

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import lm_fixtures  # noqa: E402

corpus_dir = lm_fixtures.corpus_dir
one_torch_thread = lm_fixtures._one_torch_thread

TINY = ["--layers", "2", "--d-model", "32", "--heads", "2", "--d-ff", "64", "--context-length", "32",
        "--top-k", "2", "--batch-size", "4", "--vocab-size", "300", "--eval-every", "4", "--eval-batches", "2",
        "--log-every", "1", "--steps", "4"]
FINETUNE = ["--steps", "6", "--batch-size", "4", "--eval-every", "3", "--checkpoint-every", "3", "--no-report"]


@pytest.fixture(scope="module")
def sources(tmp_path_factory, corpus_dir):
    """A tiny trained MoE run (MoE every second block, so it has dense FFNs too) and a dense one, and
    text to adapt them to."""
    root = tmp_path_factory.mktemp("sources")
    moe, dense = root / "moe", root / "dense"
    assert main(["train", "--data", str(corpus_dir), "--out", str(moe), "--experts", "4", "--moe-every", "2",
                 *TINY]) == 0
    assert main(["train", "--data", str(corpus_dir), "--out", str(dense), "--experts", "0", *TINY]) == 0
    new_text = root / "new_text"
    new_text.mkdir()
    for i, name in enumerate(sorted(corpus_dir.iterdir())[:6]):
        (new_text / f"part{i}.py").write_text(name.read_text().upper())  # a shifted domain
    return {"moe": moe, "dense": dense, "data": new_text}


def _finetune(sources, out, *extra, source="moe"):
    return main(["finetune", str(sources[source]), "--out", str(out), "--data", str(sources["data"]), *FINETUNE,
                 *extra])


def _logits(model, seed=0):
    idx = torch.randint(0, model.config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        return model.eval()(idx).logits


def test_lora_trains_only_the_adapters_and_writes_a_peft_folder_and_a_merged_run(tmp_path, sources, capsys):
    out = tmp_path / "lora"
    assert _finetune(sources, out, "--rank", "4", "--targets", "experts,router", "--merge") == 0
    record = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    source, tuned = _load_run(sources["moe"]), _load_run(out)
    assert tuned.config.adapter.method == "lora" and tuned.config.adapter.rank == 4
    base_keys = dict(source.state_dict())
    for name, tensor in tuned.state_dict().items():
        if ".lora_" in name:
            continue
        original = base_keys[name.replace("experts.base.", "experts.").replace("parametrizations.weight.original",
                                                                               "weight")]
        assert torch.equal(tensor, original), f"{name} changed"
    adapters = {n: p for n, p in tuned.named_parameters() if ".lora_B" in n}
    assert len(adapters) == 3 and all(p.abs().sum() > 0 for p in adapters.values())  # in, out, router
    assert record["trainable_parameters"] == sum(p.numel() for n, p in tuned.named_parameters() if ".lora_" in n)
    # The peft folder on the source's model, and the merged run, compute what the fine-tuned model does.
    load_peft_adapter(source, out / "adapter")
    torch.testing.assert_close(_logits(source), _logits(tuned), rtol=1e-5, atol=1e-5)
    merged = _load_run(out / "merged")
    assert merged.config.adapter is None
    torch.testing.assert_close(_logits(merged), _logits(tuned), rtol=1e-5, atol=1e-5)
    assert record["val_loss_end"] < record["val_loss_start"]


def test_an_interrupted_finetune_continues_to_the_same_weights(tmp_path, sources, monkeypatch):
    whole = tmp_path / "whole"
    assert _finetune(sources, whole) == 0
    from moekit.train.trainer import Trainer

    original_step = Trainer.train_step

    def interrupt_at_step_5(self):
        if self.step == 4:
            raise KeyboardInterrupt
        return original_step(self)

    cut = tmp_path / "cut"
    monkeypatch.setattr(Trainer, "train_step", interrupt_at_step_5)
    assert _finetune(sources, cut) == 130  # the step-3 checkpoint is on disk
    monkeypatch.setattr(Trainer, "train_step", original_step)
    assert _finetune(sources, cut) == 0
    for (name, a), (_, b) in zip(_load_run(whole).state_dict().items(), _load_run(cut).state_dict().items(),
                                 strict=True):
        assert torch.equal(a, b), name
    lines = [json.loads(line) for line in (cut / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines if "loss" in r] == list(range(1, 7))


def test_mixlora_starts_where_the_dense_model_was_and_merges_into_an_moe(tmp_path, sources):
    out = tmp_path / "mixlora"
    assert _finetune(sources, out, "--method", "mixlora", "--mixlora-experts", "4", "--rank", "4", "--merge",
                     source="dense") == 0
    record = json.loads((out / "finetune.json").read_text())
    step0 = json.loads((out / "checkpoints" / "latest.json").read_text())
    assert step0 and record["val_loss_end"] < record["val_loss_start"]
    tuned, merged = _load_run(out), _load_run(out / "merged")
    assert tuned.config.adapter.method == "mixlora" and merged.config.moe.num_experts == 4
    torch.testing.assert_close(_logits(merged), _logits(tuned), rtol=1e-5, atol=1e-5)
    # At step 0 the mixtures computed exactly what the dense model did.
    from moekit.finetune.runs import FinetunePlan, adapt

    dense = _load_run(sources["dense"])
    expected = _logits(dense)
    adapted = adapt(_load_run(sources["dense"]), FinetunePlan(method="mixlora", rank=4))
    torch.testing.assert_close(_logits(adapted), expected, rtol=1e-6, atol=1e-6)


def test_full_finetuning_trains_every_weight(tmp_path, sources):
    out = tmp_path / "full"
    assert _finetune(sources, out, "--method", "full") == 0
    record = json.loads((out / "finetune.json").read_text())
    assert record["trainable_parameters"] == record["parameters"]
    assert not (out / "adapter").exists()


@pytest.mark.parametrize("case,message", [
    ("missing", "does not exist"),
    ("hf", "has no tokenizer.json"),
    ("rank", "rank (64) must be <= 32"),
    ("lora-on-dense", "this model is dense"),
    ("other-settings", "holds a fine-tuning run with other settings"),
])
def test_mistakes_get_one_line_errors(tmp_path, sources, capsys, case, message):
    source = {"missing": tmp_path / "nowhere", "hf": tmp_path / "hf"}.get(case)
    if case == "hf":
        source.mkdir()
        (source / "config.json").write_text(json.dumps({"model_type": "mixtral"}))
    args = {"missing": [], "hf": [], "rank": ["--rank", "64"], "lora-on-dense": [],
            "other-settings": ["--rank", "2"]}[case]
    if case == "other-settings":
        assert _finetune(sources, tmp_path / "run", "--rank", "4") == 0
        capsys.readouterr()
    code = main(["finetune", str(source or sources["dense" if case == "lora-on-dense" else "moe"]),
                 "--out", str(tmp_path / "run"), "--data", str(sources["data"]), *FINETUNE, *args])
    err = capsys.readouterr().err
    assert code == 2 and message in err and "Traceback" not in err, err


def test_a_rank_below_one_is_refused_by_the_parser(tmp_path, sources, capsys):
    with pytest.raises(SystemExit) as exit_info:
        _finetune(sources, tmp_path / "run", "--rank", "0")
    assert exit_info.value.code == 2 and "expected a positive integer" in capsys.readouterr().err
