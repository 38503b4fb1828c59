"""The Python examples in the docs run (docs must not rot)."""

import re
from pathlib import Path

import pytest

DOCS = Path(__file__).resolve().parents[1] / "docs"
PAGES = ["index.md", "quickstart.md", "parameter-graphs.md", "symmetries.md", "extending.md"]


def _blocks(page: str) -> list[str]:
    text = (DOCS / page).read_text()
    return re.findall(r"```python\n(.*?)```", text, flags=re.S)


@pytest.mark.parametrize("page", PAGES)
def test_doc_examples_run(page):
    blocks = [b for b in _blocks(page) if "checkpoints" not in b]
    for code in blocks:
        exec(compile(code, f"{page}", "exec"), {"__name__": "docs_example"})
