"""Tests of the Triton interval-attention kernel against a float64 dense-softmax reference.

Without CUDA the kernels run in Triton's CPU interpreter (slow), so the CPU cases are tiny. The CUDA
variants (marked ``gpu``) run the same checks at larger sizes, plus a few long sequences.

Layouts come from a small generator written here, independently of ``transfusion.layout``: a row is cut
into documents with padding gaps, each document holds 0-4 images; the reference mask is built from the
document and image ids with the definition ``same doc and (k <= q or same image)``.
"""

from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import importlib  # noqa: E402
import math  # noqa: E402
from dataclasses import dataclass  # noqa: E402

import pytest  # noqa: E402

import kernels  # noqa: E402
from kernels import interval_attention, plan_tiles  # noqa: E402
from kernels.work_order import work_order  # noqa: E402

# The package re-exports the function under the module's name, so fetch the module itself.
ia = importlib.import_module("kernels.interval_attention") if kernels.HAS_TRITON else None
HAS_CUDA = torch.cuda.is_available()
INTERPRET = bool(ia is not None and ia.INTERPRET)
# a Triton / NumPy pair whose interpreter cannot run the kernels (the kernels refuse it, saying why)
INTERPRETER_PROBLEM = ia.interpreter_problem() if INTERPRET else None

pytestmark = [
    pytest.mark.skipif(not kernels.HAS_TRITON, reason="triton is not installed"),
    pytest.mark.skipif(bool(INTERPRETER_PROBLEM), reason=str(INTERPRETER_PROBLEM)),
]

DEVICES = [
    pytest.param(
        "cpu",
        marks=pytest.mark.skipif(not INTERPRET, reason="the CPU path needs TRITON_INTERPRET=1"),
    ),
    pytest.param("cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(not HAS_CUDA, reason="needs CUDA")]),
]
TOL = {torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 2e-2}


@pytest.fixture(autouse=True)
def _heaviest_first_everywhere(monkeypatch):
    """Every launch in these tests starts its programs heaviest first (kernels/work_order.py), also for
    the short rows that would keep the natural order by default; test_program_orders_agree covers the
    natural order."""
    if ia is not None:
        monkeypatch.setattr(ia, "ORDER_MIN_QUERIES", 1)


@pytest.fixture(autouse=True)
def _split_backward_unless_asked(monkeypatch):
    """The split backward scheme unless a test asks for another (backward_mode): on CUDA the default
    "auto" would time both schemes at every new shape; the backward-scheme tests below cover it."""
    if ia is not None:
        monkeypatch.setattr(ia, "_BACKWARD", "split")


# --------------------------------------------------------------------------------------------------------
# Random layouts
# --------------------------------------------------------------------------------------------------------
def _randint(lo: int, hi: int) -> int:
    """Uniform integer in [lo, hi] from torch's default generator."""
    return int(torch.randint(lo, hi + 1, ()).item())


@dataclass
class Row:
    """One packed row of ``length`` positions (keys); ``doc``/``img`` are -1 outside documents/images."""

    length: int
    docs: list[tuple[int, int]]
    images: list[tuple[int, int]]
    doc: torch.Tensor
    img: torch.Tensor

    def describe(self) -> str:
        return f"Row(length={self.length}, docs={self.docs}, images={self.images})"


def random_row(length: int, max_doc: int = 40, max_image: int = 12) -> Row:
    """Documents are contiguous spans separated by optional padding gaps (and a padding tail); each
    document holds 0-4 images, non-overlapping spans of patches, anywhere in it (first, last, adjacent)."""
    doc = torch.full((length,), -1, dtype=torch.int64)
    img = torch.full((length,), -1, dtype=torch.int64)
    docs: list[tuple[int, int]] = []
    images: list[tuple[int, int]] = []
    pos = 0
    while pos < length:
        if _randint(0, 3) == 0:  # padding gap
            pos += _randint(1, 4)
            continue
        end = min(length, pos + _randint(1, max_doc))
        doc[pos:end] = len(docs)
        docs.append((pos, end))
        n_images = _randint(0, 4)
        p = pos
        while p < end and n_images > 0:
            p += _randint(0, 5) if _randint(0, 2) else 0  # text before the image, possibly none
            if p >= end:
                break
            img_end = min(end, p + _randint(1, max_image))
            img[p:img_end] = len(images)
            images.append((p, img_end))
            p = img_end
            n_images -= 1
        pos = end
    return Row(length, docs, images, doc, img)


def intervals(row: Row) -> tuple[torch.Tensor, torch.Tensor]:
    """lo/hi over all positions: the doc start, and the query itself (text) or its image's last patch."""
    pos = torch.arange(row.length)
    lo = pos.clone()
    hi = pos - 1  # padding: empty interval [q, q - 1]
    for start, end in row.docs:
        lo[start:end] = start
        hi[start:end] = pos[start:end]
    for start, end in row.images:
        hi[start:end] = end - 1
    return lo, hi


def definition_mask(row: Row, q_pos: torch.Tensor) -> torch.Tensor:
    """(Lq, Lk) bool straight from the definition: same doc and (k <= q or same image)."""
    k_pos = torch.arange(row.length)
    dq, dk = row.doc[q_pos][:, None], row.doc[None, :]
    iq, ik = row.img[q_pos][:, None], row.img[None, :]
    same_doc = (dq == dk) & (dk >= 0)
    same_img = (iq == ik) & (ik >= 0)
    return same_doc & ((k_pos[None, :] <= q_pos[:, None]) | same_img)


@dataclass
class Case:
    lo: torch.Tensor  # (B, Lq) int32
    hi: torch.Tensor
    mask: torch.Tensor  # (B, Lq, Lk) bool
    kv_len: int
    text: str


def random_case(bsz: int, kv_len: int, q_len: int, **row_kw) -> Case:
    """Each batch row gets its own layout; the queries are the last q_len positions."""
    q_pos = torch.arange(kv_len - q_len, kv_len)
    los, his, masks, texts = [], [], [], []
    for _ in range(bsz):
        row = random_row(kv_len, **row_kw)
        lo, hi = intervals(row)
        lo, hi = lo[q_pos], hi[q_pos]
        k_pos = torch.arange(kv_len)
        mask = (k_pos[None, :] >= lo[:, None]) & (k_pos[None, :] <= hi[:, None])
        expect = definition_mask(row, q_pos)
        assert torch.equal(mask, expect), f"lo/hi mask differs from the definition for {row.describe()}"
        los.append(lo)
        his.append(hi)
        masks.append(mask)
        texts.append(row.describe())
    text = f"B={bsz} Lk={kv_len} Lq={q_len} rows=[" + "; ".join(texts) + "]"
    return Case(
        torch.stack(los).to(torch.int32), torch.stack(his).to(torch.int32), torch.stack(masks), kv_len, text
    )


def arbitrary_case(bsz: int, kv_len: int, q_len: int) -> Case:
    """Random intervals with no order at all (some empty, some sticking out of [0, Lk))."""
    a = torch.randint(-3, kv_len + 3, (bsz, q_len))
    b = torch.randint(-3, kv_len + 3, (bsz, q_len))
    empty = torch.rand(bsz, q_len) < 0.2
    lo = torch.where(empty, torch.maximum(a, b), torch.minimum(a, b))
    hi = torch.where(empty, torch.minimum(a, b) - 1, torch.maximum(a, b))
    k_pos = torch.arange(kv_len)
    mask = (k_pos[None, None, :] >= lo[..., None]) & (k_pos[None, None, :] <= hi[..., None])
    text = f"arbitrary B={bsz} Lk={kv_len} Lq={q_len} lo={lo.tolist()} hi={hi.tolist()}"
    return Case(lo.to(torch.int32), hi.to(torch.int32), mask, kv_len, text)


# --------------------------------------------------------------------------------------------------------
# Reference and checks
# --------------------------------------------------------------------------------------------------------
def reference(q, k, v, mask, scale=None):
    """float64 dense softmax attention; rows with no allowed key give zeros (and zero gradients)."""
    q, k, v = (t.double() for t in (q, k, v))
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    m = mask[:, None].to(q.device)
    s = (q @ k.transpose(-1, -2)) * scale
    s = torch.where(m, s, float("-inf"))
    some = m.any(-1, keepdim=True)
    s = torch.where(some, s, 0.0)
    p = torch.softmax(s, dim=-1) * some
    return p @ v


def rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    got, want = got.double(), want.double()
    denom = want.norm().item()
    diff = (got - want).norm().item()
    return diff / denom if denom > 0 else diff


def check_case(case: Case, heads: int, head_dim: int, dtype: torch.dtype, device: str) -> None:
    bsz, q_len = case.lo.shape
    kv_len = case.kv_len
    ctx = f"{case.text} H={heads} D={head_dim} dtype={dtype}"
    q = torch.randn(bsz, heads, q_len, head_dim, device=device).to(dtype).requires_grad_()
    k = torch.randn(bsz, heads, kv_len, head_dim, device=device).to(dtype).requires_grad_()
    v = torch.randn(bsz, heads, kv_len, head_dim, device=device).to(dtype).requires_grad_()
    lo, hi = case.lo.to(device), case.hi.to(device)
    grad_out = torch.randn(bsz, heads, q_len, head_dim, device=device).to(dtype)

    with ia.poison_outputs():  # every buffer starts NaN: the kernels must write all of it
        out = interval_attention(q, k, v, lo, hi)
        out.backward(grad_out)

    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    ref = reference(q64, k64, v64, case.mask)
    ref.backward(grad_out.double())

    tol = TOL[dtype]
    for name, got, want in (
        ("out", out, ref),
        ("dq", q.grad, q64.grad),
        ("dk", k.grad, k64.grad),
        ("dv", v.grad, v64.grad),
    ):
        assert got.dtype == dtype, f"{name} has dtype {got.dtype}; {ctx}"
        assert not torch.isnan(got).any(), f"{name} has NaN (unwritten or bad math); {ctx}"
        err = rel_err(got, want)
        assert err <= tol, f"{name}: relative error {err:.3g} > {tol}; {ctx}"

    # Padding queries: exact zeros. Keys nobody may see: exactly zero gradients.
    empty_q = ~case.mask.any(-1).to(device)  # (B, Lq)
    unseen_k = ~case.mask.any(1).to(device)  # (B, Lk)
    assert (out.detach()[empty_q.unsqueeze(1).expand(-1, heads, -1)] == 0).all(), f"padding out != 0; {ctx}"
    assert (q.grad[empty_q.unsqueeze(1).expand(-1, heads, -1)] == 0).all(), f"padding dq != 0; {ctx}"
    sel = unseen_k.unsqueeze(1).expand(-1, heads, -1)
    assert (k.grad[sel] == 0).all() and (v.grad[sel] == 0).all(), f"unseen keys have grads; {ctx}"


def random_sizes(max_len: int, min_len: int = 1) -> tuple[int, int, int, int]:
    """(B, H, Lk, Lq); a third of the cases decode a suffix of the keys (Lq < Lk)."""
    bsz, heads = _randint(1, 2), _randint(1, 2)
    kv_len = _randint(min_len, max_len)
    q_len = _randint(min_len, kv_len) if _randint(0, 2) == 0 else kv_len
    return bsz, heads, kv_len, q_len


# --------------------------------------------------------------------------------------------------------
# Tests
# --------------------------------------------------------------------------------------------------------
def test_layout_generator_matches_definition():
    """random_case asserts lo/hi == definition internally; also check the invariants kernels rely on."""
    for _ in range(200):
        kv_len = _randint(1, 120)
        q_len = _randint(1, kv_len)
        case = random_case(1, kv_len, q_len)
        lo, hi = case.lo[0].long(), case.hi[0].long()
        assert (lo[1:] >= lo[:-1]).all() and (hi[1:] >= hi[:-1]).all(), case.text
        q_pos = torch.arange(kv_len - q_len, kv_len)
        empty = hi < lo
        assert torch.equal(lo[empty], q_pos[empty]) and torch.equal(hi[empty], q_pos[empty] - 1), case.text


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("trial", range(50))
def test_fp32_random_layouts(device, trial):
    max_len = 70 if device == "cpu" else 300
    bsz, heads, kv_len, q_len = random_sizes(max_len)
    check_case(random_case(bsz, kv_len, q_len), heads, 32, torch.float32, device)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(
    "dtype,head_dim,trial",
    [(torch.bfloat16, 32, t) for t in range(4)]
    + [(torch.float16, 32, t) for t in range(2)]
    + [(torch.float32, 64, 0), (torch.float32, 128, 0), (torch.bfloat16, 64, 0), (torch.bfloat16, 128, 0)],
)
def test_dtypes_and_head_dims(device, dtype, head_dim, trial):
    # At least 16 queries: with only a handful of half-precision values, one unlucky rounding (O is
    # stored in bf16 before delta = rowsum(dO * O), as in every flash attention) can dominate the norm.
    max_len = 50 if device == "cpu" else 300
    bsz, heads, kv_len, q_len = random_sizes(max_len, min_len=16)
    check_case(random_case(bsz, kv_len, q_len), heads, head_dim, dtype, device)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("trial", range(3))
def test_arbitrary_intervals_are_still_correct(device, trial):
    """Non-monotone intervals lose tile skipping but must never lose correctness."""
    max_len = 50 if device == "cpu" else 200
    bsz, heads, kv_len, q_len = random_sizes(max_len)
    check_case(arbitrary_case(bsz, kv_len, q_len), heads, 32, torch.float32, device)


@pytest.mark.parametrize("device", DEVICES)
def test_all_padding_and_single_tokens(device):
    # A row that is all padding next to a normal row, and a single query/key.
    kv_len = 19
    pos = torch.arange(kv_len)
    lo = torch.stack([pos, torch.zeros(kv_len, dtype=torch.int64)]).to(torch.int32)
    hi = torch.stack([pos - 1, pos]).to(torch.int32)
    k_pos = torch.arange(kv_len)
    mask = (k_pos[None, None, :] >= lo[..., None]) & (k_pos[None, None, :] <= hi[..., None])
    check_case(Case(lo, hi, mask, kv_len, "all-padding + causal"), 2, 32, torch.float32, device)
    one = torch.zeros(1, 1, dtype=torch.int32)
    check_case(
        Case(one, one, torch.ones(1, 1, 1, dtype=torch.bool), 1, "single"), 1, 32, torch.float32, device
    )


@pytest.mark.parametrize("device", DEVICES)
def test_backward_is_deterministic(device):
    case = random_case(2, 45, 45)
    q, k, v = (torch.randn(2, 2, 45, 32, device=device, requires_grad=True) for _ in range(3))
    lo, hi = case.lo.to(device), case.hi.to(device)
    grads = []
    for _ in range(2):
        for t in (q, k, v):
            t.grad = None
        interval_attention(q, k, v, lo, hi).sum().backward()
        grads.append([t.grad.clone() for t in (q, k, v)])
    for a, b in zip(*grads):
        assert torch.equal(a, b)


@pytest.mark.parametrize("device", DEVICES)
def test_custom_scale_and_noncontiguous_inputs(device):
    case = random_case(1, 33, 33)
    base = torch.randn(1, 33, 2, 32, device=device)  # (B, L, H, D) viewed as (B, H, L, D): non-contiguous
    q = base.transpose(1, 2).requires_grad_()
    k = torch.randn(1, 2, 33, 32, device=device)
    v = torch.randn(1, 2, 33, 32, device=device)
    out = interval_attention(q, k, v, case.lo.to(device), case.hi.to(device), scale=0.3)
    ref = reference(q.detach(), k, v, case.mask, scale=0.3)
    assert rel_err(out, ref) <= 1e-4


def brute_force_tiles(case: Case, block_m: int, block_n: int) -> dict[str, int]:
    """Tile counts from the dense mask alone, with the kernel's rules spelled out independently."""
    mask = case.mask
    bsz, q_len, kv_len = mask.shape
    n_mb, n_nb = -(-q_len // block_m), -(-kv_len // block_n)
    q_offset = kv_len - q_len
    out = {"computed": 0, "full": 0, "causal": 0, "dense": bsz * n_mb * n_nb}
    for b in range(bsz):
        for m in range(n_mb):
            rows = mask[b, m * block_m : (m + 1) * block_m]
            nonempty = rows.any(-1)
            q_end = q_offset + min((m + 1) * block_m, q_len) - 1
            for n in range(n_nb):
                tile = rows[:, n * block_n : (n + 1) * block_n]
                out["computed"] += int(tile.any())
                # Full: the key block lies entirely inside [0, Lk) and inside every non-empty row's interval.
                complete = (n + 1) * block_n <= kv_len
                out["full"] += int(complete and bool(nonempty.any()) and bool(tile[nonempty].all()))
                out["causal"] += int(n * block_n <= q_end)
    return out


@pytest.mark.parametrize("device", DEVICES)
def test_plan_tiles_matches_brute_force(device):
    blocks = [(16, 16), (16, 32), (32, 16), (32, 64), (64, 32)]
    for trial in range(12):
        kv_len = _randint(1, 200)
        q_len = kv_len if trial % 3 else _randint(1, kv_len)
        text_only = trial % 4 == 0
        case = random_case(_randint(1, 3), kv_len, q_len)
        if text_only:
            case = _strip_images(case)
        bm, bn = blocks[trial % len(blocks)]
        got = plan_tiles(case.lo.to(device), case.hi.to(device), kv_len, bm, bn)
        want = brute_force_tiles(case, bm, bn)
        for key in ("computed", "full", "dense", "causal"):
            assert got[key] == want[key], f"{key}: plan {got[key]} != brute force {want[key]}; {case.text}"
        assert got["masked"] == got["computed"] - got["full"]
        assert got["full"] <= got["computed"] <= got["dense"]
        if text_only:
            assert got["computed"] <= got["causal"], case.text


def _strip_images(case: Case) -> Case:
    """Text-only variant: every non-empty row sees its doc prefix up to itself."""
    bsz, q_len = case.lo.shape
    q_pos = torch.arange(case.kv_len - q_len, case.kv_len)
    empty = case.hi < case.lo
    hi = torch.where(empty, case.hi, q_pos.to(torch.int32).expand(bsz, -1))
    k_pos = torch.arange(case.kv_len)
    mask = (k_pos[None, None, :] >= case.lo[..., None]) & (k_pos[None, None, :] <= hi[..., None])
    return Case(case.lo, hi.contiguous(), mask, case.kv_len, case.text + " (images stripped)")


def test_plan_tiles_known_layout():
    # One causal document of 64 tokens, blocks 16x16: 10 tiles on and below the diagonal, 6 of them full.
    pos = torch.arange(64, dtype=torch.int32)
    plan = plan_tiles(torch.zeros(1, 64, dtype=torch.int32), pos[None].clone(), 64, 16, 16)
    assert (plan["computed"], plan["full"], plan["dense"], plan["causal"]) == (10, 6, 16, 10)
    # Two documents of 32: the cross-document tiles below the diagonal disappear.
    lo = torch.where(pos < 32, 0, 32).to(torch.int32)[None]
    plan = plan_tiles(lo, pos[None].clone(), 64, 16, 16)
    assert (plan["computed"], plan["full"]) == (6, 2)


@pytest.mark.parametrize("device", DEVICES)
def test_kernels_compute_exactly_the_planned_tiles(device):
    """In-kernel counters: forward, dK/dV and dQ visit exactly the tiles plan_tiles reports."""
    heads = 2
    for trial in range(3 if device == "cpu" else 6):
        kv_len = _randint(20, 64 if device == "cpu" else 700)
        q_len = kv_len if trial % 2 else _randint(1, kv_len)
        case = random_case(_randint(1, 2), kv_len, q_len)
        bsz = case.lo.shape[0]
        lo, hi = case.lo.to(device), case.hi.to(device)
        q = torch.randn(bsz, heads, q_len, 32, device=device, requires_grad=True)
        k = torch.randn(bsz, heads, kv_len, 32, device=device, requires_grad=True)
        v = torch.randn(bsz, heads, kv_len, 32, device=device, requires_grad=True)
        interval_attention(q, k, v, lo, hi).sum().backward()  # tune first, so counting sees one run
        with ia.count_tiles() as counts:
            interval_attention(q, k, v, lo, hi).sum().backward()
        for name, kernel in (
            ("fwd", ia._fwd_kernel),
            ("dkdv", ia._bwd_dkdv_kernel),
            ("dq", ia._bwd_dq_kernel),
        ):
            cfg = kernel.best_config
            bm, bn = cfg.kwargs["BLOCK_M"], cfg.kwargs["BLOCK_N"]
            plan = plan_tiles(case.lo, case.hi, kv_len, bm, bn)
            want = [heads * plan["computed"], heads * plan["full"]]
            assert counts[name] == want, (
                f"{name} ({bm}x{bn}) counted {counts[name]}, plan {want}; {case.text}"
            )
    if device == "cpu":
        assert ia.kernel_block_sizes(32, torch.float32, "cpu") == (16, 16)


# --------------------------------------------------------------------------------------------------------
# The TMA variant and the candidate configs
# --------------------------------------------------------------------------------------------------------
HAS_HOPPER = HAS_CUDA and torch.cuda.get_device_capability()[0] >= 9
TMA_DEVICES = [
    DEVICES[0],
    pytest.param(
        "cuda",
        marks=[pytest.mark.gpu, pytest.mark.skipif(not HAS_HOPPER, reason="needs CUDA capability >= 9")],
    ),
]


@pytest.mark.parametrize("device", TMA_DEVICES)
@pytest.mark.parametrize(
    "dtype,head_dim,trial",
    [(torch.float32, 32, t) for t in range(3)] + [(torch.bfloat16, 32, 0), (torch.float16, 64, 0)],
)
def test_tma_variant_random_layouts(device, dtype, head_dim, trial):
    """The TMA code path (full tiles loaded through tensor descriptors) against the float64 reference.
    Long documents so that most tiles are full ones. On CUDA every case runs bf16 at D = 128 (fp32 has
    no TMA candidates), so the kernels compile once and are shared with test_gpu_every_candidate_config:
    the GPU session's minutes go to checks, not compiles."""
    if device == "cuda":
        dtype, head_dim = torch.bfloat16, 128
    max_len = 90 if device == "cpu" else 700
    bsz, heads, kv_len, q_len = random_sizes(max_len, min_len=40)
    case = random_case(bsz, kv_len, q_len, max_doc=max_len)
    with ia.kernel_configs(tma=True):
        check_case(case, heads, head_dim, dtype, device)
        for kernel in (ia._fwd_kernel, ia._bwd_dkdv_kernel, ia._bwd_dq_kernel):
            assert ia._config_key(kernel.best_config)[4], "the TMA config did not run"


@pytest.mark.parametrize("device", TMA_DEVICES)
def test_tma_variant_computes_the_planned_tiles(device):
    heads, kv_len = 2, (80 if device == "cpu" else 900)
    dtype = torch.float32 if device == "cpu" else torch.bfloat16
    case = random_case(2, kv_len, kv_len, max_doc=kv_len)
    lo, hi = case.lo.to(device), case.hi.to(device)
    q, k, v = (
        torch.randn(2, heads, kv_len, 32, device=device, dtype=dtype, requires_grad=True) for _ in "qkv"
    )
    with ia.kernel_configs(tma=True):
        interval_attention(q, k, v, lo, hi).sum().backward()
        with ia.count_tiles() as counts:
            interval_attention(q, k, v, lo, hi).sum().backward()
    for name, kernel in (("fwd", ia._fwd_kernel), ("dkdv", ia._bwd_dkdv_kernel), ("dq", ia._bwd_dq_kernel)):
        bm, bn = kernel.best_config.kwargs["BLOCK_M"], kernel.best_config.kwargs["BLOCK_N"]
        plan = plan_tiles(case.lo, case.hi, kv_len, bm, bn)
        assert counts[name] == [heads * plan["computed"], heads * plan["full"]], (name, case.text)
        assert plan["full"] > 0, "the layout should have full tiles for TMA to load"


def test_kernel_configs_restrictions():
    with pytest.raises(ValueError, match="index"), ia.kernel_configs(index=-1):
        pass
    # Every half-precision class has TMA candidates; fp32 has none (TMA is listed for fp16/bf16 only).
    for kernel in ("fwd", "dkdv", "dq"):
        for dim in (32, 64, 128):
            assert ia.candidate_count(kernel, torch.bfloat16, dim, tma=True) >= 1
            assert ia.candidate_count(kernel, torch.bfloat16, dim, tma=False) >= 3
            assert ia.candidate_count(kernel, torch.float32, dim, tma=True) == 0
    # Restrictions change the autotuning key, so a restricted run never reuses an unrestricted choice.
    tags = set()
    for tma in (None, True, False):
        for index in (None, 0, 1):
            with ia.kernel_configs(tma=tma, index=index):
                tags.add(ia._tune_tag())
    assert len(tags) == 9


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA or INTERPRET, reason="needs CUDA")
def test_tma_variant_refused_where_it_cannot_run():
    """fp32 never has TMA candidates (nor does a GPU before Hopper): asking for them is an error."""
    x = torch.randn(1, 1, 16, 32, device="cuda", dtype=torch.float32)
    zeros = torch.zeros(1, 16, dtype=torch.int32, device="cuda")
    with ia.kernel_configs(tma=True), pytest.raises(ValueError, match="fp16/bf16"):
        interval_attention(x, x, x, zeros, zeros)


def test_tuning_log_records_every_timed_candidate():
    """_log_tuning turns an autotuner's timings into rows once per tuning (a fake autotuner here: the
    interpreter never benchmarks)."""
    from types import SimpleNamespace

    configs = ia._make_configs("fwd")[:2]
    fake = SimpleNamespace(
        configs_timings={configs[0]: [0.5, 0.4, 0.6], configs[1]: [0.7, 0.6, 0.8]}, best_config=configs[0]
    )
    before = len(ia.tuning_log())
    ia._log_tuning("fwd-test", fake, 64, torch.bfloat16, 1000, 3000)
    ia._log_tuning("fwd-test", fake, 64, torch.bfloat16, 1000, 3000)  # same tuning: not logged twice
    rows = ia.tuning_log()[before:]
    assert [r["ms"] for r in rows] == [0.5, 0.7]
    assert [r["chosen"] for r in rows] == [True, False]
    assert rows[0]["q_bucket"] == 1024 and rows[0]["kv_bucket"] == 4096 and rows[0]["dtype"] == "bfloat16"
    assert (rows[1]["block_m"], rows[1]["tma"]) == (
        configs[1].kwargs["BLOCK_M"],
        configs[1].kwargs["USE_TMA"],
    )
    # a lone candidate's placeholder timings (Triton before 3.8 "times" even that one) are not rows
    untimed = SimpleNamespace(configs_timings={configs[0]: [math.nan] * 3})
    ia._log_tuning("fwd-test", untimed, 64, torch.bfloat16, 1000, 3000)
    assert len(ia.tuning_log()) == before + 2


def test_autotuner_times_only_a_choice(monkeypatch):
    """Every kernel's autotuner times through _time_candidates. After a pruning that leaves one candidate
    it runs nothing and returns "not timed" (Triton 3.6 would otherwise time it: on a GPU, a thousand
    launches per shape; in the interpreter, through a missing GPU driver); otherwise it times."""
    for kernel in (ia._fwd_kernel, ia._bwd_dkdv_kernel, ia._bwd_dkdv_atomic_kernel, ia._bwd_dq_kernel):
        assert kernel._do_bench is ia._time_candidates
    ran = []
    monkeypatch.setattr(ia, "_time_ms", lambda fn, quantiles=None: ran.append(fn) or [1.0, 0.9, 1.1])
    monkeypatch.setattr(ia, "_LONE_CANDIDATE", True)
    timings = ia._time_candidates(lambda: ran.append("launched"), quantiles=(0.5, 0.2, 0.8))
    assert len(timings) == 3 and all(math.isnan(t) for t in timings) and ran == []
    monkeypatch.setattr(ia, "_LONE_CANDIDATE", False)
    assert ia._time_candidates("run", quantiles=(0.5, 0.2, 0.8)) == [1.0, 0.9, 1.1] and ran == ["run"]
    # the pruner sets the flag from the candidates it keeps
    half = {"Q": torch.zeros(1, dtype=torch.bfloat16), "HEAD_DIM": 128, "DESC_K": None}
    monkeypatch.setattr(ia, "INTERPRET", False)
    monkeypatch.setattr(ia, "_PIN_INDEX", None)
    monkeypatch.setattr(ia, "_AUTOTUNE", True)
    prune = ia._make_pruner("fwd")
    configs = ia._make_configs("fwd")
    assert len(prune(configs, half)) > 1 and ia._LONE_CANDIDATE is False
    monkeypatch.setattr(ia, "_PIN_INDEX", 0)
    assert len(prune(configs, half)) == 1 and ia._LONE_CANDIDATE is True


@pytest.mark.parametrize("device", DEVICES)
def test_prebuilt_kv_table_gives_the_same_gradients(device):
    """A key-major table built once (as the backend caches it per layout) changes nothing; a table of the
    wrong shape is refused."""
    case = random_case(2, 57, 41)
    lo, hi = case.lo.to(device), case.hi.to(device)
    q = torch.randn(2, 2, 41, 32, device=device, requires_grad=True)
    k, v = (torch.randn(2, 2, 57, 32, device=device, requires_grad=True) for _ in "kv")
    grads = []
    for table in (None, ia.key_major_table(lo, hi, 57)):
        for t in (q, k, v):
            t.grad = None
        interval_attention(q, k, v, lo, hi, kv_table=table).square().sum().backward()
        grads.append([t.grad.clone() for t in (q, k, v)])
    for a, b in zip(*grads):
        assert torch.equal(a, b)
    with pytest.raises(ValueError, match="kv_table"):
        interval_attention(q, k, v, lo, hi, kv_table=ia.key_major_table(lo, hi, 40))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("trial", range(4))
def test_program_orders_agree(device, trial):
    """Heaviest-first and natural launch order give bitwise the same outputs and gradients (each program
    computes the same tiles), and the natural order is itself correct; a prebuilt order table is the one
    the call would build."""
    bsz, heads, kv_len, q_len = random_sizes(90 if device == "cpu" else 600, min_len=20)
    case = random_case(bsz, kv_len, q_len)
    with ia.program_order("natural"):
        check_case(case, heads, 32, torch.float32, device)
    lo, hi = case.lo.to(device), case.hi.to(device)
    q = torch.randn(bsz, heads, q_len, 32, device=device, requires_grad=True)
    k, v = (torch.randn(bsz, heads, kv_len, 32, device=device, requires_grad=True) for _ in "kv")
    table = ia.key_major_table(lo, hi, kv_len)
    results = []
    for mode, order in (("natural", None), ("heaviest-first", None), ("heaviest-first", "prebuilt")):
        if order == "prebuilt":
            order = work_order(lo, hi, kv_len, table)
        with ia.program_order(mode):
            out = interval_attention(q, k, v, lo, hi, order=order)
            grads = torch.autograd.grad(out.square().sum(), (q, k, v))
        results.append((out, *grads))
    for name, a, b, c in zip(("out", "dq", "dk", "dv"), *results):
        assert torch.equal(a, b) and torch.equal(b, c), f"{name} depends on the launch order; {case.text}"


def test_program_order_validation():
    case = random_case(1, 40, 40)
    q = torch.randn(1, 1, 40, 32, device="cuda" if HAS_CUDA and not INTERPRET else "cpu")
    lo, hi = case.lo.to(q.device), case.hi.to(q.device)
    with pytest.raises(ValueError, match="order = 'fastest'"), ia.program_order("fastest"):
        pass
    wrong = work_order(lo[:, :20], hi[:, :20], 20, ia.key_major_table(lo[:, :20], hi[:, :20], 20))
    with pytest.raises(ValueError, match="order is"):
        interval_attention(q, q, q, lo, hi, order=wrong)
    right = work_order(lo, hi, 40, ia.key_major_table(lo, hi, 40))
    with pytest.raises(ValueError, match="order is"):
        interval_attention(q, q, q, lo, hi, order=right.long())


def test_input_validation():
    dev = "cuda" if HAS_CUDA and not INTERPRET else "cpu"
    q = torch.randn(1, 2, 8, 32, device=dev)
    lo = torch.zeros(1, 8, dtype=torch.int32, device=dev)
    hi = torch.arange(8, dtype=torch.int32, device=dev)[None]
    with pytest.raises(ValueError, match="lo.dtype"):
        interval_attention(q, q, q, lo.long(), hi)
    with pytest.raises(ValueError, match="hi.shape"):
        interval_attention(q, q, q, lo, hi[:, :4])
    with pytest.raises(ValueError, match="head dim D = 48"):
        x = torch.randn(1, 2, 8, 48, device=dev)
        interval_attention(x, x, x, lo, hi)
    with pytest.raises(ValueError, match="k.shape"):
        interval_attention(q, torch.randn(1, 3, 8, 32, device=dev), q, lo, hi)
    with pytest.raises(ValueError, match="v.shape"):
        interval_attention(q, q, torch.randn(1, 2, 9, 32, device=dev), lo, hi)
    with pytest.raises(ValueError, match="4-D"):
        interval_attention(q[0], q, q, lo, hi)
    with pytest.raises(ValueError, match="dtype"):
        interval_attention(q.double(), q.double(), q.double(), lo, hi)
    with pytest.raises(ValueError, match="share a dtype"):
        interval_attention(q, q.half(), q, lo, hi)
    if HAS_CUDA and INTERPRET:
        with pytest.raises(ValueError, match="device"):
            interval_attention(q, q, q, lo.cuda(), hi)
    with pytest.raises(ValueError, match="block_m"):
        plan_tiles(lo, hi, 8, 24, 16)
    # Empty query set and zero keys are fine.
    assert interval_attention(q[:, :, :0], q, q, lo[:, :0], hi[:, :0]).shape == (1, 2, 0, 32)
    out = interval_attention(q, q[:, :, :0], q[:, :, :0], lo, hi)
    assert out.shape == q.shape and (out == 0).all()


# --------------------------------------------------------------------------------------------------------
# Backward schemes: split (a dQ kernel) and atomic (dQ added by the dK/dV kernel)
# --------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(
    "dtype,head_dim,trial",
    [(torch.float32, 32, t) for t in range(6)]
    + [(torch.bfloat16, 32, t) for t in range(2)]
    + [(torch.float16, 64, t) for t in range(2)]
    + [(torch.bfloat16, 128, t) for t in range(2)],
)
def test_atomic_dq_random_layouts(device, dtype, head_dim, trial):
    """The atomic scheme against the float64 reference: dQ summed by atomics over key blocks. On the CPU
    odd trials pin the transposed dQ product (the interpreter's second dkdv-atomic candidate), and every
    other pair of trials loads full tiles through the TMA path."""
    max_len = 70 if device == "cpu" else 700
    bsz, heads, kv_len, q_len = random_sizes(max_len, min_len=16)
    pin = trial % 2 if device == "cpu" else None
    tma = (trial // 2) % 2 == 1 if device == "cpu" else None  # the interpreter runs the TMA path too
    with ia.backward_mode("atomic"), ia.kernel_configs(tma=tma, index=pin):
        check_case(random_case(bsz, kv_len, q_len), heads, head_dim, dtype, device)
        if device == "cpu":
            assert ia._bwd_dkdv_atomic_kernel.best_config.kwargs["DQ_T"] == bool(pin)


def _grads(case, q, k, v, device) -> list[torch.Tensor]:
    out = interval_attention(q, k, v, case.lo.to(device), case.hi.to(device))
    return list(torch.autograd.grad(out.square().sum(), (q, k, v)))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("trial", range(3))
def test_backward_schemes_agree(device, trial):
    """dK and dV come from the same tiles in the same order in both schemes (the first candidates share
    their blocks): bitwise equal in the interpreter, and to fp32 rounding on a GPU, where the compiler
    schedules the two kernels apart. dQ is summed in another order with atomics: equal to fp32 rounding."""
    bsz, heads, kv_len, q_len = random_sizes(80 if device == "cpu" else 900, min_len=20)
    case = random_case(bsz, kv_len, q_len)
    q = torch.randn(bsz, heads, q_len, 32, device=device, requires_grad=True)
    k, v = (torch.randn(bsz, heads, kv_len, 32, device=device, requires_grad=True) for _ in "kv")
    got = {}
    for mode in ("split", "atomic"):
        with ia.backward_mode(mode), ia.kernel_configs(index=0):
            got[mode] = _grads(case, q, k, v, device)
    (dq_s, dk_s, dv_s), (dq_a, dk_a, dv_a) = got["split"], got["atomic"]
    if device == "cpu":
        assert torch.equal(dk_s, dk_a) and torch.equal(dv_s, dv_a), case.text
    else:
        assert rel_err(dk_a, dk_s) <= 1e-6 and rel_err(dv_a, dv_s) <= 1e-6, case.text
    assert rel_err(dq_a, dq_s) <= 1e-5, f"dq: {rel_err(dq_a, dq_s):.3g}; {case.text}"


@pytest.mark.parametrize("device", DEVICES)
def test_atomic_scheme_computes_the_planned_tiles_and_no_dq_kernel(device):
    """The atomic scheme's dK/dV kernel visits exactly the planned tiles, and no dQ kernel runs; its
    autotuner zeroes the dQ buffer before every timed run (else the timings' sums would pile up)."""
    case = random_case(2, 60, 60)
    lo, hi = case.lo.to(device), case.hi.to(device)
    q, k, v = (torch.randn(2, 2, 60, 32, device=device, requires_grad=True) for _ in "qkv")
    with ia.backward_mode("atomic"):
        interval_attention(q, k, v, lo, hi).sum().backward()  # tune first, so counting sees one run
        with ia.count_tiles() as counts:
            interval_attention(q, k, v, lo, hi).sum().backward()
    cfg = ia._bwd_dkdv_atomic_kernel.best_config
    plan = plan_tiles(case.lo, case.hi, 60, cfg.kwargs["BLOCK_M"], cfg.kwargs["BLOCK_N"])
    assert counts["dkdv"] == [2 * plan["computed"], 2 * plan["full"]] and counts["dq"] == [0, 0]
    acc, counter = torch.ones(5, device=device), torch.ones(2, dtype=torch.int32, device=device)
    ia._bwd_dkdv_atomic_kernel.pre_hook({"DQ_ACC": acc, "COUNTER": counter}, reset_only=True)
    assert (acc == 0).all() and (counter == 0).all()


def test_backward_mode_resolution(monkeypatch):
    """Which scheme a backward pass takes: explicit modes as asked; "auto" times them only on CUDA in
    half precision and not under deterministic algorithms; bad names are refused, naming the setting."""
    with pytest.raises(ValueError, match="mode = 'fast'"), ia.backward_mode("fast"):
        pass
    half = torch.zeros(1, dtype=torch.bfloat16)
    monkeypatch.setattr(ia, "_BACKWARD", "fastest")
    with pytest.raises(ValueError, match="INTERVAL_ATTENTION_BACKWARD = 'fastest'"):
        ia._resolve_backward(half)
    monkeypatch.setattr(ia, "INTERPRET", False)  # decide as on a GPU
    for mode, dtype, want in (
        ("auto", torch.bfloat16, "auto"),
        ("auto", torch.float16, "auto"),
        ("auto", torch.float32, "split"),
        ("split", torch.bfloat16, "split"),
        ("atomic", torch.float32, "atomic"),
    ):
        with ia.backward_mode(mode):
            assert ia._resolve_backward(torch.zeros(1, dtype=dtype)) == want, (mode, dtype)
    deterministic = torch.are_deterministic_algorithms_enabled()
    try:
        torch.use_deterministic_algorithms(True)
        with ia.backward_mode("auto"):
            assert ia._resolve_backward(half) == "split"
        with ia.backward_mode("atomic"), pytest.raises(RuntimeError, match="deterministic"):
            ia._resolve_backward(half)
    finally:
        torch.use_deterministic_algorithms(deterministic)
    with ia.backward_mode("auto"), ia.count_tiles():
        assert ia._resolve_backward(half) == "split"  # timing would add its runs to the counts
    monkeypatch.setattr(ia, "INTERPRET", True)
    with ia.backward_mode("auto"):
        assert ia._resolve_backward(half) == "split"  # the interpreter never times


def test_interpreter_refuses_triton_numpy_pairs_that_cannot_run(monkeypatch):
    """Triton before 3.7 interprets loop bounds with int(1-element array), which NumPy 2.4 refuses: that
    pair gets one clear error naming both versions (before any launch); the pairs that work get none."""
    import numpy as np

    for triton_version, numpy_version, broken in (
        ("3.6.0", "2.4.1", True),
        ("3.5.1", "2.5.0", True),
        ("3.6.0", "2.3.5", False),
        ("3.7.1", "2.4.6", False),
        ("3.8.0+git1a2b", "2.4.0rc1", False),
    ):
        monkeypatch.setattr(ia.triton, "__version__", triton_version)
        monkeypatch.setattr(np, "__version__", numpy_version)
        ia.interpreter_problem.cache_clear()
        problem = ia.interpreter_problem()
        assert (problem is not None) == broken, (triton_version, numpy_version, problem)
        if broken:
            assert triton_version in problem and numpy_version in problem and "numpy<2.4" in problem
    monkeypatch.setattr(ia.triton, "__version__", "3.6.0")
    monkeypatch.setattr(np, "__version__", "2.4.1")
    monkeypatch.setattr(ia, "INTERPRET", True)
    ia.interpreter_problem.cache_clear()
    q = torch.randn(1, 1, 8, 32)
    lo, hi = torch.zeros(1, 8, dtype=torch.int32), torch.arange(8, dtype=torch.int32)[None]
    try:
        with pytest.raises(RuntimeError, match="NumPy 2.4.1"):
            interval_attention(q, q, q, lo, hi)
    finally:
        ia.interpreter_problem.cache_clear()


def test_auto_backward_keeps_the_faster_scheme(monkeypatch):
    """ "auto" times both schemes once per shape key (a fake clock here: the interpreter cannot time),
    computes with the faster, logs both timings, and reuses the choice without timing again."""
    case = random_case(1, 50, 50)
    q = torch.randn(1, 2, 50, 32, requires_grad=True)
    k, v = (torch.randn(1, 2, 50, 32, requires_grad=True) for _ in "kv")
    with ia.backward_mode("split"):
        want = _grads(case, q, k, v, "cpu")
    timed = []

    def fake_clock(run):
        timed.append(run.keywords["atomic_dq"])
        return 1.0 if run.keywords["atomic_dq"] == atomic_wins else 2.0

    monkeypatch.setattr(ia, "_time_ms", fake_clock)
    monkeypatch.setattr(ia, "_resolve_backward", lambda q: "auto")
    monkeypatch.setattr(ia, "_BACKWARD_CHOICE", {})
    before = len(ia.tuning_log())
    atomic_wins = True
    for _ in range(2):
        got = _grads(case, q, k, v, "cpu")
        for name, a, b in zip(("dq", "dk", "dv"), got, want):
            assert rel_err(a, b) <= 1e-5, name
    assert timed == [False, True], "each scheme is timed once, the second call reuses the choice"
    assert list(ia.backward_choices().values()) == ["atomic"]
    rows = [r for r in ia.tuning_log()[before:] if r["kernel"] == "backward"]
    logged = [(r["scheme"], r["ms"], r["chosen"]) for r in rows]
    assert logged == [("split", 2.0, False), ("atomic", 1.0, True)]
    # Another length bucket is another key: timed afresh, and here split wins.
    atomic_wins = False
    case = random_case(1, 20, 20)
    q, k, v = (torch.randn(1, 2, 20, 32, requires_grad=True) for _ in "qkv")
    _grads(case, q, k, v, "cpu")
    assert sorted(ia.backward_choices().values()) == ["atomic", "split"]
    # So is another number of batch rows x heads (17 heads: the next bucket) at the same lengths.
    atomic_wins = True
    q, k, v = (torch.randn(1, 17, 20, 32, requires_grad=True) for _ in "qkv")
    _grads(case, q, k, v, "cpu")
    assert sorted(ia.backward_choices().values()) == ["atomic", "atomic", "split"]
    assert len(timed) == 6


def test_auto_backward_falls_back_to_split_when_timing_runs_out_of_memory(monkeypatch):
    def no_memory(run):
        raise torch.OutOfMemoryError("CUDA out of memory (a stand-in)")

    monkeypatch.setattr(ia, "_time_ms", no_memory)
    monkeypatch.setattr(ia, "_resolve_backward", lambda q: "auto")
    monkeypatch.setattr(ia, "_BACKWARD_CHOICE", {})
    case = random_case(1, 30, 30)
    q, k, v = (torch.randn(1, 2, 30, 32, requires_grad=True) for _ in "qkv")
    before = len(ia.tuning_log())
    got = _grads(case, q, k, v, "cpu")
    with ia.backward_mode("split"):
        want = _grads(case, q, k, v, "cpu")
    assert all(torch.equal(a, b) for a, b in zip(got, want))
    assert list(ia.backward_choices().values()) == ["split"]
    rows = [r for r in ia.tuning_log()[before:] if r["kernel"] == "backward"]
    assert [(r["scheme"], r["chosen"]) for r in rows] == [("split", True), ("atomic", False)]
    assert all(math.isnan(r["ms"]) for r in rows)


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA or INTERPRET, reason="needs CUDA")
def test_gpu_auto_backward_times_both_schemes():
    case = random_case(2, 1500, 1500, max_doc=1200, max_image=300)
    before = len(ia.tuning_log())
    with ia.backward_mode("auto"):
        check_case(case, 2, 128, torch.bfloat16, "cuda")
    rows = [r for r in ia.tuning_log()[before:] if r["kernel"] == "backward"]
    assert sorted(r["scheme"] for r in rows) == ["atomic", "split"]
    assert sum(r["chosen"] for r in rows) == 1 and all(r["ms"] > 0 for r in rows)


# --------------------------------------------------------------------------------------------------------
# GPU only: long sequences
# --------------------------------------------------------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs CUDA")
@pytest.mark.parametrize("kv_len,q_len", [(1024, 1024), (4000, 4000), (3001, 517)])
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_gpu_long_sequences(kv_len, q_len, head_dim, dtype):
    case = random_case(2, kv_len, q_len, max_doc=1500, max_image=300)
    check_case(case, 2, head_dim, dtype, "cuda")


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs CUDA")
@pytest.mark.parametrize("head_dim", [128])  # the headline shape; every candidate costs a compile
def test_gpu_every_candidate_config(head_dim):
    """Each autotuning candidate (pointer and TMA) of the three kernels, pinned in turn, is correct, with
    either backward scheme."""
    dtype = torch.bfloat16
    n = max(ia.candidate_count(k, dtype, head_dim) for k in ("fwd", "dkdv", "dkdv-atomic", "dq"))
    case = random_case(2, 1100, 1100, max_doc=900, max_image=300)
    n_atomic = ia.candidate_count("dkdv-atomic", dtype, head_dim)
    failures = []  # every failing pair, named with the configs it launched (not only the first)
    for index in range(n):
        for mode in ("split", "atomic")[: 2 if index < n_atomic else 1]:  # each scheme's dK/dV kernel
            ia.launched_configs(reset=True)
            with ia.kernel_configs(tma=None if HAS_HOPPER else False, index=index), ia.backward_mode(mode):
                try:
                    check_case(case, 2, head_dim, dtype, "cuda")
                except AssertionError as e:
                    failures.append(f"index {index} {mode} {ia.launched_configs()}: {str(e).splitlines()[0]}")
    assert not failures, "\n".join(failures)
