"""`llmctl convert`: folder <-> GGUF by OUT's name, dequantizing with --dtype, what it reports, what it refuses."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from conftest import make_hf_model
from llmctl import kernels
from llmctl.cli import app
from llmctl.io import gguf as G
from llmctl.io.model_folder import read_model, write_model
from llmctl.io.safetensors import RawTensor, load_folder_tensors

gguf = pytest.importorskip("gguf")
TOKENS = [[1, 17, 42, 7, 3, 99, 300]]


def convert(*args: object):
    return CliRunner().invoke(app, ["convert", *map(str, args)])


def digest(path: Path) -> dict[str, str]:
    """Content hash of every file under `path` (or of the file itself)."""
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    return {str(p.relative_to(path.parent)): hashlib.sha256(p.read_bytes()).hexdigest() for p in files}


@pytest.fixture(scope="module")
def float_folder(tmp_path_factory, small_corpus) -> Path:
    """A random Llama (vocab 320) saved by transformers, with a byte-level BPE tokenizer and a chat template."""
    from llmctl.tokenizer import Tokenizer

    folder = tmp_path_factory.mktemp("convert") / "float"
    make_hf_model("llama", folder, seed=1, scale=4.0, vocab_size=320)
    Tokenizer.train_bpe(sorted(small_corpus.glob("*.txt")), vocab_size=300).save(folder)
    return folder


@pytest.fixture(scope="module")
def q4_folder(float_folder) -> Path:
    """The float folder quantized to affine 4-bit groups of 32 with float16 scales (MLX's layout)."""
    folder = read_model(float_folder)
    tensors: dict[str, RawTensor] = {}
    for name, tensor in folder.tensors.items():
        if len(tensor.shape) == 2:
            module = name.removesuffix(".weight")
            packed = kernels.quantize(G.float32_of(tensor).astype(np.float16), 32, 4)
            for suffix, array in zip(("weight", "scales", "biases"), packed):
                tensors[f"{module}.{suffix}"] = RawTensor.from_numpy(array)
        else:
            tensors[name] = tensor
    quant = {"group_size": 32, "bits": 4}
    out = float_folder.parent / "q4"
    write_model(out, folder.spec, tensors, source=float_folder, dtype="float16",
                extra_config={"quantization": quant, "quantization_config": quant})  # fmt: skip
    return out


def torch_logits(model: Path) -> np.ndarray:
    from llmctl.backends import get_backend

    return get_backend("torch").load(model).logits(TOKENS)


def test_folder_to_gguf_and_back_is_exact(float_folder, tmp_path):
    from llmctl.tokenizer import Tokenizer

    before = digest(float_folder)
    result = convert(float_folder, "--out", tmp_path / "m.gguf")
    assert result.exit_code == 0, result.output
    assert "exact: all" in result.output and "lossy" not in result.output
    result = convert(tmp_path / "m.gguf", "--out", tmp_path / "back")
    assert result.exit_code == 0, result.output
    original, back = load_folder_tensors(float_folder), load_folder_tensors(tmp_path / "back")
    assert sorted(back) == sorted(original)
    for name, tensor in original.items():
        np.testing.assert_array_equal(back[name].data, tensor.data, err_msg=name)
    np.testing.assert_array_equal(torch_logits(tmp_path / "back"), torch_logits(float_folder))
    np.testing.assert_array_equal(torch_logits(tmp_path / "m.gguf"), torch_logits(float_folder))
    ours, theirs = Tokenizer.from_dir(tmp_path / "back"), Tokenizer.from_dir(float_folder)
    text = "First Citizen: 12 apples, héllo\n<|im_start|>user\nhi<|im_end|>"
    assert ours.encode(text) == theirs.encode(text) and ours.chat_template == theirs.chat_template
    config = json.loads((tmp_path / "back" / "config.json").read_text())
    assert "quantization" not in config and config["rope_theta"] == config["rope_parameters"]["rope_theta"]
    assert digest(float_folder) == before  # the source is never modified
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary files left


def test_quantized_folder_dequantized_with_dtype(q4_folder, tmp_path):
    before = digest(q4_folder)
    result = convert(q4_folder, "--out", tmp_path / "fp32", "--dtype", "fp32")
    assert result.exit_code == 0, result.output
    assert "float float32 model folder" in result.output and "exact" in result.output
    quantized = load_folder_tensors(q4_folder)
    dequantized = load_folder_tensors(tmp_path / "fp32")
    assert not any(name.endswith((".scales", ".biases")) for name in dequantized)
    for module in (name.removesuffix(".scales") for name in quantized if name.endswith(".scales")):
        got = dequantized[f"{module}.weight"]
        assert got.dtype == "F32"
        np.testing.assert_array_equal(got.data, G.affine_float32(quantized, module, 32, 4), err_msg=module)
    assert "quantization" not in json.loads((tmp_path / "fp32" / "config.json").read_text())
    assert torch_logits(tmp_path / "fp32").shape == (1, len(TOKENS[0]), 320)
    # float16 rounds the float32 values once more: said, and measured
    result = convert(q4_folder, "--out", tmp_path / "fp16", "--dtype", "fp16")
    assert result.exit_code == 0, result.output
    assert "lossy:" in result.output and "moved by at most" in result.output
    assert digest(q4_folder) == before


def test_quantized_folder_to_gguf_is_exact_and_back_to_the_same_folder(q4_folder, tmp_path):
    result = convert(q4_folder, "--out", tmp_path / "q.gguf")
    assert result.exit_code == 0, result.output
    assert "Q4_1" in result.output and "exact" in result.output
    result = convert(tmp_path / "q.gguf", "--out", tmp_path / "q")
    assert result.exit_code == 0, result.output
    original, back = load_folder_tensors(q4_folder), load_folder_tensors(tmp_path / "q")
    assert sorted(back) == sorted(original)
    for name, tensor in original.items():
        assert back[name].dtype == tensor.dtype, name
        np.testing.assert_array_equal(back[name].data, tensor.data, err_msg=name)
    config = json.loads((tmp_path / "q" / "config.json").read_text())
    assert config["quantization"] == config["quantization_config"] == {"group_size": 32, "bits": 4}


def test_float_folder_to_quantized_gguf_says_it_is_lossy(float_folder, tmp_path):
    result = convert(float_folder, "--out", tmp_path / "q.gguf", "--type", "q4_0")
    assert result.exit_code == 0, result.output
    assert "16 Q4_0" in result.output and "lossy: 16 of 21 tensors changed" in result.output
    # and the GGUF's blocks read back exactly; --dtype dequantizes them as ggml does
    result = convert(tmp_path / "q.gguf", "--out", tmp_path / "bf16", "--dtype", "bf16")
    assert result.exit_code == 0, result.output
    reader = gguf.GGUFReader(tmp_path / "q.gguf")
    down = next(t for t in reader.tensors if t.name == "blk.0.ffn_down.weight")
    expected = gguf.quants.dequantize(down.data, down.tensor_type)
    got = load_folder_tensors(tmp_path / "bf16")["model.layers.0.mlp.down_proj.weight"]
    assert got.dtype == "BF16"
    rounded = RawTensor("BF16", expected.shape, G.bfloat16_bits(expected))
    np.testing.assert_array_equal(G.float32_of(got), G.float32_of(rounded))  # equal values (ggml may give -0.0)


def test_existing_out_is_refused_unless_force(float_folder, tmp_path):
    (tmp_path / "m.gguf").write_bytes(b"old")
    result = convert(float_folder, "--out", tmp_path / "m.gguf")
    assert result.exit_code == 1
    assert "m.gguf already exists" in result.output and "--force" in result.output
    assert (tmp_path / "m.gguf").read_bytes() == b"old"
    result = convert(float_folder, "--out", tmp_path / "m.gguf", "--force")
    assert result.exit_code == 0, result.output
    untokenized = {"bos_token_id": None, "eos_token_ids": (), "pad_token_id": None}  # GGUF takes the tokenizer's
    written = G.read_gguf(tmp_path / "m.gguf").spec.with_updates(**untokenized)
    assert written == read_model(float_folder).spec.with_updates(**untokenized)
    (tmp_path / "folder").mkdir()
    (tmp_path / "folder" / "keep.txt").write_text("x")
    result = convert(tmp_path / "m.gguf", "--out", tmp_path / "folder")
    assert result.exit_code == 1 and "already exists" in result.output
    result = convert(tmp_path / "m.gguf", "--out", tmp_path / "folder", "--force")
    assert result.exit_code == 0, result.output
    assert not (tmp_path / "folder" / "keep.txt").exists() and (tmp_path / "folder" / "config.json").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["folder", "m.gguf"]


@pytest.mark.parametrize(
    "args, message",
    [
        (["--out", "{tmp}/m.gguf", "--type", "q3_k"], "q3_k"),
        (["--out", "{tmp}/m.gguf", "--dtype", "fp32"], "--dtype is for folder outputs"),
        (["--out", "{tmp}/folder", "--type", "q4_0"], "--type is for .gguf outputs"),
        (["--out", "{tmp}/folder"], "is a model folder already: pass --dtype"),
        (["--out", "{tmp}/folder", "--dtype", "fp64"], "fp64"),
    ],
    ids=["unsupported-type", "dtype-to-gguf", "type-to-folder", "folder-to-folder", "unsupported-dtype"],
)
def test_usage_errors_exit_2(float_folder, tmp_path, args, message):
    result = convert(float_folder, *[a.format(tmp=tmp_path) for a in args])
    assert result.exit_code == 2, result.output
    assert message in result.output
    assert list(tmp_path.iterdir()) == []


def test_clear_errors_for_bad_sources(float_folder, tmp_path):
    writer = gguf.GGUFWriter(tmp_path / "gpt2.gguf", "gpt2")
    writer.add_tensor("token_embd.weight", np.zeros((8, 4), np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    result = convert(tmp_path / "gpt2.gguf", "--out", tmp_path / "out")
    assert result.exit_code == 1
    assert (
        "gpt2.gguf holds a model of architecture 'gpt2'; llmctl reads GGUF files of the llama architecture"
        in result.output
    )

    result = convert(tmp_path / "missing.gguf", "--out", tmp_path / "out")
    assert result.exit_code == 1 and "missing.gguf does not exist" in result.output

    result = convert(float_folder, "--out", float_folder, "--dtype", "fp32", "--force")
    assert result.exit_code == 1 and "is the input" in result.output

    gptq = tmp_path / "gptq"
    shutil.copytree(float_folder, gptq)
    config = json.loads((gptq / "config.json").read_text())
    (gptq / "config.json").write_text(json.dumps(config | {"quantization_config": {"quant_method": "gptq", "bits": 4}}))
    result = convert(gptq, "--out", tmp_path / "g.gguf")
    assert result.exit_code == 1 and "quantization method 'gptq'" in result.output
    assert not (tmp_path / "out").exists() and not (tmp_path / "g.gguf").exists()


def test_a_gguf_file_is_accepted_where_a_model_folder_is(q4_folder, tmp_path):
    """info and generate take the .gguf path itself (tokenizer from its metadata) and act as on the folder."""
    gguf_path = tmp_path / "m.gguf"
    assert convert(q4_folder, "--out", gguf_path).exit_code == 0
    runner = CliRunner()
    info = runner.invoke(app, ["info", str(gguf_path)])
    assert info.exit_code == 0 and "llama" in info.output

    def greedy_text(model: Path) -> str:
        result = runner.invoke(app, ["generate", "--model", str(model), "--prompt", "def main():", "--max-tokens", "12", "--json"])
        assert result.exit_code == 0, result.output
        return json.loads(result.stdout.strip().splitlines()[-1])["text"]

    from_folder = greedy_text(q4_folder)
    assert from_folder and greedy_text(gguf_path) == from_folder
