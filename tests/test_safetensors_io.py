"""Safetensors reading and writing: bit-exact round trips, library compatibility, shards, damage, atomicity."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np
import pytest

from llmctl.errors import CheckpointError, OutputError
from llmctl.io import safetensors as st
from llmctl.io.safetensors import (
    RawTensor,
    atomic_write_text,
    from_mlx,
    from_torch,
    load_folder_tensors,
    read_metadata,
    read_safetensors,
    save_tensors,
    to_mlx,
    to_torch,
    write_safetensors,
)

DTYPES = ["F32", "F16", "BF16", "I32", "U32", "U8", "I8", "I16", "U16", "I64", "U64", "F64", "BOOL", "F8_E4M3"]


def random_tensor(dtype: str, shape: tuple[int, ...], seed: int = 0) -> RawTensor:
    """Random bits of every pattern (NaNs, infinities, subnormals), so equality means bit equality."""
    storage = st._NUMPY[dtype]
    rng = np.random.default_rng(seed)
    if dtype == "BOOL":
        return RawTensor(dtype, shape, rng.integers(0, 2, size=shape).astype(bool))
    raw = rng.integers(0, 256, size=int(np.prod(shape)) * storage.itemsize, dtype=np.uint8)
    return RawTensor(dtype, shape, raw.view(storage).reshape(shape))


def mixed_tensors() -> dict[str, RawTensor]:
    shapes = [(3, 5), (7,), (), (0, 4), (2, 3, 2)]
    return {f"t.{i}.{d.lower()}": random_tensor(d, shapes[i % len(shapes)], seed=i) for i, d in enumerate(DTYPES)}


def same_bits(a: RawTensor, b: RawTensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and a.data.tobytes() == b.data.tobytes()


def files_in(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


# ---- round trips


@pytest.mark.parametrize("dtype", DTYPES)
def test_round_trip_is_bit_exact(dtype, tmp_path):
    tensors = {"a": random_tensor(dtype, (4, 6)), "scalar": random_tensor(dtype, ())}
    tensors["empty"] = random_tensor(dtype, (0, 3))
    save_tensors(tmp_path, tensors)
    got = load_folder_tensors(tmp_path)
    assert list(got) == sorted(tensors)  # one dtype: the header is in name order
    for name, tensor in tensors.items():
        assert same_bits(got[name], tensor), name


def test_mixed_dtypes_round_trip_and_metadata(tmp_path):
    tensors = mixed_tensors()
    save_tensors(tmp_path, tensors, metadata={"format": "pt", "note": "llmctl"})
    assert files_in(tmp_path) == ["model.safetensors"]
    got = load_folder_tensors(tmp_path)
    assert got.keys() == tensors.keys()
    assert all(same_bits(got[n], t) for n, t in tensors.items())
    assert read_metadata(tmp_path / "model.safetensors") == {"format": "pt", "note": "llmctl"}
    # the data buffer starts 8-aligned and every tensor is aligned to its item size, so reads are zero-copy
    (length,) = struct.unpack("<Q", (tmp_path / "model.safetensors").read_bytes()[:8])
    assert length % 8 == 0
    assert all(t.data.base is not None for t in got.values() if t.data.size)


def test_read_is_memory_mapped_and_private(tmp_path):
    save_tensors(tmp_path, {"w": RawTensor.from_numpy(np.arange(6, dtype=np.float32))})
    before = (tmp_path / "model.safetensors").read_bytes()
    w = read_safetensors(tmp_path / "model.safetensors")["w"]
    w.data[:] = -1.0  # writable (torch.from_numpy needs that) but never written back
    assert (tmp_path / "model.safetensors").read_bytes() == before


@pytest.mark.parametrize("dtype", DTYPES)
def test_torch_converters_are_bit_exact(dtype):
    torch = pytest.importorskip("torch")
    raw = random_tensor(dtype, (3, 4))
    tensor = to_torch(raw)
    assert tensor.dtype == getattr(torch, st._TORCH[dtype])
    assert tensor.shape == (3, 4)
    assert same_bits(from_torch(tensor), raw)


def test_torch_values_survive_bf16(tmp_path):
    torch = pytest.importorskip("torch")
    x = torch.randn(5, 7, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
    save_tensors(tmp_path, {"x": from_torch(x), "t": from_torch(x.t())})  # a non-contiguous view too
    got = load_folder_tensors(tmp_path)
    assert torch.equal(to_torch(got["x"]), x)
    assert torch.equal(to_torch(got["t"]), x.t())


@pytest.mark.parametrize("dtype", ["F32", "F16", "BF16", "I32", "U32", "U8", "I8", "I16", "U16", "BOOL"])
def test_mlx_converters_are_bit_exact(dtype):
    mx = pytest.importorskip("mlx.core")
    raw = random_tensor(dtype, (3, 4))
    array = to_mlx(raw)
    assert array.dtype == getattr(mx, st._MLX[dtype])
    assert array.shape == (3, 4)
    assert same_bits(from_mlx(array), raw)


def test_mlx_and_torch_share_bf16_files(tmp_path):
    mx = pytest.importorskip("mlx.core")
    torch = pytest.importorskip("torch")
    x = mx.random.normal((4, 8), key=mx.random.key(0)).astype(mx.bfloat16)
    save_tensors(tmp_path, {"x": from_mlx(x), "xt": from_mlx(x.T)})
    got = load_folder_tensors(tmp_path)
    assert mx.array_equal(to_mlx(got["x"]), x).item()
    assert mx.array_equal(to_mlx(got["xt"]), x.T).item()
    back = to_torch(got["x"]).float().numpy()
    np.testing.assert_array_equal(back, np.asarray(x.astype(mx.float32)))
    assert to_torch(got["x"]).dtype == torch.bfloat16


def test_mlx_reads_float8_exactly():
    mx = pytest.importorskip("mlx.core")
    torch = pytest.importorskip("torch")
    x = torch.randn(64, generator=torch.Generator().manual_seed(0))
    for dtype in (torch.float8_e4m3fn, torch.float8_e5m2):
        fp8 = x.to(dtype)
        got = to_mlx(from_torch(fp8)).astype(mx.float32)
        np.testing.assert_array_equal(np.asarray(got), fp8.float().numpy())


# ---- the safetensors library and transformers


def test_files_are_byte_identical_to_the_safetensors_library(tmp_path):
    torch = pytest.importorskip("torch")
    from safetensors.torch import save

    rng = torch.Generator().manual_seed(0)
    tensors = {
        "b.bf16": torch.randn(3, 5, generator=rng).bfloat16(),
        "a.f32": torch.randn(2, 2, generator=rng),
        "c.u8": torch.arange(7, dtype=torch.uint8),
        "d.f16": torch.randn(9, generator=rng).half(),
        "e.i64": torch.arange(3),
        "f.fp8": torch.randn(4, generator=rng).to(torch.float8_e4m3fn),
        "ünïcode": torch.ones(1),
    }
    write_safetensors(tmp_path / "ours.safetensors", {k: from_torch(v) for k, v in tensors.items()})
    assert (tmp_path / "ours.safetensors").read_bytes() == save(tensors, metadata={"format": "pt"})


def test_our_files_load_in_the_safetensors_library(tmp_path):
    torch = pytest.importorskip("torch")
    from safetensors.numpy import load_file as load_numpy
    from safetensors.torch import load_file as load_torch

    tensors = mixed_tensors()
    save_tensors(tmp_path, tensors)
    loaded = load_torch(tmp_path / "model.safetensors")
    assert loaded.keys() == tensors.keys()
    for name, tensor in tensors.items():
        # NaN != NaN, so compare bits
        bits = [t.reshape(-1).view(torch.uint8) for t in (loaded[name], to_torch(tensor))]
        assert loaded[name].dtype == to_torch(tensor).dtype and torch.equal(*bits), name
    plain = {k: v for k, v in tensors.items() if v.dtype not in st._BITS_ONLY}
    save_tensors(tmp_path / "np", plain)
    for name, array in load_numpy(tmp_path / "np" / "model.safetensors").items():
        assert array.dtype == plain[name].data.dtype
        np.testing.assert_array_equal(array.reshape(-1).view(np.uint8), plain[name].data.reshape(-1).view(np.uint8))


def test_reads_files_of_the_safetensors_library(tmp_path):
    torch = pytest.importorskip("torch")
    from safetensors.torch import save_file

    rng = torch.Generator().manual_seed(1)
    tensors = {
        "w": torch.randn(16, 8, generator=rng).bfloat16(),
        "h": torch.randn(3, generator=rng).half(),
        "f": torch.randn(2, 3, generator=rng),
        "i": torch.arange(-4, 4, dtype=torch.int32),
        "q": torch.randint(0, 2**31, (5,), generator=rng, dtype=torch.int64).to(torch.uint32),
        "u": torch.arange(9, dtype=torch.uint8),
    }
    save_file(tensors, tmp_path / "model.safetensors", metadata={"format": "pt"})
    got = load_folder_tensors(tmp_path)
    assert got.keys() == tensors.keys()
    for name, tensor in tensors.items():
        assert torch.equal(to_torch(got[name]), tensor), name


def tiny_llama():
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(
        vocab_size=128, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1, max_position_embeddings=64, tie_word_embeddings=False,
    )  # fmt: skip
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(config).eval()


def test_reads_sharded_save_pretrained(tmp_path):
    torch = pytest.importorskip("torch")
    model = tiny_llama()
    model.save_pretrained(tmp_path, max_shard_size="20KB", safe_serialization=True)
    assert (tmp_path / "model.safetensors.index.json").is_file()
    assert len(list(tmp_path.glob("model-*-of-*.safetensors"))) > 1
    got = load_folder_tensors(tmp_path)
    state = model.state_dict()
    assert got.keys() == state.keys()
    for name, tensor in state.items():
        assert torch.equal(to_torch(got[name]), tensor), name


def test_transformers_loads_our_shards(tmp_path):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    model = tiny_llama()
    model.config.save_pretrained(tmp_path)
    state = model.state_dict()
    written = save_tensors(tmp_path, {k: from_torch(v) for k, v in state.items()}, max_shard_bytes=20_000)
    assert len(written) > 2
    back = transformers.LlamaForCausalLM.from_pretrained(tmp_path, dtype=torch.float32)
    for name, tensor in back.state_dict().items():
        assert torch.equal(tensor, state[name]), name


def test_shard_layout_and_index(tmp_path):
    tensors = {f"layer.{i}.w": random_tensor("F32", (10, 10), seed=i) for i in range(5)}  # 400 bytes each
    tensors["big"] = random_tensor("BF16", (30, 30))  # 1800 bytes: a shard of its own
    written = save_tensors(tmp_path, tensors, max_shard_bytes=1000)
    names = [p.name for p in written]
    assert names == [f"model-0000{i}-of-00004.safetensors" for i in range(1, 5)] + ["model.safetensors.index.json"]
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert index["metadata"] == {"total_parameters": 5 * 100 + 900, "total_size": 5 * 400 + 1800}
    assert index["weight_map"] == {
        "layer.0.w": names[0], "layer.1.w": names[0], "layer.2.w": names[1], "layer.3.w": names[1],
        "big": names[2], "layer.4.w": names[3],
    }  # fmt: skip  (as huggingface_hub splits: an oversized tensor's shard goes before the one being filled)
    assert list(index["weight_map"]) == sorted(index["weight_map"])
    got = load_folder_tensors(tmp_path)
    assert all(same_bits(got[n], t) for n, t in tensors.items())


def test_resaving_removes_stale_weights_and_keeps_mapped_data(tmp_path):
    tensors = {f"w{i}": random_tensor("F32", (16, 16), seed=i) for i in range(6)}  # 1 KiB each
    save_tensors(tmp_path, tensors, max_shard_bytes=2048)
    assert len(list(tmp_path.glob("model-*-of-00003.safetensors"))) == 3
    (tmp_path / "config.json").write_text("{}")
    # save over the very files the arrays are mapped from: the old mapping must stay intact
    loaded = load_folder_tensors(tmp_path)
    save_tensors(tmp_path, loaded)
    assert files_in(tmp_path) == ["config.json", "model.safetensors"]
    assert all(same_bits(loaded[n], t) for n, t in tensors.items())
    save_tensors(tmp_path, load_folder_tensors(tmp_path), max_shard_bytes=3072)
    assert files_in(tmp_path) == [
        "config.json", "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors",
        "model.safetensors.index.json",
    ]  # fmt: skip
    got = load_folder_tensors(tmp_path)
    assert all(same_bits(got[n], t) for n, t in tensors.items())


# ---- atomic writes


def test_no_temporary_files_are_left(tmp_path):
    save_tensors(tmp_path, mixed_tensors(), max_shard_bytes=200)
    save_tensors(tmp_path, mixed_tensors())
    atomic_write_text(tmp_path / "config.json", '{"a": 1}\n')
    atomic_write_text(tmp_path / "config.json", '{"a": 2}\n')
    assert files_in(tmp_path) == ["config.json", "model.safetensors"]
    assert json.loads((tmp_path / "config.json").read_text()) == {"a": 2}


def test_failed_write_keeps_the_old_file(tmp_path, monkeypatch):
    save_tensors(tmp_path, {"w": random_tensor("F32", (64, 64))})
    before = (tmp_path / "model.safetensors").read_bytes()
    real_write = st._write_data

    def disk_full(f, data):
        real_write(f, data[: len(data) // 2])
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(st, "_write_data", disk_full)
    with pytest.raises(OutputError, match="model.safetensors: the disk is full"):
        save_tensors(tmp_path, {"w": random_tensor("F32", (64, 64), seed=1)})
    assert (tmp_path / "model.safetensors").read_bytes() == before
    assert files_in(tmp_path) == ["model.safetensors"]


def test_failed_sharded_write_keeps_the_old_model(tmp_path, monkeypatch):
    old = {f"w{i}": random_tensor("F16", (8, 8), seed=i) for i in range(4)}  # 128 bytes each
    save_tensors(tmp_path, old, max_shard_bytes=256)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    calls = []

    def fail_on_fourth(f, data):
        calls.append(1)
        if len(calls) == 4:  # the second new shard, after the first is complete
            raise OSError("disk gone")
        f.write(data.tobytes())

    monkeypatch.setattr(st, "_write_data", fail_on_fourth)
    new = {f"w{i}": random_tensor("F16", (8, 8), seed=9 + i) for i in range(4)}
    with pytest.raises(OSError, match="disk gone"):
        save_tensors(tmp_path, new, max_shard_bytes=256)  # the same shard names as the old save
    monkeypatch.undo()
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before  # no new shard renamed into place
    got = load_folder_tensors(tmp_path)
    assert all(same_bits(got[n], t) for n, t in old.items())


# ---- damaged files and bad folders


def good_file(tmp_path: Path) -> bytes:
    write_safetensors(tmp_path / "x.safetensors", {"w": random_tensor("F32", (4, 4)), "b": random_tensor("F16", (4,))})
    return (tmp_path / "x.safetensors").read_bytes()


def with_header(header: dict, data: bytes = b"") -> bytes:
    text = json.dumps(header).encode()
    return struct.pack("<Q", len(text)) + text + data


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (lambda b: b[:-10], "outside the"),
        (lambda b: b[:5], "too short"),
        (lambda b: struct.pack("<Q", 10**12) + b[8:], "header claims"),
        (lambda b: b[:8] + b"[" + b[9:], "not valid JSON"),
        (lambda b: b[:8] + b"\xff" + b[9:], "not valid JSON"),
        (lambda b: with_header([1, 2]), "not an object"),  # type: ignore[arg-type]
        (lambda b: with_header({"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 800]}}, bytes(8)), "outside"),
        (lambda b: with_header({"w": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}}, bytes(8)), "needs 12"),
        (lambda b: with_header({"w": {"dtype": "F32", "shape": [2], "data_offsets": [8, 0]}}, bytes(8)), "outside"),
        (lambda b: with_header({"w": {"dtype": "F32", "shape": [-2], "data_offsets": [0, 8]}}, bytes(8)), "shape"),
        (lambda b: with_header({"w": {"dtype": "Q9", "shape": [2], "data_offsets": [0, 8]}}, bytes(8)), "'Q9'"),
        (lambda b: with_header({"w": {"dtype": "F32"}}), "needs dtype"),
    ],
    ids=["truncated", "tiny", "huge-header", "bad-json", "bad-utf8", "json-list", "offsets-out-of-range",
         "size-mismatch", "offsets-reversed", "negative-shape", "unknown-dtype", "missing-keys"],  # fmt: skip
)
def test_damaged_files_name_the_file(tmp_path, damage, message):
    path = tmp_path / "model.safetensors"
    path.write_bytes(damage(good_file(tmp_path)))
    with pytest.raises(CheckpointError, match=message) as info:
        load_folder_tensors(tmp_path)
    assert str(path) in info.value.message
    assert info.value.hint


def test_damaged_tensor_is_named(tmp_path):
    (tmp_path / "model.safetensors").write_bytes(
        with_header({"ok": {"dtype": "U8", "shape": [2], "data_offsets": [0, 2]},
                     "bad.weight": {"dtype": "F32", "shape": [4], "data_offsets": [2, 18]}}, bytes(10))  # fmt: skip
    )
    with pytest.raises(CheckpointError, match="tensor 'bad.weight'"):
        load_folder_tensors(tmp_path)


def test_pickle_only_folder_is_refused(tmp_path):
    torch = pytest.importorskip("torch")
    torch.save({"w": torch.ones(2)}, tmp_path / "pytorch_model.bin")
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(CheckpointError, match="pickle") as info:
        load_folder_tensors(tmp_path)
    assert "pytorch_model.bin" in info.value.message
    assert "safe_serialization=True" in info.value.hint


def test_missing_and_empty_folders(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist") as info:
        load_folder_tensors(tmp_path / "nope")
    assert str(tmp_path / "nope") in info.value.message
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(CheckpointError, match="holds no weights") as info:
        load_folder_tensors(tmp_path)
    assert str(tmp_path) in info.value.message


def test_unreadable_file_is_named(tmp_path):
    with pytest.raises(CheckpointError, match="Cannot read .*absent.safetensors"):
        read_safetensors(tmp_path / "absent.safetensors")
    with pytest.raises(CheckpointError, match="Cannot read"):
        read_metadata(tmp_path)


def test_index_naming_a_missing_shard(tmp_path):
    save_tensors(tmp_path, {f"w{i}": random_tensor("F32", (8, 8), seed=i) for i in range(3)}, max_shard_bytes=256)
    (tmp_path / "model-00002-of-00003.safetensors").unlink()
    with pytest.raises(CheckpointError, match="model-00002-of-00003.safetensors") as info:
        load_folder_tensors(tmp_path)
    assert "model.safetensors.index.json" in info.value.message


def test_index_pointing_at_the_wrong_shard(tmp_path):
    save_tensors(tmp_path, {f"w{i}": random_tensor("F32", (8, 8), seed=i) for i in range(2)}, max_shard_bytes=256)
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    index["weight_map"]["w0"] = "model-00002-of-00002.safetensors"
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match="'w0'"):
        load_folder_tensors(tmp_path)


def test_loose_safetensors_files_without_index(tmp_path):
    write_safetensors(tmp_path / "consolidated.safetensors", {"a": random_tensor("BF16", (2, 2))})
    write_safetensors(tmp_path / "extra.safetensors", {"b": random_tensor("U8", (3,))})
    write_safetensors(tmp_path / "adapter_model.safetensors", {"lora": random_tensor("F32", (1,))})
    assert sorted(load_folder_tensors(tmp_path)) == ["a", "b"]
    write_safetensors(tmp_path / "dup.safetensors", {"a": random_tensor("BF16", (2, 2))})
    with pytest.raises(CheckpointError, match="'a' is in both"):
        load_folder_tensors(tmp_path)


def test_raw_tensor_checks_its_fields():
    with pytest.raises(ValueError, match="BF16"):
        RawTensor("BF16", (2,), np.zeros(2, np.float16))
    with pytest.raises(ValueError, match="shape"):
        RawTensor("F32", (3,), np.zeros(2, np.float32))
    with pytest.raises(ValueError, match="unknown"):
        RawTensor("F4", (2,), np.zeros(2, np.uint8))
    assert RawTensor.from_numpy(np.zeros((2, 3), ">f4")).dtype == "F32"

