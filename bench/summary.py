"""The attention sweep's headline: our Triton kernel against FlexAttention and the device ceilings."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pandas as pd

from transfusion.provenance import atomic_write_text

GOALS = {"fwd_vs_flex": 1.1, "fwd_bwd_vs_flex": 1.0, "fwd_frac_of_peak": 0.6}


def summarize(results_dir: Path, seq_len: int = 8192) -> str:
    df = pd.read_csv(results_dir / "attention.csv")
    meta = json.loads((results_dir / "attention_provenance.json").read_text())
    first = df.iloc[0]
    base = df[
        (df.head_dim == first.head_dim)
        & (df["dtype"] == first["dtype"])
        & (df.image_tokens == first.image_tokens)
        & (df.image_fraction == first.image_fraction)
    ]
    if seq_len not in set(base.seq_len):
        seq_len = int(base.seq_len.max())
    at = base[base.seq_len == seq_len].set_index(["backend", "mode"])
    lines = [
        f"# Attention at L = {seq_len}, D = {first.head_dim}, {first['dtype']}, "
        f"images of {first.image_tokens} tokens, {first.image_fraction:.0%} of tokens in images",
        "",
        f"Device: {meta['device']}; torch {meta['torch']}, triton {meta['triton']}, "
        f"xformers {meta['xformers']}; commit {meta['commit']}; {meta['date']}.",
        "",
        "| backend | fwd ms | fwd TFLOP/s | fwd+bwd ms | fwd+bwd TFLOP/s | peak MiB (fwd+bwd) | status |",
        "|---|---|---|---|---|---|---|",
    ]
    # Triton timings that ran a config bench kernel-check found wrong are reported, not used for goals.
    invalid = invalid_triton_modes(results_dir, int(first.head_dim), str(first["dtype"]), seq_len)
    for backend in dict.fromkeys(b for b, _ in at.index):
        cells = []
        status = []
        for mode in ("fwd", "fwd_bwd"):
            r = at.loc[(backend, mode)] if (backend, mode) in at.index else None
            if r is None or r.status != "ok":
                cells += ["-", "-"]
                status.append(f"{mode}: {r.status if r is not None else 'absent'}")
            else:
                cells += [f"{r.ms:.3g}", f"{r.tflops:.3g}"]
                if backend == "triton" and mode in invalid:
                    status.append(f"{mode}: INVALID, {invalid[mode]}")
        mem = at.loc[(backend, "fwd_bwd")].peak_mem_mb if (backend, "fwd_bwd") in at.index else float("nan")
        lines.append(f"| {backend} | {' | '.join(cells)} | {mem:.0f} | {'; '.join(status) or 'ok'} |")
    peak = meta.get("matmul_peak_tflops", {}).get(first["dtype"])
    lines += ["", f"Measured {first['dtype']} matmul peak: {peak:.3g} TFLOP/s." if peak else "", ""]
    # Device time (CUDA events, calls back to back) where the sweep recorded it: the kernels' own speed,
    # beside the wall time of one synchronized call above (which includes the host's launch overhead).
    has_device = "device_ms" in at.columns and at.device_ms.notna().any()
    if has_device:
        lines += [
            "Device time (CUDA events, calls launched back to back) and the host's time per call to issue",
            "them; the table above is the wall time of one call with a synchronization after it:",
            "",
            "| backend | fwd device ms | fwd host ms | fwd+bwd device ms | fwd+bwd host ms |",
            "|---|---|---|---|---|",
        ]
        for backend in dict.fromkeys(b for b, _ in at.index):
            cells = []
            for m in ("fwd", "fwd_bwd"):
                flag = " (INVALID)" if backend == "triton" and m in invalid else ""
                cells += [
                    _time_cell(at, backend, m, "device_ms") + flag,
                    _time_cell(at, backend, m, "host_ms"),
                ]
            lines.append(f"| {backend} | {' | '.join(cells)} |")
        lines.append("")

    def ms(b: str, m: str, column: str = "ms") -> float | None:
        r = at.loc[(b, m)] if (b, m) in at.index else None
        valid = not (b == "triton" and m in invalid)
        ok = r is not None and r.status == "ok" and valid and column in r.index and pd.notna(r[column])
        return float(r[column]) if ok else None

    def goals(column: str) -> list[tuple[str, float | None, float]]:
        f_t, f_f = ms("triton", "fwd", column), ms("flex", "fwd", column)
        fb_t, fb_f = ms("triton", "fwd_bwd", column), ms("flex", "fwd_bwd", column)
        frac = None
        if f_t and peak:  # the CSV's own TFLOP/s column for this timing
            frac = float(at.loc[("triton", "fwd")][column.replace("ms", "tflops")]) / peak
        return [
            ("triton fwd speed / flex", f_f / f_t if f_t and f_f else None, GOALS["fwd_vs_flex"]),
            ("triton fwd+bwd speed / flex", fb_f / fb_t if fb_t and fb_f else None, GOALS["fwd_bwd_vs_flex"]),
            ("triton fwd TFLOP/s / matmul peak", frac, GOALS["fwd_frac_of_peak"]),
        ]

    wall = goals("ms")
    if has_device:
        device = goals("device_ms")
        if any(v is not None for _, v, _ in wall + device):
            lines += [
                "| goal | wall time | device time | target | met (wall / device) |",
                "|---|---|---|---|---|",
            ]
            for (n, v, t), (_, d, _) in zip(wall, device):
                met = " / ".join("-" if x is None else ("yes" if x >= t else "no") for x in (v, d))
                cells = ["-" if x is None else f"{x:.2f}" for x in (v, d)]
                lines.append(f"| {n} | {cells[0]} | {cells[1]} | {t:.2f} | {met} |")
    elif any(v is not None for _, v, _ in wall):
        lines += ["| goal | measured | target | met |", "|---|---|---|---|"]
        lines += [
            f"| {n} | {v:.2f} | {t:.2f} | {'yes' if v >= t else 'no'} |" for n, v, t in wall if v is not None
        ]
    if invalid:
        left_out = "; ".join(f"triton {m} ({why})" for m, why in invalid.items())
        lines += ["", f"Goals left out: {left_out}. The checks are listed below."]
    pivot = (meta.get("profile") or {}).get("pivot_len") or seq_len  # where the sweep varies each axis
    lines += _variation_lines(df, results_dir, first, int(pivot), seq_len)
    lines += _tuning_lines(results_dir, int(first.head_dim), str(first["dtype"]), seq_len)
    lines += _kernel_check_lines(results_dir)
    lines += _breakdown_lines(results_dir)
    text = "\n".join(lines) + "\n"
    atomic_write_text(results_dir / "attention_summary.md", text)
    return text


# The sweep's one-axis variations at the headline length: (column, how a value of it reads).
VARIED: dict[str, Callable[[Any], str]] = {
    "head_dim": lambda v: f"D = {int(v)}",
    "dtype": str,
    "image_tokens": lambda v: f"images of {int(v)} tokens",
    "image_fraction": lambda v: f"{float(v):.0%} of tokens in images",
}


def _variation_lines(
    df: pd.DataFrame, results_dir: Path, first: pd.Series, seq_len: int, headline_len: int
) -> list[str]:
    """The rows at ``seq_len`` (the sweep's pivot length) that change one axis of the headline setting,
    by variation and backend, with each backend's speed against flex's under the same variation (and the
    unvaried setting first when the headline is at another length). A triton timing is marked INVALID as
    in the headline table, and says whether the check of its autotuned configs there passed."""
    from bench.kernel_check import read_checks

    at_len = df[df.seq_len == seq_len]
    checks = read_checks(results_dir)
    groups = [(spell(v), column, v) for column, spell in VARIED.items()
              for v in dict.fromkeys(at_len[column]) if v != first[column]]  # fmt: skip
    if groups and headline_len != seq_len:
        groups.insert(0, ("none", "head_dim", first.head_dim))
    lines: list[str] = []
    for label, column, value in groups:
        others = [c for c in VARIED if c != column]
        rows = at_len[(at_len[others] == first[others]).all(axis=1) & (at_len[column] == value)]
        rows = rows.set_index(["backend", "mode"])
        if rows.empty:
            continue
        if not (rows.status == "ok").any():  # the budget ran out first, say: one line
            lines.append(f"| {label} | all | - | - | - | - | {_why_none(rows)} |")
            continue
        head_dim, dtype = int(rows.head_dim.iloc[0]), str(rows["dtype"].iloc[0])
        invalid = invalid_triton_modes(results_dir, head_dim, dtype, seq_len)
        # the image variations run the pivot's configs (the autotuner keys on head dim, dtype and length)
        state = _tuned_check_state(_autotuned_checks(checks, seq_len, head_dim, dtype),
                                   column in ("image_tokens", "image_fraction"))  # fmt: skip
        for backend in dict.fromkeys(b for b, _ in rows.index):
            cells, status = _variation_cells(rows, backend, invalid)
            if backend == "triton" and not invalid:
                status.append(state)
            lines.append(f"| {label} | {backend} | {cells} | {'; '.join(status) or 'ok'} |")
    if not lines:
        return []
    return [
        "",
        f"One axis of the setting above varied, at L = {seq_len} (wall time; speed / flex: flex's time "
        "over the backend's, under the same variation; causal-sdpa does the whole causal mask's work):",
        "",
        "| varied | backend | fwd ms | fwd+bwd ms | fwd speed / flex | fwd+bwd speed / flex | status |",
        "|---|---|---|---|---|---|---|",
        *lines,
    ]


def _why_none(rows: pd.DataFrame) -> str:
    """Why no row of a variation was measured: each distinct status, with its error."""
    errors = rows["error"].fillna("") if "error" in rows else pd.Series("", index=rows.index)
    return "; ".join(dict.fromkeys(f"{st} ({e})" if e else st for st, e in zip(rows.status, errors)))


def _variation_cells(rows: pd.DataFrame, backend: str, invalid: dict[str, str]) -> tuple[str, list[str]]:
    """One backend's cells under one variation (``rows`` indexed by backend and mode), and its status."""
    times, speeds, status = [], [], []
    for mode in ("fwd", "fwd_bwd"):
        r = rows.loc[(backend, mode)] if (backend, mode) in rows.index else None
        f = rows.loc[("flex", mode)] if ("flex", mode) in rows.index else None
        ok = r is not None and r.status == "ok"
        bad = backend == "triton" and mode in invalid
        # causal-sdpa computes the whole causal mask: a ceiling, not the same work as flex
        same_work = backend != "causal-sdpa" and f is not None and f.status == "ok"
        times.append(f"{r.ms:.3g}" if ok else "-")
        speeds.append(f"{f.ms / r.ms:.2f}" if ok and not bad and same_work else "-")
        if not ok:
            status.append(f"{mode}: {r.status if r is not None else 'absent'}")
        elif bad:
            status.append(f"{mode}: INVALID, {invalid[mode]}")
    return " | ".join(times + speeds), status


def _autotuned_checks(checks: pd.DataFrame, seq_len: int, head_dim: int, dtype: str) -> pd.DataFrame:
    """The kernel-check rows of the autotuned configs (``bench attention --kernel-check``) at this shape."""
    if checks.empty:
        return checks
    return checks[(checks["index"] == "autotuned") & (checks.seq_len.astype(int) == seq_len)
                  & (checks.head_dim.astype(int) == head_dim) & (checks["dtype"] == dtype)]  # fmt: skip


def _tuned_check_state(tuned: pd.DataFrame, on_pivot_layout: bool) -> str:
    """What the check of the autotuned configs at a shape said, for a triton timing that stands."""
    if tuned.empty:
        return "autotuned configs not checked here"
    where = " on the pivot's layout" if on_pivot_layout else ""
    if (tuned.status == "pass").all():
        return f"autotuned configs checked{where}"
    return f"autotuned configs checked{where}: {_check_states(tuned)}"


def _check_states(tuned: pd.DataFrame) -> str:
    """Each checked scheme's status: "split pass, atomic fail"."""
    return ", ".join(f"{r['mode']} {r.status}" for _, r in tuned.iterrows())


def _time_cell(at: pd.DataFrame, backend: str, mode: str, column: str) -> str:
    r = at.loc[(backend, mode)] if (backend, mode) in at.index else None
    if r is None or r.status != "ok" or column not in r.index or pd.isna(r[column]):
        return "-"
    return f"{r[column]:.3g}"


def _config(r: pd.Series) -> str:
    """A kernel_tuning.csv row's config, spelled as the kernel and kernel-check spell it."""
    from kernels.config_names import config_name

    dq_t = r.get("dq_transposed")  # the atomic dK/dV kernel's transposed dQ; NaN for the other kernels
    # int(): float columns beside NaN
    return config_name((int(r.block_m), int(r.block_n), int(r.warps), int(r.stages), bool(r.tma),
                        bool(pd.notna(dq_t) and dq_t)))  # fmt: skip


def _tuning_at(results_dir: Path, head_dim: int, dtype: str, seq_len: int) -> pd.DataFrame:
    """The rows of kernel_tuning.csv for this head dim, dtype and length (its power-of-two bucket, as the
    autotuner keys it); empty without the file."""
    path = results_dir / "kernel_tuning.csv"
    if not path.exists():
        return pd.DataFrame()
    from kernels.config_names import length_bucket

    df = pd.read_csv(path)
    return df[(df.head_dim == head_dim) & (df["dtype"] == dtype) & (df.q_bucket == length_bucket(seq_len))]


def _tuning_lines(results_dir: Path, head_dim: int, dtype: str, seq_len: int) -> list[str]:
    """The Triton autotuner's timings at the headline shape: fastest pointer and TMA config per kernel."""
    at = _tuning_at(results_dir, head_dim, dtype, seq_len)
    if at.empty:
        return []
    lines = [
        "",
        f"Triton autotuning at L = {seq_len} (all {len(at)} timed candidates in kernel_tuning.csv):",
        "",
        "| kernel | fastest pointer config | ms | fastest TMA config | ms | chosen |",
        "|---|---|---|---|---|---|",
    ]
    for kernel in ("fwd", "dkdv", "dkdv-atomic", "dq"):
        k = at[at.kernel == kernel]
        if k.empty:
            continue
        cells = []
        for tma in (False, True):
            sub = k[k.tma == tma]
            if sub.empty:
                cells += ["-", "-"]
            else:
                best = sub.loc[sub.ms.idxmin()]
                cells += [_config(best), f"{best.ms:.3g}"]
        chosen = k[k.chosen]
        lines.append(
            f"| {kernel} | {' | '.join(cells)} | {_config(chosen.iloc[-1]) if not chosen.empty else '-'} |"
        )
    # backward_mode("auto"): the whole backward pass timed once per scheme (after its kernels' tuning)
    schemes = at[at.kernel == "backward"]
    if not schemes.empty:
        timed = ", ".join(f"{r.scheme} {r.ms:.3g} ms" for r in schemes.itertuples())
        chosen = schemes[schemes.chosen.astype(bool)]
        lines += ["", f"Backward scheme (auto): {timed}; chosen: {', '.join(chosen.scheme) or '-'}."]
    return lines


def _breakdown_lines(results_dir: Path, top: int = 6) -> list[str]:
    """The largest kernels of one forward+backward per backend (kernel_breakdown.csv, torch.profiler)."""
    path = results_dir / "kernel_breakdown.csv"
    if not path.exists():
        return []
    df = pd.read_csv(path).dropna(subset=["us_per_step"])
    if df.empty:
        return []
    meta_path = results_dir / "kernel_breakdown_provenance.json"
    meta = json.loads(meta_path.read_text()) if meta_path.exists() else {}
    shape = ", ".join(f"{k} {meta[k]}" for k in ("seq_len", "head_dim", "dtype") if k in meta)
    lines = [
        "",
        f"Per-kernel time of one forward+backward ({shape or 'see provenance'}; `bench breakdown`):",
        "",
    ]
    first = df.groupby("backend", sort=False).first()
    steps = first["step_us"]
    shape = {b: f"{int(r.batch)} x {int(r.heads)}" if "batch" in first else "-" for b, r in first.iterrows()}
    lines += ["| backend | batch x heads | device time per step (us) |", "|---|---|---|"]
    lines += [f"| {backend} | {shape[backend]} | {us:.4g} |" for backend, us in steps.items()]
    for ordered, natural in (("triton", "triton-natural"), ("triton-1row", "triton-natural-1row")):
        if {ordered, natural} <= set(steps.index):
            ratio = steps[ordered] / steps[natural]
            lines += ["", f"{ordered} ({shape[ordered]}): heaviest-first / natural launch order: {ratio:.3f}"]
    if {"triton-atomic", "triton-split"} <= set(steps.index):
        ratio = steps["triton-atomic"] / steps["triton-split"]
        lines += ["", f"triton ({shape['triton-atomic']}): atomic / split backward scheme: {ratio:.3f}"]
    lines += ["", "| backend | kernel | us per step | share | calls |", "|---|---|---|---|---|"]
    for backend, rows in df.groupby("backend", sort=False):
        for r in rows.nlargest(top, "us_per_step").itertuples():
            name = str(r.kernel).replace("|", "/")[:60]
            lines.append(
                f"| {backend} | `{name}` | {r.us_per_step:.4g} | {r.share:.1%} | {r.calls_per_step:.3g} |"
            )
    return lines


def invalid_triton_modes(results_dir: Path, head_dim: int, dtype: str, seq_len: int) -> dict[str, str]:
    """{"fwd" | "fwd_bwd": why} for the sweep's triton timings at this shape that cannot stand:

    * the autotuner's choice there (kernel_tuning.csv) is a config that a kernel-check in the folder
      found wrong at this dtype and head dim;
    * the check of the autotuned configs at this very shape (``bench attention --kernel-check``, rows
      with index ``autotuned``) did not clear it: the forward stands if some pair there ran it with a
      right output, forward+backward if the forward stands and the pair of the scheme the sweep used
      passed (every scheme's, when the tuning log does not say which);
    * the sweep asked for that check at this shape (its provenance's ``kernel_check_shapes``; the pivot
      shape in older ones) and no row of it is there."""
    from bench.kernel_check import read_checks, suspects, wrong_configs

    checks = read_checks(results_dir)
    meta_path = results_dir / "attention_provenance.json"
    meta = json.loads(meta_path.read_text()) if meta_path.exists() else {}
    profile = meta.get("profile") or {}
    shapes = meta.get("kernel_check_shapes")
    if shapes is None:  # a sweep from before it checked more than its pivot shape
        first = {k: (profile.get(k + "s") or [None])[0] for k in ("head_dim", "dtype")}
        shapes = [dict(seq_len=profile.get("pivot_len"), **first)]
    asked = bool(meta.get("kernel_check")) and any(
        (s["seq_len"], s["head_dim"], s["dtype"]) == (seq_len, head_dim, dtype) for s in shapes
    )
    at = _tuning_at(results_dir, head_dim, dtype, seq_len)
    chosen, scheme = {}, None
    if not at.empty:
        chosen = {k: _config(g[g.chosen.astype(bool)].iloc[-1]) for k, g in at.groupby("kernel")
                  if k != "backward" and g.chosen.astype(bool).any()}  # fmt: skip
        schemes = at[(at.kernel == "backward") & at.chosen.astype(bool)]
        scheme = schemes.scheme.iloc[-1] if not schemes.empty else None
    backward = {"atomic": ["dkdv-atomic"], "split": ["dkdv", "dq"], None: ["dkdv", "dq", "dkdv-atomic"]}[
        scheme
    ]
    out = {}
    wrong = {(k, c) for k, dt, d, c in wrong_configs(checks) if dt == dtype and d == head_dim}
    for mode, names in {"fwd": ["fwd"], "fwd_bwd": ["fwd", *backward]}.items():
        hits = [f"{k} {chosen[k]}" for k in names if k in chosen and (k, chosen[k]) in wrong]
        if hits:
            out[mode] = f"ran {', '.join(hits)}, wrong in kernel-check"

    tuned = _autotuned_checks(checks, seq_len, head_dim, dtype)
    if tuned.empty:
        if asked:
            for mode in ("fwd", "fwd_bwd"):
                out.setdefault(mode, "the check of its autotuned configs is missing")
        return out
    fwd_ok = any(r.status == "pass" or (r.status == "fail" and ("fwd", r.fwd_config) not in suspects(r))
                 for _, r in tuned.iterrows())  # fmt: skip
    needed = [scheme] if scheme else sorted(set(tuned["mode"]) | {"split"})
    passed = set(tuned[tuned.status == "pass"]["mode"])
    why = f"the check of its autotuned configs did not clear it ({_check_states(tuned)})"
    if not fwd_ok:
        out.setdefault("fwd", why)
    if not (fwd_ok and all(m in passed for m in needed)):
        out.setdefault("fwd_bwd", why)
    return out


def _kernel_check_lines(results_dir: Path) -> list[str]:
    """bench kernel-check in this folder: pairs passed per file, and every pair that did not pass."""
    from bench.kernel_check import read_checks, suspects

    df = read_checks(results_dir)
    if df.empty:
        return []
    lines = ["", "Kernel configs checked against a float32 reference (`bench kernel-check`):", ""]
    lines += ["| file | shape | TMA | pairs | passed |", "|---|---|---|---|---|"]
    for (file, layout, batch, heads, seq, tma), g in df.groupby(
        ["file", "layout", "batch", "heads", "seq_len", "tma"], sort=False
    ):
        shape = f"{layout} {batch} x {heads} x {seq}"
        lines.append(f"| {file} | {shape} | {tma} | {len(g)} | {(g.status == 'pass').sum()} |")
    bad = df[df.status != "pass"]
    if not bad.empty:
        lines += [
            "",
            "| file | index | scheme | status | dK/dV config | wrong | error |",
            "|---|---|---|---|---|---|---|",
        ]
        for _, r in bad.iterrows():
            wrong = ", ".join(f"{k} {c}" for k, c in suspects(r)) if r.status == "fail" else ""
            err = str(r.error)[:80] if pd.notna(r.error) else ""
            dkdv = r.dkdv_config if pd.notna(r.dkdv_config) else "-"
            cells = [r.file, r["index"], r["mode"], r.status, dkdv, wrong, err]
            lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    return lines
