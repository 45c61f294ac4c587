import re

import pytest

from lm_fixtures import tiny_model_config, tiny_train_config
from moekit.analysis.report import write_report
from moekit.train import new_run


@pytest.fixture(scope="module")
def tiny_runs(tmp_path_factory, prepared, tiny_data_config):
    root = tmp_path_factory.mktemp("runs")
    vocab = prepared.tokenizer.vocab_size
    runs = {}
    for label, model_config in (("MoE", tiny_model_config(vocab, capacity_factor=1.0)),
                                ("dense", tiny_model_config(vocab, experts=0))):
        new_run(root / label, model_config, tiny_train_config(steps=4, eval_every=2), tiny_data_config,
                prepared=prepared, progress=False, tensorboard=False).fit()
        runs[label] = root / label
    return runs


def test_report_renders_every_plot_and_section(tiny_runs, tmp_path):
    index = write_report(tiny_runs, tmp_path / "report", max_new_tokens=8, progress=False)
    page = index.read_text()
    images = re.findall(r'<img src="([^"]+)"', page)
    expected = {"loss_curves.png", "training_curves.png", "load_moe.png", "entropy_moe.png", "drop_rate_moe.png",
                "specialisation_moe.png", "coactivation_moe.png"}
    assert set(images) == expected
    for name in images:
        assert (tmp_path / "report" / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    for heading in ("Summary", "Validation loss", "Routing during training", "What the experts learned",
                    "Top tokens of each expert", "Sample generations", "step time MoE ÷ dense"):
        assert heading in page
    # Both models' samples, each starting with every prompt.
    assert page.count("<pre>") == 2 and page.count("<b>def </b>") == 2
    assert "http://" not in page and "https://" not in page and "<script" not in page


def test_the_summary_states_the_cost_and_the_uncertainty_honestly(tiny_runs, tmp_path):
    import json

    from moekit.analysis.compare import compare
    from moekit.train import read_metrics

    page = write_report(tiny_runs, tmp_path / "report", max_new_tokens=4, progress=False).read_text()
    assert "one seed: no spread measured" in page
    # The tiny MoE's two experts of width 32 match the dense width 64; a baseline of another size is named.
    assert "same active parameters per token (within 1 %)" in page
    from types import SimpleNamespace

    from moekit.analysis.report import _active_parameters_lead

    def view(label, active):
        return SimpleNamespace(label=label, model=SimpleNamespace(num_parameters=lambda active_only=False, **_: active))

    lead = _active_parameters_lead([view("MoE", 1_000_000), view("baseline", 2_000_000)])
    assert lead == "Same tokens; active parameters per token differ: MoE 1.000 M, baseline 2.000 M."
    comparison = compare(read_metrics(tiny_runs["MoE"]), read_metrics(tiny_runs["dense"]))
    if comparison["moe_steps_to_dense_loss"] is None:
        assert "did not reach the final validation loss of the dense model" in page
    else:
        assert f"after {comparison['moe_steps_to_dense_loss']} of {comparison['dense_steps']} steps" in page
        assert "s of training, against" in page
    # A slower MoE step is never coloured as a win.
    card = re.search(r'step time MoE ÷ dense</div><div class="v ([a-z]*)">([0-9.]+)×', page)
    assert card.group(1) == ("good" if float(card.group(2)) <= 1.0 else "")
    json.dumps(comparison)
