"""The shared type tests for configuration values: bools are refused where numbers are asked for."""

import math

import numpy as np
import pytest

from transfusion.config import ModelConfig
from transfusion.value_checks import is_finite_real, is_int, is_real


@pytest.mark.parametrize(
    ("value", "integer", "real"),
    [(3, True, True), (0, True, True), (-2, True, True), (True, False, False), (False, False, False),
     (2.5, False, True), (math.inf, False, True), ("3", False, False), (None, False, False),
     (np.float32(1.0), False, False)],
)  # fmt: skip
def test_is_int_and_is_real(value, integer, real):
    assert is_int(value) is integer and is_real(value) is real
    assert is_finite_real(value) is (real and math.isfinite(value))


def test_is_finite_real_refuses_nan_and_inf():
    assert not any(is_finite_real(v) for v in (math.nan, math.inf, -math.inf, True))
    assert all(is_finite_real(v) for v in (0, -3, 2.5, 1e300))


def test_a_config_refuses_a_bool_for_a_count():
    with pytest.raises(ValueError, match="codebook_size = True"):
        ModelConfig(codebook_size=True)
