"""Check every autotuning candidate of the Triton interval kernel, pinned in turn, at one shape.

The GPU tests stop at the first wrong candidate and say neither which one nor whether the others pass;
this checker runs each (candidate index, backward scheme) pair at a chosen shape, with every output
buffer poisoned (NaN) before the kernels write it, and compares the output and the three gradients with
a float32 dense reference computed head by head. Each pair gets one line and one CSV row, written before
the next pair starts, with the config every kernel launched (or, for a pinned pair, was to launch). A
pair that kills the process (an illegal memory access ends the CUDA context) is recorded as ``crashed``,
by the process itself when it can, else by the next run with the same ``--out``, which then goes on
with the remaining pairs (bench/gpu_check_loop.sh reruns it so); run it under ``CUDA_LAUNCH_BLOCKING=1``
so that the error surfaces at the faulting launch. Exit status 0 only when every pair passed.

    python -m bench kernel-check --layout benchmark --seq-len 8192 --batch 4 --heads 16 --tma off \\
        --out results/gpu/kernel_check.csv
    python -m bench kernel-check --layout mixed --timing      # plus wall vs device time of triton and flex

``--timing`` also times the forward and forward+backward of ``triton`` and ``flex`` at the shape: the
sweep's wall time (one call, synchronized after each), and calls launched back to back, timed on the
device with CUDA events and on the host per call (its launch overhead).
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import importlib
import io
import json
import math
import sys
from pathlib import Path

import pandas as pd
import torch

from bench.workloads import benchmark_layout
from transfusion.layout import AttentionLayout
from transfusion.provenance import atomic_write_json, atomic_write_text, provenance

FIELDS = (
    "layout", "batch", "heads", "seq_len", "head_dim", "dtype", "tma", "index", "mode", "status",
    "fwd_config", "dkdv_config", "dq_config", "out_nan", "out_err", "dq_nan", "dq_err", "dk_nan", "dk_err",
    "dv_nan", "dv_err", "tolerance", "error",
)  # fmt: skip
KEY_FIELDS = ("layout", "batch", "heads", "seq_len", "head_dim", "dtype", "tma", "index", "mode")
TOLERANCE = {torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 2e-2}
# Two rows of 1100 tokens on which every-candidate GPU test first failed (H200, 2026-11-28): padding at
# a row's start, an image at a document's first token, adjacent images, a document of 12 tokens.
MIXED_ROWS = (
    ([(4, 415), (415, 1100)], [(4, 12), (12, 263), (266, 339), (415, 674), (678, 718), (718, 764)]),
    ([(0, 373), (373, 385), (385, 1100)], [(4, 147), (151, 345), (347, 373), (376, 385)]),
)
MIXED_LEN = 1100
AUTOTUNED = "autotuned"  # --indices autotuned: no pinning, the configs the autotuner picks (as the sweep)


def _ia():
    return importlib.import_module("kernels.interval_attention")


def make_layout(name: str, batch: int, seq_len: int, device: torch.device) -> AttentionLayout:
    if name == "mixed":
        rows = [AttentionLayout.from_spans(MIXED_LEN, docs, images) for docs, images in MIXED_ROWS]
        return AttentionLayout.stack(rows).to(device)
    if name == "benchmark":
        return benchmark_layout(batch, seq_len, 256, 0.5, device=device)
    raise ValueError(f"layout = {name!r}; use 'mixed' or 'benchmark'")


def reference(q, k, v, g, layout: AttentionLayout) -> dict[str, torch.Tensor]:
    """float32 dense softmax attention and its gradients, one (row, head) at a time; a query with no
    allowed key gives zeros."""
    scale = 1.0 / math.sqrt(q.shape[-1])
    res = {n: torch.empty(t.shape, dtype=torch.float32, device=t.device) for n, t in
           (("out", q), ("dq", q), ("dk", k), ("dv", v))}  # fmt: skip
    mask = layout.dense_mask()
    for b in range(q.shape[0]):
        m = mask[b]
        some = m.any(-1, keepdim=True)
        for h in range(q.shape[1]):
            qs, ks, vs = (t[b, h].float().requires_grad_() for t in (q, k, v))
            s = torch.where(m, (qs @ ks.T) * scale, float("-inf"))
            p = torch.softmax(torch.where(some, s, 0.0), dim=-1) * some
            out = p @ vs
            out.backward(g[b, h].float())
            res["out"][b, h], res["dq"][b, h] = out.detach(), qs.grad
            res["dk"][b, h], res["dv"][b, h] = ks.grad, vs.grad
    return res


def _candidate_range(tma: bool | None, dtype: torch.dtype, head_dim: int) -> tuple[int, int]:
    """(number of pinned indices to visit, how many of them the atomic dK/dV kernel has)."""
    ia = _ia()
    kernels = ("fwd", "dkdv", "dkdv-atomic", "dq")
    n = max(ia.candidate_count(k, dtype, head_dim, tma) for k in kernels)
    return n, ia.candidate_count("dkdv-atomic", dtype, head_dim, tma)


def _fmt_config(cfg: tuple | None) -> str:
    return "" if cfg is None else _ia().config_name(cfg)


def _config_columns(configs: dict[str, str], mode: str) -> dict[str, str]:
    """The CSV's config columns from {kernel: config name}."""
    return {
        "fwd_config": configs.get("fwd", ""),
        "dkdv_config": configs.get("dkdv-atomic" if mode == "atomic" else "dkdv", ""),
        "dq_config": configs.get("dq", "") if mode == "split" else "atomic",
    }


def check_pair(tensors: dict, layout: AttentionLayout, tma: bool | None, index: int | None, mode: str,
               ref: dict, tol: float, restrict: bool = True) -> dict:  # fmt: skip
    """One (candidate index, backward scheme) pair: poisoned buffers, fwd+bwd, compared. ``index`` None
    lets the autotuner choose, as the sweep does; ``restrict`` False keeps the process's TMA setting."""
    ia = _ia()
    q, k, v, g = (tensors[n] for n in "qkvg")

    def call(poison: bool) -> torch.Tensor:
        for t in (q, k, v):
            t.grad = None
        configs = ia.kernel_configs(tma=tma, index=index) if restrict else contextlib.nullcontext()
        with configs, ia.backward_mode(mode), ia.poison_outputs() if poison else contextlib.nullcontext():
            out = ia.interval_attention(q, k, v, layout.lo, layout.hi)
            out.backward(g)
        return out

    if index is None:
        # Autotuning benchmarks every candidate into the call's own output buffers, which would fill in
        # what the chosen config leaves unwritten: tune in an unchecked call first, then check a fresh one.
        call(poison=False)
    ia.launched_configs(reset=True)
    out = call(poison=True)
    launched = {name: _fmt_config(cfg) for name, cfg in ia.launched_configs().items()}
    row: dict = _config_columns(launched, mode)
    ok = True
    for name, got in (("out", out), ("dq", q.grad), ("dk", k.grad), ("dv", v.grad)):
        x = got.detach().float()
        nan = int(torch.isnan(x).sum())
        want = ref[name]
        err = float((torch.nan_to_num(x, nan=0.0) - want).norm() / want.norm().clamp_min(1e-30))
        row[f"{name}_nan"], row[f"{name}_err"] = nan, err
        ok &= nan == 0 and err <= tol
    row["status"] = "pass" if ok else "fail"
    return row


def read_checks(folder: Path) -> pd.DataFrame:
    """Every kernel-check CSV in a results folder (``kernel_check*.csv``), with a ``file`` column. A
    ``.running`` marker left beside one (a process that died inside a pair, with nothing after it to
    record that) reads as that pair, crashed."""
    paths = sorted(Path(folder).glob("kernel_check*.csv"))
    frames = [pd.read_csv(p, dtype={"index": str, "error": str}).assign(file=p.name) for p in paths]
    for marker in sorted(Path(folder).glob("kernel_check*.running")):
        died = _crashed(json.loads(marker.read_text()))
        row = dict(died, index=str(died.get("index")))
        frames.append(pd.DataFrame([row]).assign(file=marker.with_suffix(".csv").name))
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()


def _dkdv_kernel(mode: str) -> str:
    return "dkdv-atomic" if mode == "atomic" else "dkdv"


def suspects(row: pd.Series) -> list[tuple[str, str]]:
    """The (kernel, config) a failed pair points to: a wrong output points to the forward (every
    gradient is then suspect too); wrong dK or dV to the dK/dV kernel; wrong dQ to the dQ kernel, or in
    the atomic scheme to the dK/dV kernel, which adds dQ."""
    tol = float(row["tolerance"])

    def bad(name: str) -> bool:
        return int(row[f"{name}_nan"]) > 0 or not float(row[f"{name}_err"]) <= tol

    dkdv = (_dkdv_kernel(row["mode"]), row["dkdv_config"])
    if bad("out"):
        return [("fwd", row["fwd_config"])]
    out = []
    if bad("dk") or bad("dv"):
        out.append(dkdv)
    if bad("dq"):
        out.append(dkdv if row["mode"] == "atomic" else ("dq", row["dq_config"]))
    return list(dict.fromkeys(out))


def _row_configs(row: pd.Series) -> list[tuple[str, str]]:
    """(kernel, config) of every kernel a pair ran (or, for a crashed pinned pair, was to run)."""
    cols = [("fwd", "fwd_config"), (_dkdv_kernel(row["mode"]), "dkdv_config")]
    cols += [("dq", "dq_config")] if row["mode"] == "split" else []
    return [(k, str(row[c])) for k, c in cols if pd.notna(row[c]) and str(row[c]) not in ("", "atomic")]


SHAPE_FIELDS = ("layout", "batch", "heads", "seq_len", "head_dim", "dtype")


def wrong_configs(checks: pd.DataFrame) -> set[tuple[str, str, int, str]]:
    """(kernel, dtype, head dim, config) that the checks found wrong: what a failed pair points to, and
    every config of a crashed or erroring pair that no passing pair at the same shape ran (a config can
    pass on short rows and crash on long ones)."""
    if checks.empty:
        return set()

    def shape(r: pd.Series) -> tuple[str, ...]:
        return tuple(str(r[k]) for k in SHAPE_FIELDS)

    passed = {
        (shape(r), k, c) for _, r in checks[checks.status == "pass"].iterrows() for k, c in _row_configs(r)
    }
    wrong = set()
    for _, r in checks.iterrows():
        where = (str(r["dtype"]), int(r["head_dim"]))
        if r["status"] == "fail":
            wrong |= {(k, *where, c) for k, c in suspects(r)}
        elif r["status"] in ("crashed", "error"):
            wrong |= {(k, *where, c) for k, c in _row_configs(r) if (shape(r), k, c) not in passed}
    return wrong


def exclusions(checks: pd.DataFrame) -> str:
    """The INTERVAL_ATTENTION_EXCLUDE value that drops every config the checks found wrong. Half
    precision shares its candidate lists and code paths, so a config wrong in bf16 or fp16 is dropped in
    both."""
    half = ("bfloat16", "float16")
    out = set()
    for kernel, dtype, head_dim, config in wrong_configs(checks):
        out |= {(kernel, d, head_dim, config) for d in (half if dtype in half else (dtype,))}
    return ";".join(",".join(map(str, w)) for w in sorted(out))


def _crashed(died: dict) -> dict:
    """The row of a pair whose process died inside it, from the ``.running`` marker it left."""
    return dict(died, status="crashed", error="the process died here")


def record_marker(out: Path, rows: list[dict] | None = None) -> list[dict]:
    """Record the pair a dead process left its ``.running`` marker in as crashed (unless the CSV already
    has it: a fatal error the process caught itself), remove the marker, and return the CSV's rows."""
    rows = _read_rows(out) if rows is None else rows
    running = out.with_suffix(".running")
    if running.exists():
        died = json.loads(running.read_text())
        if _key(died) not in {_key(r) for r in rows}:
            rows.append(_crashed(died))
            _write_rows(out, rows)
        running.unlink()
    return rows


def is_fatal(message: str) -> bool:
    """An error after which this process can launch nothing more on the GPU (a CUDA error kills the
    context: the next call fails whatever it is)."""
    return "CUDA error" in message or "[CUDA]" in message


def _key(row: dict) -> tuple[str, ...]:
    """What makes a pair: the shape it ran at, the candidate index and the backward scheme."""
    return tuple(str(row[k]) for k in KEY_FIELDS)


def _read_rows(path: Path) -> list[dict]:
    if not path.exists():
        return []
    with path.open() as f:
        return list(csv.DictReader(f))


def _write_rows(path: Path, rows: list[dict]) -> None:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=FIELDS, extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_text(path, buf.getvalue())


def timing_probe(layout: AttentionLayout, shape: tuple[int, ...], dtype: torch.dtype, reps: int = 20) -> str:
    """Wall (synchronized per call, as the sweep times) and device (CUDA events) milliseconds of triton
    and flex at this shape, forward and forward+backward, as a Markdown table."""
    from bench.attention import device_and_host_ms, median_ms
    from transfusion.attention import attend

    device = layout.device
    lines = [
        "| backend | mode | wall ms (sync per call) | device ms (events, back to back) | host ms per call |"
    ]
    lines.append("|---|---|---|---|---|")

    def make_step(backend: str, grad: bool):
        t = {n: torch.randn(*shape, device=device, dtype=dtype, requires_grad=grad) for n in "qkvg"}

        def step() -> None:
            with torch.set_grad_enabled(grad):
                out = attend(t["q"], t["k"], t["v"], layout, backend=backend)
                if grad:
                    out.backward(t["g"])
                    for n in "qkv":  # as the sweep's step: no gradient accumulation across calls
                        t[n].grad = None

        return step

    for backend in ("triton", "flex"):
        for mode in ("fwd", "fwd_bwd"):
            step = make_step(backend, mode == "fwd_bwd")
            wall = median_ms(step, device, warmup=3, reps=reps)
            dev, host = device_and_host_ms(step, reps)
            lines.append(f"| {backend} | {mode} | {wall:.3f} | {dev:.3f} | {host:.3f} |")
    return "\n".join(lines) + "\n"


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m bench kernel-check", description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )  # fmt: skip
    p.add_argument("--layout", choices=("mixed", "benchmark"), default="mixed",
                   help="mixed: the two fixed 1100-token rows (batch and length fixed); benchmark: "
                        "the sweep's (256-patch images, half the tokens), --batch x --seq-len")  # fmt: skip
    p.add_argument("--batch", type=int, default=4, help="rows (benchmark layout only)")
    p.add_argument("--seq-len", type=int, default=8192, help="tokens per row (benchmark layout only)")
    p.add_argument("--heads", type=int, default=2)
    p.add_argument("--head-dim", type=int, default=128, choices=(32, 64, 128))
    p.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float16", "float32"))
    p.add_argument("--tma", choices=("auto", "on", "off"), default="auto",
                   help="auto: pointer and TMA candidates where TMA can run; on/off: only those")  # fmt: skip
    p.add_argument("--indices", default="all",
                   help="comma-separated candidate indices to pin (default: all); 'autotuned' pins "
                        "nothing: the configs the autotuner picks, as the sweep runs them")  # fmt: skip
    p.add_argument("--modes", default="split,atomic", help="backward schemes to check (split, atomic)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=None,
                   help="CSV of the pairs; an existing one is resumed (its pairs are skipped)")  # fmt: skip
    p.add_argument("--timing", action="store_true", help="also time triton and flex (CUDA only)")
    p.add_argument("--record-marker", type=Path, default=None, metavar="CSV",
                   help="record the pair a dead run's .running marker names as crashed in CSV, and exit "
                        "(what the GPU script does when its last try died)")  # fmt: skip
    p.add_argument("--exclusions-from", type=Path, default=None, metavar="FOLDER",
                   help="print the INTERVAL_ATTENTION_EXCLUDE value that drops every config the folder's "
                        "kernel_check*.csv found wrong, and exit")  # fmt: skip
    args = p.parse_args(argv)
    if args.batch < 1 or args.seq_len < 1 or args.heads < 1:
        p.error(f"--batch, --seq-len, --heads must be >= 1; got {args.batch}, {args.seq_len}, {args.heads}")
    modes = [m for m in args.modes.split(",") if m]
    bad = [m for m in modes if m not in ("split", "atomic")]
    if bad or not modes:
        p.error(f"--modes = {args.modes!r}; use split and/or atomic, comma-separated")
    args.modes = modes
    if args.indices not in ("all", AUTOTUNED):
        try:
            args.indices = sorted({int(i) for i in args.indices.split(",")})
        except ValueError:
            p.error(f"--indices = {args.indices!r}; give comma-separated integers or 'all'")
        if args.indices[0] < 0:
            p.error(f"--indices = {args.indices}; indices must be >= 0")
    return args


def run_pairs(
    layout_name: str,
    layout: AttentionLayout,
    heads: int,
    head_dim: int,
    dtype_name: str,
    tma_arg: str = "auto",
    indices: str | list[int] = "all",
    modes: tuple[str, ...] = ("split", "atomic"),
    out: Path | None = None,
    seed: int = 0,
) -> list[dict]:
    """Check the (candidate, scheme) pairs at this shape and return their rows, appending them to ``out``
    (resumed: pairs already there are not run again; a pair a dead process left behind is recorded as
    crashed). ``indices`` "autotuned" checks the configs this process's autotuner picks."""
    ia = _ia()
    device = layout.device
    dtype = getattr(torch, dtype_name)
    hopper = ia._tma_possible(torch.empty(1, device=device, dtype=torch.bfloat16)) and dtype != torch.float32
    tma = {"auto": None if hopper else False, "on": True, "off": False}[tma_arg]
    # Autotuned with --tma auto: no restriction at all, so the process's own setting (the environment's
    # INTERVAL_ATTENTION_TMA) applies, and the rows name it.
    keep_setting = indices == AUTOTUNED and tma_arg == "auto"
    if keep_setting:
        tma_arg = {None: "auto", False: "off", True: "on"}[ia._TMA_MODE]
    bsz, seq_len = layout.batch_size, layout.kv_len
    shape = (bsz, heads, seq_len, head_dim)
    n_idx, n_atomic = _candidate_range(tma, dtype, head_dim)
    if indices == AUTOTUNED:
        pairs = [(AUTOTUNED, m) for m in modes]
    else:
        chosen = range(n_idx) if indices == "all" else indices
        if max(chosen, default=0) >= n_idx:
            raise ValueError(f"--indices {list(chosen)}: {dtype_name} at head dim {head_dim}, tma={tma_arg}, "
                             f"has {n_idx} candidates (indices 0 to {n_idx - 1})")  # fmt: skip
        pairs = [(i, m) for i in chosen for m in modes if m == "split" or i < n_atomic]
    gen = torch.Generator(device="cpu").manual_seed(seed)
    tensors = {n: torch.randn(*shape, generator=gen).to(device, dtype) for n in "qkvg"}
    for n in "qkv":
        tensors[n].requires_grad_(True)
    ref = reference(*(tensors[n].detach() for n in "qkvg"), layout)
    tol = TOLERANCE[dtype]
    base = dict(layout=layout_name, batch=bsz, heads=heads, seq_len=seq_len, head_dim=head_dim,
                dtype=dtype_name, tma=tma_arg, tolerance=tol)  # fmt: skip

    if out:
        meta = {k: v for k, v in base.items() if k != "tolerance"}
        atomic_write_json(out.with_name(out.stem + "_provenance.json"), provenance(device, seed=seed, **meta))
    # A marker the previous run left: it died inside that pair. One CSV can hold several shapes' checks:
    # a pair is done when a row has its shape, index and mode.
    rows = record_marker(out) if out else []
    done = {_key(r) for r in rows}
    running = out.with_suffix(".running") if out else None
    print(f"kernel-check: {layout_name} layout, shape {shape}, {dtype_name}, tma={tma_arg} on {device}; "
          f"{len(pairs)} pairs", flush=True)  # fmt: skip
    for index, mode in pairs:
        if _key(dict(base, index=index, mode=mode)) in done:
            continue
        pin = None if index == AUTOTUNED else index
        planned: dict = {}
        try:
            # The configs a pinned pair will launch, known before it runs: a pair that kills the process
            # still names them (an autotuned pair's are known only once the autotuner has chosen).
            if pin is not None:
                with ia.kernel_configs(tma=tma, index=pin):
                    configs = ia.planned_configs(dtype, head_dim, device, mode)
                planned = _config_columns(configs, mode)
            if running:
                atomic_write_text(running, json.dumps(dict(base, index=index, mode=mode, **planned)))
            row = check_pair(tensors, layout, tma, pin, mode, ref, tol, restrict=not keep_setting)
        except Exception as e:  # a config that does not compile or launch: record it and go on
            msg = f"{type(e).__name__}: {(str(e).splitlines() or [''])[0][:200]}"
            if is_fatal(msg):
                # The CUDA context is gone (an illegal address, say): record the pair and end the process.
                # The marker stays: the next run with this --out sees the pair done and goes on past it.
                rows.append(dict(base, index=index, mode=mode, status="crashed", error=msg, **planned))
                if out:
                    _write_rows(out, rows)
                raise
            row = dict(planned, status="error", error=msg)
        rows.append(dict(base, index=index, mode=mode, **row))
        errs = " ".join(f"{n} {row.get(n + '_err', math.nan):.1e}/{row.get(n + '_nan', '-')}nan"
                        for n in ("out", "dq", "dk", "dv"))  # fmt: skip
        print(f"index {index} {mode:6s} {row['status']:5s} fwd [{row.get('fwd_config', '')}] "
              f"dkdv [{row.get('dkdv_config', '')}] dq [{row.get('dq_config', '')}] {errs} "
              f"{row.get('error', '')}", flush=True)  # fmt: skip
        if out:
            _write_rows(out, rows)
        if running:
            running.unlink()
    mine = {_key(dict(base, index=i, mode=m)) for i, m in pairs}
    return [r for r in rows if _key(r) in mine]


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    if args.exclusions_from is not None:
        print(exclusions(read_checks(args.exclusions_from)))
        return 0
    if args.record_marker is not None:
        record_marker(args.record_marker)
        return 0
    import kernels

    if not kernels.HAS_TRITON:
        print("kernel-check needs triton", file=sys.stderr)
        return 2
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    layout = make_layout(args.layout, args.batch, args.seq_len, device)
    try:
        rows = run_pairs(args.layout, layout, args.heads, args.head_dim, args.dtype, args.tma, args.indices,
                         tuple(args.modes), args.out, args.seed)  # fmt: skip
    except ValueError as e:
        print(f"kernel-check: {e}", file=sys.stderr)
        return 2
    failed = [r for r in rows if r["status"] != "pass"]
    print(f"kernel-check: {len(rows) - len(failed)} of {len(rows)} pairs pass", flush=True)
    if args.timing and device.type == "cuda":
        shape = (layout.batch_size, args.heads, layout.kv_len, args.head_dim)
        print(timing_probe(layout, shape, getattr(torch, args.dtype)), flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
