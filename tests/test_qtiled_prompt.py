"""The AVX2 prompt kernel of the tiled layout (int16 x, codes widened once per tile for many x rows) and the choice
of QuantizedLinear that sends 16-bit prompts to it: the same int32 sums and float32 operations as the one-row kernel,
so each output row equals that row's one-row product bit for bit, within the int16 bound of test_qmatmul."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

from llmctl import kernels  # noqa: E402
from test_qmatmul import _tiled, x_rounding_bound  # noqa: E402

needs_avx2 = pytest.mark.skipif("avx2" not in kernels.cpu_isas(), reason="this CPU has no AVX2 kernels")


@needs_avx2
@pytest.mark.parametrize("scale_dtype", ["float32", "float16", "bfloat16"])
@pytest.mark.parametrize("group_size", [32, 64, 128])
@pytest.mark.parametrize("bits", [4, 8])
def test_prompt_rows_equal_the_one_row_kernel_and_keep_the_int16_bound(bits, group_size, scale_dtype):
    """Batches of 4+ rows take the prompt kernel (6 rows a pass, a remainder of 1-5, blocks of 128 rows); each row
    equals the one-row (decode) kernel's product exactly, for float32 and bfloat16 x, and lies within
    x_rounding_bound(32639) of W @ x; and what the kernels compute, scale * code times x rounded to int16 per group plus
    the bias times x's own group sum, it equals within float32 rounding (1e-5 of sum |x| |w|, the bound's float term;
    the int16 rounding puts W @ x itself 3-5e-5 of it away here)."""
    rows, cols = 48, 3 * group_size  # three tiles; an odd number of groups
    (wq, scales, biases), tiled, w = _tiled(rows, cols, group_size, bits, scale_dtype, seed=group_size + bits)
    # the kernels multiply scale * code by x rounded to int16, and the bias by the float32 sum of x itself
    scaled = kernels.dequantize(wq, scales.float(), torch.zeros_like(biases).float(), group_size, bits).double()
    bias = biases.double().repeat_interleave(group_size, dim=1)
    for batch in (4, 5, 6, 13, 133):
        x = torch.randn(batch, cols, generator=torch.Generator().manual_seed(batch)) * 3
        x[-1, 1] = 50.0  # an outlier in one group
        for x_dtype in (torch.float32, torch.bfloat16):
            xs = x.to(x_dtype)
            got = kernels.qmatmul_tiled(xs, *tiled, group_size, bits, isa="avx2", threads=2)
            rows_one = torch.cat([kernels.qmatmul_tiled(r[None], *tiled, group_size, bits, isa="avx2", threads=1) for r in xs])
            assert torch.equal(got, rows_one), f"batch={batch} {x_dtype}"
            if x_dtype != torch.float32:
                continue
            bound = x_rounding_bound(xs, w, group_size, 32639)
            want = xs.double() @ w.double().T
            assert ((got.double() - want).abs() <= bound).all(), f"batch={batch}: {((got.double() - want).abs() / bound).max():.3g} x the bound"
            xg = xs.double().reshape(batch, -1, group_size)
            step = xg.abs().amax(-1, keepdim=True) / 32639
            rounded = (torch.round(xg / step) * step).reshape(xs.shape) @ scaled.T + xs.double() @ bias.T
            off = ((got.double() - rounded).abs() / (xs.double().abs() @ w.double().abs().T)).max().item()
            assert off <= 1e-5, f"batch={batch}: {off:.3g} of sum |x| |w| off scale * code @ rounded x + bias @ x"


@needs_avx2
def test_prompt_kernel_handles_zero_groups_and_inf():
    """A group of zeros (step 0) gives its bias times 0; inf in x leaves the kernels for the float32 loop, as the
    one-row kernel does."""
    _, tiled, w = _tiled(32, 128, 64, 4, "bfloat16")
    x = torch.randn(9, 128, generator=torch.Generator().manual_seed(1))
    x[2, :64] = 0.0
    got = kernels.qmatmul_tiled(x, *tiled, 64, 4, isa="avx2")
    assert torch.equal(got[2], kernels.qmatmul_tiled(x[2:3], *tiled, 64, 4, isa="avx2")[0])
    x[4, 3] = float("inf")
    got = kernels.qmatmul_tiled(x, *tiled, 64, 4, isa="avx2")
    assert torch.equal(got, kernels.qmatmul_tiled(x, *tiled, 64, 4, isa="scalar"))


@needs_avx2
@pytest.mark.parametrize("bits", [4, 8])
def test_one_row_sums_alike_however_the_tiles_split_over_threads(bits):
    """Decoding reads each thread's range of tiles as far-apart streams and the tiles left over as one: 37 tiles over
    1, 2, 4 and 5 threads put different tiles in the streams and the leftovers (tile 8: streamed by one thread, left
    over by four), and every output is the same bit for bit, and the same as that row's in a two-row product (tiles
    summed group by group in order either way)."""
    rows, cols = 37 * 16, 512
    _, tiled, _ = _tiled(rows, cols, 64, bits, "bfloat16", seed=bits)
    x = torch.randn(2, cols, generator=torch.Generator().manual_seed(3)) * 3
    one = kernels.qmatmul_tiled(x[:1], *tiled, 64, bits, isa="avx2", threads=1)
    for threads in (2, 4, 5):
        assert torch.equal(kernels.qmatmul_tiled(x[:1], *tiled, 64, bits, isa="avx2", threads=threads), one), threads
    assert torch.equal(kernels.qmatmul_tiled(x, *tiled, 64, bits, isa="avx2", threads=1)[:1], one)


def _layer(dtype: torch.dtype):
    from llmctl.backends.torch import quant
    from llmctl.quant import QuantParams

    layer = quant.QuantizedLinear(256, 96, False, QuantParams(64, 4), dtype=dtype)
    w = torch.randn(96, 256, generator=torch.Generator().manual_seed(0)) * 0.05
    layer.weight, layer.scales, layer.biases = kernels.quantize(w.bfloat16(), 64, 4)
    return layer


@needs_avx2
def test_16bit_prompts_take_the_prompt_kernel_and_float32_prompts_stay_exact():
    """On AVX2 a tiled layer multiplies a bfloat16 prompt (DEQUANTIZED_ROWS+ rows) with the prompt kernel: equal to
    kernels.qmatmul_tiled and to each row's own product; a float32 prompt, and any prompt with the scalar kernels
    forced, still takes dequantized float32 products (exactly `_dequantized_matmul`)."""
    from llmctl.backends.torch import quant

    layer = _layer(torch.bfloat16)
    if not layer.can_tile():
        pytest.skip("this CPU has no tiled kernels")
    assert layer.tile()
    layer.isa = kernels.isa_code("avx2")
    x = torch.randn(2, quant.DEQUANTIZED_ROWS + 3, 256, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        half = x.bfloat16()
        y = layer(half)
        want = kernels.qmatmul_tiled(half, layer.weight, layer.scales, layer.biases, 64, 4, isa="avx2")
        assert y.dtype == torch.bfloat16 and torch.equal(y, want)
        assert torch.equal(y[1, 7], layer(half[1, 7][None])[0])
        assert torch.equal(layer(x), layer._dequantized_matmul(x))
        layer.isa = kernels.isa_code("scalar")
        assert torch.equal(layer(half), layer._dequantized_matmul(half))
