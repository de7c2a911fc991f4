"""Float products on CPUs without bfloat16 arithmetic (AVX2, most ARM): 16-bit prompts are multiplied in float32."""

from __future__ import annotations

import torch

from llmctl.backends.torch.model import WIDENED_ROWS, dense_linear, half_products


def test_16_bit_prompts_multiply_widened_to_float32_where_the_cpu_has_no_bfloat16_arithmetic():
    g = torch.Generator().manual_seed(0)
    w, bias = torch.randn(96, 64, generator=g).bfloat16(), torch.randn(96, generator=g).bfloat16()
    for dtype in (torch.bfloat16, torch.float16):
        x = torch.randn(WIDENED_ROWS, 64, generator=g).to(dtype)
        got = dense_linear(x, w.to(dtype), bias.to(dtype))
        assert got.dtype == dtype and got.shape == (WIDENED_ROWS, 96)
        widened = torch.nn.functional.linear(x.float(), w.to(dtype).float(), bias.to(dtype).float()).to(dtype)
        if half_products():  # oneDNN's own 16-bit products (float32 sums): the same up to the last rounding
            torch.testing.assert_close(got, widened)
        else:
            assert torch.equal(got, widened), dtype
        one = dense_linear(x[:1], w.to(dtype), bias.to(dtype))  # a single row stays a 16-bit product
        torch.testing.assert_close(one, widened[:1])
