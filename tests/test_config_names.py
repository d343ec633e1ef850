"""The Triton-free spellings the kernel, kernel-check and the summary share."""

from __future__ import annotations

import random

from kernels.config_names import config_name, length_bucket


def test_length_bucket_is_the_next_power_of_two_at_least_16():
    rng = random.Random()
    for n in [0, 1, 15, 16, 17, 255, 256, 257, 8192, 8193] + [rng.randrange(1, 1 << 20) for _ in range(200)]:
        want = 16
        while want < n:  # the definition, spelled out
            want *= 2
        assert length_bucket(n) == want, n


def test_config_name_spells_tma_and_transposed_dq():
    assert config_name((128, 64, 8, 3, False)) == "128x64 w8 s3"
    assert config_name((32, 128, 8, 3, True)) == "32x128 w8 s3 tma"
    assert config_name((16, 128, 8, 3, False, True)) == "16x128 w8 s3 dqT"
    assert config_name((32, 128, 8, 3, False, False)) == "32x128 w8 s3"
