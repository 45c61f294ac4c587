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
    expected = {"loss_curves.png", "load_moe.png", "entropy_moe.png", "drop_rate_moe.png",
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
