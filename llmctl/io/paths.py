"""Files of a model are read only from inside its folder: names that climb out, absolute names and symlinks leaving it are refused."""

from __future__ import annotations

from pathlib import Path, PurePosixPath, PureWindowsPath

from llmctl.errors import CheckpointError


def _roots(folder: Path) -> list[Path]:
    roots = [folder.resolve()]
    if folder.parent.name == "snapshots":  # the Hugging Face cache links snapshot files to ../../blobs/HASH
        roots.append((folder.parent.parent / "blobs").resolve())
    return roots


def inside(folder: str | Path, name: str, source: str | Path | None = None) -> Path:
    """`folder / name`, refused when `name` is absolute or climbs out, or when it resolves (symlinks) outside `folder`.

    `source` names the file that gave `name` (a shard index), for the message; the file's bytes are never shown.
    """
    folder = Path(folder)
    where = f"{source}: " if source else ""
    if (
        not name
        or PurePosixPath(name).is_absolute()
        or PureWindowsPath(name).is_absolute()
        or PureWindowsPath(name).drive
        or ".." in PurePosixPath(name.replace("\\", "/")).parts
    ):
        raise CheckpointError(
            f"{where}the file name {name!r} points outside the model folder {folder}; llmctl reads a model's "
            "files only from inside its folder.",
            hint="Use plain file names inside the folder (e.g. model-00001-of-00002.safetensors).",
        )
    path = folder / name
    if path.exists() or path.is_symlink():
        real = path.resolve()
        if not any(real == root or root in real.parents for root in _roots(folder)):
            raise CheckpointError(
                f"{path} is a symbolic link to {real}, outside the model folder {folder}; llmctl reads a model's "
                "files only from inside its folder.",
                hint="Copy the file into the folder instead of linking to it, if you trust it.",
            )
    return path
