"""Benchmark suites: ``python -m bench <suite> [options]``; ``python -m bench <suite> --help`` for a suite's
options.

Profiles: only ``attention`` takes one, ``--profile cpu`` (the default: 2k tokens, minutes on a laptop) or
``--profile gpu`` (32k tokens). ``quick`` and ``study`` are profiles themselves: ``python -m bench quick``
runs the quick profile, and ``--profile quick`` (``--profile study`` for the study) is accepted and changes
nothing. The other suites take no profile.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
from pathlib import Path
from typing import NoReturn

# Every suite ``python -m bench <suite>`` accepts, with its one-line description for --help.
SUITES: dict[str, str] = {
    "quick": "the main job (CPU, <= 10 min): Transfusion vs the discrete baseline, trained, sampled and "
    "judged -> results/quick/",
    "study": "the paper's ablations and the scaling comparison at toy scale, 2 seeds (CPU, <= 90 min)",
    "eval_noise": "a study row's spread over evaluation seeds against its spread over training seeds",
    "attention": "attention backend sweep (TFLOP/s, memory) -> results/<profile>/attention.csv and plots",
    "plots": "redraw the plots of a folder `bench attention` or `bench study` wrote, from its files",
    "summary": "headline table of an attention results folder (writes attention_summary.md)",
    "report": "results/REPORT.md from every results folder's files",
    "flops-recount": "a study's or quick job's training FLOPs recounted with attention on allowed pairs, "
    "parity ratios redone",
    "generation": "text-to-image wall time with and without prefix KV reuse",
    "breakdown": "per-kernel time of one forward+backward (torch.profiler) for a few backends",
    "kernel-check": "every autotuning candidate of the Triton kernel against a float32 reference",
    "kernels": "compile-time resources of the Triton kernel's candidate configs (no GPU needed) -> "
    "results/kernels/",
    "launch-order": "model of the Triton kernels' heaviest-first launch order (no GPU needed) -> "
    "results/kernels/",
}
# The suites with an option parser of their own: their arguments go to MODULE.main.
DELEGATED: dict[str, str] = {
    "quick": "bench.quick",
    "study": "bench.study",
    "eval_noise": "bench.eval_noise",
    "generation": "bench.generation",
    "kernel-check": "bench.kernel_check",
    "flops-recount": "bench.flops_recount",
}
# What `bench attention` writes and `bench plots` / `bench summary` read.
SWEEP_FILES: tuple[str, ...] = ("attention.csv", "attention_provenance.json")
# The suites that are a profile themselves: ``--profile <suite>`` is accepted (and dropped) for them.
OWN_PROFILE: tuple[str, ...] = ("quick", "study")


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def _fail(prog: str, message: str) -> NoReturn:
    """An argparse-style usage error: ``PROG: error: MESSAGE`` on stderr, exit status 2."""
    print(f"{prog}: error: {message}", file=sys.stderr)
    raise SystemExit(2)


def drop_own_profile(suite: str, args: list[str]) -> list[str]:
    """``args`` of a suite that is a profile itself without ``--profile <suite>`` (or ``--profile=<suite>``);
    any other profile is a usage error that says what to run instead."""
    out: list[str] = []
    i = 0
    while i < len(args):
        arg = args[i]
        if arg == "--":
            out += args[i:]
            break
        if arg != "--profile" and not arg.startswith("--profile="):
            out.append(arg)
            i += 1
            continue
        if arg == "--profile":
            if i + 1 == len(args):
                _fail(
                    f"python -m bench {suite}",
                    f"--profile needs a value; {suite}'s only profile is {suite!r}",
                )
            value, i = args[i + 1], i + 2
        else:
            value, i = arg.partition("=")[2], i + 1
        if value != suite:
            _fail(
                f"python -m bench {suite}",
                f"--profile {value!r}: {suite} is a profile itself, its only profile is {suite!r} (run "
                f"`python -m bench {suite}`); the cpu and gpu profiles are the attention sweep's "
                f"(`python -m bench attention --profile {value if value in ('cpu', 'gpu') else 'cpu|gpu'}`)",
            )
    return out


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] and argv[0] in DELEGATED:  # a suite with its own option parser
        suite, rest = argv[0], argv[1:]
        if suite in OWN_PROFILE:
            rest = drop_own_profile(suite, rest)
        return importlib.import_module(DELEGATED[suite]).main(rest)
    parser = argparse.ArgumentParser(
        prog="python -m bench", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="suite", required=True, metavar="<suite>", title="suites")
    parsers = {
        name: sub.add_parser(name, help=help, description=help, add_help=name not in DELEGATED)
        for name, help in SUITES.items()
    }  # the DELEGATED ones only for --help and the choices: main() passed them on above
    att = parsers["attention"]
    att.add_argument(
        "--profile",
        default="cpu",
        help="cpu (the default: 2k tokens, minutes on a laptop) or gpu (32k tokens)",
    )
    att.add_argument("--out", type=Path, default=None, help="results folder (default: results/<profile>)")
    att.add_argument("--seed", type=int, default=0)
    att.add_argument(
        "--budget-s", type=float, default=None, help="stop starting new configurations after this"
    )
    att.add_argument("--backends", default=None, help="comma-separated subset of the profile's backends")
    att.add_argument("--seq-lens", default=None, help="comma-separated subset of lengths, e.g. 1024,4096")
    att.add_argument(
        "--kernel-check",
        action="store_true",
        help="as soon as the pivot shape, and each variation at the pivot length with a head dim or dtype "
        "of its own, is measured, check the Triton configs the sweep's autotuner chose there against a "
        "float32 reference (kernel_check.csv; exit status 1 if one fails)",
    )
    pl = parsers["plots"]
    pl.add_argument(
        "results",
        type=Path,
        help="a folder `bench attention` wrote (attention.csv, attention_provenance.json) or `bench study` "
        "wrote (study.json)",
    )
    sm = parsers["summary"]
    sm.add_argument("results", type=Path)
    sm.add_argument("--seq-len", type=int, default=8192)
    bd = parsers["breakdown"]
    bd.add_argument(
        "--backends",
        default="triton,flex",
        help="comma-separated backends; triton-natural: triton with its programs in the natural launch "
        "order; triton-1row / triton-natural-1row: the two orders on one row of 8 heads; triton-split / "
        "triton-atomic: triton with its backward scheme pinned (a dQ kernel / dQ by atomics)",
    )
    bd.add_argument(
        "--device", default="cuda" if _cuda() else "cpu", help="default: cuda if there is one, else cpu"
    )
    bd.add_argument("--seq-len", type=int, default=8192)
    bd.add_argument("--head-dim", type=int, default=128)
    bd.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    bd.add_argument("--heads", type=int, default=16)
    bd.add_argument("--tokens-per-batch", type=int, default=32768)
    bd.add_argument("--out", type=Path, default=None, help="default: results/gpu on CUDA, else results/cpu")
    kr = parsers["kernels"]
    kr.add_argument("--arch", type=int, default=90, help="CUDA compute capability x10 (90: H100/H200)")
    kr.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    kr.add_argument("--head-dim", type=int, default=128, choices=[32, 64, 128])
    kr.add_argument(
        "--kernels",
        default="fwd,dkdv,dkdv-atomic,dq",
        help="comma-separated subset of fwd,dkdv,dkdv-atomic,dq (dkdv-atomic: the atomic backward scheme's "
        "dK/dV kernel, which also adds dQ)",
    )
    kr.add_argument("--out", type=Path, default=Path("results/kernels"))
    lo = parsers["launch-order"]
    lo.add_argument("--sms", type=int, default=132, help="streaming multiprocessors (132: H100/H200 SXM)")
    lo.add_argument("--ctas-per-sm", type=int, default=1, help="resident programs per SM")
    lo.add_argument("--out", type=Path, default=Path("results/kernels"))
    rp = parsers["report"]
    rp.add_argument("--results", type=Path, default=Path("results"))
    args = parser.parse_args(argv)

    if args.suite == "attention":
        from bench.attention import PROFILES, run_sweep
        from bench.plots import plot_attention

        if args.profile not in PROFILES:
            parser.error(f"--profile {args.profile!r} is not one of {sorted(PROFILES)}")
        import dataclasses

        profile = PROFILES[args.profile]
        if args.budget_s is not None:
            profile = dataclasses.replace(profile, time_budget_s=args.budget_s)
        if args.backends:
            wanted = args.backends.split(",")
            unknown = sorted(set(wanted) - set(profile.backends))
            if unknown:
                parser.error(f"--backends {unknown} not in the profile's {profile.backends}")
            profile = dataclasses.replace(profile, backends=wanted)
        if args.seq_lens:
            profile = dataclasses.replace(profile, seq_lens=[int(x) for x in args.seq_lens.split(",")])
        out = args.out or Path("results") / args.profile
        checked: list[dict] = []
        rows = run_sweep(profile, out, seed=args.seed, check_kernel=args.kernel_check, checked=checked)
        for p in plot_attention(out):
            print(f"wrote {p}")
        bad = [r for r in rows if r["status"] != "ok"]
        print(f"{len(rows) - len(bad)} measured, {len(bad)} oom/unsupported/skipped; see {out}/attention.csv")
        if args.kernel_check:
            failed = [r for r in checked if r["status"] != "pass"]
            note = "" if checked else " (triton was not measured at the shapes to check)"
            print(f"kernel check of the autotuned Triton configs: {len(checked) - len(failed)} of "
                  f"{len(checked)} pairs pass{note}")  # fmt: skip
            if failed:
                return 1
    elif args.suite == "plots" and (args.results / "study.json").is_file():
        from bench.study_plots import plot_study

        info = json.loads((args.results / "study.json").read_text())
        for p in plot_study(args.results, info["summary"], info["runs"], info.get("references")):
            print(f"wrote {p}")
    elif args.suite == "plots":
        needed = SWEEP_FILES
        missing = [n for n in needed if not (args.results / n).is_file()]
        if missing:
            sweeps = sorted(str(f.parent) for f in args.results.parent.glob("*/attention.csv"))
            pl.error(
                f"results = {str(args.results)!r}: no {' or '.join(missing)} there; bench plots redraws the "
                "plots of a folder `bench study` wrote (study.json) or `bench attention` wrote, one holding "
                f"{' and '.join(needed)} ({'here: ' + ', '.join(sweeps) if sweeps else 'e.g. results/cpu'})"
            )
        from bench.plots import plot_attention

        for p in plot_attention(args.results):
            print(f"wrote {p}")
    elif args.suite == "summary":
        from bench.summary import summarize

        needed = SWEEP_FILES
        missing = [n for n in needed if not (args.results / n).is_file()]
        if missing:
            parser.error(f"{args.results}: no {' or '.join(missing)} (did `bench attention` run into it?)")
        print(summarize(args.results, args.seq_len))
    elif args.suite == "breakdown":
        import torch

        from bench.breakdown import check_backends
        from bench.breakdown import run as run_breakdown
        from transfusion.devices import check_device

        backends = args.backends.split(",")
        try:
            check_backends(backends)
        except ValueError as e:
            bd.error(f"--backends {args.backends!r}: {e}")
        try:
            check_device(args.device)
        except ValueError as e:
            bd.error(f"--device {e}")
        out = args.out or Path("results") / ("gpu" if args.device.startswith("cuda") else "cpu")
        rows = run_breakdown(
            out, backends, args.device, seq_len=args.seq_len, head_dim=args.head_dim,
            dtype=getattr(torch, args.dtype), heads=args.heads, tokens_per_batch=args.tokens_per_batch,
        )  # fmt: skip
        for r in rows:
            if "us_per_step" in r:
                print(f"{r['backend']:>8} {r['us_per_step']:10.1f} us {r['share']:6.1%}  {r['kernel'][:70]}")
            else:
                print(f"{r['backend']:>8} {r['kernel']}")
        print(f"wrote {out}/kernel_breakdown.csv")
    elif args.suite == "kernels":
        # Compiling needs real @triton.jit functions: the interpreter must be off before kernels imports.
        os.environ["TRITON_INTERPRET"] = "0"
        from bench.kernel_resources import KERNELS, markdown_table, run

        kernels = tuple(args.kernels.split(","))
        if not set(kernels) <= set(KERNELS):
            parser.error(f"--kernels {args.kernels!r}: choose from {', '.join(KERNELS)}")
        print(markdown_table(run(args.out, args.dtype, args.head_dim, args.arch, kernels)), end="")
        print(f"wrote {args.out}/kernel_resources.csv and kernel_resources.md")
    elif args.suite == "launch-order":
        from bench.launch_order import markdown_table as order_table
        from bench.launch_order import run as run_order_model

        for name in ("sms", "ctas_per_sm"):
            if getattr(args, name) < 1:
                parser.error(f"--{name.replace('_', '-')} = {getattr(args, name)} must be >= 1")
        print(order_table(run_order_model(args.out, args.sms, args.ctas_per_sm)), end="")
        print(f"wrote {args.out}/launch_order_model.csv and launch_order_model.md")
    elif args.suite == "report":
        from bench.report import build_report

        print(f"wrote {build_report(args.results)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
