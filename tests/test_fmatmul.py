"""Dense float products of few rows (kernels.fmatmul, csrc/fmatmul.h) on every ISA path this CPU runs, and the decode
paths that use them (the C++ step and the torch model's few-row products) against the model module in torch."""

from __future__ import annotations

import pytest
import torch

from conftest import make_hf_model
from llmctl import kernels
from llmctl.backends import get_backend
from llmctl.backends.torch import model as torch_model
from llmctl.backends.torch.generate import Generator

pytestmark = pytest.mark.usefixtures("one_thread")

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# (out, in): in not a multiple of 8 or 16, out not a multiple of the 4-row blocks, one row, one value
SHAPES = [(37, 77), (13, 200), (1, 9), (6, 1), (64, 96)]


def bound(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """fmatmul.h's error bound of each output: in * 2^-24 * sum |w x| (the weights and x convert exactly)."""
    return w.shape[1] * 2.0**-24 * (x.double().abs() @ w.double().abs().T)


@pytest.mark.parametrize("dtype", DTYPES, ids=["float32", "float16", "bfloat16"])
def test_each_isa_multiplies_within_the_stated_bound(dtype):
    g = torch.Generator().manual_seed(0)
    for out, inputs in SHAPES:
        w = torch.randn(out, inputs, generator=g).to(dtype)
        for batch in (1, 2, 3, 4, 7):  # every block of x rows (1-4) and a second block
            x = torch.randn(batch, inputs, generator=g)
            exact = x.double() @ w.double().T
            for isa in kernels.cpu_isas():
                got = kernels.fmatmul(x, w, isa=kernels.ISAS.index(isa))
                err = (got.double() - exact).abs()
                assert (err <= bound(x, w)).all(), f"{isa} {dtype} {out}x{inputs} batch {batch}: {err.max():.3g}"
                # and against torch's own float32 product, each within the bound of the exact one
                torch.testing.assert_close(got, x @ w.float().T, rtol=0, atol=2 * bound(x, w).max().item() + 1e-30)


def test_a_wrong_weight_or_a_dropped_tail_is_outside_the_bound():
    """The bound is tight enough to catch a kernel that skips the last values of a row (in 77: 5 past the vectors)."""
    g = torch.Generator().manual_seed(1)
    w, x = torch.randn(37, 77, generator=g), torch.randn(3, 77, generator=g)
    short = x.clone()
    short[:, 72:] = 0
    assert ((short.double() @ w.double().T - x.double() @ w.double().T).abs() > bound(x, w)).any()


def test_bias_dtypes_and_threads():
    """bias added in float32, y in x's dtype, and the row split over threads changes no bit (one thread per row)."""
    g = torch.Generator().manual_seed(2)
    w, bias = torch.randn(300, 260, generator=g).bfloat16(), torch.randn(300, generator=g).bfloat16()
    x = torch.randn(2, 260, generator=g)
    for isa in kernels.cpu_isas():
        code = kernels.ISAS.index(isa)
        one = kernels.fmatmul(x, w, bias, threads=1, isa=code)
        assert torch.equal(one, kernels.fmatmul(x, w, bias, threads=2, isa=code))
        want = x.double() @ w.double().T + bias.double()
        assert ((one.double() - want).abs() <= bound(x, w) + 2.0**-24 * want.abs()).all(), isa
        half = kernels.fmatmul(x.bfloat16(), w, bias, isa=code)
        assert half.dtype == torch.bfloat16
        assert torch.equal(half, kernels.fmatmul(x.bfloat16().float(), w, bias, threads=1, isa=code).bfloat16())


def test_bad_arguments_are_refused():
    w = torch.randn(8, 16)
    with pytest.raises(kernels.KernelArgumentError, match="contiguous 2-D weight"):
        kernels.fmatmul(torch.randn(1, 16), w.T.contiguous().T)
    with pytest.raises(kernels.KernelArgumentError, match=r"x \(\.\.\., 16\)"):
        kernels.fmatmul(torch.randn(1, 15), w)
    with pytest.raises(kernels.KernelArgumentError, match="bias"):
        kernels.fmatmul(torch.randn(1, 16), w, torch.randn(7))
    with pytest.raises(kernels.KernelArgumentError, match="isa"):
        kernels.fmatmul(torch.randn(1, 16), w, isa=9)


def test_few_rows_take_the_kernels_and_a_prompt_does_not(monkeypatch):
    """On a CPU without bfloat16 arithmetic dense_linear multiplies fewer than WIDENED_ROWS rows of 16-bit weights in
    fmatmul (LLMCTL_ISA picks its path), more in torch; float32 weights take fmatmul for 2-8 rows of x (a server's
    batched step), and one row on AVX2, and torch (oneDNN) for one row elsewhere, more rows, or an x that autograd
    tracks (training)."""
    calls = []
    monkeypatch.setattr(torch_model, "half_products", lambda: False)
    real = kernels.fmatmul
    monkeypatch.setattr(kernels, "fmatmul", lambda *a, **k: calls.append(k["isa"]) or real(*a, **k))
    monkeypatch.setenv("LLMCTL_ISA", "scalar")
    w = torch.randn(24, 40).bfloat16()
    few, many = torch.randn(3, 40).bfloat16(), torch.randn(torch_model.WIDENED_ROWS, 40).bfloat16()
    got = torch_model.dense_linear(few, w)
    assert calls == [kernels.ISAS.index("scalar")] and got.dtype == torch.bfloat16
    torch.testing.assert_close(got, (few.float() @ w.float().T).bfloat16())
    torch_model.dense_linear(many, w)
    torch_model.dense_linear(few[:1].float(), w.float())
    torch_model.dense_linear(torch.randn(torch_model.FEW_FLOAT32_ROWS[1] + 1, 40), w.float())
    tracked = torch_model.dense_linear(few.float().requires_grad_(), w.float())
    assert len(calls) == 1 and tracked.requires_grad
    bias = torch.randn(24)
    got = torch_model.dense_linear(few.float(), w.float(), bias)
    assert len(calls) == 2 and got.dtype == torch.float32
    torch.testing.assert_close(got, few.float() @ w.float().T + bias, rtol=1e-5, atol=1e-5)
    if "avx2" in kernels.cpu_isas():  # one float32 row takes the AVX2 kernels (their four row streams), not oneDNN
        monkeypatch.setenv("LLMCTL_ISA", "avx2")
        got = torch_model.dense_linear(few[:1].float(), w.float())
        assert calls[2:] == [kernels.ISAS.index("avx2")]
        torch.testing.assert_close(got, few[:1].float() @ w.float().T, rtol=1e-5, atol=1e-5)


def model_of(folder, dtype: str):
    loaded = get_backend("torch").load(folder, dtype=dtype)
    return loaded.module if hasattr(loaded, "module") else loaded


@pytest.fixture(scope="module")
def llama_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("llama")
    make_hf_model("llama", folder, seed=4, scale=2.0)
    return folder


@torch.inference_mode()
def decode(model, native: bool, steps: int = 12) -> tuple[list[int], torch.Tensor]:
    """Greedy tokens and their float32 logits after a short prompt, every token through the C++ step (`native`) or
    through the model's forward."""
    generator = Generator(model)
    if not native:
        generator.native = None
    cache = generator.new_cache().layers
    for token in (1, 17, 42, 7):  # one at a time: a prompt's forward would keep 16-bit activations in the cache
        logits = generator.forward(torch.tensor([[token]]), cache)[0, -1].float()
    tokens, rows = [], []
    for _ in range(steps):
        tokens.append(int(logits.argmax()))
        rows.append(logits)
        logits = generator.forward(torch.tensor([[tokens[-1]]]), cache)[0, -1].float()
    return tokens, torch.stack(rows)


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
def test_each_isa_decodes_as_the_model_module(llama_folder, dtype, monkeypatch):
    """The C++ step and the torch model's few-row products (fmatmul) on each ISA path against the model module run
    on torch's own products, in float32 on the same (rounded) weights: greedy tokens equal, logits close."""
    reference = model_of(llama_folder, dtype)
    with torch.no_grad():
        for p in reference.parameters():
            p.data = p.data.float()
    with monkeypatch.context() as torch_only:
        torch_only.setattr(torch_model, "native_products", lambda: False)
        want_tokens, want = decode(reference, native=False)
    for isa in kernels.cpu_isas():
        monkeypatch.setenv("LLMCTL_ISA", isa)
        model = model_of(llama_folder, dtype)
        for native in (True, False):
            tokens, logits = decode(model, native)
            if dtype == "float32" or native:  # activations in float32: only the sums' order differs
                assert tokens == want_tokens, (isa, native)
                assert (logits - want).abs().max() <= 1e-4 * want.abs().max(), (isa, native)
            else:  # the torch path keeps 16-bit activations between its products
                assert tokens[:4] == want_tokens[:4], (isa, native)
