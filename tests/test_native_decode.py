"""The C++ decode step (llmctl._C.NativeDecoder) against the torch path it replaces for one token of batch 1.

Every family it covers, float32/bfloat16/float16 weights, quantized layers (affine 4/8-bit, NF4, a quantized tied
embedding), Mistral's sliding window, a cache that grows past its first chunk, and threads. The greedy tests in
test_generate.py hold it to `transformers` token for token as well.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from conftest import FAMILY_CONFIGS, make_hf_model
from llmctl.backends import get_backend
from llmctl.backends.torch.generate import Generator, NativeStep
from llmctl.backends.torch.model import CACHE_CHUNK, make_cache, prepare_inference

PROMPT = [1, 17, 42, 7, 99, 3, 250, 12, 31]
STEPS = [5, 200, 64, 9, 77, 130]


def model_of(folder: Path, dtype: str = "float32"):
    loaded = get_backend("torch").load(folder, dtype=dtype)
    return loaded.module if hasattr(loaded, "module") else loaded


@torch.inference_mode()
def step_logits(model, native: bool, prompt=PROMPT, steps=STEPS, threads: int = 1) -> torch.Tensor:
    """Float32 logits of each token in `steps`, decoded one by one after `prompt` went through the model's forward:
    by the C++ step on `threads` threads, or (`native` False) by the model's forward too."""
    generator = Generator(model)
    assert generator.native is not None, "this model should run the C++ step"
    if not native:
        generator.native = None
    cache = generator.new_cache().layers
    generator.forward(torch.tensor([prompt]), cache, last_only=True)
    return torch.stack([generator.forward(torch.tensor([[t]]), cache, threads=threads)[0, -1].float() for t in steps])


def assert_close(got: torch.Tensor, want: torch.Tensor, rel: float, what: str) -> None:
    err, bound = (got - want).abs().max().item(), rel * max(1.0, want.abs().max().item())
    assert err <= bound, f"{what}: max difference {err:.3g} > {bound:.3g}"


@pytest.fixture(scope="module", params=[f for f in FAMILY_CONFIGS if f != "mixtral"])
def family_folder(request, tmp_path_factory) -> tuple[str, Path]:
    folder = tmp_path_factory.mktemp(request.param)
    make_hf_model(request.param, folder, seed=1, scale=2.0)
    return request.param, folder


def test_float32_step_equals_the_torch_path(family_folder):
    name, folder = family_folder
    model = model_of(folder)
    # Mistral's window (5) is shorter than prompt + steps: positions fall out of it on both paths
    assert_close(step_logits(model, True), step_logits(model, False), 1e-5, name)


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_half_weights_are_read_as_stored(family_folder, dtype):
    """The step keeps activations in float32: it equals the torch path run in float32 on the same (rounded) weights."""
    name, folder = family_folder
    half = model_of(folder, dtype)
    reference = model_of(folder, dtype)
    with torch.no_grad():
        for p in reference.parameters():
            p.data = p.data.float()
    # every token through the step (a torch prefill would fill the cache from half-precision activations)
    got = step_logits(half, True, PROMPT[:1], PROMPT[1:] + STEPS)
    want = step_logits(reference, False, PROMPT[:1], PROMPT[1:] + STEPS)
    assert_close(got, want, 1e-4, f"{name} {dtype}")


def _quantize(source: Path, out: Path, *overrides: str) -> Path:
    from llmctl.commands.quantize import QuantizeConfig, run
    from llmctl.config import load_recipe

    cfg = load_recipe(QuantizeConfig, "quantize", "default", list(overrides), {"model": str(source), "out": out})
    return run(cfg, "torch")


@pytest.mark.parametrize(
    "overrides",
    [
        ("quant.bits=4", "quant.group_size=32"),
        ("quant.bits=8", "quant.group_size=64"),
        ("quant.bits=3", "quant.group_size=32"),
        ("quant.method=nf4", "quant.group_size=32"),
        ("quant.bits=4", "quant.group_size=32", "quant.keep="),  # embeddings and head quantized too (tied for qwen2)
    ],
    ids=["4bit", "8bit", "3bit", "nf4", "4bit-all"],
)
def test_quantized_step_equals_the_torch_path(family_folder, overrides, tmp_path):
    name, folder = family_folder
    model = model_of(_quantize(folder, tmp_path / "q", *overrides))
    # both run qmatmul on float32 x, but x differs by rounding, which its int16 steps of x can magnify:
    # the bar for one quantized folder on two backends
    assert_close(step_logits(model, True), step_logits(model, False), 1e-3, f"{name} {overrides}")


def test_the_cache_grows_past_its_first_chunk(tmp_path):
    make_hf_model("llama", tmp_path, seed=2, scale=2.0, max_position_embeddings=2 * CACHE_CHUNK)
    model = model_of(tmp_path)
    prompt = list(range(1, CACHE_CHUNK - 2))
    steps = [(7 * i) % 250 + 1 for i in range(6)]  # crosses position CACHE_CHUNK
    assert_close(step_logits(model, True, prompt, steps), step_logits(model, False, prompt, steps), 1e-5, "growth")


def test_threads_do_not_change_the_result(family_folder):
    _, folder = family_folder
    model = model_of(folder)
    before = torch.get_num_threads()
    one, two = step_logits(model, True, threads=1), step_logits(model, True, threads=2)
    assert torch.equal(one, two)
    assert torch.get_num_threads() == before  # the count reaches the kernels per call, torch's is left alone  # each output row is summed by one thread, in the same order


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_rows_split_unevenly_over_threads_sum_alike(tmp_path, dtype):
    """Matrices big enough for two threads (a head of 2003 x 64: 8 tasks of 250-251 rows): each thread's rows run as
    four streams and the rows left over as one; every row sums in the same order however the rows fall."""
    make_hf_model("llama", tmp_path, seed=3, scale=2.0, vocab_size=2003)
    model = model_of(tmp_path, dtype)
    assert torch.equal(step_logits(model, True, threads=1), step_logits(model, True, threads=2))


@pytest.mark.parametrize("bits", [4, 8])
def test_tiled_rows_split_unevenly_over_threads_sum_alike(tmp_path, bits):
    """A quantized head of 123 tiles (1968 x 64, tiled where the CPU has tiled kernels): one thread reads tiles 0-60
    and 61-121 as two streams and 122 alone; two threads' first range leaves tile 60 over. The logits are the same
    bit for bit (they differ when the left-over tiles sum in another order)."""
    make_hf_model("llama", tmp_path / "f", seed=3, scale=2.0, vocab_size=1968)
    model = model_of(_quantize(tmp_path / "f", tmp_path / "q", f"quant.bits={bits}", "quant.group_size=32"))
    assert torch.equal(step_logits(model, True, threads=1), step_logits(model, True, threads=2))


@pytest.mark.parametrize("bits", [None, 4, 8], ids=["float32", "4bit", "8bit"])
def test_each_isa_this_cpu_runs_gives_the_torch_path_s_logits(bits, tmp_path, monkeypatch):
    """LLMCTL_ISA picks the step's kernels (products, attention, activations) as it picks qmatmul's: every path this
    CPU runs is held to the torch path, on a CPU that has a faster one."""
    from llmctl import kernels

    make_hf_model("llama", tmp_path / "f", seed=3, scale=2.0)
    folder = tmp_path / "f" if bits is None else _quantize(tmp_path / "f", tmp_path / "q", f"quant.bits={bits}", "quant.group_size=32")
    results = {}
    for isa in kernels.cpu_isas():
        monkeypatch.setenv("LLMCTL_ISA", isa)
        model = model_of(folder)
        assert Generator(model).native.isa == kernels.ISAS.index(isa)
        results[isa] = step_logits(model, True)
        assert_close(results[isa], step_logits(model, False), 1e-5 if bits is None else 1e-3, f"{isa} bits={bits}")
    assert len(results) >= 2  # scalar and this CPU's SIMD
    # and they are different paths: their sums round differently (the SIMD ones also step x to int16 for codes)
    assert not torch.equal(results["scalar"], results[kernels.cpu_isas()[-1]])


def test_what_it_does_not_cover_runs_on_torch(tmp_path, monkeypatch):
    make_hf_model("mixtral", tmp_path / "moe", seed=0)
    assert NativeStep.build(model_of(tmp_path / "moe")) is None  # mixture of experts
    make_hf_model("llama", tmp_path / "dense", seed=0)
    monkeypatch.setenv("LLMCTL_NATIVE_DECODE", "0")
    assert NativeStep.build(model_of(tmp_path / "dense")) is None  # turned off


def test_bad_arguments_raise_instead_of_crashing(tmp_path):
    make_hf_model("llama", tmp_path, seed=0)
    model = model_of(tmp_path)
    step = Generator(model).native
    cache = make_cache(model.spec, torch.float32)
    with pytest.raises(ValueError, match="outside the vocabulary"):
        step(model.spec.vocab_size, cache, 1)
    with pytest.raises(ValueError, match="one key and one value cache per layer"):
        step(3, cache[:1], 1)


@pytest.mark.parametrize("bits", [3, 4, 5, 8])
def test_tiled_layers_give_the_logits_of_mlx_s_layout(family_folder, bits, tmp_path):
    """Loading rearranges affine 4-/8-bit layers into the tiled layout in place (`prepare_inference`), 3-bit ones
    widened to 4 bits and 5-/6-bit ones to 8 (TILED_BITS); the logits are those of the same model put back in MLX's
    layout, and the state dict still holds the folder's tensors (narrowed back: bit for bit)."""
    from safetensors.torch import load_file

    from llmctl import _C
    from llmctl.backends.torch.quant import TILED_BITS, QuantizedLinear

    if not _C.tiled_fast():
        pytest.skip("this CPU has no tiled kernels (AVX-512 VNNI): the layers stay in MLX's layout")
    name, folder = family_folder
    quantized = _quantize(folder, tmp_path / "q", f"quant.bits={bits}", "quant.group_size=64", "quant.keep=")
    tiled = model_of(quantized)
    got = step_logits(tiled, True)
    # every layer at `bits` (the head takes max(bits, 6) bits, widened to 8 where its rows fill whole tiles)
    layers = [m for m in tiled.modules() if type(m) is QuantizedLinear and m.bits == bits]
    assert layers and all(m.tiled and m.codes_bits == TILED_BITS[bits] for m in layers), f"{name}: {[m.tiled for m in layers]}"

    plain = model_of(quantized)
    for layer in plain.modules():
        if isinstance(layer, QuantizedLinear):
            layer.untile()  # the fused products made at load no longer hold: each layer runs on its own
    assert not any(getattr(m, "tiled", False) for m in plain.modules())
    want = step_logits(plain, False)
    assert_close(got, want, 1e-3, f"{name} {bits}-bit tiled")
    # a tied head's table (max(bits, 6) bits) is tiled in 8-bit codes, and its rows are looked up from the tiles
    embed, tokens = tiled.model.embed_tokens, torch.arange(tiled.spec.vocab_size).flip(0)
    assert embed.tiled == tiled.spec.tie_embeddings, name
    assert torch.equal(embed(tokens), plain.model.embed_tokens(tokens)), name

    stored = {}
    for file in quantized.glob("*.safetensors"):
        stored.update(load_file(file))
    state = tiled.state_dict()
    compared = [k for k in state if k.endswith((".weight", ".scales", ".biases")) and k.rsplit(".", 1)[0] + ".scales" in stored]
    assert len(compared) >= 3 * len(layers)
    for key in compared:
        assert torch.equal(state[key], stored[key]), key
    tiled.float()  # a move or cast gives MLX's layout back, which the step reads as it is
    assert not any(m.tiled for m in layers)
    want = step_logits(plain.float(), False)  # float32 scales now: products no longer rounded to float16
    assert_close(step_logits(tiled, True), want, 1e-3, f"{name} {bits}-bit untiled by a cast")
    prepare_inference(tiled)  # and tiles again
    assert all(m.tiled for m in layers)
    assert_close(step_logits(tiled, True), want, 1e-3, f"{name} {bits}-bit tiled again")
    assert all(m.tiled for m in layers)
    plain.load_state_dict(state)  # and it loads back as it should
    for layer in layers:  # loading into a tiled model puts MLX's layout back first
        layer.load_state_dict({k: v.clone() for k, v in layer.state_dict().items()})
        assert not layer.tiled


@pytest.mark.parametrize(
    "heads", [(4, 2, 64), (3, 1, 128), (6, 1, 64)], ids=["2-per-kv-head-dim64", "3-per-kv-head-dim128", "6-per-kv-head"]
)
def test_grouped_attention_equals_the_torch_path(heads, tmp_path, monkeypatch):
    """Head sizes the step's grouped attention kernels cover (AVX-512 and AVX2: 64 or 128 wide, 1-4 query heads per
    KV head; 6 is past them and takes the per-head loop), over a hundred cached positions (so attention runs on every
    thread), on every ISA path this CPU runs (the AVX2 one also brings its own exp to softmax and SwiGLU)."""
    from llmctl import kernels

    n_heads, n_kv, head_dim = heads
    make_hf_model("llama", tmp_path, seed=3, scale=2.0, hidden_size=n_heads * head_dim, num_attention_heads=n_heads,
                  num_key_value_heads=n_kv, intermediate_size=256)  # fmt: skip
    model = model_of(tmp_path)
    prompt = [(13 * i) % 250 + 1 for i in range(120)]
    want = step_logits(model, False, prompt)
    for isa in kernels.cpu_isas():
        monkeypatch.setenv("LLMCTL_ISA", isa)
        assert_close(step_logits(model, True, prompt), want, 1e-4, f"heads {heads} on {isa}")
