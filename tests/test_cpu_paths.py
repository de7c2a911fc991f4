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
    """Many rows of x (a prompt): on AVX2 the tiled kernels take them (int8 x for 4-bit codes: within its rounding
    bound, as in tests/test_qmatmul.py), elsewhere the dequantize-then-matmul path, which reads the tiled
    layout block by block (the same products as MLX's layout)."""
    from llmctl import kernels
    from llmctl.backends.torch.quant import DEQUANTIZED_ROWS, QuantizedLinear
    from llmctl.quant import QuantParams

    g = torch.Generator().manual_seed(0)
    for bits in (4, 8):
        layer = QuantizedLinear(128, 32, False, QuantParams(group_size=64, bits=bits), dtype=torch.float32)
        wq, scales, biases = kernels.quantize(torch.randn(32, 128, generator=g) * 0.05, 64, bits)
        layer.weight.copy_(wq), layer.scales.copy_(scales), layer.biases.copy_(biases)
        x = torch.randn(DEQUANTIZED_ROWS, 128, generator=g)
        want = layer(x)  # MLX's layout: dequantized, then a float32 product
        if not layer.can_tile():
            pytest.skip("no tiled kernels on this CPU: the layer keeps MLX's layout")
        assert layer.tile()
        if layer._kernel_isa() != "avx2":
            torch.testing.assert_close(layer(x), want)
            continue
        w = layer.dequantized()
        got = layer(x)
        exact = x.double() @ w.double().T
        step = x.double().abs().reshape(len(x), -1, 64).amax(-1) / (127 if bits == 4 else 32639)  # as x_rounding_bound
        bound = (step / 2) @ w.double().abs().reshape(32, -1, 64).sum(-1).T + (want.double() - exact).abs() + 1e-6
        assert ((got.double() - exact).abs() <= bound).all(), bits
        assert not torch.equal(got, want), "the prompt was not multiplied by the tiled kernels"
