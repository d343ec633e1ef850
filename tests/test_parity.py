"""Parity FLOP ratio: checked against hand-derived crossings of synthetic curves."""

import math

import pytest

from transfusion.eval.parity import parity_flop_ratio


def test_crossing_is_interpolated_in_log_flops():
    # bpb 3 -> 2 -> 1 at 1e9, 1e10, 1e11 FLOPs; target 1.5 is halfway between the last two points, so in
    # log-FLOPs it is at 10^10.5.
    p = parity_flop_ratio([1e9, 1e10, 1e11], [3.0, 2.0, 1.0], target=1.5, baseline_flops=1e12)
    assert p.kind == "exact"
    assert p.flops == pytest.approx(10**10.5)
    assert p.ratio == pytest.approx(10**10.5 / 1e12)
    assert str(p) == f"{10**10.5 / 1e12:.3g}"


def test_higher_is_better_and_exact_hit():
    p = parity_flop_ratio(
        [2.0, 4.0, 8.0], [0.1, 0.3, 0.5], target=0.3, baseline_flops=16.0, lower_is_better=False
    )
    assert p.kind == "exact" and p.ratio == pytest.approx(4.0 / 16.0)  # reached exactly at the 2nd point
    q = parity_flop_ratio(
        [2.0, 4.0, 8.0], [0.1, 0.3, 0.5], target=0.4, baseline_flops=16.0, lower_is_better=False
    )
    assert q.flops == pytest.approx(math.exp((math.log(4) + math.log(8)) / 2))


def test_bounds_when_there_is_no_crossing_to_interpolate():
    first = parity_flop_ratio([1.0, 2.0], [0.5, 0.4], target=0.9, baseline_flops=10.0)
    assert first.kind == "at_most" and first.ratio == pytest.approx(0.1) and str(first).startswith("<= ")
    never = parity_flop_ratio([1.0, 2.0], [0.5, 0.4], target=0.1, baseline_flops=10.0)
    assert never.kind == "more_than" and never.ratio == pytest.approx(0.2) and str(never).startswith("> ")


def test_a_curve_that_regresses_uses_the_first_crossing():
    p = parity_flop_ratio([1.0, 10.0, 100.0, 1000.0], [5.0, 1.0, 6.0, 0.5], target=2.0, baseline_flops=100.0)
    assert p.kind == "exact" and 1.0 < p.flops < 10.0


@pytest.mark.parametrize(
    "flops,values,base,match",
    [([], [], 1.0, "non-empty"), ([1.0, 1.0], [1.0, 2.0], 1.0, "increase"),
     ([1.0], [float("nan")], 1.0, "finite"), ([0.0], [1.0], 1.0, "positive"), ([1.0], [1.0], 0.0, "positive"),
     ([1.0, 2.0], [1.0], 1.0, "equally")],
)  # fmt: skip
def test_bad_input_is_named(flops, values, base, match):
    with pytest.raises(ValueError, match=match):
        parity_flop_ratio(flops, values, target=1.0, baseline_flops=base)
