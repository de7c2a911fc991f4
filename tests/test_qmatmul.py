"""llmctl.kernels.qmatmul: agreement with dequantize-then-matmul on every kernel, NF4, frameworks, errors, CUDA."""

from __future__ import annotations

import numpy as np
import pytest

from llmctl import kernels
from llmctl.kernels import KernelArgumentError

BITS = (2, 3, 4, 5, 6, 8)
GROUP_SIZES = (32, 64, 128)
NF4_LEVELS = [  # bitsandbytes' NF4 code book (QLoRA, Dettmers et al. 2023), as its CUDA kernels hard-code it
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
    -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
    0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
]  # fmt: skip


def simd_isas() -> list[str]:
    """The kernels this CPU runs: scalar always, plus the SIMD ones up to the best."""
    best = kernels.cpu_isa()
    return ["scalar"] + {"avx512": ["avx2", "avx512"], "avx2": ["avx2"], "neon": ["neon"]}.get(best, [])


def close(got: np.ndarray, want: np.ndarray, what: str, tol: float = 1e-3) -> None:
    """max|a - b| <= tol * max|b| over the whole output."""
    err, scale = np.abs(got.astype(np.float64) - want).max(), np.abs(want).max()
    assert err <= tol * scale, f"{what}: max error {err:.3g} > {tol} * {scale:.3g}"


def affine(rows: int, cols: int, group_size: int, bits: int, seed: int = 0, dtype=np.float32):
    w = (np.random.default_rng(seed).standard_normal((rows, cols)) * 0.05).astype(dtype)
    wq, scales, biases = kernels.quantize(w, group_size, bits)
    return wq, scales, biases, kernels.dequantize(wq, scales, biases, group_size, bits, dtype=np.float32)


@pytest.mark.parametrize("group_size", GROUP_SIZES)
@pytest.mark.parametrize("bits", BITS)
def test_every_kernel_matches_dequantize_then_matmul(bits, group_size):
    rng = np.random.default_rng(bits * group_size)
    for rows, cols in ((7, 3 * group_size), (13, 5 * 32 if group_size == 32 else 2 * group_size), (40, 512)):
        wq, scales, biases, w = affine(rows, cols, group_size, bits, seed=rows)
        for batch in (1, 3, 17):
            x = rng.standard_normal((batch, cols)).astype(np.float32)
            x[0, 0] = 30.0  # an outlier in one group of x
            want = x.astype(np.float64) @ w.T.astype(np.float64)
            for isa in simd_isas():
                got = kernels.qmatmul(x, wq, scales, biases, group_size, bits, isa=isa)
                assert got.shape == (batch, rows) and got.dtype == np.float32
                close(got, want, f"{isa} bits={bits} group={group_size} {rows}x{cols} batch={batch}")


@pytest.mark.parametrize("group_size", GROUP_SIZES)
def test_simd_and_scalar_kernels_agree(group_size):
    wq, scales, biases, _ = affine(64, 1024, group_size, 4, seed=1)
    x = np.random.default_rng(1).standard_normal((5, 1024)).astype(np.float32)
    scalar = kernels.qmatmul(x, wq, scales, biases, group_size, 4, isa="scalar")
    for isa in simd_isas()[1:]:
        close(kernels.qmatmul(x, wq, scales, biases, group_size, 4, isa=isa), scalar, isa, tol=5e-4)


def test_auto_picks_the_best_kernel_and_env_can_force_scalar(monkeypatch):
    wq, scales, biases, _ = affine(16, 256, 64, 4)
    x = np.random.default_rng(2).standard_normal((1, 256)).astype(np.float32)
    best = kernels.qmatmul(x, wq, scales, biases, 64, 4, isa=kernels.cpu_isa())
    np.testing.assert_array_equal(kernels.qmatmul(x, wq, scales, biases, 64, 4), best)
    monkeypatch.setenv("LLMCTL_ISA", "scalar")
    np.testing.assert_array_equal(
        kernels.qmatmul(x, wq, scales, biases, 64, 4), kernels.qmatmul(x, wq, scales, biases, 64, 4, isa="scalar")
    )


def test_threads_split_rows_without_changing_the_result():
    wq, scales, biases, _ = affine(1000, 768, 64, 4, seed=3)
    x = np.random.default_rng(3).standard_normal((2, 768)).astype(np.float32)
    one = kernels.qmatmul(x, wq, scales, biases, 64, 4, threads=1)
    np.testing.assert_array_equal(kernels.qmatmul(x, wq, scales, biases, 64, 4, threads=3), one)


@pytest.mark.parametrize("scale_dtype", ("float32", "float16", "bfloat16"))
def test_torch_bf16_activations_and_half_scales(scale_dtype):
    torch = pytest.importorskip("torch")
    w = torch.randn(24, 256, generator=torch.Generator().manual_seed(4)).to(getattr(torch, scale_dtype)) * 0.05
    wq, scales, biases = kernels.quantize(w, 64, 4)
    dense = kernels.dequantize(wq, scales, biases, 64, 4, dtype="float32").double()
    x = torch.randn(3, 5, 256, generator=torch.Generator().manual_seed(5)).bfloat16()
    want = (x.double() @ dense.T).numpy()
    for isa in simd_isas():
        got = kernels.qmatmul(x, wq, scales, biases, 64, 4, isa=isa)
        assert got.dtype == torch.bfloat16 and got.shape == (3, 5, 24)
        close(got.float().numpy(), want, f"{isa} {scale_dtype}", tol=5e-3)  # the output itself is bfloat16


def test_mlx_arrays_match_quantized_matmul():
    mx = pytest.importorskip("mlx.core")
    w = mx.random.normal((48, 256), key=mx.random.key(6)) * 0.05
    wq, scales, biases = mx.quantize(w, group_size=64, bits=4, stream=mx.cpu)
    x = mx.random.normal((3, 256), key=mx.random.key(7))
    want = np.array(mx.quantized_matmul(x, wq, scales, biases, transpose=True, group_size=64, bits=4, stream=mx.cpu))
    got = kernels.qmatmul(x, wq, scales, biases, 64, 4)
    assert isinstance(got, mx.array) and got.shape == (3, 48)
    close(np.array(got), want.astype(np.float64), "mlx")


def test_nf4_code_book_is_qlora_s():
    assert kernels.nf4_levels() == pytest.approx(NF4_LEVELS, abs=0, rel=1e-7)
    from llmctl.quant.nf4 import NF4_LEVELS as python_levels

    assert list(python_levels) == pytest.approx(NF4_LEVELS, rel=1e-7)


@pytest.mark.parametrize("group_size", GROUP_SIZES)
def test_nf4_quantize_dequantize_and_matmul(group_size):
    rng = np.random.default_rng(group_size)
    w = (rng.standard_normal((13, 3 * group_size)) * 0.05).astype(np.float32)
    wq, scales = kernels.quantize_nf4(w, group_size)
    assert wq.shape == (13, 3 * group_size // 8) and scales.shape == (13, 3)
    blocks = w.reshape(13, 3, group_size)
    np.testing.assert_array_equal(scales, np.abs(blocks).max(-1))
    levels = np.array(NF4_LEVELS, np.float32)
    codes = kernels.unpack(wq, 4, 3 * group_size).reshape(13, 3, group_size)
    nearest = np.abs(blocks[..., None] / scales[..., None, None] - levels).argmin(-1)
    np.testing.assert_array_equal(codes, nearest)
    dense = kernels.dequantize_nf4(wq, scales, group_size)
    np.testing.assert_array_equal(dense, (levels[codes] * scales[..., None]).reshape(13, -1))
    for batch in (1, 3, 17):
        x = rng.standard_normal((batch, 3 * group_size)).astype(np.float32)
        want = x.astype(np.float64) @ dense.T.astype(np.float64)
        for isa in simd_isas():
            close(kernels.qmatmul(x, wq, scales, None, group_size, 4, mode="nf4", isa=isa), want, f"nf4 {isa} {batch}")


def test_nonfinite_activations_propagate():
    wq, scales, biases, _ = affine(8, 128, 64, 4)
    x = np.ones((2, 128), np.float32)
    x[1, 5] = np.inf
    y = kernels.qmatmul(x, wq, scales, biases, 64, 4)
    assert np.isfinite(y[0]).all() and not np.isfinite(y[1]).any()


def _bad_calls():
    wq, scales, biases, _ = affine(8, 256, 64, 4)
    x = np.zeros((2, 256), np.float32)
    return [
        ("features", lambda: kernels.qmatmul(np.zeros((2, 128), np.float32), wq, scales, biases, 64, 4),
         "x has 128 features but wq (8, 32) and scales (8, 4) hold 256 features per row at group_size 64"),
        ("bits", lambda: kernels.qmatmul(x, wq, scales, biases, 64, 3), "wq (8, 32) has 32 words per row, but 256 features of 3 bits take 24"),
        ("x dtype", lambda: kernels.qmatmul(x.astype(np.int32), wq, scales, biases, 64, 4), "x has dtype int32"),
        ("no biases", lambda: kernels.qmatmul(x, wq, scales, None, 64, 4), "affine weights need their biases"),
        ("nf4 biases", lambda: kernels.qmatmul(x, wq, scales, biases, 64, 4, mode="nf4"), "mode='nf4' has no biases"),
        ("nf4 bits", lambda: kernels.qmatmul(x, wq, scales, None, 64, 8, mode="nf4"), "4-bit codes; got bits=8"),
        ("mode", lambda: kernels.qmatmul(x, wq, scales, biases, 64, 4, mode="fp4"), "mode='fp4' is not one of"),
        ("isa", lambda: kernels.qmatmul(x, wq, scales, biases, 64, 4, isa="sse"), "isa='sse' is not one of"),
        ("group", lambda: kernels.qmatmul(x, wq, scales, biases, 48, 4), "group_size=48 is not supported"),
        ("3-d wq", lambda: kernels.qmatmul(x, wq[None], scales, biases, 64, 4), "must be 2-D"),
    ]


@pytest.mark.parametrize("case", range(len(_bad_calls())))
def test_bad_arguments_say_what_is_wrong(case):
    name, call, message = _bad_calls()[case]
    with pytest.raises(KernelArgumentError) as info:
        call()
    assert message in str(info.value), name


def test_an_isa_this_cpu_lacks_is_refused():
    other = "neon" if kernels.cpu_isa() != "neon" else "avx512"
    wq, scales, biases, _ = affine(8, 256, 64, 4)
    with pytest.raises(KernelArgumentError, match=f"cannot run the {other} kernels"):
        kernels.qmatmul(np.zeros((1, 256), np.float32), wq, scales, biases, 64, 4, isa=other)


@pytest.mark.gpu
@pytest.mark.parametrize("bits", (2, 4, 5, 8))
def test_cuda_matches_cpu(bits):
    torch = pytest.importorskip("torch")
    from llmctl import _C

    if not torch.cuda.is_available():
        pytest.skip("no CUDA GPU visible to torch")
    if not _C.has_cuda():
        pytest.skip("llmctl._C built without CUDA (pip install . --config-settings=cmake.define.LLMCTL_CUDA=ON)")
    gen = torch.Generator().manual_seed(bits)
    for group_size in GROUP_SIZES:
        w = torch.randn(37, 4 * group_size, generator=gen) * 0.05
        wq, scales, biases = kernels.quantize(w, group_size, bits)
        for batch in (1, 3, 17):
            x = torch.randn(batch, 4 * group_size, generator=gen)
            want = kernels.qmatmul(x, wq, scales, biases, group_size, bits, isa="scalar").double().numpy()
            got = kernels.qmatmul(x.cuda(), wq.cuda(), scales.cuda(), biases.cuda(), group_size, bits)
            assert got.device.type == "cuda"
            close(got.cpu().numpy(), want, f"cuda bits={bits} group={group_size} batch={batch}", tol=1e-5)
        if bits == 4:
            wq, scales = kernels.quantize_nf4(w, group_size)
            x = torch.randn(3, 4 * group_size, generator=gen)
            want = kernels.qmatmul(x, wq, scales, None, group_size, 4, mode="nf4", isa="scalar").double().numpy()
            got = kernels.qmatmul(x.cuda(), wq.cuda(), scales.cuda(), None, group_size, 4, mode="nf4")
            close(got.cpu().numpy(), want, f"cuda nf4 group={group_size}", tol=1e-5)


# ---- the tiled layout (csrc/qtiled.cpp): 16 rows interleaved for one-row products, made in place from MLX's

def _tiled(rows: int, cols: int, group_size: int, bits: int, scale_dtype: str, seed: int = 0):
    """(MLX-layout tensors, tiled copies, the float32 weights code * scale + bias) of random weights."""
    torch = pytest.importorskip("torch")
    g = torch.Generator().manual_seed(seed)
    w = (torch.randn(rows, cols, generator=g) * 0.05).to(getattr(torch, scale_dtype))
    wq, scales, biases = kernels.quantize(w, group_size, bits)
    want = kernels.dequantize(wq, scales.float(), biases.float(), group_size, bits)  # float32 arithmetic
    tiled = kernels.to_tiled(*(t.clone() for t in (wq, scales, biases)), group_size, bits)
    return (wq, scales, biases), tiled, want


def _qmatmul_tiled(x, tiled, group_size: int, bits: int, isa: str = "auto", threads: int = 0, x_int8: bool = False):
    return kernels.qmatmul_tiled(x, *tiled, group_size, bits, isa=isa, threads=threads, x_int8=x_int8)


@pytest.mark.parametrize("scale_dtype", ["float32", "float16", "bfloat16"])
@pytest.mark.parametrize("group_size", GROUP_SIZES)
@pytest.mark.parametrize("bits", [4, 8])
def test_tiled_kernels_match_dequantize_then_matmul(bits, group_size, scale_dtype):
    torch = pytest.importorskip("torch")
    for rows, cols in ((16, group_size), (48, 3 * group_size), (80, 512)):
        mlx, tiled, w = _tiled(rows, cols, group_size, bits, scale_dtype, seed=rows)
        assert tiled[0].shape == (rows // 16, cols * bits // 32, 16) and tiled[1].shape == (rows // 16, cols // group_size, 16)
        assert not torch.equal(tiled[0].reshape(rows, -1), mlx[0]), "the codes were not rearranged"
        for batch in (1, 2, 3):  # the decode kernels (one row, or two at a time); prompts: the test below
            x = torch.randn(batch, cols, generator=torch.Generator().manual_seed(batch))
            x[0, 0] = 30.0  # an outlier in one group of x
            want = (x.double() @ w.double().T).numpy()
            for isa in kernels.cpu_isas():  # every path this CPU runs (AVX-512 VNNI has its own, others the loop)
                got = _qmatmul_tiled(x, tiled, group_size, bits, isa).numpy()
                close(got, want, f"tiled isa={isa} bits={bits} group={group_size} {scale_dtype} {rows}x{cols} batch={batch}")


def x_rounding_bound(x, w, group_size: int, levels: int):
    """The error bound of kernels that round x to integers of at most `levels` per group (step = largest |x| / levels):
    half a step per value times sum |w| over the group, summed over groups; plus 1e-5 of sum |x| |w| for float32 sums."""
    x, w = x.double(), w.double()
    step = x.abs().reshape(len(x), -1, group_size).amax(-1) / levels
    return (step / 2) @ w.abs().reshape(len(w), -1, group_size).sum(-1).T + 1e-5 * (x.abs() @ w.abs().T)


@pytest.mark.parametrize("x_int8", [False, True])
@pytest.mark.parametrize("scale_dtype", ["float32", "float16", "bfloat16"])
@pytest.mark.parametrize("group_size", GROUP_SIZES)
@pytest.mark.parametrize("bits", [4, 8])
def test_tiled_prompt_kernels_stay_within_their_bound(bits, group_size, scale_dtype, x_int8):
    """Several rows of x (a prompt). On AVX2, 4-bit codes multiply int8 x (largest |x| / 127 a step per group): each
    output within x_rounding_bound(127); 8-bit codes, and every other kernel, keep int16 x (32639 steps)."""
    torch = pytest.importorskip("torch")
    rows, cols = 48, 2 * max(group_size, 128)
    _, tiled, w = _tiled(rows, cols, group_size, bits, scale_dtype, seed=group_size)
    for batch in (4, 7, 133):  # whole blocks of 4 rows, a remainder, past a block of 128 x rows
        x = torch.randn(batch, cols, generator=torch.Generator().manual_seed(batch))
        x[0, 0] = 30.0  # an outlier in one group of x
        want = x.double() @ w.double().T
        for isa in kernels.cpu_isas():
            for x_dtype in (torch.float32, torch.bfloat16):
                xs = x.to(x_dtype)
                got = _qmatmul_tiled(xs, tiled, group_size, bits, isa, x_int8=x_int8)
                assert got.dtype == x_dtype
                want = xs.double() @ w.double().T
                levels = 127 if x_int8 and isa == "avx2" and bits == 4 else 32639
                bound = x_rounding_bound(xs, w, group_size, levels)
                if x_dtype == torch.bfloat16:  # y rounded to bfloat16 too
                    bound = bound + want.abs() * 2.0**-8
                err = (got.double() - want).abs()
                worst = (err / bound).max().item()
                assert worst <= 1.0, f"{isa} bits={bits} group={group_size} {scale_dtype} batch={batch} {x_dtype}: {worst:.3g} x the bound"
                if levels == 127 and x_dtype == torch.float32:  # exactly the weights times the rounded x
                    xg = xs.double().reshape(batch, -1, group_size)
                    step = xg.abs().amax(-1, keepdim=True) / 127
                    rounded = (torch.round(xg / step) * step).reshape(xs.shape) @ w.double().T
                    off = ((got.double() - rounded).abs() / bound).max().item()
                    assert off <= 0.02, f"bits={bits} group={group_size} {scale_dtype} batch={batch}: {off:.3g} of the bound off W @ rounded x"


@pytest.mark.parametrize("bits", [4, 8])
def test_tiled_layout_round_trips_and_dequantizes_exactly(bits):
    torch = pytest.importorskip("torch")
    mlx, tiled, w = _tiled(64, 256, 32, bits, "bfloat16")
    for isa in kernels.cpu_isas():
        rows = kernels.dequantize_tiled(*tiled, 32, bits, (16, 48), isa=isa)  # rows 16..47: whole tiles from the middle
        assert torch.equal(rows, w[16:48])
        half = kernels.dequantize_tiled(*tiled, 32, bits, (16, 48), torch.bfloat16, isa=isa)
        assert torch.equal(half, w[16:48].bfloat16())  # rounded to nearest even, as torch rounds float32 to bfloat16
    for got, want in zip(kernels.from_tiled(*tiled, 32, bits), mlx):
        assert torch.equal(got, want)


def test_tiled_threads_do_not_change_the_result():
    torch = pytest.importorskip("torch")
    _, tiled, _ = _tiled(256, 512, 64, 4, "bfloat16")
    for batch in (1, 6):  # a decode step and a prompt (int8 x on AVX2, prepared on both threads)
        x = torch.randn(batch, 512)
        one = _qmatmul_tiled(x, tiled, 64, 4, threads=1)
        assert torch.equal(_qmatmul_tiled(x, tiled, 64, 4, threads=2), one)


def test_tiled_nonfinite_activations_propagate():
    torch = pytest.importorskip("torch")
    _, tiled, _ = _tiled(16, 128, 64, 4, "float32")
    for batch in (2, 6):  # the decode kernels' x and the prompt kernel's (int8 on AVX2)
        x = torch.ones(batch, 128)
        x[1, 5] = float("inf")
        y = _qmatmul_tiled(x, tiled, 64, 4)
        assert torch.isfinite(y[0]).all() and not torch.isfinite(y[1]).any()


def test_tiled_layout_refuses_what_it_cannot_hold():
    torch = pytest.importorskip("torch")
    wq, scales, biases = kernels.quantize(torch.randn(24, 128), 64, 4)  # 24 rows: not whole tiles of 16
    with pytest.raises(KernelArgumentError, match="multiple of 16 rows, not 4-bit codes of 24 rows"):
        kernels.to_tiled(wq, scales, biases, 64, 4)
    wq, scales, biases = kernels.quantize(torch.randn(32, 128), 64, 3)
    with pytest.raises(KernelArgumentError, match="affine 4- or 8-bit codes"):
        kernels.to_tiled(wq, scales, biases, 64, 3)
    tiled = kernels.to_tiled(*kernels.quantize(torch.randn(32, 128), 64, 4), 64, 4)
    with pytest.raises(KernelArgumentError, match=r"rows \[8, 24\) are not whole tiles of 16 within 32"):
        kernels.dequantize_tiled(*tiled, 64, 4, (8, 24))


def test_tiled_weights_are_refused_where_mlx_s_layout_is_read():
    """The tiled layout is in the arrays' shapes: qmatmul and dequantize refuse it instead of reading it as MLX's."""
    torch = pytest.importorskip("torch")
    mlx, tiled, _ = _tiled(32, 128, 64, 4, "float32")
    x = torch.randn(2, 128)
    with pytest.raises(KernelArgumentError, match="tiled layout.*qmatmul reads MLX's"):
        kernels.qmatmul(x, *tiled, 64, 4)
    with pytest.raises(KernelArgumentError, match="tiled layout.*dequantize reads MLX's"):
        kernels.dequantize(*tiled, 64, 4)
    with pytest.raises(KernelArgumentError, match="not in the tiled layout"):
        kernels.qmatmul_tiled(x, *mlx, 64, 4)
    with pytest.raises(KernelArgumentError, match="not in MLX's layout"):
        kernels.to_tiled(*tiled, 64, 4)
    assert torch.equal(kernels.QuantizedWeights(*tiled, 64, 4).matmul(x), kernels.qmatmul_tiled(x, *tiled, 64, 4))
    assert torch.equal(kernels.QuantizedWeights(*mlx, 64, 4).matmul(x), kernels.qmatmul(x, *mlx, 64, 4))


def test_checked_weights_refuse_what_they_cannot_hold_and_check_x_on_each_call():
    """kernels.QuantizedWeights (the decode path's products): the weights checked once, x on every call."""
    torch = pytest.importorskip("torch")
    wq, scales, biases = kernels.quantize(torch.randn(32, 128), 64, 4)
    checked = kernels.QuantizedWeights(wq, scales, biases, 64, 4)
    x = torch.randn(3, 128)
    assert torch.equal(checked.matmul(x, isa=1), kernels.qmatmul(x, wq, scales, biases, 64, 4, isa="scalar"))
    with pytest.raises(KernelArgumentError, match="x has 96 features"):
        checked.matmul(torch.randn(3, 96))
    with pytest.raises(KernelArgumentError, match="are not 4-bit codes and their scales at group_size 32"):
        kernels.QuantizedWeights(wq, scales, biases, 32, 4)
    with pytest.raises(KernelArgumentError, match="affine weights have biases"):
        kernels.QuantizedWeights(wq, scales, None, 64, 4)
    with pytest.raises(KernelArgumentError, match="contiguous torch CPU tensors"):
        kernels.QuantizedWeights(wq.t().contiguous().t(), scales, biases, 64, 4)


@pytest.mark.parametrize("scale_dtype", ["float32", "float16", "bfloat16"])
@pytest.mark.parametrize("group_size", GROUP_SIZES)
@pytest.mark.parametrize("bits", [4, 8])
def test_simd_kernels_keep_their_stated_error_bound(bits, group_size, scale_dtype):
    """The SIMD kernels (tiled or MLX's layout, forced one by one) round each group of x to int16 with step
    sx = max|x in group| / 32639 and sum exactly in int32: per output o the error is at most
    sum over groups of sx / 2 * sum |w_oi|, plus float32 rounding of the group sums (held here to 1e-6 of
    sum |x_i w_oi|). Checked per output, against float64 dequantize-then-matmul. The exception: 4-bit tiled codes
    against several rows of x on AVX2 (a prompt), whose x is int8 (x_rounding_bound with 127 steps)."""
    torch = pytest.importorskip("torch")
    rows, cols = 48, 4 * group_size
    mlx, tiled, w = _tiled(rows, cols, group_size, bits, scale_dtype, seed=bits + group_size)
    x = torch.randn(5, cols, generator=torch.Generator().manual_seed(group_size))
    x[0, 1] = 40.0  # an outlier: its group's step is large, the others' are not
    want = x.double() @ w.double().T
    step = x.abs().double().view(5, -1, group_size).amax(-1) / 32639  # (batch, groups)
    w_abs = w.abs().double().view(rows, -1, group_size).sum(-1)  # (rows, groups)
    bound = (step / 2) @ w_abs.T + 1e-6 * (x.abs().double() @ w.abs().double().T)
    simd = [isa for isa in kernels.cpu_isas() if isa != "scalar"]
    if not simd:
        pytest.skip("this CPU runs only the scalar kernels")
    for isa in simd:
        int8 = isa == "avx2" and bits == 4  # the prompt kernel takes the tiled product of these 5 rows
        for layout, got in (("tiled", _qmatmul_tiled(x, tiled, group_size, bits, isa)),
                            ("mlx", kernels.qmatmul(x, *mlx, group_size, bits, isa=isa))):  # fmt: skip
            err = (got.double() - want).abs()
            limit = x_rounding_bound(x, w, group_size, 127) if int8 and layout == "tiled" else bound
            assert (err <= limit).all(), f"{isa} {layout}: error {(err / limit).max():.3g}x the bound"
        for batch in (1, 3) if int8 else (1, 5):  # one row (decode) and several: both layouts sum the same int16 x
            assert torch.allclose(_qmatmul_tiled(x[:batch], tiled, group_size, bits, isa),
                                  kernels.qmatmul(x[:batch], *mlx, group_size, bits, isa=isa), rtol=1e-5, atol=1e-5)  # fmt: skip


def test_tiled_kernels_are_a_different_path_from_the_portable_loop():
    """Forcing an ISA with tiled kernels (AVX2, AVX-512) runs them, not the float32 loop: their int16 x rounds."""
    torch = pytest.importorskip("torch")
    _, tiled, _ = _tiled(32, 256, 64, 4, "bfloat16")
    x = torch.randn(1, 256, generator=torch.Generator().manual_seed(0))
    scalar = _qmatmul_tiled(x, tiled, 64, 4, "scalar")
    simd = [isa for isa in kernels.cpu_isas() if isa in ("avx2", "avx512")]
    if not simd:
        pytest.skip("no tiled kernels on this CPU")
    assert kernels.tiled_fast()
    for isa in simd:
        got = _qmatmul_tiled(x, tiled, 64, 4, isa)
        assert not torch.equal(got, scalar), isa
        assert torch.allclose(got, scalar, rtol=1e-3, atol=1e-3), isa


@pytest.mark.parametrize("group_size", [16, 32])
@pytest.mark.parametrize("bits", BITS)
def test_k_quant_codes_keep_the_stated_error_bound(bits, group_size):
    """Groups of 16 (GGUF's Q6_K, Q3_K, Q2_K as read) at every width, and 2/3/5/6-bit codes in groups of 32 (Q5_0,
    Q5_K), run SIMD kernels (qmatmul_k.cpp on AVX2, forced one by one) with the bound of the test above, per output,
    against float64 dequantize-then-matmul; one x row (decode) and several, float32 and float16 scales, and a last
    row whose codes end the buffer. They are not the scalar loop (their int16 x rounds)."""
    rng = np.random.default_rng(bits * group_size)
    rows, cols = 37, 6 * group_size + 64
    codes = rng.integers(0, 2**bits, (rows, cols), dtype=np.uint8)
    wq = kernels.pack(codes, bits)
    for dtype in (np.float32, np.float16):
        scales = (rng.random((rows, cols // group_size)) * 0.01 + 1e-3).astype(dtype)
        biases = (-rng.random((rows, cols // group_size)) * 0.05).astype(dtype)
        w = codes * np.repeat(scales.astype(np.float64), group_size, 1) + np.repeat(biases.astype(np.float64), group_size, 1)
        x = rng.standard_normal((5, cols)).astype(np.float32)
        x[0, 1] = 40.0
        want = x.astype(np.float64) @ w.T
        step = np.abs(x).astype(np.float64).reshape(5, -1, group_size).max(-1) / 32639
        scaled = (codes * np.repeat(np.abs(scales.astype(np.float64)), group_size, 1)).reshape(rows, -1, group_size)
        bound = (step / 2) @ scaled.sum(-1).T + 1e-6 * (np.abs(x).astype(np.float64) @ np.abs(w).T)
        for isa in simd_isas():
            for batch in (1, 5):
                got = kernels.qmatmul(x[:batch], wq, scales, biases, group_size, bits, isa=isa)
                err = np.abs(got - want[:batch])
                assert (err <= bound[:batch]).all(), f"{isa} batch {batch}: error {(err / bound[:batch]).max():.3g}x the bound"
                if isa != "scalar" and (group_size == 16 or bits not in (4, 8)):
                    assert not np.array_equal(got, kernels.qmatmul(x[:batch], wq, scales, biases, group_size, bits, isa="scalar"))
