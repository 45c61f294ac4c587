"""The Python code blocks of the README and the docs pages run as written."""

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# Pages whose examples are self-contained (distributed.md needs torchrun).
PAGES = ["README.md", "docs/classic.md", "docs/surgery.md"]


@pytest.mark.parametrize("page", PAGES)
def test_python_blocks_run(page):
    path = ROOT / page
    blocks = re.findall(r"```python\n(.*?)```", path.read_text(), flags=re.S)
    assert blocks, f"{page} has no python code block"
    for block in blocks:
        exec(compile(block, str(path), "exec"), {})
