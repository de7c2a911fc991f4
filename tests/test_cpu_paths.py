"""Float products on CPUs without bfloat16 arithmetic (AVX2, most ARM): 16-bit prompts are multiplied in float32."""

from __future__ import annotations

import pytest
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


def test_a_tiled_layer_multiplies_a_prompt_as_its_mlx_layout_does():
    """Many rows of x (a prompt) take the dequantize-then-matmul path, which reads the tiled layout block by block."""
    from llmctl import kernels
    from llmctl.backends.torch.quant import DEQUANTIZED_ROWS, QuantizedLinear
    from llmctl.quant import QuantParams

    g = torch.Generator().manual_seed(0)
    layer = QuantizedLinear(128, 32, False, QuantParams(group_size=64, bits=4), dtype=torch.float32)
    wq, scales, biases = kernels.quantize(torch.randn(32, 128, generator=g) * 0.05, 64, 4)
    layer.weight.copy_(wq), layer.scales.copy_(scales), layer.biases.copy_(biases)
    x = torch.randn(DEQUANTIZED_ROWS, 128, generator=g)
    want = layer(x)
    if not layer.can_tile():
        pytest.skip("no tiled kernels on this CPU: the layer keeps MLX's layout")
    assert layer.tile()
    torch.testing.assert_close(layer(x), want)
