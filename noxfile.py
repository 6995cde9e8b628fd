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
    session.run("pytest", *session.posargs)


@nox.session(venv_params=VENV)
def lint(session: nox.Session) -> None:
    session.install("ruff")
    session.run("ruff", "check", ".")
    session.run("ruff", "format", "--check", ".")


@nox.session(venv_params=VENV)
def autodoc(session: nox.Session) -> None:
    session.install("-e", ".[dev]")
    session.run(
        "pdoc", "--math", "--docformat", "google", "--output-directory", "docs/api", "exigo"
    )
