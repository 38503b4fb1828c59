"""The docs site builds with `mkdocs build --strict` and shows no raw reStructuredText.

mkdocstrings renders docstrings as Markdown (Google style, arithmatex math), so a leftover
reST role or directive (`:math:`, `:class:`, `.. math::`, double-backtick literals)
appears on the page as text. The build takes about 10 s (20 s on a busy 2-core machine), so
the module builds the site once for all its tests.
"""

from __future__ import annotations

import html
import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# reST that Markdown leaves as text: roles, the math directive, double-backtick literals
RAW_REST = re.compile(
    r":(?:py:)?(?:math|class|func|meth|attr|mod|obj|data|exc):`?|\.\. math::|``"
)
# math that arithmatex did not pick up ("$x$" or a "$$" block left as text)
RAW_MATH = re.compile(r"(?<![\w$\\])\$(?![\s$])[^$<>\n]{1,200}(?<![\s\\])\$(?![\w$])|\$\$")
_BLOCKS = re.compile(r"<(pre|script|style)\b[^>]*>.*?</\1>", re.S | re.I)
_INLINE_CODE = re.compile(r"<code\b[^>]*>(.*?)</code>", re.S | re.I)
_TAG = re.compile(r"<[^>]+>")


def raw_markup(page_html: str) -> list[str]:
    """Snippets of unrendered reST / math in a page's text (code blocks are ignored)."""
    text = _BLOCKS.sub(" ", page_html)
    # inline code stays readable in the report, without the characters the checks look for
    text = _INLINE_CODE.sub(lambda m: "‹" + re.sub(r"[`$:]", "", m.group(1)) + "›", text)
    # arithmatex output keeps its TeX between \( \) / \[ \]; it is rendered by MathJax
    text = re.sub(r'<(span|div) class="arithmatex">.*?</\1>', " ", text, flags=re.S)
    text = html.unescape(_TAG.sub("", text))
    found = []
    for rx in (RAW_REST, RAW_MATH):
        for m in rx.finditer(text):
            a, b = max(0, m.start() - 40), min(len(text), m.end() + 40)
            found.append(" ".join(text[a:b].split()))
    return found


def test_raw_markup_detector():
    # negative controls: every construct the docstring conversion removes is reported
    for bad in (
        "<p>with :math:<code>x_i</code> nodes</p>",
        "<p>see :class:<code>ParameterGraph</code></p>",
        "<p>:func:`graphspace.merge.merge`</p>",
        "<p>.. math::\n  a = b</p>",
        "<p>the ``edge_index`` tensor</p>",
        "<p>a raw $x_i$ left as text</p>",
        "<p>$$\n  a = b\n  $$</p>",
    ):
        assert raw_markup(bad), bad
    # rendered markup, and reST-looking text inside code, pass
    good = (
        '<p>with <span class="arithmatex">\\(x_i\\)</span> nodes, '
        '<a class="autorefs" href="#g">ParameterGraph</a>, <code>edge_index</code></p>'
        '<div class="arithmatex">\\[a = b\\]</div>'
        "<pre><code>:math:`x` ``y`` .. math::</code></pre><p>costs $5 or 6 dollars</p>"
    )
    assert raw_markup(good) == []


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Path:
    missing = [m for m in ("mkdocs", "material", "mkdocstrings", "mkdocstrings_handlers.python")
               if not _has(m)]
    if missing:
        pytest.skip(f"docs extra not installed (missing {', '.join(missing)}); "
                    "pip install mkdocs mkdocs-material mkdocstrings mkdocstrings-python")
    out = tmp_path_factory.mktemp("site")
    proc = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--quiet", "--site-dir", str(out)],
        cwd=ROOT, capture_output=True, text=True,
        env={**os.environ, "NO_MKDOCS_2_WARNING": "1"},  # mkdocs-material's banner
    )
    assert proc.returncode == 0, f"mkdocs build --strict failed:\n{proc.stderr[-4000:]}"
    return out


def _has(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except ImportError:
        return False


def test_docs_build_strict_without_raw_rest(site: Path):
    pages = sorted(site.rglob("*.html"))
    assert any(p.relative_to(site).parts[0] == "api" for p in pages), "no API pages built"
    bad = {}
    for page in pages:
        found = raw_markup(page.read_text(encoding="utf-8"))
        if found:
            bad[str(page.relative_to(site))] = found
    assert not bad, "raw reStructuredText / unrendered math in the built site:\n" + "\n".join(
        f"  {name} ({len(f)} hits), first: {f[0]!r}" for name, f in sorted(bad.items())
    )


def test_docs_math_and_links_render(site: Path):
    # the API reference shows equations through arithmatex and links objects through autorefs
    api = "".join(p.read_text(encoding="utf-8") for p in (site / "api").rglob("*.html"))
    assert api.count('class="arithmatex"') > 10
    assert api.count('class="autorefs autorefs-internal"') > 10
    js = (site / "javascripts" / "mathjax.js").read_text()
    assert "arithmatex" in js
