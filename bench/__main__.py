"""Benchmark suites: ``python -m bench <suite> --profile <name>``.

Suites:
  quick       the main job (CPU, <= 10 min): train Transfusion and the discrete baseline, generate, judge,
              write results/quick/ with plots (python -m bench quick --help)
  study       the paper's ablations and the scaling comparison at toy scale, 2 seeds (CPU, <= 90 min;
              python -m bench study --help)
  eval_noise  how much of a study row's spread over seeds is the evaluation's sampling: evaluation seeds
              against training seeds (python -m bench eval_noise --help)
  attention   sweep every attention backend over the Transfusion mask; writes results/<profile>/attention.csv,
              attention_provenance.json and plots/attention_*.png
  plots       redraw the plots of a results folder from its files
  summary     headline table of a results folder (writes attention_summary.md)
  report      results/REPORT.md from every results folder's files
  generation  text-to-image wall time with and without prefix KV reuse (python -m bench generation --help)
  breakdown   per-kernel time of one forward+backward (torch.profiler) for a few backends at one shape
  kernel-check  every autotuning candidate of the Triton kernel, pinned in turn, against a float32
              reference at one shape, one line per (candidate, backward scheme); crashes are resumed past
              (python -m bench kernel-check --help)
  kernels     compile the Triton kernel's candidate configs for a GPU target on this machine (no GPU
              needed): registers, spills, shared memory, occupancy, load paths -> results/kernels/
  launch-order  model of the Triton kernels' heaviest-first launch order against the natural one (list
              scheduling on the GPU's SMs, no GPU needed) -> results/kernels/launch_order_model.*
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["generation"]:  # its own option parser
        from bench.generation import main as generation_main

        return generation_main(argv[1:])
    if argv[:1] == ["study"]:  # its own option parser
        from bench.study import main as study_main

        return study_main(argv[1:])
    if argv[:1] == ["eval_noise"]:  # its own option parser
        from bench.eval_noise import main as eval_noise_main

        return eval_noise_main(argv[1:])
    if argv[:1] == ["kernel-check"]:  # its own option parser
        from bench.kernel_check import main as kernel_check_main

        return kernel_check_main(argv[1:])
    if argv[:1] == ["quick"]:  # its own option parser
        from bench.quick import main as quick_main

        return quick_main(argv[1:])
    parser = argparse.ArgumentParser(
        prog="python -m bench", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="suite", required=True)
    sub.add_parser(
        "generation", help="text-to-image wall time with and without prefix KV reuse", add_help=False
    )
    att = sub.add_parser("attention", help="attention backend sweep (TFLOP/s, memory, tiles)")
    att.add_argument(
        "--profile", default="cpu", help="cpu (2k tokens, minutes on a laptop) or gpu (32k tokens)"
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
    pl = sub.add_parser("plots", help="redraw plots from a results folder")
    pl.add_argument("results", type=Path)
    sm = sub.add_parser("summary", help="headline table of an attention results folder")
    sm.add_argument("results", type=Path)
    sm.add_argument("--seq-len", type=int, default=8192)
    bd = sub.add_parser("breakdown", help="per-kernel time of one forward+backward (torch.profiler)")
    bd.add_argument(
        "--backends",
        default="triton,flex",
        help="comma-separated backends; triton-natural: triton with its programs in the natural launch "
        "order; triton-1row / triton-natural-1row: the two orders on one row of 8 heads; triton-split / "
        "triton-atomic: triton with its backward scheme pinned (a dQ kernel / dQ by atomics)",
    )
    bd.add_argument("--device", default="cuda" if _cuda() else "cpu")
    bd.add_argument("--seq-len", type=int, default=8192)
    bd.add_argument("--head-dim", type=int, default=128)
    bd.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    bd.add_argument("--heads", type=int, default=16)
    bd.add_argument("--tokens-per-batch", type=int, default=32768)
    bd.add_argument("--out", type=Path, default=None, help="default: results/gpu on CUDA, else results/cpu")
    kr = sub.add_parser("kernels", help="compile-time resources of the Triton kernel's candidate configs")
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
    lo = sub.add_parser("launch-order", help="model of the heaviest-first launch order (no GPU needed)")
    lo.add_argument("--sms", type=int, default=132, help="streaming multiprocessors (132: H100/H200 SXM)")
    lo.add_argument("--ctas-per-sm", type=int, default=1, help="resident programs per SM")
    lo.add_argument("--out", type=Path, default=Path("results/kernels"))
    rp = sub.add_parser("report", help="build results/REPORT.md from the result files")
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
    elif args.suite == "plots":
        from bench.plots import plot_attention

        for p in plot_attention(args.results):
            print(f"wrote {p}")
    elif args.suite == "summary":
        from bench.summary import summarize

        needed = ("attention.csv", "attention_provenance.json")
        missing = [n for n in needed if not (args.results / n).is_file()]
        if missing:
            parser.error(f"{args.results}: no {' or '.join(missing)} (did `bench attention` run into it?)")
        print(summarize(args.results, args.seq_len))
    elif args.suite == "breakdown":
        import torch

        from bench.breakdown import run as run_breakdown

        out = args.out or Path("results") / ("gpu" if args.device.startswith("cuda") else "cpu")
        rows = run_breakdown(
            out, args.backends.split(","), args.device, seq_len=args.seq_len, head_dim=args.head_dim,
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
