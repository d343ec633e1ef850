"""Attention benchmark: every backend on the Transfusion mask, swept over length, images, head dim, dtype.

Each row of the CSV is one (backend, shape, mode) measurement: median milliseconds over repeated runs
after warm-up, timed two ways on CUDA: ``ms`` is the host's wall time of one call with a device
synchronization after each (host launch overhead included), ``device_ms`` the CUDA-event time of one call
among calls launched back to back (the device's time; the host's overhead hides while it keeps ahead),
``host_ms`` the host's time per call to issue those (its launch overhead).
TFLOP/s (``tflops``, ``device_tflops``) are counted on allowed (query, key) pairs only
(forward 4*D per pair per head, backward 2.5x forward), peak memory (``peak_mem_mb``: the peak of the
bytes torch allocated during one step above what was allocated before it; PEAK_MEM_MEANING says how each
device type measures it), the time to build the backend's mask structure from the layout, and the tiles
computed. Two ceilings are measured in the same run: the device's matmul peak and plain causal SDPA
(``is_causal=True``) at the same shape. A configuration that runs out of memory or is unsupported is
recorded as such and the sweep goes on.
"""

from __future__ import annotations

import dataclasses
import gc
import os
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from bench.workloads import benchmark_layout
from transfusion.attention import attend, get_backend
from transfusion.layout import AttentionLayout
from transfusion.provenance import atomic_write_json, atomic_write_text, provenance

BWD_FACTOR = 2.5  # backward FLOPs / forward FLOPs (DESIGN section 6)
# What makes two configurations the same shape (backend and mode aside)
SHAPE_KEYS: tuple[str, ...] = ("seq_len", "head_dim", "dtype", "image_tokens", "image_fraction")


@dataclass
class SweepProfile:
    name: str
    device: str
    backends: list[str]
    seq_lens: list[int]
    head_dims: list[int]
    dtypes: list[str]
    image_tokens: list[int]
    image_fractions: list[float]
    heads: int = 8
    tokens_per_batch: int = 8192  # batch = max(1, tokens_per_batch // seq_len)
    modes: tuple[str, ...] = ("fwd", "fwd_bwd")
    warmup: int = 2
    reps: int = 5
    # The base grid is backends x seq_lens at the first value of every other axis; at pivot_len each other
    # axis is also varied alone (the full product would not fit a GPU session of minutes).
    pivot_len: int = 1024
    time_budget_s: float = 600.0
    skip: dict[str, int] = field(default_factory=dict)  # backend -> largest seq_len to try
    # Timing one configuration (its repeated runs, after the first call) may take about this long: a slow
    # configuration (a dense-mask backend at long L) gets fewer runs, down to 1 warm-up and MIN_REPS, so
    # the sweep's minutes go to the rest. None: always the profile's warmup and reps.
    timing_budget_ms: float | None = None

    def configs(self) -> list[dict]:
        base = dict(
            head_dim=self.head_dims[0],
            dtype=self.dtypes[0],
            image_tokens=self.image_tokens[0],
            image_fraction=self.image_fractions[0],
        )
        # The pivot length first, then the other lengths, then the one-axis variations: when the time
        # budget runs out, what is left unmeasured is the least important.
        lens = sorted(self.seq_lens, key=lambda L: (L != self.pivot_len, L))
        shapes = [dict(base, seq_len=L) for L in lens]
        for key, values in (
            ("head_dim", self.head_dims),
            ("dtype", self.dtypes),
            ("image_tokens", self.image_tokens),
            ("image_fraction", self.image_fractions),
        ):
            shapes += [dict(base, seq_len=self.pivot_len, **{key: v}) for v in values[1:]]
        return [dict(s, backend=b, mode=m) for s in shapes for m in self.modes for b in self.backends]


PROFILES = {
    "cpu": SweepProfile(
        name="cpu",
        device="cpu",
        backends=["naive", "sdpa", "flex"],
        seq_lens=[256, 512, 1024, 2048],
        head_dims=[64, 32],
        dtypes=["float32"],
        image_tokens=[64, 256],
        image_fractions=[0.5, 0.0, 0.25],
        heads=4,
        tokens_per_batch=2048,
        pivot_len=1024,
        reps=3,
        time_budget_s=420.0,
    ),
    "gpu": SweepProfile(
        name="gpu",
        device="cuda",
        backends=["naive", "sdpa", "flex", "xformers", "xformers-dense", "triton"],
        seq_lens=[256, 1024, 4096, 8192, 16384, 32768],
        head_dims=[128, 64],
        dtypes=["bfloat16", "float16"],
        image_tokens=[256, 1024],
        image_fractions=[0.5, 0.0],
        heads=16,
        tokens_per_batch=32768,
        pivot_len=8192,
        warmup=3,
        reps=10,
        time_budget_s=240.0,
        skip={"naive": 16384, "xformers-dense": 16384},
        timing_budget_ms=1000.0,
    ),
}


# What the peak_mem_mb column means on each device type (written into the sweep's provenance).
PEAK_MEM_MEANING = {
    "cuda": "MiB: the peak of the bytes torch's CUDA allocator had allocated during the configuration's warm "
    "and timed steps above what was allocated before its first step (so the inputs q, k, v and the output "
    "gradient are left out; their gradients and every temporary count): torch.cuda.max_memory_allocated(), "
    "reset after the first call, minus memory_allocated() before it",
    "cpu": "MiB: the peak of the bytes torch's CPU allocator had allocated during one extra, untimed step "
    "(run after the timed ones) above what was allocated before it (so the inputs q, k, v and the output "
    "gradient are left out; their gradients and every temporary count): the peak of the running sum, in time "
    "order, of the allocations and frees that torch.profiler (profile_memory=True) records in that step "
    "(bench.attention.cpu_peak_bytes)",
}


def cpu_peak_bytes(fn: Callable[[], object]) -> int:
    """The peak, over one call of ``fn``, of the bytes torch's CPU allocator holds above what it held when
    the call began: the CPU analogue of ``torch.cuda.max_memory_allocated()`` minus ``memory_allocated()``
    before the call. The call runs under torch's profiler with memory profiling (so it is slower: never time
    it); the allocations (+bytes) and frees (-bytes) it records are summed in time order and the largest
    partial sum is the peak. A block allocated before the call and freed during it is not seen (the
    allocator learns sizes only while profiling), so it does not lower the running sum, unless it was
    allocated under an earlier profiled call."""
    from torch.autograd import DeviceType
    from torch.autograd.profiler import profile

    # Kineto prints two lines on every profiler start/stop (and a GPU-count error on a CPU-only machine);
    # level 6 silences them. Read once, when the profiler first starts; a level set by the user stands.
    os.environ.setdefault("KINETO_LOG_LEVEL", "6")
    with profile(use_cpu=True, profile_memory=True) as prof:
        fn()
    events = sorted(  # stable: events of the same nanosecond keep the order they were recorded in
        ((e.start_ns(), e.nbytes()) for e in prof.kineto_results.events()
         if e.name() == "[memory]" and e.device_type() == DeviceType.CPU),
        key=lambda ev: ev[0],
    )  # fmt: skip
    held = peak = 0
    for _, nbytes in events:
        held += nbytes
        peak = max(peak, held)
    return peak


def _first_line(e: BaseException) -> str:
    return (str(e).splitlines() or [""])[0][:200]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


MIN_REPS = 3


def timing_reps(call_ms: float, profile: SweepProfile) -> tuple[int, int]:
    """(warmup, reps) for a configuration whose warm call took ``call_ms``. Each rep is run twice (the
    wall-time median, then the device timing), so a configuration whose profile counts would take longer
    than ``profile.timing_budget_ms`` gets fewer reps (at least MIN_REPS) and a single warm-up."""
    warmup, reps = profile.warmup, profile.reps
    if profile.timing_budget_ms is None or call_ms * (warmup + 2 * reps) <= profile.timing_budget_ms:
        return warmup, reps
    fit = int(profile.timing_budget_ms / (2 * max(call_ms, 1e-9)))
    return 1, min(reps, max(MIN_REPS, fit))


def median_ms(fn: Callable[[], object], device: torch.device, warmup: int, reps: int) -> float:
    for _ in range(warmup):
        fn()
    _sync(device)
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        _sync(device)
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def device_and_host_ms(fn: Callable[[], object], reps: int) -> tuple[float, float]:
    """Calls of ``fn`` launched back to back with no host synchronization between them (one at the
    end): the median CUDA-event milliseconds of one call on the device, and the host's milliseconds per
    call to issue them. When the host's time is the larger, the device idles between calls. CUDA only."""
    events = [tuple(torch.cuda.Event(enable_timing=True) for _ in range(2)) for _ in range(reps)]
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for start, end in events:
        start.record()
        fn()
        end.record()
    host = (time.perf_counter() - t0) * 1e3 / reps
    torch.cuda.synchronize()
    return statistics.median(start.elapsed_time(end) for start, end in events), host


def matmul_peak_tflops(device: torch.device, dtype: torch.dtype) -> float:
    n = 8192 if device.type == "cuda" else 1024
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    ms = median_ms(lambda: a @ b, device, warmup=3, reps=10)
    return 2 * n**3 / (ms * 1e-3) / 1e12


def _fresh(layout: AttentionLayout) -> AttentionLayout:
    return dataclasses.replace(layout, cache={})


def _tiles(backend: str, layout: AttentionLayout, head_dim: int, dtype: torch.dtype) -> dict:
    """Tiles computed by the backend where it can say, and what dense / causal kernels would compute."""
    try:
        import kernels

        bm, bn = kernels.kernel_block_sizes(head_dim, dtype, layout.device, layout.q_len, layout.kv_len)
        plan = kernels.plan_tiles(layout.lo, layout.hi, layout.kv_len, bm, bn)
    except Exception:
        return {}
    out = {"tiles_dense": plan["dense"], "tiles_causal": plan["causal"], "tile_shape": f"{bm}x{bn}"}
    if backend == "triton":
        out["tiles_computed"] = plan["computed"]
        out["tiles_full"] = plan["full"]
    elif backend == "flex":
        from transfusion.attention.flex import FLEX_BLOCK, interval_block_mask

        bmask = interval_block_mask(layout)
        out["tiles_computed"] = int(bmask.kv_num_blocks.sum() + bmask.full_kv_num_blocks.sum())
        out["tiles_full"] = int(bmask.full_kv_num_blocks.sum())
        out["tile_shape"] = f"{FLEX_BLOCK}x{FLEX_BLOCK}"
    return out


def measure(cfg: dict, profile: SweepProfile) -> dict:
    device = torch.device(profile.device)
    dtype = getattr(torch, cfg["dtype"])
    L, D, H = cfg["seq_len"], cfg["head_dim"], profile.heads
    B = max(1, profile.tokens_per_batch // L)
    row = dict(cfg, batch=B, heads=H, status="ok")
    layout = benchmark_layout(B, L, cfg["image_tokens"], cfg["image_fraction"], device=device)
    backend = cfg["backend"]
    causal = backend == "causal-sdpa"
    pairs = B * L * (L + 1) // 2 if causal else int(layout.allowed_pairs().sum())
    fwd_flops = 4 * D * pairs * H
    flops = fwd_flops * (1 + BWD_FACTOR) if cfg["mode"] == "fwd_bwd" else fwd_flops
    row.update(allowed_pairs=pairs, density=pairs / (B * L * L), gflop=flops / 1e9)

    if not causal:
        spec = get_backend(backend)
        reason = spec.why_not(device.type, dtype, cfg["mode"] == "fwd_bwd", D)
        if reason:
            return dict(row, status="unsupported", error=reason)
        if L > profile.skip.get(backend, L):
            return dict(row, status="skipped", error=f"L > {profile.skip[backend]} (O(L^2) memory)")
        if spec.prepare is not None:
            probe = _fresh(layout)
            _sync(device)
            t0 = time.perf_counter()
            spec.prepare(probe)
            _sync(device)
            row["mask_build_ms"] = (time.perf_counter() - t0) * 1e3

    backward = cfg["mode"] == "fwd_bwd"
    # Kept in a dict so the tensors can be freed before the next configuration.
    t = {n: torch.randn(B, H, L, D, device=device, dtype=dtype, requires_grad=backward) for n in "qkvg"}

    def call() -> torch.Tensor:
        if causal:
            return F.scaled_dot_product_attention(t["q"], t["k"], t["v"], is_causal=True)
        return attend(t["q"], t["k"], t["v"], layout, backend=backend)

    def step() -> None:
        if not backward:
            with torch.no_grad():
                call()
            return
        call().backward(t["g"])
        for n in "qkv":
            t[n].grad = None

    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        base_mem = torch.cuda.memory_allocated(device)
    try:
        t0 = time.perf_counter()
        step()  # first call: compilation / autotuning, reported apart from the timing
        _sync(device)
        row["first_call_s"] = time.perf_counter() - t0
        if device.type == "cuda":  # the peak of the timed steps, not of autotuning's benchmark buffers
            torch.cuda.reset_peak_memory_stats(device)
        t0 = time.perf_counter()
        step()  # the first warm call: how slow this configuration is sets how many reps it gets
        _sync(device)
        warmup, reps = timing_reps((time.perf_counter() - t0) * 1e3, profile)
        row["reps"] = reps
        ms = median_ms(step, device, max(0, warmup - 1), reps)
        nan = float("nan")
        dev_ms, host_ms = device_and_host_ms(step, reps) if device.type == "cuda" else (nan, nan)
        if device.type == "cpu":  # one more step, profiled for its allocations (never a timed one)
            try:
                row["peak_mem_mb"] = cpu_peak_bytes(step) / 2**20
            except Exception as e:  # (the profiler's event API is torch's own): the timings still stand
                row.update(peak_mem_mb=float("nan"), peak_mem_error=f"{type(e).__name__}: {_first_line(e)}")
    except torch.OutOfMemoryError as e:
        return dict(row, status="oom", error=_first_line(e))
    except Exception as e:  # an unsupported shape inside a library: record it and go on
        return dict(row, status="error", error=f"{type(e).__name__}: {_first_line(e)}")
    finally:
        t.clear()
        gc.collect()
    if device.type == "cuda":
        row["peak_mem_mb"] = (torch.cuda.max_memory_allocated(device) - base_mem) / 2**20
    row.update(ms=ms, tflops=flops / (ms * 1e-3) / 1e12)
    row.update(device_ms=dev_ms, device_tflops=flops / (dev_ms * 1e-3) / 1e12, host_ms=host_ms)
    row.update(_tiles(backend, layout, D, dtype) if not causal else {})
    return row


def run_sweep(
    profile: SweepProfile,
    out_dir: Path,
    seed: int = 0,
    check_kernel: bool = False,
    checked: list[dict] | None = None,
) -> list[dict]:
    """Measure the profile's configurations into ``out_dir`` (pivot shape first). ``check_kernel``: as
    soon as each shape of kernel_check_shapes is measured, check the Triton configs the autotuner chose
    there against a float32 reference (check_tuned_kernel); the rows are appended to ``checked``."""
    import pandas as pd

    torch.manual_seed(seed)
    device = torch.device(profile.device)
    out_dir.mkdir(parents=True, exist_ok=True)
    peaks = {}
    for dt in ("bfloat16", "float32"):
        if device.type == "cpu" and dt == "bfloat16":
            continue
        peaks[dt] = matmul_peak_tflops(device, getattr(torch, dt))
    to_check = kernel_check_shapes(profile) if check_kernel else []
    meta = provenance(device, seed=seed, profile=dataclasses.asdict(profile), matmul_peak_tflops=peaks,
                      kernel_check=check_kernel, kernel_check_shapes=to_check,
                      peak_mem_mb=PEAK_MEM_MEANING.get(device.type))  # fmt: skip
    atomic_write_json(out_dir / "attention_provenance.json", meta)

    # One causal-SDPA ceiling per shape and mode, measured right after that shape's backends.
    configs: list[dict] = []
    for c in profile.configs():
        configs.append(c)
        if c["backend"] == profile.backends[-1]:
            configs.append(dict(c, backend="causal-sdpa"))
    rows: list[dict] = []
    start = time.perf_counter()

    def check(shape: dict) -> None:
        try:
            found = check_tuned_kernel(profile, shape, rows, out_dir, seed)
            (checked if checked is not None else []).extend(found)
        except Exception as e:  # a broken check must not cost the sweep; a dead CUDA context ends both
            from bench.kernel_check import is_fatal

            if is_fatal(f"{type(e).__name__}: {_first_line(e)}"):
                raise
            where = f"L = {shape['seq_len']}, D = {shape['head_dim']}, {shape['dtype']}"
            print(f"kernel check at {where} failed to run: {type(e).__name__}: {_first_line(e)}")

    done_shape = None
    for cfg in tqdm(configs, desc=f"attention sweep ({profile.name})", unit="cfg"):
        shape = {k: cfg[k] for k in SHAPE_KEYS}
        if done_shape is not None and shape != done_shape and done_shape in to_check:  # its rows are done
            check(done_shape)
        done_shape = shape
        if time.perf_counter() - start > profile.time_budget_s:
            rows.append(dict(cfg, status="skipped", error=f"time budget {profile.time_budget_s:.0f} s spent"))
            continue
        rows.append(measure(cfg, profile))
        # Rewrite the CSV after every row: an interrupted sweep still leaves everything measured so far.
        atomic_write_text(out_dir / "attention.csv", pd.DataFrame(rows).to_csv(index=False))
        _write_tuning_log(out_dir)
    atomic_write_text(out_dir / "attention.csv", pd.DataFrame(rows).to_csv(index=False))
    if done_shape in to_check:  # the last shape's rows
        check(done_shape)
    return rows


def kernel_check_shapes(profile: SweepProfile) -> list[dict]:
    """The shapes whose autotuned Triton configs ``--kernel-check`` checks: at the pivot length, the pivot
    shape and each one-axis variation with a head dim or dtype of its own (the autotuner keys on those and
    the length; the image variations run the pivot's configs)."""
    shapes: list[dict] = []
    for c in profile.configs():
        shape = {k: c[k] for k in SHAPE_KEYS}
        tuned = [(x["head_dim"], x["dtype"]) for x in shapes]
        if shape["seq_len"] == profile.pivot_len and (shape["head_dim"], shape["dtype"]) not in tuned:
            shapes.append(shape)
    return shapes


def check_tuned_kernel(
    profile: SweepProfile, shape: dict, rows: list[dict], out_dir: Path, seed: int = 0
) -> list[dict]:
    """In a sweep's process, once it has measured ``shape``: bench kernel-check of the Triton configs its
    autotuner chose there, both backward schemes, against a float32 reference (appended to
    ``out_dir/kernel_check.csv``), so that what the sweep timed is what is checked, before anything later
    can take the GPU down. Returns the rows; none when the sweep did not measure triton there. The summary
    marks the timings a missing check leaves unchecked (the provenance lists the shapes asked for)."""
    from bench.kernel_check import AUTOTUNED, run_pairs

    if not any(r["backend"] == "triton" and r["status"] == "ok" and all(r[k] == shape[k] for k in SHAPE_KEYS)
               for r in rows):  # fmt: skip
        return []
    batch = max(1, profile.tokens_per_batch // shape["seq_len"])
    layout = benchmark_layout(batch, shape["seq_len"], shape["image_tokens"], shape["image_fraction"],
                              device=torch.device(profile.device))  # fmt: skip
    return run_pairs("benchmark", layout, profile.heads, shape["head_dim"], shape["dtype"], "auto", AUTOTUNED,
                     ("split", "atomic"), out_dir / "kernel_check.csv", seed)  # fmt: skip


def _write_tuning_log(out_dir: Path) -> None:
    """kernel_tuning.csv: every candidate config the Triton kernel's autotuner timed in this sweep (CUDA
    only: the interpreter never tunes), so the next session can see which tiles and TMA paid off."""
    import pandas as pd

    try:
        from kernels.interval_attention import tuning_log
    except Exception:  # no Triton: nothing was tuned
        return
    log = tuning_log()
    if log:
        atomic_write_text(out_dir / "kernel_tuning.csv", pd.DataFrame(log).to_csv(index=False))
