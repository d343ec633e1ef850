"""``python -m bench``: every suite listed, the profiles said right, clean one-line errors, copyable help."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import bench.__main__ as bench_main
from bench.study_grid import GROUPS

# every suite `python -m bench <suite>` accepts (bench/__main__.py dispatches them)
EXPECTED_SUITES = (
    "quick", "study", "eval_noise", "attention", "plots", "summary", "report", "generation", "breakdown",
    "kernel-check", "kernels", "launch-order", "flops-recount",
)  # fmt: skip
ROOT = Path(__file__).resolve().parents[1]


def run_bench(capsys, *argv: str) -> tuple[int, str, str]:
    """bench's main in this process: (exit status, stdout, stderr); argparse's exits become the status."""
    try:
        code = bench_main.main(list(argv))
    except SystemExit as e:
        code = e.code
    out = capsys.readouterr()
    return code, out.out, out.err


def assert_clean_error(code: int, err: str, *parts: str) -> None:
    """Exit status 2 and one ``error:`` line holding every part; no traceback."""
    assert code == 2, err
    assert "Traceback" not in err
    lines = [ln for ln in err.splitlines() if ": error: " in ln]
    assert len(lines) == 1, err
    for part in parts:
        assert part in lines[0], (part, lines[0])


# ---------------------------------------------------------------------- 1. every suite listed
def test_help_lists_every_suite_with_its_description(capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "250")  # one description per line
    suites = bench_main.SUITES
    assert set(EXPECTED_SUITES) <= set(suites) and set(bench_main.DELEGATED) <= set(suites)
    code, out, _ = run_bench(capsys, "--help")
    assert code == 0
    for name, desc in suites.items():
        assert re.search(rf"^ +{re.escape(name)}\s+{re.escape(desc)}$", out, re.M), name


@pytest.mark.parametrize("suite", EXPECTED_SUITES)
def test_every_listed_suite_is_accepted(capsys, suite):
    code, out, err = run_bench(capsys, suite, "--help")
    assert code == 0, err
    assert f"python -m bench {suite}" in out


def test_mistyped_suite_names_every_suite(capsys):
    code, _, err = run_bench(capsys, "quik")
    assert_clean_error(code, err, "'quik'", *(f"'{s}'" for s in EXPECTED_SUITES))


# ---------------------------------------------------------------------- 2. profiles
def test_top_level_help_says_which_suites_take_a_profile(capsys):
    _, out, _ = run_bench(capsys, "--help")
    assert "--profile <name>" not in out
    assert "only ``attention`` takes one" in out and "``--profile gpu``" in out


@pytest.fixture
def quick_args(monkeypatch):
    """The arguments bench passes on to bench.quick.main (which is not run)."""
    import bench.quick

    seen: list[list[str]] = []
    monkeypatch.setattr(bench.quick, "main", lambda argv: seen.append(list(argv)) or 0)
    return seen


@pytest.mark.parametrize(
    "argv, passed",
    [
        ([], []),  # the README's quick start: python -m bench quick
        (["--profile", "quick"], []),
        (["--profile=quick", "--steps", "3"], ["--steps", "3"]),
        (["--fresh", "--profile", "quick", "--set", "n_t2i=8"], ["--fresh", "--set", "n_t2i=8"]),
    ],
)
def test_quick_takes_its_own_profile(capsys, quick_args, argv, passed):
    code, _, err = run_bench(capsys, "quick", *argv)
    assert code == 0, err
    assert quick_args == [passed]


# ids not "gpu": conftest skips the tests whose keywords hold "gpu" on a machine without CUDA
@pytest.mark.parametrize("value", ["gpu", "cpu", "study"], ids=lambda v: f"profile-{v}")
def test_quick_refuses_another_profile_and_says_what_to_run(capsys, quick_args, value):
    code, _, err = run_bench(capsys, "quick", "--profile", value)
    assert_clean_error(
        code, err, f"--profile {value!r}", "python -m bench quick", "bench attention --profile"
    )
    assert quick_args == []


def test_study_takes_its_own_profile(capsys):
    # the study's own parser sees the arguments without --profile: it refuses the group, nothing else
    code, _, err = run_bench(capsys, "study", "--profile", "study", "--groups", "nosuch")
    assert_clean_error(code, err, "unknown study group(s) ['nosuch']")


def test_quick_profile_quick_through_the_module():
    # quick's own parser gets past --profile quick to its check of --families (and stops there: no run)
    r = subprocess.run(
        [sys.executable, "-m", "bench", "quick", "--profile", "quick", "--families", "nosuch"],
        capture_output=True, text=True, cwd=ROOT, timeout=120,
    )  # fmt: skip
    assert_clean_error(r.returncode, r.stderr, "--families: unknown ['nosuch']")


# ---------------------------------------------------------------------- 3. clean errors
def test_plots_of_a_folder_without_a_sweep(capsys, tmp_path):
    (tmp_path / "cpu").mkdir()
    (tmp_path / "cpu" / "attention.csv").write_text("backend\n")
    (tmp_path / "quick").mkdir()
    code, _, err = run_bench(capsys, "plots", str(tmp_path / "quick"))
    assert_clean_error(code, err, str(tmp_path / "quick"), "attention.csv", str(tmp_path / "cpu"))
    assert not (tmp_path / "quick" / "plots").exists()


def test_plots_help_says_which_folders(capsys):
    _, out, _ = run_bench(capsys, "--help")
    said = "plots redraw the plots of a folder `bench attention` or `bench study` wrote"
    assert re.search(re.escape(said).replace(r"\ ", r"\s+"), out)  # (argparse wraps the line)


def test_plots_redraws_a_study_folder_from_its_files(capsys, tmp_path):
    import shutil

    folder = tmp_path / "study_prompts_64"
    shutil.copytree(ROOT / "results" / "study_prompts_64", folder)
    shutil.rmtree(folder / "plots")
    code, out, err = run_bench(capsys, "plots", str(folder))
    assert code in (0, None), err
    pngs = sorted((folder / "plots").glob("*.png"))
    assert [p.name for p in pngs] == sorted(
        p.name for p in (ROOT / "results" / "study_prompts_64" / "plots").glob("*.png")
    )
    assert all(p.read_bytes()[:4] == b"\x89PNG" for p in pngs) and f"wrote {pngs[0]}" in out


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
@pytest.mark.parametrize("suite", ["generation", "breakdown"])
def test_cuda_device_without_cuda(capsys, tmp_path, suite):
    code, _, err = run_bench(capsys, suite, "--device", "cuda", "--out", str(tmp_path / "out"))
    assert_clean_error(code, err, "--device 'cuda'", "CUDA is not available")
    assert not (tmp_path / "out").exists()


def test_generation_bad_device_and_lengths(capsys, tmp_path):
    code, _, err = run_bench(capsys, "generation", "--device", "nosuch", "--out", str(tmp_path))
    assert_clean_error(code, err, "--device 'nosuch'", "not a torch device")
    code, _, err = run_bench(capsys, "generation", "--prefix-lengths", "16,x", "--out", str(tmp_path))
    assert_clean_error(code, err, "--prefix-lengths '16,x'")
    code, _, err = run_bench(capsys, "generation", "--prefix-lengths", "16,0", "--out", str(tmp_path))
    assert_clean_error(code, err, "--prefix-lengths '16,0'", ">= 1")
    code, _, err = run_bench(capsys, "generation", "--repeats", "0", "--out", str(tmp_path))
    assert_clean_error(code, err, "--repeats 0", ">= 1")


def test_breakdown_unknown_backend(capsys, tmp_path):
    out = tmp_path / "out"
    # a tiny shape: should sdpa run before the check, it takes a moment, not the default shape's minutes
    tiny = ["--seq-len", "64", "--heads", "1", "--head-dim", "32", "--tokens-per-batch", "64"]
    code, _, err = run_bench(
        capsys, "breakdown", "--backends", "sdpa,nosuch", "--device", "cpu", "--dtype", "float32",
        "--out", str(out), *tiny,
    )  # fmt: skip
    assert_clean_error(code, err, "--backends 'sdpa,nosuch'", "unknown backend 'nosuch'", "known:", "sdpa",
                       "triton-natural")  # fmt: skip
    assert not out.exists()  # checked before anything is written


# ---------------------------------------------------------------------- 4. group names never broken
@pytest.mark.parametrize("suite", ["study", "eval_noise"])
@pytest.mark.parametrize("columns", ["50", "80", "120"])
def test_group_names_whole_in_help(capsys, monkeypatch, suite, columns):
    monkeypatch.setenv("COLUMNS", columns)
    code, out, _ = run_bench(capsys, suite, "--help")
    assert code == 0
    for g in GROUPS:
        assert re.search(rf"(?<![\w-]){re.escape(g)}(?![\w-])", out), (g, out)


# ---------------------------------------------------------------------- 5. generation's help
def test_generation_help_gives_every_option_a_default(capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "250")
    code, out, _ = run_bench(capsys, "generation", "--help")
    assert code == 0
    assert out.startswith("usage: python -m bench generation ")
    options = dict(re.findall(r"^  (--[\w-]+)(.*?)(?=^  -|\Z)", out, re.M | re.S))  # option -> its text
    assert set(options) >= {"--out", "--device", "--prefix-lengths", "--batch-size", "--scheduler", "--steps",
                            "--repeats", "--seed"}  # fmt: skip
    for option, text in options.items():
        assert "(default: " in text, option


# ---------------------------------------------------------------------- 6. dependencies
def test_core_dependencies_cover_the_main_job():
    tomllib = pytest.importorskip("tomllib")
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    names = {re.split(r"[<>=!~;\[ ]", d, maxsplit=1)[0].lower() for d in project["dependencies"]}
    # Pillow: transfusion.data.image/folder, transfusion.generation.run; diffusers: the autoencoders;
    # pandas, matplotlib: bench quick's report and plots
    assert {"pillow", "diffusers", "pandas", "matplotlib"} <= names
