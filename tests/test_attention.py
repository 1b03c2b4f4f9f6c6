"""library/attention.py: choosing the SDPA kernel order (the benchmarks' --sdpa_kernels)."""

from __future__ import annotations

import pytest

from library.errors import ConfigError


def test_sdpa_kernel_order_can_be_chosen_and_is_checked():
    from torch.nn.attention import SDPBackend

    from library import attention as attn

    saved = list(attn._PRIORITY)
    try:
        attn.set_sdpa_kernel_order(["flash", "math"])
        assert attn._PRIORITY == [SDPBackend.FLASH_ATTENTION, SDPBackend.MATH]
        with pytest.raises(ConfigError, match="unknown SDPA kernels"):
            attn.set_sdpa_kernel_order(["cudnn", "fastest"])
        with pytest.raises(ConfigError, match="unknown SDPA kernels"):
            attn.set_sdpa_kernel_order([])
    finally:
        attn._PRIORITY[:] = saved
