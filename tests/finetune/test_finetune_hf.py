"""``moekit finetune`` on a local Hugging Face folder: a tiny Mixtral saved with a tokenizer,
LoRA on its experts and routers through moekit's trainer, exact resume, the peft folder
on the original transformers model, the merged save_pretrained folder, and the errors."""

from __future__ import annotations

import copy
import json
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")
peft = pytest.importorskip("peft")
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM  # noqa: E402

from moekit.cli import main  # noqa: E402
from moekit.data.tokenizer import BPETokenizer  # noqa: E402
from moekit.finetune.runs import _load_run  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from transformers import MixtralConfig, MixtralForCausalLM  # noqa: E402

import lm_fixtures  # noqa: E402
from interop.test_hf import TINY  # noqa: E402

VOCAB = 300  # the smallest byte-level BPE vocabulary moekit trains is 258


def _mixtral():
    torch.manual_seed(0)
    return MixtralForCausalLM(MixtralConfig(**dict(TINY, vocab_size=VOCAB), intermediate_size=48,
                                            num_local_experts=4)).eval()

corpus_dir = lm_fixtures.corpus_dir
one_torch_thread = lm_fixtures._one_torch_thread

FINETUNE = ["--steps", "6", "--batch-size", "4", "--eval-every", "3", "--checkpoint-every", "3",
            "--context-length", "32", "--no-report"]


def _save_with_tokenizer(model, folder: Path, corpus_dir: Path) -> Path:
    model.save_pretrained(folder)
    texts = [p.read_text() for p in sorted(corpus_dir.iterdir())]
    BPETokenizer.train(texts, vocab_size=VOCAB).save(folder / "tokenizer.json")
    return folder


@pytest.fixture(scope="module")
def mixtral_folder(tmp_path_factory, corpus_dir):
    return _save_with_tokenizer(_mixtral(), tmp_path_factory.mktemp("hf") / "mixtral", corpus_dir)


def _finetune(folder, out, corpus_dir, *extra):
    return main(["finetune", str(folder), "--out", str(out), "--data", str(corpus_dir), *FINETUNE, *extra])


def _ids():
    return torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(5))


def test_lora_on_a_hugging_face_folder_writes_a_peft_folder_and_a_merged_folder(tmp_path, mixtral_folder,
                                                                                corpus_dir, capsys):
    out = tmp_path / "run"
    assert _finetune(mixtral_folder, out, corpus_dir, "--rank", "4", "--targets", "experts,router", "--merge") == 0
    record = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert record["val_loss_end"] < record["val_loss_start"]
    tuned = _load_run(out).eval()
    with torch.no_grad():
        expected = tuned.hf_model(_ids()).logits
    original = AutoModelForCausalLM.from_pretrained(mixtral_folder).eval()
    with torch.no_grad():
        assert not torch.allclose(original(_ids()).logits, expected, atol=1e-4)
    with_adapter = peft.PeftModel.from_pretrained(copy.deepcopy(original), out / "adapter").eval()
    merged = AutoModelForCausalLM.from_pretrained(out / "merged").eval()
    with torch.no_grad():
        torch.testing.assert_close(with_adapter(_ids()).logits, expected, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(merged(_ids()).logits, expected, rtol=1e-5, atol=1e-5)


def test_an_interrupted_hugging_face_finetune_continues_to_the_same_weights(tmp_path, mixtral_folder, corpus_dir,
                                                                           monkeypatch):
    assert _finetune(mixtral_folder, tmp_path / "whole", corpus_dir) == 0
    from moekit.train.trainer import Trainer

    original_step = Trainer.train_step

    def interrupt_at_step_5(self):
        if self.step == 4:
            raise KeyboardInterrupt
        return original_step(self)

    monkeypatch.setattr(Trainer, "train_step", interrupt_at_step_5)
    assert _finetune(mixtral_folder, tmp_path / "cut", corpus_dir) == 130
    monkeypatch.setattr(Trainer, "train_step", original_step)
    assert _finetune(mixtral_folder, tmp_path / "cut", corpus_dir) == 0
    whole, cut = _load_run(tmp_path / "whole").state_dict(), _load_run(tmp_path / "cut").state_dict()
    assert whole.keys() == cut.keys()
    for name in whole:
        assert torch.equal(whole[name], cut[name]), name


def test_folders_that_cannot_be_fine_tuned_get_one_line_errors(tmp_path, mixtral_folder, corpus_dir, capsys):
    mismatched = tmp_path / "mismatched"
    _save_with_tokenizer(_mixtral(), mismatched, corpus_dir)
    config = json.loads((mismatched / "config.json").read_text())
    config["intermediate_size"] = 64
    (mismatched / "config.json").write_text(json.dumps(config))
    dense = _save_with_tokenizer(LlamaForCausalLM(LlamaConfig(
        hidden_size=32, intermediate_size=48, num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=VOCAB)), tmp_path / "llama", corpus_dir)
    no_tokenizer = tmp_path / "no_tokenizer"
    _mixtral().save_pretrained(no_tokenizer)
    cases = [(mismatched, [], "do not match its config.json"), (dense, [], "no supported MoE block"),
             (no_tokenizer, [], "has no tokenizer.json"), (mixtral_folder, ["--rank", "64"], "must be <= 32"),
             (mixtral_folder, ["--method", "mixlora"], "use lora")]
    for i, (folder, extra, message) in enumerate(cases):
        code = _finetune(folder, tmp_path / f"out{i}", corpus_dir, *extra)
        err = capsys.readouterr().err
        assert code == 2 and message in err and "Traceback" not in err, (folder, err)
