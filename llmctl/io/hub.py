"""Turn what the user typed (a folder, a .gguf file, or a Hugging Face id) into a local model path."""

from __future__ import annotations

import os
import re
from pathlib import Path

from llmctl.errors import CheckpointError
from llmctl.io.safetensors import weight_files

# what a model needs; pickled *.bin weights are never fetched (llmctl refuses them anyway)
ALLOW_PATTERNS = ["*.json", "*.safetensors", "tokenizer.model", "*.jinja", "*.txt"]
# org/name or org/name@revision, as the hub allows them; anything else is taken as a path
_HF_ID = re.compile(r"(?P<repo>[A-Za-z0-9][\w.-]*/[\w.-]+)(?:@(?P<revision>[\w./-]+))?")


def _env_true(name: str) -> bool:
    return os.environ.get(name, "").upper() in {"1", "ON", "YES", "TRUE"}


def hub_cache_dir() -> Path:
    """The Hugging Face cache as the environment says now (huggingface_hub reads it once, at import)."""
    env = os.environ.get
    home = env("HF_HOME") or os.path.join(env("XDG_CACHE_HOME") or "~/.cache", "huggingface")
    cache = env("HF_HUB_CACHE") or env("HUGGINGFACE_HUB_CACHE") or os.path.join(home, "hub")
    return Path(os.path.expandvars(cache)).expanduser()


def hub_offline() -> str | None:
    """The variable that forbids network access (HF_HUB_OFFLINE, TRANSFORMERS_OFFLINE), or None."""
    return next((name for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE") if _env_true(name)), None)


def _split_id(name: str) -> tuple[str, str | None] | None:
    match = _HF_ID.fullmatch(name)
    if match is None or ".." in name or name.startswith(".") or name.endswith((".gguf", ".safetensors", ".json")):
        return None
    return match["repo"], match["revision"]


def _has_weights(folder: Path) -> bool:
    try:
        weight_files(folder)
    except CheckpointError:
        return False
    return True


def resolve_model(name: str | Path) -> Path:
    """A folder or .gguf file as given; an `org/name[@revision]` id from the local cache, downloaded if online.

    A cached snapshot that has weights is used without asking the hub (fast, and works offline); name a revision
    (`org/name@v2`) or run `huggingface-cli download` to get a newer one.
    """
    path = Path(name).expanduser()
    if path.is_dir() or (path.is_file() and path.suffix == ".gguf"):
        return path
    if path.is_file():
        raise CheckpointError(
            f"{path} is a file; llmctl expects a model folder (config.json and *.safetensors) or a .gguf file.",
            hint=f"Pass the folder that holds it: {path.parent}",
        )
    parsed = _split_id(str(name))
    if parsed is None:
        raise CheckpointError(
            f"Model folder {path} does not exist.",
            hint="Pass a folder with config.json and *.safetensors, a .gguf file, or a Hugging Face id (org/name).",
        )
    repo_id, revision = parsed
    cache = hub_cache_dir()
    found = _from_cache(repo_id, revision, cache)
    if found is not None and _has_weights(found):
        return found
    offline = hub_offline()
    if offline:
        raise _not_cached(repo_id, cache, found, f"{offline} is set")
    return _download(repo_id, revision, cache, found)


def _from_cache(repo_id: str, revision: str | None, cache: Path) -> Path | None:
    """The cached snapshot folder for this revision, or None; never touches the network."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        folder = snapshot_download(
            repo_id, revision=revision, cache_dir=cache, local_files_only=True, allow_patterns=ALLOW_PATTERNS
        )
    except (LocalEntryNotFoundError, OSError):  # not cached, or cached only in part
        return None
    return Path(folder)


def _not_cached(repo_id: str, cache: Path, partial: Path | None, reason: str) -> CheckpointError:
    where = f"only in part (no safetensors weights) at {partial}" if partial else f"not in the cache at {cache}"
    return CheckpointError(
        f"{repo_id!r} is not a folder, and the Hugging Face model {repo_id} is {where}; "
        f"this machine cannot reach the hub ({reason}).",
        hint=f"Run `huggingface-cli download {repo_id}` on a machine with network (same HF_HOME), "
        "or pass the path of a model folder.",
    )


def _download(repo_id: str, revision: str | None, cache: Path, partial: Path | None) -> Path:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (
        GatedRepoError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    try:
        folder = Path(
            snapshot_download(repo_id, revision=revision, cache_dir=cache, allow_patterns=ALLOW_PATTERNS)
        )
    except GatedRepoError:
        raise CheckpointError(
            f"{repo_id} is gated on the Hugging Face hub.",
            hint=f"Accept its license at https://huggingface.co/{repo_id}, then run `huggingface-cli login`.",
        ) from None
    except RepositoryNotFoundError:
        raise CheckpointError(
            f"{repo_id!r} is not a folder, and no Hugging Face model {repo_id} exists (or it is private).",
            hint="Check the spelling, or run `huggingface-cli login` for a private model.",
        ) from None
    except RevisionNotFoundError:
        raise CheckpointError(
            f"{repo_id} has no revision {revision!r} on the Hugging Face hub.",
            hint="Use a branch, tag or commit that exists, or leave out @revision.",
        ) from None
    except (LocalEntryNotFoundError, OSError) as e:  # connection refused, DNS, timeouts
        first_line = str(e).strip().splitlines()[0][:200] if str(e).strip() else ""
        raise _not_cached(repo_id, cache, partial, f"{type(e).__name__}: {first_line}") from None
    if not _has_weights(folder):
        raise CheckpointError(
            f"The Hugging Face model {repo_id} has no safetensors weights (downloaded to {folder}).",
            hint="llmctl refuses pickled *.bin weights because loading them can run code; "
            "look for a safetensors version of the model.",
        )
    return folder
