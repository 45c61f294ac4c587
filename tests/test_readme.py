"""The Python code blocks of the README and the docs pages run as written."""

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# Pages whose examples are self-contained (distributed.md needs torchrun).
PAGES = ["README.md", "docs/architecture.md", "docs/classic.md", "docs/lm.md", "docs/surgery.md", "docs/inference.md",
         "docs/finetune.md", "docs/multitask.md", "docs/timeseries.md",
         "docs/vision.md"]


@pytest.fixture
def registries():
    """Put back what a page's examples register (architecture.md adds a router, experts, a path)."""
    from moekit import COMPUTE_PATHS, EXPERTS, ROUTERS

    saved = [(registry, dict(registry)) for registry in (ROUTERS, EXPERTS, COMPUTE_PATHS)]
    yield
    for registry, before in saved:
        registry.clear()
        registry.update(before)


@pytest.mark.parametrize("page", PAGES)
def test_python_blocks_run(page, registries):
    path = ROOT / page
    blocks = re.findall(r"```python\n(.*?)```", path.read_text(), flags=re.S)
    assert blocks, f"{page} has no python code block"
    namespace = {"__name__": "docs_example"}
    for block in blocks:
        exec(compile(block, str(path), "exec", dont_inherit=True), namespace)
