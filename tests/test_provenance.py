import os
import stat
from pathlib import Path

import pytest

from transfusion.provenance import atomic_file, atomic_savefig, atomic_write_json, provenance


def test_atomic_write_replaces_whole_file_and_is_shareable(tmp_path):
    path = tmp_path / "out" / "a.json"
    atomic_write_json(path, {"x": 1})
    atomic_write_json(path, {"x": 2})
    assert path.read_text().strip().replace(" ", "").replace("\n", "") == '{"x":2}'
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~umask
    assert [p.name for p in path.parent.iterdir()] == ["a.json"]


def test_failed_write_leaves_old_file_and_no_temp(tmp_path):
    path = tmp_path / "b.txt"
    path.write_text("old")
    with pytest.raises(RuntimeError), atomic_file(path) as tmp:
        tmp.write_text("half")
        raise RuntimeError("interrupted")
    assert path.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["b.txt"]


def test_provenance_names_commit_device_versions_command_seed():
    info = provenance("cpu", seed=7, extra_field=1)
    assert info["seed"] == 7 and info["extra_field"] == 1
    for key in ("commit", "device", "torch", "python", "command", "date"):
        assert info[key], key


def test_commit_is_dirty_only_when_code_changes_not_results(tmp_path, monkeypatch):
    import subprocess

    from transfusion.provenance import _git_commit

    monkeypatch.delenv("TRANSFUSION_COMMIT", raising=False)

    def git(*args: str) -> str:
        env = {"GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t",
               "GIT_COMMITTER_EMAIL": "t@t", "PATH": "/usr/bin:/bin"}  # fmt: skip
        return subprocess.run(
            ["git", *args], cwd=tmp_path, env=env, check=True, capture_output=True, text=True
        ).stdout

    (tmp_path / "results").mkdir()
    (tmp_path / "code.py").write_text("x = 1\n")
    (tmp_path / "results" / "r.csv").write_text("a\n1\n")
    git("init", "-q")
    git("add", ".")
    git("commit", "-qm", "c")
    head = git("rev-parse", "HEAD").strip()
    assert _git_commit(tmp_path) == head
    (tmp_path / "results" / "r.csv").write_text("a\n2\n")  # a suite rewrote its result file
    assert _git_commit(tmp_path) == head
    (tmp_path / "code.py").write_text("x = 2\n")
    assert _git_commit(tmp_path) == head + "+dirty"


def test_atomic_savefig_writes_the_format_of_the_suffix_and_never_half_a_file(tmp_path):
    matplotlib = pytest.importorskip("matplotlib")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots()
    ax.plot([0, 1], [1, 0])
    png, pdf = tmp_path / "a.png", tmp_path / "b.pdf"
    atomic_savefig(fig, png, dpi=50)
    atomic_savefig(fig, pdf)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and pdf.read_bytes()[:5] == b"%PDF-"
    before = png.read_bytes()

    class Broken:
        def savefig(self, path, **kwargs):
            Path(path).write_bytes(b"half")
            raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        atomic_savefig(Broken(), png)
    assert png.read_bytes() == before  # the old image stands, and no temporary file is left
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.png", "b.pdf"]
    plt.close(fig)
