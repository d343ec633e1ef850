"""Provenance for every result file (commit, device, versions, command, seed) and atomic writes."""

from __future__ import annotations

import contextlib
import datetime as _dt
import json
import os
import platform
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch


def _git_commit(root: Path | None = None) -> str:
    # The GPU machine receives a copy of the tree without .git: the caller passes the commit in the env.
    env = os.environ.get("TRANSFUSION_COMMIT")
    if env:
        return env
    try:
        root = root or Path(__file__).resolve().parent.parent
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, check=True
        ).stdout.strip()
        # "+dirty": the code differs from the commit. Result files are outputs: rewriting them in place
        # (every run of a suite does) does not make the code dirty.
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no", "--", ".", ":(exclude)results"],
            cwd=root,
            capture_output=True,
            text=True,
        ).stdout.strip()
        return commit + ("+dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def _version(module: str) -> str | None:
    try:
        mod = __import__(module)
    except Exception:  # not installed, or a broken binary build
        return None
    return getattr(mod, "__version__", "unknown")


def device_name(device: str | torch.device) -> str:
    dev = torch.device(device)
    if dev.type == "cuda":
        return torch.cuda.get_device_name(dev)
    return f"{platform.processor() or platform.machine()} ({os.cpu_count()} cores)"


def provenance(device: str | torch.device = "cpu", seed: int | None = None, **extra: Any) -> dict[str, Any]:
    """Everything needed to say where a number came from."""
    info = {
        "commit": _git_commit(),
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
        "device": device_name(device),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "triton": _version("triton"),
        "xformers": _version("xformers") if torch.device(device).type == "cuda" else None,
        "seed": seed,
        # the Triton kernel's settings (candidate restrictions, exclusions, launch order, backward scheme)
        "kernel_env": {k: v for k, v in sorted(os.environ.items()) if k.startswith("INTERVAL_ATTENTION_")},
    }
    info.update(extra)
    return info


_UMASK = os.umask(0)
os.umask(_UMASK)


@contextlib.contextmanager
def atomic_file(path: str | Path, suffix: str = ".tmp") -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success it is renamed onto ``path`` (readers never see
    half a file), on failure it is removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=suffix)
    os.close(fd)
    os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600 files; results are meant to be shared
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: str | Path, text: str) -> None:
    with atomic_file(path) as tmp, open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def atomic_write_json(path: str | Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")


def atomic_savefig(fig: Any, path: str | Path, **kwargs: Any) -> None:
    """``fig.savefig(path, **kwargs)`` through a temporary file beside it (the format from ``path``'s
    suffix), so an interrupted run never leaves half an image."""
    path = Path(path)
    with atomic_file(path, suffix=path.suffix) as tmp:
        fig.savefig(tmp, format=path.suffix.lstrip(".") or None, **kwargs)
