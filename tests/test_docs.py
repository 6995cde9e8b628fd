"""The API site (`nox -s autodoc`): a page per public module, no warning, documented arguments.

The site is built in-process with the settings of the nox session (`pdoc --math --docformat
google`, private `exigo._*` modules left out). Every function, class and public method named
in a module's `__all__` must have a docstring whose `Args:` section lists each parameter (and
nothing else) and, when it returns something, a `Returns:` (or `Yields:`) section; every field
of a public dataclass is described in `Attributes:` or by a docstring under the field. Every
formula ($...$, $$...$$) reaches the HTML unchanged by pdoc's Markdown, and `docs/build_api.py`
turns it into MathML at build time: a page opened from disk without a network shows formulas,
not LaTeX (checked in headless Chromium with the network off).
"""

from __future__ import annotations

import contextlib
import dataclasses
import html
import importlib
import importlib.util
import inspect
import io
import pkgutil
import re
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

import exigo

pdoc = pytest.importorskip("pdoc")

REPO = Path(__file__).resolve().parents[1]


def _load_builder():  # docs/build_api.py, the script `nox -s autodoc` runs
    spec = importlib.util.spec_from_file_location("build_api", REPO / "docs" / "build_api.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


build_api = _load_builder()

#: The module specifications the nox session passes to pdoc.
PDOC_SPECS = build_api.PDOC_SPECS

_SECTION = re.compile(r"^(\w[\w ]*):\s*$")
_ENTRY = re.compile(r"^(\*{0,2}\w+)\s*(?:\([^)]*\))?\s*:")


def public_modules() -> list[str]:
    """`exigo` and every module or subpackage below it whose name has no leading underscore."""
    names = ["exigo"]
    for info in pkgutil.walk_packages(exigo.__path__, "exigo."):
        if not any(part.startswith("_") for part in info.name.split(".")):
            names.append(info.name)
    return names


def page_path(site: Path, module: str) -> Path:
    """Where pdoc writes `module`'s page (`exigo.analyses.confusion` -> `exigo/confusion.html`)."""
    return site.joinpath(*module.split(".")).with_suffix(".html")


@dataclasses.dataclass
class Site:
    """A built API site and what was printed while building it."""

    root: Path
    warnings: list[str]
    stderr: str


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Site]:
    root = tmp_path_factory.mktemp("api") / "api"
    stderr = io.StringIO()
    with warnings.catch_warnings(record=True) as caught, contextlib.redirect_stderr(stderr):
        warnings.simplefilter("always")
        build_api.build(root)
    yield Site(root, [str(w.message) for w in caught], stderr.getvalue())


def test_public_modules_are_found() -> None:
    modules = public_modules()
    for expected in (
        "exigo.pipeline",
        "exigo.analyses.confusion",
        "exigo.analyses.saliency",
        "exigo.cli",
    ):
        assert expected in modules
    assert not any("._" in name for name in modules)


def test_every_public_module_has_a_page(site: Site) -> None:
    missing = [m for m in public_modules() if not page_path(site.root, m).is_file()]
    assert not missing, f"no API page for {missing}"
    assert (site.root / "index.html").is_file()


def test_private_modules_have_no_page(site: Site) -> None:
    assert not list(site.root.glob("exigo/_*.html"))


def test_building_the_site_prints_no_warning(site: Site) -> None:
    assert site.warnings == []
    assert site.stderr == ""


def test_pages_with_formulas_carry_mathml_and_load_no_renderer(site: Site) -> None:
    with_formulas = 0
    for module in public_modules():
        page = page_path(site.root, module).read_text()
        assert "mathjax" not in page.lower() and "cdn." not in page, module
        if "$" in (importlib.import_module(module).__doc__ or ""):
            assert "<math" in page, module
            with_formulas += 1
    assert with_formulas >= 5


def test_formulas_become_mathml_outside_code_only() -> None:
    page = (
        "<p>With $x &lt; y$ and</p><p>$$a_{ij} = \\frac{1}{2}$$</p>"
        "<pre><code>echo $HOME $PATH</code></pre><p>costs <code>$5</code></p>"
    )
    converted = build_api.formulas_to_mathml(page)
    assert converted.count("<math") == 2 and 'display="block"' in converted
    assert 'alttext="x &lt; y"' in converted and "<mo>&#x0003C;</mo>" in converted
    assert "<pre><code>echo $HOME $PATH</code></pre>" in converted
    assert "<code>$5</code>" in converted and "$$" not in converted


_VISIBLE = """(() => ({
  text: document.body.innerText,
  formulas: document.querySelectorAll("main math").length,
  drawn: [...document.querySelectorAll("main math")]
    .every((formula) => formula.getBoundingClientRect().width > 0),
}))()"""


def test_a_page_shows_its_formulas_with_the_network_off(site: Site, browser, tmp_path) -> None:
    from browser import nonblank_share

    page = page_path(site.root, "exigo.analyses.saliency")
    browser.open(page.as_uri(), offline=True, width=1200)
    seen = browser.evaluate(_VISIBLE)
    assert seen["formulas"] >= 5 and seen["drawn"]
    assert "$$" not in seen["text"] and "\\(" not in seen["text"] and "\\nabla" not in seen["text"]
    assert not re.search(r"\$[^$\n]+\$", seen["text"])
    assert [u for u in browser.requested_urls() if not u.startswith(("file:", "data:"))] == []
    shot = browser.screenshot(tmp_path / "saliency-docs.png")
    assert nonblank_share(shot) > 0.05


_MATH = re.compile(r"\$\$.+?\$\$|\$[^$\n]+\$", re.S)


def _documented_objects(doc: pdoc.doc.Doc) -> Iterator[pdoc.doc.Doc]:
    """`doc` and every class, function and variable documented under it."""
    yield doc
    for member in getattr(doc, "own_members", []):
        if isinstance(member, (pdoc.doc.Class, pdoc.doc.Function, pdoc.doc.Variable)):
            yield from _documented_objects(member)


@pytest.mark.parametrize("module", public_modules())
def test_formulas_reach_the_page_as_written(module: str) -> None:
    # pdoc's Markdown runs before MathJax and eats backslash escapes inside $...$: `\{`
    # becomes `{`, a `\\` line break becomes `\`, `\!` becomes `!`, and `a * b * c` turns
    # into emphasis. Write `\lbrace`, `\ast`, and one display formula per line instead.
    to_html = pdoc.render_helpers.to_html
    damaged = []
    for doc in _documented_objects(pdoc.doc.Module(importlib.import_module(module))):
        if "$" not in doc.docstring:
            continue
        markdown = pdoc.docstrings.convert(doc.docstring, "google", None)
        page = html.unescape(to_html(markdown))
        damaged += [
            f"{doc.fullname}: {span}" for span in _MATH.findall(markdown) if span not in page
        ]
    assert not damaged, "formulas changed by Markdown:\n" + "\n".join(damaged)


def test_the_formula_check_sees_damage() -> None:
    to_html = pdoc.render_helpers.to_html
    markdown = r"$$\{ x \} \\ y$$ and $a \lbrace b \rbrace$"
    page = html.unescape(to_html(markdown))
    assert _MATH.findall(markdown)[0] not in page
    assert _MATH.findall(markdown)[1] in page


def _sections(docstring: str) -> dict[str, list[str]]:
    """Google-style sections of a cleaned docstring: title -> the entry names it lists."""
    sections: dict[str, list[str]] = {}
    current: list[str] | None = None
    entry_indent: int | None = None
    for line in docstring.splitlines():
        if not line.strip():
            continue
        indent = len(line) - len(line.lstrip())
        title = _SECTION.match(line)
        if indent == 0 and title:
            current = sections.setdefault(title.group(1), [])
            entry_indent = None
        elif indent == 0:
            current = None
        elif current is not None:
            entry_indent = indent if entry_indent is None else entry_indent
            entry = _ENTRY.match(line.strip())
            if indent == entry_indent and entry:
                current.append(entry.group(1).lstrip("*"))
    return sections


def _own_docstring(obj: object) -> str:
    docstring = obj.__doc__ or ""
    if dataclasses.is_dataclass(obj) and docstring.startswith(f"{obj.__name__}("):
        return ""  # the signature dataclasses write when the class has no docstring
    return inspect.cleandoc(docstring)


def _function_problems(name: str, function: Callable, bound: bool) -> list[str]:
    docstring = _own_docstring(function)
    if not docstring:
        return [f"{name}: no docstring"]
    signature = inspect.signature(function)
    parameters = list(signature.parameters)[1 if bound else 0 :]
    sections = _sections(docstring)
    listed = sections.get("Args", [])
    problems = [f"{name}: argument {p!r} not in Args" for p in parameters if p not in listed]
    problems += [
        f"{name}: Args lists {p!r}, not an argument" for p in listed if p not in parameters
    ]
    returns = signature.return_annotation
    gives_something = returns not in (inspect.Signature.empty, None, "None", "NoReturn") and (
        not re.fullmatch(r"(Iterator|Generator)\[None.*\]", str(returns))  # context managers
    )
    if gives_something and "Returns" not in sections and "Yields" not in sections:
        problems.append(f"{name}: returns {returns} but has no Returns section")
    return problems


def _class_problems(module: str, name: str, cls: type) -> list[str]:
    qualname = f"{module}.{name}"
    docstring = _own_docstring(cls)
    if not docstring:
        return [f"{qualname}: no docstring"]
    problems = []
    sections = _sections(docstring)
    if dataclasses.is_dataclass(cls):
        described = set(sections.get("Attributes", []) + sections.get("Args", []))
        page = pdoc.doc.Module(importlib.import_module(module)).get(name)
        for field in dataclasses.fields(cls):
            member = page.get(field.name) if page is not None else None
            if field.name not in described and not (member is not None and member.docstring):
                problems.append(f"{qualname}: field {field.name!r} not described")
    elif "__init__" in vars(cls) and not getattr(cls, "_is_protocol", False):
        init = vars(cls)["__init__"]
        listed = sections.get("Args", []) + sections.get("Attributes", [])  # stored as given
        listed += _sections(_own_docstring(init)).get("Args", [])
        for parameter in list(inspect.signature(init).parameters)[1:]:
            if parameter not in listed:
                problems.append(f"{qualname}: constructor argument {parameter!r} not in Args")
    for member_name, member in vars(cls).items():
        if member_name.startswith("_"):
            continue
        if isinstance(member, (staticmethod, classmethod)):
            bound = isinstance(member, classmethod)
            problems += _function_problems(f"{qualname}.{member_name}", member.__func__, bound)
        elif inspect.isfunction(member):
            problems += _function_problems(f"{qualname}.{member_name}", member, bound=True)
    return problems


@pytest.mark.parametrize("module", public_modules())
def test_public_api_is_documented(module: str) -> None:
    imported = importlib.import_module(module)
    assert (imported.__doc__ or "").strip(), f"{module} has no module docstring"
    problems = []
    for name in getattr(imported, "__all__", []):
        obj = getattr(imported, name)
        if inspect.isclass(obj):
            problems += _class_problems(module, name, obj)
        elif inspect.isfunction(obj):
            problems += _function_problems(f"{module}.{name}", obj, bound=False)
    assert not problems, "\n".join(problems)


def test_the_checker_catches_undocumented_arguments() -> None:
    def documented(images: object, labels: object) -> int:
        """Count.

        Args:
            images: float tensor [N, C, H, W].
            labels (Tensor): int64 tensor [N].

        Returns:
            N.
        """
        return 0

    def stale(images: object) -> int:
        """Count.

        Args:
            imgs: float tensor [N, C, H, W].
        """
        return 0

    assert _function_problems("documented", documented, bound=False) == []
    assert _function_problems("stale", stale, bound=False) == [
        "stale: argument 'images' not in Args",
        "stale: Args lists 'imgs', not an argument",
        "stale: returns int but has no Returns section",
    ]
