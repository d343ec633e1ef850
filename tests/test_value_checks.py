"""The shared type tests for configuration values: bools are refused where numbers are asked for."""

import math

import numpy as np
import pytest

from transfusion.config import ModelConfig
from transfusion.value_checks import is_int, is_real


@pytest.mark.parametrize(
    ("value", "integer", "real"),
    [(3, True, True), (0, True, True), (-2, True, True), (True, False, False), (False, False, False),
     (2.5, False, True), (math.inf, False, True), ("3", False, False), (None, False, False),
     (np.float32(1.0), False, False)],
)  # fmt: skip
def test_is_int_and_is_real(value, integer, real):
    assert is_int(value) is integer and is_real(value) is real


def test_a_config_refuses_a_bool_for_a_count():
    with pytest.raises(ValueError, match="codebook_size = True"):
        ModelConfig(codebook_size=True)
