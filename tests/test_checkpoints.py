"""Model folders through the backends: exact round trips, shards, dtypes, Hugging Face cache ids, clear errors."""

from __future__ import annotations

import hashlib
import json
import shutil

import numpy as np
import pytest
import torch

from conftest import make_hf_model
from llmctl.backends import get_backend
from llmctl.errors import CheckpointError
from llmctl.io.safetensors import load_folder_tensors


def _raw(folder) -> dict[str, bytes]:
    return {k: t.data.tobytes() for k, t in load_folder_tensors(folder).items()}


@pytest.mark.parametrize("family", ["llama", "qwen2", "mixtral"])
def test_save_load_round_trip_is_bit_exact(family, tmp_path, backend):
    make_hf_model(family, tmp_path / "hf")
    model = backend.load(tmp_path / "hf")
    model.save(tmp_path / "ours")
    assert _raw(tmp_path / "ours") == _raw(tmp_path / "hf")
    for name in ("config.json", "generation_config.json"):
        assert (tmp_path / "ours" / name).is_file()
    again = backend.load(tmp_path / "ours")
    tokens = [[1, 5, 9, 200, 3]]
    np.testing.assert_array_equal(again.logits(tokens), model.logits(tokens))
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary folders left


def test_saved_folder_loads_in_transformers(tmp_path, backend):
    transformers = pytest.importorskip("transformers")
    spec = get_backend("torch").load(_tiny(tmp_path)).spec
    model = backend.init(spec, seed=4)
    model.save(tmp_path / "ours")
    ref = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "ours").eval()
    tokens = [[3, 1, 4, 1, 5, 9, 2, 6]]
    with torch.no_grad():
        want = ref(torch.tensor(tokens)).logits.numpy()
    np.testing.assert_allclose(model.logits(tokens), want, atol=1e-4 * max(1, np.abs(want).max()), rtol=0)


def _tiny(tmp_path):
    folder = tmp_path / "tiny"
    if not folder.exists():
        make_hf_model("llama", folder)
    return folder


def test_sharded_checkpoint_loads(tmp_path, backend):
    model = make_hf_model("llama", tmp_path / "hf")
    model.save_pretrained(tmp_path / "sharded", max_shard_size="40KB")
    assert (tmp_path / "sharded" / "model.safetensors.index.json").is_file()
    tokens = [[7, 8, 9, 10]]
    np.testing.assert_array_equal(backend.load(tmp_path / "sharded").logits(tokens), backend.load(tmp_path / "hf").logits(tokens))
    backend.load(tmp_path / "hf").save(tmp_path / "ours", max_shard_bytes=60_000)
    index = json.loads((tmp_path / "ours" / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    assert _raw(tmp_path / "ours") == _raw(tmp_path / "hf")


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_half_precision_checkpoint_round_trip(dtype, tmp_path, backend):
    model = make_hf_model("llama", tmp_path / "hf")
    model.to(getattr(torch, dtype)).save_pretrained(tmp_path / "half")
    loaded = backend.load(tmp_path / "half", dtype=None)
    loaded.save(tmp_path / "ours")
    assert json.loads((tmp_path / "ours" / "config.json").read_text())["dtype"] == dtype
    assert _raw(tmp_path / "ours") == _raw(tmp_path / "half")
    assert {t.dtype for t in load_folder_tensors(tmp_path / "ours").values()} == {"BF16" if dtype == "bfloat16" else "F16"}


def test_tokenizer_files_travel_with_the_model(tmp_path, backend):
    make_hf_model("llama", tmp_path / "hf")
    (tmp_path / "hf" / "tokenizer.json").write_text("{}")
    (tmp_path / "hf" / "chat_template.jinja").write_text("{{ messages }}")
    backend.load(tmp_path / "hf").save(tmp_path / "ours")
    for name in ("tokenizer.json", "chat_template.jinja", "generation_config.json"):
        assert (tmp_path / "ours" / name).read_bytes() == (tmp_path / "hf" / name).read_bytes()


def test_pickle_only_folder_is_refused(tmp_path, backend):
    make_hf_model("llama", tmp_path)
    (tmp_path / "model.safetensors").unlink()
    torch.save({"w": torch.zeros(2)}, tmp_path / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="pickle"):
        backend.load(tmp_path)


def test_wrong_shape_names_file_and_tensor(tmp_path, backend):
    make_hf_model("llama", tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config["intermediate_size"] = 96
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError) as e:
        backend.load(tmp_path)
    text = str(e.value)
    assert "model.safetensors" in text and "model.layers.0.mlp.gate_proj.weight" in text and "[128, 64]" in text


def test_missing_tensor_is_named(tmp_path, backend):
    from safetensors.torch import load_file, save_file

    make_hf_model("llama", tmp_path)
    state = load_file(tmp_path / "model.safetensors")
    del state["model.layers.1.self_attn.k_proj.weight"]
    save_file(state, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=r"model.layers.1.self_attn.k_proj.weight \[32, 64\] is missing"):
        backend.load(tmp_path)


def _fake_hub_cache(root, repo_id: str, source) -> None:
    """The layout huggingface_hub writes: blobs by hash, snapshots/<commit>/ of symlinks, refs/main."""
    repo = root / "hub" / ("models--" + repo_id.replace("/", "--"))
    commit = "0123456789abcdef0123456789abcdef01234567"
    snapshot = repo / "snapshots" / commit
    (repo / "blobs").mkdir(parents=True)
    snapshot.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    for f in source.iterdir():
        digest = hashlib.sha256(f.read_bytes()).hexdigest()
        shutil.copyfile(f, repo / "blobs" / digest)
        (snapshot / f.name).symlink_to(f"../../blobs/{digest}")


def test_hugging_face_id_loads_from_local_cache(tmp_path, monkeypatch, backend):
    make_hf_model("qwen2", tmp_path / "src")
    _fake_hub_cache(tmp_path / "hf_home", "acme/tiny-qwen", tmp_path / "src")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    tokens = [[1, 2, 3]]
    got = backend.load("acme/tiny-qwen").logits(tokens)
    np.testing.assert_array_equal(got, backend.load(tmp_path / "src").logits(tokens))
    with pytest.raises(CheckpointError, match="acme/other"):
        backend.load("acme/other")
