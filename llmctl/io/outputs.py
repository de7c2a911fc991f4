"""The one safe way to write an output: refuse outputs that hold inputs, stage beside, check, then swap.

Every command that writes a file or folder (quantize, convert, train's model, chat's /save) goes through here:
- `check_output` refuses an --out that is, or contains, an input or the current folder, before anything is touched;
- `replacing` hands out a temporary sibling (`.NAME.tmp-PID`) to fill; only when the block completes does it take
  the place of NAME, and the old NAME is deleted only after that, so a failure or a SIGKILL keeps the old output;
- `clean_stale` removes the temporaries of processes that no longer run (and puts back an old output that a kill
  between the two renames of a swap left aside).
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import shutil
from collections.abc import Iterable, Iterator
from pathlib import Path

from llmctl.errors import ConfigError, OutputError

_STALE = re.compile(r"\.(?P<name>.+)\.(?P<kind>tmp|old|convert|qat)-(?P<pid>\d+)(?P<suffix>\..*)?")
# errors that mean "this output cannot be written here", as opposed to bugs
_WRITE_ERRNOS = {
    errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.ENOTDIR, errno.EISDIR, errno.EEXIST,
    errno.ENOENT, errno.EFBIG, errno.ENAMETOOLONG, errno.ENOTEMPTY, errno.EXDEV,
}  # fmt: skip


def _resolved(path: str | Path) -> Path:
    return Path(path).expanduser().resolve()


def check_output(out: str | Path, inputs: Iterable[str | Path | None], flag: str = "--out") -> None:
    """Refuse an output that is or contains an input (model, data, calibration file) or the current folder."""
    target = _resolved(out)
    here = Path.cwd().resolve()
    if target == here or target in here.parents:
        raise ConfigError(
            f"{flag} {out} is the current folder{'' if target == here else ' or holds it'}; "
            "replacing it would delete the files in it.",
            hint=f"Pick a new folder for {flag}, e.g. {flag} runs/NAME.",
        )
    for given in inputs:
        if given is None or not str(given):
            continue
        source = Path(given).expanduser()
        if not source.exists():
            continue
        resolved = source.resolve()
        if resolved == target or target in resolved.parents:
            what = "is" if resolved == target else "holds"
            raise ConfigError(
                f"{flag} {out} {what} the input {given}; writing there would destroy it.",
                hint=f"Pick another {flag}: an output never replaces what it is made from.",
            )


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's process
    return True


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


def clean_stale(folder: str | Path) -> list[Path]:
    """Remove `.NAME.tmp-PID` files and folders of processes that no longer run; returns what was removed.

    A `.NAME.old-PID` of a dead process is the previous output of a swap that was killed between its two renames:
    it goes back to NAME when NAME is missing, and is removed otherwise.
    """
    folder = Path(folder)
    removed: list[Path] = []
    try:
        entries = list(folder.iterdir())
    except OSError:
        return removed
    for entry in entries:
        match = _STALE.fullmatch(entry.name)
        if not match or int(match["pid"]) == os.getpid() or _alive(int(match["pid"])):
            continue
        if match["kind"] == "old":
            original = folder / (match["name"] + (match["suffix"] or ""))
            if not original.exists():
                with contextlib.suppress(OSError):  # if it cannot go back, it stays where it is: never deleted
                    os.replace(entry, original)
                continue
        _remove(entry)
        removed.append(entry)
    return removed


def temporary_sibling(path: Path, kind: str = "tmp") -> Path:
    # same folder, so the final step is a rename; the leading "." keeps it out of globs such as *.safetensors
    return path.with_name(f".{path.name}.{kind}-{os.getpid()}")


def _file_in_the_way(path: Path) -> Path | None:
    """The nearest existing ancestor of `path` that is a file, not a folder (so nothing can be created under it)."""
    for parent in path.parents:
        if parent.exists() or parent.is_symlink():
            return parent if not parent.is_dir() else None
    return None


def _public_name(path: str | Path) -> str:
    """A file name as the user knows it: `.model.safetensors.tmp-123` -> `model.safetensors`."""
    match = _STALE.fullmatch(Path(path).name)
    return match["name"] + (match["suffix"] or "") if match else Path(path).name


def write_error(error: OSError, out: str | Path) -> OutputError | None:
    """An OutputError naming the file that could not be written, or None when `error` is not about writing."""
    if error.errno not in _WRITE_ERRNOS:
        return None
    where = error.filename or out
    blocker = _file_in_the_way(Path(out))
    if blocker is not None:
        return OutputError(
            f"cannot write {out}: {blocker} is a file, not a folder.",
            hint="Pick an output path inside a folder.",
            reason=f"{blocker} is a file, not a folder",
            path=str(where),
        )
    if error.errno in (errno.ENOSPC, errno.EDQUOT):
        reason = "the disk is full"
    elif error.errno == errno.EROFS:
        reason = "the file system is read-only"
    elif error.errno == errno.ENOTDIR:
        reason = "a part of the path is a file, not a folder"
    elif error.errno == errno.ENOENT:
        reason = "its folder does not exist"
    else:
        reason = error.strerror or str(error)
    detail = "" if _public_name(where) == Path(out).name else f" (writing {_public_name(where)})"
    return OutputError(
        f"cannot write {out}: {reason}{detail}.",
        hint="Nothing was replaced: free some space or pick another output path, then run the command again.",
        reason=reason,
        path=str(where),
    )


def swap(staged: Path, out: Path) -> None:
    """Put a finished `staged` file or folder at `out`; an existing `out` is deleted only once `staged` is in place."""
    if not out.exists() and not out.is_symlink():
        os.replace(staged, out)
        return
    if staged.is_file() and out.is_file():
        os.replace(staged, out)  # one atomic rename
        return
    old = temporary_sibling(out, "old")
    _remove(old)
    os.replace(out, old)
    try:
        os.replace(staged, out)
    except BaseException:
        os.replace(old, out)
        raise
    _remove(old)


@contextlib.contextmanager
def replacing(out: str | Path, parents: bool = True) -> Iterator[Path]:
    """A temporary sibling of `out` to create (a file or a folder); it replaces `out` only if the block completes.

    `parents`: create missing parent folders (else a missing folder is an OutputError).
    """
    out = Path(out)
    try:
        if parents:
            out.parent.mkdir(parents=True, exist_ok=True)
        elif not out.parent.is_dir():
            raise FileNotFoundError(errno.ENOENT, "No such folder", str(out))
    except OSError as e:
        raise (write_error(e, out) or e) from None
    clean_stale(out.parent)
    staged = temporary_sibling(out)
    _remove(staged)
    try:
        yield staged
        swap(staged, out)
    except OutputError as e:  # from a writer inside the staged output: name the output the user asked for
        _remove(staged)
        inner = Path(e.path) if e.path else staged
        raise OutputError(
            f"cannot write {out}: {e.reason} (writing {_public_name(inner)}).", hint=e.hint, reason=e.reason, path=str(inner)
        ) from e
    except OSError as e:
        _remove(staged)
        error = write_error(e, out)
        if error is None:
            raise
        raise error from e
    except BaseException:
        _remove(staged)
        raise
