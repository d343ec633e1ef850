"""bench/gpu_check_loop.sh, the GPU scripts' retry loop around `bench kernel-check`, driven by a stand-in
`python3` that plays back what each try does (crash inside a pair, finish, fail, die early, hang)."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

LOOP = Path(__file__).resolve().parents[1] / "bench" / "gpu_check_loop.sh"

# Each try takes the next line of `plan`: "crash K" leaves the marker naming pair K and dies (as the
# checker does after recording a fatal error, or as a killed process), "pass"/"fail" finish every pair
# (removing the marker, as the next try's resume would) with status 0/1, "early" dies before touching
# anything, "hang" outlives the time limit. `--record-marker` logs the pair it records and removes it.
FAKE_PYTHON = """#!/usr/bin/env bash
dir=$(dirname "$0")
if [ "$4" = "--record-marker" ]; then
  echo "recorded $(cat "${5%.csv}.running")" >> "$dir/log"; rm -f "${5%.csv}.running"; exit 0
fi
for a in "$@"; do out=$a; done  # the last argument: --out CSV
marker=${out%.csv}.running
step=$(head -n 1 "$dir/plan"); sed -i 1d "$dir/plan"; echo "try $step" >> "$dir/log"
case $step in
  crash*) echo "${step#crash }" > "$marker"; exit 1 ;;
  pass) rm -f "$marker"; exit 0 ;;
  fail) rm -f "$marker"; exit 1 ;;
  early) exit 1 ;;
  hang) echo 9 > "$marker"; sleep 30 ;;
esac
"""


def _run(tmp_path: Path, plan: list[str], limit: int = 60) -> tuple[int, list[str], bool]:
    if shutil.which("bash") is None or shutil.which("timeout") is None:
        pytest.skip("needs bash and coreutils' timeout")
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    fake = bin_dir / "python3"
    fake.write_text(FAKE_PYTHON)
    fake.chmod(0o755)
    (bin_dir / "plan").write_text("".join(f"{p}\n" for p in plan))
    (bin_dir / "log").write_text("")
    csv = tmp_path / "kernel_check.csv"
    script = f'source "{LOOP}"; kernel_check_loop "{csv}" {limit} --layout mixed; echo "rc=$?"'
    env = dict(os.environ, PATH=f"{bin_dir}:{os.environ['PATH']}")
    done = subprocess.run(["bash", "-c", script], capture_output=True, text=True, env=env, timeout=120)
    rc = int(done.stdout.strip().splitlines()[-1].removeprefix("rc="))
    log = (bin_dir / "log").read_text().split("\n")[:-1]
    return rc, log, csv.with_suffix(".running").exists()


def test_goes_on_past_every_crash_until_done(tmp_path):
    rc, log, marker = _run(tmp_path, [f"crash {k}" for k in range(6)] + ["pass"])
    assert rc == 0 and len(log) == 7 and not marker  # no cap on the number of crashes


def test_a_finished_run_with_failures_says_so(tmp_path):
    rc, log, marker = _run(tmp_path, ["crash 1", "fail"])
    assert rc == 1 and log == ["try crash 1", "try fail"] and not marker


def test_no_progress_stops_and_records_the_pair(tmp_path):
    rc, log, marker = _run(tmp_path, ["crash 3", "early", "pass"])
    assert rc == 124 and log == ["try crash 3", "try early", "recorded 3"] and not marker


def test_out_of_time_inside_a_pair_is_not_a_crash(tmp_path):
    rc, log, marker = _run(tmp_path, ["hang"], limit=7)
    assert rc == 124 and log == ["try hang"] and not marker  # not recorded as crashed
