"""The Python examples of docs/merging.md run."""

import re
from pathlib import Path

PAGE = Path(__file__).resolve().parents[2] / "docs" / "merging.md"


def test_merging_doc_examples_run():
    blocks = re.findall(r"```python\n(.*?)```", PAGE.read_text(), flags=re.S)
    assert len(blocks) >= 2
    for code in blocks:
        exec(compile(code, str(PAGE), "exec"), {"__name__": "docs_example"})
