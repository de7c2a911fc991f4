"""Resolving folders, .gguf files and Hugging Face ids (from a hand-built cache, never the network)."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest

from llmctl.errors import CheckpointError
from llmctl.io.hub import ALLOW_PATTERNS, hub_cache_dir, resolve_model
from llmctl.io.safetensors import RawTensor, save_tensors

COMMIT = "0123456789abcdef0123456789abcdef01234567"


def fake_cache(cache: Path, repo_id: str, files: dict[str, bytes], commit: str = COMMIT, ref: str = "main") -> Path:
    """The layout huggingface_hub writes: blobs by hash, snapshots/<commit>/ of relative symlinks, refs/<branch>."""
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    snapshot = repo / "snapshots" / commit
    for folder in (repo / "blobs", repo / "refs", snapshot):
        folder.mkdir(parents=True, exist_ok=True)
    (repo / "refs" / ref).write_text(commit)
    for name, data in files.items():
        digest = hashlib.sha256(data).hexdigest()
        (repo / "blobs" / digest).write_bytes(data)
        (snapshot / name).symlink_to(f"../../blobs/{digest}")
    return snapshot


def model_files(tmp_path: Path) -> dict[str, bytes]:
    save_tensors(tmp_path / "src", {"w": RawTensor.from_numpy(np.arange(4, dtype=np.float32))})
    weights = (tmp_path / "src" / "model.safetensors").read_bytes()
    return {"config.json": b'{"model_type": "llama"}', "model.safetensors": weights}


@pytest.fixture
def offline_cache(tmp_path, monkeypatch) -> Path:
    """An empty hub cache under HF_HOME, offline; huggingface_hub may have read other values at import."""
    cache = tmp_path / "hf_home" / "hub"
    cache.mkdir(parents=True)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.chdir(tmp_path)  # relative names must not hit anything in the repository
    return cache


def test_cached_id_resolves_to_its_snapshot(offline_cache, tmp_path):
    snapshot = fake_cache(offline_cache, "org/name", model_files(tmp_path))
    assert resolve_model("org/name") == snapshot
    assert resolve_model("org/name@main") == snapshot
    assert resolve_model(f"org/name@{COMMIT}") == snapshot
    assert (resolve_model("org/name") / "model.safetensors").is_file()


def test_other_branches_resolve(offline_cache, tmp_path):
    other = "fedcba9876543210fedcba9876543210fedcba98"
    snapshot = fake_cache(offline_cache, "org/name", model_files(tmp_path), commit=other, ref="v2")
    assert resolve_model("org/name@v2") == snapshot
    with pytest.raises(CheckpointError, match="not in the cache"):
        resolve_model("org/name")  # no refs/main


def test_cache_follows_hf_home_at_call_time(offline_cache, tmp_path, monkeypatch):
    monkeypatch.delenv("HF_HUB_CACHE")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "elsewhere"))
    assert hub_cache_dir() == tmp_path / "elsewhere" / "hub"
    snapshot = fake_cache(tmp_path / "elsewhere" / "hub", "org/name", model_files(tmp_path))
    assert resolve_model("org/name") == snapshot


def test_missing_id_offline_says_where_it_looked(offline_cache):
    with pytest.raises(CheckpointError) as info:
        resolve_model("org/missing")
    message = info.value.message
    assert "org/missing" in message and str(offline_cache) in message and "cannot reach the hub" in message
    assert "huggingface-cli download org/missing" in info.value.hint


def test_cached_without_weights_offline(offline_cache):
    snapshot = fake_cache(offline_cache, "org/configonly", {"config.json": b"{}"})
    with pytest.raises(CheckpointError, match="only in part") as info:
        resolve_model("org/configonly")
    assert str(snapshot) in info.value.message


def test_plain_missing_path(offline_cache):
    for name in ["no/such/folder", "./nope", "/abs/nope", "models/tiny.gguf", "nope"]:
        with pytest.raises(CheckpointError, match="does not exist") as info:
            resolve_model(name)
        assert str(Path(name)) in info.value.message


def test_existing_paths_are_returned_as_given(offline_cache, tmp_path):
    (tmp_path / "org" / "name").mkdir(parents=True)
    assert resolve_model("org/name") == Path("org/name")  # a folder wins over an id of the same spelling
    assert resolve_model(tmp_path) == tmp_path
    (tmp_path / "tiny.gguf").write_bytes(b"GGUF")
    assert resolve_model(tmp_path / "tiny.gguf") == tmp_path / "tiny.gguf"
    (tmp_path / "weights.safetensors").write_bytes(b"")
    with pytest.raises(CheckpointError, match="is a file") as info:
        resolve_model(tmp_path / "weights.safetensors")
    assert str(tmp_path) in info.value.hint


def test_online_downloads_into_the_cache(offline_cache, tmp_path, monkeypatch):
    import huggingface_hub
    from huggingface_hub.errors import LocalEntryNotFoundError

    monkeypatch.delenv("HF_HUB_OFFLINE")
    calls = []

    def fake_snapshot_download(repo_id, *, revision=None, cache_dir=None, local_files_only=False, allow_patterns=None):
        calls.append((repo_id, revision, Path(cache_dir), local_files_only, allow_patterns))
        if local_files_only:
            raise LocalEntryNotFoundError("not cached")
        return str(fake_cache(Path(cache_dir), repo_id, model_files(tmp_path)))

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    got = resolve_model("org/new@main")
    assert got == offline_cache / "models--org--new" / "snapshots" / COMMIT
    assert calls == [
        ("org/new", "main", offline_cache, True, ALLOW_PATTERNS),
        ("org/new", "main", offline_cache, False, ALLOW_PATTERNS),
    ]


def test_online_without_network_or_weights(offline_cache, tmp_path, monkeypatch):
    import huggingface_hub
    from huggingface_hub.errors import LocalEntryNotFoundError

    monkeypatch.delenv("HF_HUB_OFFLINE")

    def no_network(repo_id, **kwargs):
        raise LocalEntryNotFoundError("connection refused")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", no_network)
    with pytest.raises(CheckpointError, match="cannot reach the hub"):
        resolve_model("org/name")

    def pickles_only(repo_id, *, local_files_only=False, cache_dir=None, **kwargs):
        if local_files_only:
            raise LocalEntryNotFoundError("not cached")
        return str(fake_cache(Path(cache_dir), repo_id, {"config.json": b"{}"}))

    monkeypatch.setattr(huggingface_hub, "snapshot_download", pickles_only)
    with pytest.raises(CheckpointError, match="no safetensors weights") as info:
        resolve_model("org/old")
    assert "pickle" in info.value.hint
