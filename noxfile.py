"""Sessions: tests, lint, quick (the main job), study (ablations, <= 90 min), gpu (the prepared GPU run),
attention (CPU sweep), report.

Sessions run in the current environment (``python -m pip install -e ".[dev]"`` first): a fresh virtualenv
per session would copy several GB of torch for nothing.
"""

import nox

nox.options.sessions = ["lint", "tests"]


@nox.session(python=False)
def tests(session: nox.Session) -> None:
    """The README's test command: every CPU test (GPU tests skip without CUDA)."""
    session.run("python", "-m", "pytest", "-q", *session.posargs)


@nox.session(python=False)
def lint(session: nox.Session) -> None:
    session.run("ruff", "check", ".")
    session.run("ruff", "format", "--check", ".")


@nox.session(python=False)
def quick(session: nox.Session) -> None:
    """The main job: both families trained, sampled and judged on CPU; results/quick/ with plots."""
    session.run("python", "-m", "bench", "quick", *session.posargs)


@nox.session(python=False)
def study(session: nox.Session) -> None:
    """The paper's ablations and the size-ladder comparison at toy scale, 2 seeds: results/study/."""
    session.run("python", "-m", "bench", "study", *session.posargs)


@nox.session(python=False)
def report(session: nox.Session) -> None:
    """results/REPORT.md from the committed result files."""
    session.run("python", "-m", "bench", "report")


@nox.session(python=False)
def attention(session: nox.Session) -> None:
    """CPU attention sweep into results/cpu/."""
    session.run("python", "-m", "bench", "attention", "--profile", "cpu", *session.posargs)


@nox.session(python=False)
def gpu(session: nox.Session) -> None:
    """The prepared single-GPU run (about 8 to 9 minutes): GPU tests, the GPU sweep and the per-kernel
    breakdown into results/gpu/."""
    session.run("bash", "bench/gpu.sh", external=True)
