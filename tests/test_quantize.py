"""llmctl quantize and quantized folders: backend parity, mlx-lm compatibility, NF4, --keep, GGUF output, bad input."""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from conftest import make_hf_model
from llmctl.backends import get_backend
from llmctl.cli import app
from llmctl.commands.quantize import QuantizeConfig, run
from llmctl.config import load_recipe

TOKENS = [[1, 17, 42, 7, 3, 99, 250, 12]]
runner = CliRunner()


def quantize(model: Path, out: Path, *overrides: str) -> Path:
    cfg = load_recipe(QuantizeConfig, "quantize", "default", list(overrides), {"model": str(model), "out": out})
    return run(cfg, "torch")


def assert_parity(got: np.ndarray, want: np.ndarray, what: str) -> None:
    """max|a - b| <= 1e-3 * max(1, max|b|), the issue's bar for one folder on two backends."""
    err, bound = np.abs(got - want).max(), 1e-3 * max(1.0, np.abs(want).max())
    assert err <= bound, f"{what}: max difference {err:.3g} > {bound:.3g}"


@pytest.fixture(scope="module")
def llama(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("llama") / "float"
    make_hf_model("llama", folder, rope_theta=10000.0, rope_scaling=None)
    return folder


@pytest.fixture(scope="module")
def tied(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("tied") / "float"
    make_hf_model("llama", folder, rope_theta=10000.0, rope_scaling=None, tie_word_embeddings=True)
    return folder


METHODS = {
    "rtn4": ("quant.bits=4",),
    "rtn8": ("quant.bits=8",),
    "rtn3-g32": ("quant.bits=3", "quant.group_size=32"),
    "nf4": ("quant.method=nf4",),
    "nf4-dq": ("quant.method=nf4", "quant.double_quant=true"),
}


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("model", ["llama", "tied"])
def test_same_folder_same_logits_on_torch_and_mlx(method, model, request, tmp_path):
    pytest.importorskip("mlx.core")
    source = request.getfixturevalue(model)
    out = quantize(source, tmp_path / "q", *METHODS[method], "quant.keep=")  # embeddings and head quantized too
    config = json.loads((out / "config.json").read_text())
    assert config["quantization"] == config["quantization_config"]
    assert config["quantization"]["mode" if "nf4" in method else "bits"] == ("nf4" if "nf4" in method else int(METHODS[method][0][-1]))
    torch_logits = get_backend("torch").load(out).logits(TOKENS)
    mlx_logits = get_backend("mlx").load(out).logits(TOKENS)
    assert_parity(torch_logits, mlx_logits, f"{method} {model}")
    float_logits = get_backend("torch").load(source).logits(TOKENS)
    assert np.abs(torch_logits - float_logits).max() < 0.5 * np.abs(float_logits).max()  # close, not equal
    assert np.abs(torch_logits - float_logits).max() > 0


def test_quantized_tensors_are_identical_from_both_backends(llama):
    pytest.importorskip("mlx.core")
    from llmctl.backends.mlx.quant import quantize_tensors as mlx_quantize
    from llmctl.backends.torch.quant import quantize_tensors as torch_quantize
    from llmctl.io.model_folder import read_model
    from llmctl.quant import QuantParams

    tensors = read_model(llama).tensors
    for params in (QuantParams(64, 4), QuantParams(32, 6), QuantParams(64, 4, "nf4", double_quant=True)):
        layers = {"model.layers.0.mlp.up_proj": params, "model.embed_tokens": params}
        a, b = torch_quantize(tensors, layers), mlx_quantize(tensors, layers)
        assert a.keys() == b.keys()
        for name in a:
            assert a[name].dtype == b[name].dtype and np.array_equal(a[name].data, b[name].data), f"{params} {name}"


@pytest.mark.parametrize("bits", (4, 8))
@pytest.mark.parametrize("keep", ([], ["model.embed_tokens", "lm_head"]), ids=("default", "float-embeddings-and-head"))
def test_mlx_lm_loads_our_folder_with_the_same_logits(bits, keep, tied, llama, tmp_path):
    """mlx-lm reads the per-layer entries (the head at max(bits, 6) bits) and gets the logits llmctl gets."""
    mx = pytest.importorskip("mlx.core")
    utils = pytest.importorskip("mlx_lm.utils")
    for source in (llama, tied):
        out = quantize(source, tmp_path / source.parent.name, f"quant.bits={bits}", f"quant.keep={','.join(keep)}")
        model, config = utils.load_model(out)
        assert config["quantization"]["bits"] == bits
        head = model.model.embed_tokens if source is tied else model.lm_head
        assert getattr(head, "bits", None) == (None if keep else max(bits, 6))
        theirs = np.array(model(mx.array(TOKENS)).astype(mx.float32))
        ours = get_backend("mlx").load(out).logits(TOKENS)
        assert_parity(ours, theirs, f"mlx_lm {source.parent.name}")
        assert_parity(get_backend("torch").load(out).logits(TOKENS), theirs, f"torch vs mlx_lm {source.parent.name}")


@pytest.mark.parametrize("model", ["llama", "tied"])
def test_default_quantizes_every_matrix_head_at_six_bits_with_16_bit_scales(model, request, tmp_path):
    """`--bits 4`: embeddings too; the output head (a tied embedding once) at 6 bits; float16 scales and biases for
    a float32 source; per-layer entries in config.json as mlx-lm writes them; smaller than keeping them in float."""
    from llmctl.io.safetensors import load_folder_tensors

    source = request.getfixturevalue(model)
    out = quantize(source, tmp_path / "q", "quant.bits=4")
    head = "model.embed_tokens" if model == "tied" else "lm_head"
    config = json.loads((out / "config.json").read_text())
    assert config["quantization"] == {"group_size": 64, "bits": 4, head: {"group_size": 64, "bits": 6}}
    tensors = load_folder_tensors(out)
    floats = load_folder_tensors(source)
    matrices = [n for n, t in floats.items() if n.endswith(".weight") and len(t.shape) == 2]
    assert ("lm_head.weight" in matrices) == (model == "llama")
    for name in matrices:
        module = name.removesuffix(".weight")
        assert tensors[name].dtype == "U32", name
        assert tensors[module + ".scales"].dtype == tensors[module + ".biases"].dtype == "F16", name
        bits = 6 if module == head else 4
        assert tensors[name].shape == (floats[name].shape[0], floats[name].shape[1] * bits // 32), name
    kept = quantize(source, tmp_path / "kept", "quant.bits=4", "quant.keep=model.embed_tokens,lm_head")
    assert "model.embed_tokens.scales" not in load_folder_tensors(kept)
    size = sum(f.stat().st_size for f in out.glob("*.safetensors"))
    assert size < sum(f.stat().st_size for f in kept.glob("*.safetensors"))
    logits = get_backend("torch").load(out).logits(TOKENS)
    reference = get_backend("torch").load(source).logits(TOKENS)
    assert 0 < np.abs(logits - reference).max() < 0.2 * np.abs(reference).max()
    same = quantize(source, tmp_path / "same", "quant.bits=4", "quant.head_bits=4")  # the head at --bits, as asked
    assert json.loads((same / "config.json").read_text())["quantization"] == {"group_size": 64, "bits": 4}


def test_we_load_a_folder_mlx_lm_quantized(llama, tmp_path):
    pytest.importorskip("mlx.core")
    utils = pytest.importorskip("mlx_lm.utils")
    model, config = utils.load_model(llama)
    model, config = utils.quantize_model(model, config, group_size=32, bits=4)  # embeddings and head too
    utils.save_model(tmp_path / "mlx", model)
    utils.save_config(config, tmp_path / "mlx" / "config.json")
    import mlx.core as mx

    theirs = np.array(model(mx.array(TOKENS)).astype(mx.float32))
    for name in ("torch", "mlx"):
        assert_parity(get_backend(name).load(tmp_path / "mlx").logits(TOKENS), theirs, name)


def test_saving_a_loaded_quantized_model_keeps_the_layout(llama, tmp_path):
    out = quantize(llama, tmp_path / "q", "quant.bits=8")
    model = get_backend("torch").load(out)
    model.save(tmp_path / "again")
    again = get_backend("torch").load(tmp_path / "again")
    np.testing.assert_array_equal(again.logits(TOKENS), model.logits(TOKENS))
    assert json.loads((tmp_path / "again" / "config.json").read_text())["quantization"]["bits"] == 8


def test_keep_patterns_and_widths_that_do_not_fit(tmp_path):
    source = tmp_path / "float"
    make_hf_model("llama", source, intermediate_size=96)  # down_proj reads 96 features: not a multiple of 64
    result = runner.invoke(app, ["quantize", "--model", str(source), "--out", str(tmp_path / "q"), "--keep", "*.self_attn.o_proj"])
    assert result.exit_code == 0, result.output
    assert "model.layers.0.mlp.down_proj is left in float" in result.output
    assert "kept in float: model.layers.0.self_attn.o_proj, model.layers.1.self_attn.o_proj" in result.output
    from llmctl.io.safetensors import load_folder_tensors

    tensors = load_folder_tensors(tmp_path / "q")
    assert tensors["model.layers.0.mlp.down_proj.weight"].dtype == "F32" and "model.layers.0.mlp.down_proj.scales" not in tensors
    assert tensors["model.layers.1.self_attn.o_proj.weight"].dtype == "F32"
    assert tensors["model.layers.0.mlp.up_proj.weight"].dtype == "U32"
    assert tensors["model.embed_tokens.weight"].dtype == "U32"  # --keep replaced the default (embeddings, head)
    assert tensors["model.embed_tokens.scales"].shape == (256, 1)
    for name in ("torch", "mlx") if "mlx" in sys.modules or _has_mlx() else ("torch",):
        assert get_backend(name).load(tmp_path / "q").logits(TOKENS).shape == (1, 8, 256)


def _has_mlx() -> bool:
    import importlib.util

    return importlib.util.find_spec("mlx") is not None


def test_summary_reports_size_bits_and_time(llama, tmp_path):
    result = runner.invoke(app, ["quantize", "--model", str(llama), "--out", str(tmp_path / "q"), "--bits", "8", "--group-size", "32"])
    assert result.exit_code == 0, result.output
    assert "layers quantized in" in result.output and "9.000 bits per quantized weight" in result.output  # 8 + 2 * 16 / 32 (float16 scales and biases)
    assert (tmp_path / "q" / "llmctl_quantize.yaml").is_file()
    assert "bits: 8" in (tmp_path / "q" / "llmctl_quantize.yaml").read_text()


def test_nf4_double_quant_stores_8_bit_scales(llama, tmp_path):
    from llmctl.io.safetensors import load_folder_tensors
    from llmctl.quant.nf4 import double_dequantize, double_quantize

    out = quantize(llama, tmp_path / "q", "quant.method=nf4", "quant.double_quant=true")
    tensors = load_folder_tensors(out)
    assert tensors["model.layers.0.mlp.up_proj.scales"].dtype == "U8"
    assert {"model.layers.0.mlp.up_proj.scales_absmax", "model.layers.0.mlp.up_proj.scales_offset"} <= tensors.keys()
    assert "model.layers.0.mlp.up_proj.biases" not in tensors
    assert json.loads((out / "config.json").read_text())["quantization"] == {"group_size": 64, "bits": 4, "mode": "nf4", "double_quant": True}
    scales = np.random.default_rng(0).uniform(0.01, 0.2, (300, 7)).astype(np.float32)
    rebuilt = double_dequantize(*double_quantize(scales))
    assert np.abs(rebuilt - scales).max() <= (scales.max() - scales.min()) / 254 + 1e-7


def _digest(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


def test_bad_input_is_refused_clearly_and_the_source_is_untouched(llama, tmp_path):
    before = _digest(llama)
    quantized = quantize(llama, tmp_path / "q4")
    (tmp_path / "exists").mkdir()
    cases = [
        (["--bits", "7"], "--bits 7 is not supported; choose one of 2, 3, 4, 5, 6, 8"),
        (["--group-size", "48"], "--group-size 48 is not supported; choose one of 32, 64, 128"),
        (["--method", "nf4", "--bits", "8"], "--method nf4 stores 4 bits per weight"),
        (["--double-quant"], "--double-quant applies to --method nf4 only"),
        (["--method", "gptq", "--calib", str(tmp_path / "missing.txt")], "missing.txt: no such file or folder"),
    ]
    for args, message in cases:
        result = runner.invoke(app, ["quantize", "--model", str(llama), "--out", str(tmp_path / "o"), *args])
        assert result.exit_code == 1 and message in result.output, (args, result.output)
    result = runner.invoke(app, ["quantize", "--model", str(quantized), "--out", str(tmp_path / "o")])
    assert result.exit_code == 1 and "is already quantized" in result.output
    assert f"llmctl convert {quantized} --out" in result.output and "--dtype fp32" in result.output
    result = runner.invoke(app, ["quantize", "--model", str(llama), "--out", str(tmp_path / "exists")])
    assert result.exit_code == 1 and "already exists" in result.output and "--force" in result.output
    result = runner.invoke(app, ["quantize", "--model", str(llama), "--out", str(tmp_path / "exists"), "--force"])
    assert result.exit_code == 0 and (tmp_path / "exists" / "config.json").is_file()
    assert _digest(llama) == before
    assert not (tmp_path / "o").exists()


def test_gguf_output(llama, tmp_path):
    gguf = pytest.importorskip("gguf")
    out = tmp_path / "model.gguf"
    result = runner.invoke(app, ["quantize", "--model", str(llama), "--type", "q8_0", "--out", str(out)])
    assert result.exit_code == 0, result.output
    reader = gguf.GGUFReader(out)
    types = {t.name: t.tensor_type.name for t in reader.tensors}
    assert types["blk.0.ffn_up.weight"] == "Q8_0"
    tensor = next(t for t in reader.tensors if t.name == "blk.0.ffn_up.weight")
    got = gguf.quants.dequantize(tensor.data, tensor.tensor_type)
    from llmctl.io.safetensors import load_folder_tensors

    want = load_folder_tensors(llama)["model.layers.0.mlp.up_proj.weight"].data
    assert got.shape == want.shape
    step = np.abs(want.reshape(-1, 32)).max(-1, keepdims=True) / 127  # Q8_0: blocks of 32, absmax / 127
    assert (np.abs(got.reshape(-1, 32) - want.reshape(-1, 32)) <= 0.6 * step).all()  # half a step, d in float16


def test_torch_quantized_linear_passes_gradients_to_its_input():
    torch = pytest.importorskip("torch")
    from llmctl import kernels
    from llmctl.backends.torch.quant import QuantizedLinear
    from llmctl.quant import QuantParams

    layer = QuantizedLinear(128, 24, True, QuantParams(64, 4))
    w = torch.randn(24, 128, generator=torch.Generator().manual_seed(0)) * 0.05
    layer.weight, layer.scales, layer.biases = kernels.quantize(w, 64, 4)
    layer.bias.data.fill_(0.5)
    x = torch.randn(3, 128, requires_grad=True)
    y = layer(x)
    dense = layer.dequantized()
    torch.testing.assert_close(y, x.detach() @ dense.T + 0.5, atol=1e-3, rtol=1e-3)
    y.square().sum().backward()
    torch.testing.assert_close(x.grad, (2 * y.detach()) @ dense, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("tiled", [False, True], ids=["mlx-layout", "tiled"])
@pytest.mark.parametrize("x_dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_torch_quantized_linear_prompt_path_matches_kernel_rows(dtype, x_dtype, tiled):
    """A prompt (at least DEQUANTIZED_ROWS rows) multiplies by blocks of dequantized weights (bfloat16 x on AVX2's
    tiled layout: by the int16 prompt kernel, test_qtiled_prompt); each of its rows equals that row through the
    one-row kernel (1e-3 of the largest output), and float32 dequantize-then-matmul (1e-5).
    bfloat16 x, on a CPU with bfloat16 products, multiplies the weights rounded to bfloat16: then the bars are those
    of bfloat16 outputs (8e-3: two roundings of 2^-9), against the same product done in float32 on rounded inputs."""
    torch = pytest.importorskip("torch")
    from llmctl import kernels
    from llmctl.backends.torch import quant
    from llmctl.quant import QuantParams

    gen = torch.Generator().manual_seed(0)
    # more than one block, and a ragged last one (whole tiles of 16 rows for the tiled layout)
    out_features = quant.DEQUANTIZED_BLOCK // 192 // 16 * 16 + 48 if tiled else quant.DEQUANTIZED_BLOCK // 192 + 37
    layer = quant.QuantizedLinear(192, out_features, False, QuantParams(64, 4))
    w = (torch.randn(out_features, 192, generator=gen) * 0.05).to(getattr(torch, dtype))
    layer.weight, layer.scales, layer.biases = kernels.quantize(w, 64, 4)
    # each weight as code * scale + bias in float32 (dequantized() rounds them to the scales' dtype, as MLX does)
    w32 = kernels.dequantize(layer.weight, layer.scales.float(), layer.biases.float(), 64, 4)
    if tiled:
        if not layer.can_tile():
            pytest.skip("this CPU has no tiled kernels (AVX-512 VNNI)")
        assert layer.tile()
    x = torch.randn(2, quant.DEQUANTIZED_ROWS, 192, generator=gen).to(getattr(torch, x_dtype))
    with torch.no_grad():
        y = layer(x)
        rows = torch.stack([layer(row[None]) for row in x.reshape(-1, 192)]).reshape(y.shape)
        low = x_dtype == "bfloat16" and quant._bf16_products()
        dense = x.float() @ (w32.bfloat16().float() if low else w32).T
    assert y.shape == (2, quant.DEQUANTIZED_ROWS, out_features) and y.dtype == x.dtype
    y, rows = y.float(), rows.float()
    bar = 8e-3 if x_dtype == "bfloat16" else 1e-3
    assert float((y - rows).abs().max()) <= bar * float(rows.abs().max())
    assert float((y - dense).abs().max()) <= (8e-3 if x_dtype == "bfloat16" else 1e-5) * float(dense.abs().max())
