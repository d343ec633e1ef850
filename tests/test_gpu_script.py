"""bench/gpu.sh end to end, driven by stand-in `python3` and `nvidia-smi` commands that log every call
(with the kernel settings it ran under) and play back what each phase does. A GPU session is too scarce
to find a wiring mistake in the script: these check that the configs found wrong reach every later
phase, that unchecked candidates switch TMA off, that old checks are removed, which files reach $OUT,
and the exit status."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "bench" / "gpu.sh"

# $STAND_IN/check: what each kernel-check try does ("pass", "fail" or "hang": marker left, outlives the
# limit); $STAND_IN/exclude: what --exclusions-from prints ("!" makes it fail). The sweep and the
# breakdown write the files the script copies to $OUT.
FAKE_PYTHON = r"""#!/usr/bin/env bash
dir=$(dirname "$0")
out_arg() { while [ $# -gt 1 ]; do [ "$1" != --out ] || { echo "$2"; return; }; shift; done; }
settings="EXCLUDE=${INTERVAL_ATTENTION_EXCLUDE-unset} TMA=${INTERVAL_ATTENTION_TMA-unset}"
echo "$* | $settings AUTOTUNE=${INTERVAL_ATTENTION_AUTOTUNE-unset}" >> "$dir/calls"
case "$1 $2 $3" in
  "-c "*) case "$2" in *xdist*) exit 0 ;; *) echo "torch X triton Y"; exit 0 ;; esac ;;
  "-m pytest "*) echo "1 passed"; exit "$(cat "$dir/pytest_rc" 2>/dev/null || echo 0)" ;;
  "-m bench kernel-check")
    case "$4" in
      --exclusions-from)
        ex=$(cat "$dir/exclude" 2>/dev/null); [ "$ex" != "!" ] || exit 1; echo -n "$ex"; exit 0 ;;
      --record-marker) rm -f "${5%.csv}.running"; exit 0 ;;
    esac
    for a in "$@"; do out=$a; done
    echo "config,passed" > "$out"
    case $(cat "$dir/check") in
      pass) exit 0 ;; fail) exit 1 ;; hang) echo 0 > "${out%.csv}.running"; sleep 30 ;;
    esac ;;
  "-m bench attention")
    res=$(out_arg "$@")
    for f in attention.csv attention_provenance.json kernel_tuning.csv; do echo x > "$res/$f"; done; exit 0 ;;
  "-m bench breakdown")
    res=$(out_arg "$@")
    echo x > "$res/kernel_breakdown.csv"; echo x > "$res/kernel_breakdown_provenance.json"; exit 0 ;;
  "-m bench summary") exit 0 ;;
esac
echo "unexpected call: $*" >&2; exit 3
"""

COPIED = {
    "attention.csv", "attention_provenance.json", "gpu_tests.txt", "kernel_tuning.csv",
    "kernel_breakdown.csv", "kernel_breakdown_provenance.json", "kernel_check.csv",
}  # fmt: skip


def _run(tmp_path: Path, check: str = "pass", exclude: str = "", check_limit: int = 60, **settings: str):
    if shutil.which("bash") is None or shutil.which("timeout") is None:
        pytest.skip("needs bash and coreutils' timeout")
    stand_in = tmp_path / "bin"
    stand_in.mkdir()
    for name, text in (("python3", FAKE_PYTHON), ("nvidia-smi", "#!/usr/bin/env bash\necho Stand-in GPU\n")):
        (stand_in / name).write_text(text)
        (stand_in / name).chmod(0o755)
    (stand_in / "check").write_text(check)
    (stand_in / "exclude").write_text(exclude)
    results, out, wheels = tmp_path / "gpu results", tmp_path / "out", tmp_path / "no-wheels"  # a space too
    for d in (results, out, wheels):
        d.mkdir()
    (results / "kernel_check_old.csv").write_text("an earlier run's check\n")
    (results / "kernel_check_old.running").write_text("3\n")
    (results / "NOTES.md").write_text("kept\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith("INTERVAL_ATTENTION_")}
    env.update(
        PATH=f"{stand_in}:{os.environ['PATH']}", RESULTS=str(results), OUT=str(out), WHEELS=str(wheels),
        CHECK_TIMEOUT_S=str(check_limit), **settings,
    )  # fmt: skip
    done = subprocess.run(
        ["bash", str(SCRIPT)], capture_output=True, text=True, env=env, timeout=120, cwd=tmp_path
    )
    calls = (stand_in / "calls").read_text().splitlines()
    return done, calls, results, out


def _phase(calls: list[str], words: str) -> str:
    found = [c for c in calls if c.startswith(words)]
    assert len(found) == 1, (words, calls)
    return found[0]


def test_every_phase_runs_in_order_and_its_files_reach_out(tmp_path):
    done, calls, results, out = _run(tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr
    order = ["-m bench kernel-check --layout", "-m bench kernel-check --exclusions-from", "-m pytest",
             "-m bench attention", "-m bench breakdown", "-m bench summary"]  # fmt: skip
    positions = [calls.index(_phase(calls, words)) for words in order]
    assert positions == sorted(positions)
    # Nothing excluded, TMA left on; the tests pin the default configs and run in parallel.
    for c in calls:
        assert "EXCLUDE=unset TMA=unset" in c, c
    pytest_call = _phase(calls, "-m pytest")
    assert "AUTOTUNE=0" in pytest_call and "-n 8" in pytest_call and "not every_candidate" in pytest_call
    sweep = _phase(calls, "-m bench attention")
    assert "--kernel-check" in sweep and "--budget-s 300 " in sweep  # the time left, capped at SWEEP_MAX_S
    assert {p.name for p in out.iterdir()} == COPIED
    # An earlier run's checks would be read beside this one's; other files stay.
    assert not list(results.glob("kernel_check_old*")) and (results / "NOTES.md").exists()
    assert "removing an earlier run's checks" in done.stdout and "kernel_check_old.csv" in done.stdout


def test_configs_found_wrong_are_left_out_of_every_later_phase(tmp_path):
    wrong = "fwd:bfloat16:128:128x64 w8 s3"
    done, calls, _, _ = _run(tmp_path, check="fail", exclude=wrong)
    assert done.returncode == 1  # a failed check fails the run, though the rest went on
    later = calls[calls.index(_phase(calls, "-m bench kernel-check --exclusions-from")) + 1 :]
    assert [c for c in later if c.startswith("-m ")] and all(f"EXCLUDE={wrong} TMA=unset" in c for c in later)
    assert f"INTERVAL_ATTENTION_EXCLUDE='{wrong}'" in done.stdout


def test_unchecked_candidates_switch_tma_off(tmp_path):
    done, calls, _, _ = _run(tmp_path, check="hang", check_limit=7)
    assert done.returncode == 1
    assert "the rest runs with INTERVAL_ATTENTION_TMA=0" in done.stdout
    for words in ("-m pytest", "-m bench attention", "-m bench breakdown"):
        assert "TMA=0" in _phase(calls, words)


def test_unreadable_exclusions_count_as_unchecked(tmp_path):
    done, calls, _, _ = _run(tmp_path, exclude="!")
    assert done.returncode == 1
    assert "could not read the checks' exclusions" in done.stdout
    assert "EXCLUDE=unset TMA=0" in _phase(calls, "-m bench attention")


@pytest.mark.parametrize(
    ("settings", "budget"),
    [({"TOTAL_S": "200"}, 120), ({"TOTAL_S": "330"}, 200), ({"SWEEP_BUDGET_S": "77"}, 77)],
)
def test_the_sweep_gets_the_time_the_earlier_phases_left(tmp_path, settings, budget):
    """TOTAL_S less the breakdown's 70 s and 60 s more, within [SWEEP_MIN_S, SWEEP_MAX_S] = [120, 300];
    the stand-in phases take about no time."""
    done, calls, _, _ = _run(tmp_path, **settings)
    assert done.returncode == 0, done.stdout + done.stderr
    got = int(_phase(calls, "-m bench attention").split("--budget-s ")[1].split()[0])
    assert budget - 2 <= got <= budget
