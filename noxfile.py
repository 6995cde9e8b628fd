"""Developer sessions: `nox -s tests`, `nox -s lint`, `nox -s autodoc`.

The virtual environments see the interpreter's site-packages, so a torch that is already
installed (5.5 GB) is reused instead of downloaded again for every session.
"""

import nox

nox.options.sessions = ["lint", "tests"]
nox.options.reuse_existing_virtualenvs = True

VENV = ["--system-site-packages"]


@nox.session(venv_params=VENV)
def tests(session: nox.Session) -> None:
    session.install("-e", ".[dev]")
    # `python -m`: the venv's interpreter, so the checkout's exigo is imported, not another
    # installed copy (pytest and pdoc themselves may come from the system site-packages).
    session.run("python", "-m", "pytest", *session.posargs)


@nox.session(venv_params=VENV)
def lint(session: nox.Session) -> None:
    session.install("ruff")
    session.run("python", "-m", "ruff", "check", ".")
    session.run("python", "-m", "ruff", "format", "--check", ".")


@nox.session(venv_params=VENV)
def autodoc(session: nox.Session) -> None:
    session.install("-e", ".[dev]")
    # pdoc, every formula turned into MathML at build time (no MathJax, no CDN: the pages
    # show their formulas offline); the private modules (exigo._*) get no page.
    # tests/test_docs.py builds the same site with the same script.
    session.run("python", "docs/build_api.py", "docs/api")
