r"""Build the API site (`nox -s autodoc`): one pdoc page per public module, formulas as MathML.

pdoc's `--math` leaves `$...$` and `$$...$$` in the pages for MathJax, which it loads from a
CDN when a page opens: opened from disk without a network (an air-gapped cluster, a CI
browser) the pages show raw LaTeX. Here every formula is converted once, at build time, by
latex2mathml into MathML, which browsers draw natively (Chrome 109+, Firefox, Safari): the
pages load nothing from elsewhere.

The conversion runs on each docstring's HTML after pdoc's Markdown (which keeps formulas as
written; `tests/test_docs.py` checks that), and skips `<code>` and `<pre>` blocks, so a `$` in
a shell example stays a `$`.

Usage: `python docs/build_api.py [OUTPUT_DIRECTORY]` (default `docs/api`).
"""

from __future__ import annotations

import html
import re
import shutil
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

#: The module specifications: every module of exigo but the private `exigo._*`.
PDOC_SPECS = ("exigo", r"!exigo\._.*")

_VERBATIM = re.compile(r"(<pre\b.*?</pre>|<code\b.*?</code>)", re.S)
_DISPLAY = re.compile(r"\$\$(.+?)\$\$", re.S)
_INLINE = re.compile(r"(?<![\\$])\$([^$\n]+?)\$(?!\$)")


class _Rendered(str):
    """A str that keeps markdown2's `toc_html` (pdoc's module page reads it)."""

    toc_html: str | None = None


def mathml(latex: str, *, display: bool) -> str:
    """One LaTeX formula as a MathML `<math>` element.

    Args:
        latex: the formula without its `$` delimiters, HTML entities already decoded.
        display: a display formula (`$$...$$`, centred on its own line) or inline (`$...$`).

    Returns:
        The `<math>` element's markup, with the LaTeX source kept in its `alttext`.
    """
    from latex2mathml.converter import convert

    markup = convert(latex.strip(), display="block" if display else "inline")
    alt = html.escape(" ".join(latex.split()), quote=True)
    return markup.replace("<math ", f'<math alttext="{alt}" ', 1)


def formulas_to_mathml(page: str) -> str:
    """Replace every `$$...$$` and `$...$` of an HTML fragment, outside code, with MathML.

    Args:
        page: HTML from pdoc's Markdown (entities such as `&lt;` inside formulas are decoded).

    Returns:
        The same HTML with MathML in place of the formulas.
    """
    parts = _VERBATIM.split(page)
    for index in range(0, len(parts), 2):  # odd indices are <pre>/<code> blocks
        text = _DISPLAY.sub(lambda m: mathml(html.unescape(m.group(1)), display=True), parts[index])
        parts[index] = _INLINE.sub(lambda m: mathml(html.unescape(m.group(1)), display=False), text)
    return "".join(parts)


def _with_mathml(to_html: Callable[[str], str]) -> Callable[[str], str]:
    def render(markdown: str) -> str:
        original = to_html(markdown)
        converted = _Rendered(formulas_to_mathml(original))
        converted.toc_html = getattr(original, "toc_html", None)
        return converted

    return render


def build(output_directory: str | Path, specs: Sequence[str] = PDOC_SPECS) -> Path:
    """Write the API site with pdoc, formulas rendered as MathML (no MathJax, no network).

    Args:
        output_directory: where the pages go (replaced: no page of a module that is gone).
        specs: pdoc's module specifications.

    Returns:
        `output_directory` as a Path.
    """
    import pdoc
    import pdoc.render

    output = Path(output_directory)
    shutil.rmtree(output, ignore_errors=True)
    pdoc.render.configure(docformat="google", math=False)
    filters = pdoc.render.env.filters
    original = filters["to_html"]
    filters["to_html"] = _with_mathml(original)
    try:
        pdoc.pdoc(*specs, output_directory=output)
    finally:  # leave pdoc as it was: tests build other sites in the same process
        filters["to_html"] = original
        pdoc.render.configure()
    return output


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's exigo
    site = build(sys.argv[1] if len(sys.argv) > 1 else "docs/api")
    print(f"API site: {site / 'index.html'}")
