"""Outputs are never lost: stage, check, swap (llmctl/io/outputs.py), SIGKILL mid-write, checkpoints, and the
`train` -> `quantize --bits 4` -> `chat` chain with no other arguments on both backends."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from typer.testing import CliRunner

from conftest import BACKENDS
from llmctl.cli import app
from llmctl.errors import ConfigError, OutputError
from llmctl.io.outputs import check_output, clean_stale, replacing

from conftest import LLMCTL_ROOT as ROOT  # noqa: E402
DEAD_PID = 2**22 + 12345  # above Linux's largest pid_max: no process has it
TINY = ["data.seq_len=32", "data.batch_size=4", "model.dim=64", "model.n_layers=1", "model.n_heads=2",
        "data.vocab_size=300", "train.dtype=fp32"]  # fmt: skip


def digest(path: Path) -> dict[str, str]:
    return {str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(path.rglob("*")) if p.is_file()}


def test_replacing_keeps_the_old_output_until_the_new_one_is_complete(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("old")
    with pytest.raises(RuntimeError), replacing(out) as staged:
        staged.mkdir()
        (staged / "new.txt").write_text("half")
        raise RuntimeError("killed")
    assert digest(out) == {"old.txt": hashlib.sha256(b"old").hexdigest()}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # the staged folder is gone
    with replacing(out) as staged:
        staged.mkdir()
        (staged / "new.txt").write_text("new")
    assert sorted(p.name for p in out.iterdir()) == ["new.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_stale_temporaries_are_cleaned_and_a_half_swap_is_undone(tmp_path):
    (tmp_path / f".q4.tmp-{DEAD_PID}").mkdir()
    (tmp_path / f".model.safetensors.tmp-{DEAD_PID}").write_bytes(b"half")
    (tmp_path / f".mine.tmp-{os.getpid()}").mkdir()  # this process's own: in use
    old = tmp_path / f".run.old-{DEAD_PID}"  # killed between the two renames of a swap: run/ is missing
    old.mkdir()
    (old / "model.safetensors").write_bytes(b"weights")
    removed = clean_stale(tmp_path)
    assert sorted(p.name for p in removed) == [f".model.safetensors.tmp-{DEAD_PID}", f".q4.tmp-{DEAD_PID}"]
    assert sorted(p.name for p in tmp_path.iterdir()) == [f".mine.tmp-{os.getpid()}", "run"]
    assert (tmp_path / "run" / "model.safetensors").read_bytes() == b"weights"


def test_check_output_refuses_inputs_and_the_current_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "zoo" / "llama").mkdir(parents=True)
    (tmp_path / "data.txt").write_text("x")
    for out, inputs, words in [
        (".", [], "is the current folder"),
        ("..", [], "current folder or holds it"),
        ("zoo", ["zoo/llama"], "--out zoo holds the input zoo/llama"),
        ("zoo/llama", ["zoo/llama"], "--out zoo/llama is the input zoo/llama"),
        (tmp_path / "zoo" / ".." / "zoo", ["zoo/llama"], "holds the input"),
    ]:
        with pytest.raises(ConfigError, match=words.replace(".", r"\.")):
            check_output(out, inputs)
    check_output("zoo/llama-q4", ["zoo/llama", "data.txt", None, "missing"])  # a sibling is fine


def test_an_unwritable_output_names_the_file(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(OutputError, match="file is a file, not a folder"), replacing(tmp_path / "file" / "out") as staged:
        staged.write_text("never")
    with pytest.raises(OutputError, match="its folder does not exist"), replacing(tmp_path / "no" / "x.json", parents=False) as staged:
        staged.write_text("never")


def _subprocess(code: str, cwd: Path, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], cwd=cwd, capture_output=True, text=True, timeout=300,
        env=os.environ | {"PYTHONPATH": str(ROOT)} | env,
    )  # fmt: skip


KILL_WHILE_WRITING = """
    import os, signal, sys
    from llmctl.io import safetensors as st

    real = st._write_data
    def killed(f, data):  # half a tensor reaches the disk, then the process dies without any cleanup
        if {marker!r} in f.name:
            real(f, data[: len(data) // 2])
            f.flush()
            os.kill(os.getpid(), signal.SIGKILL)
        real(f, data)
    st._write_data = killed
    from llmctl.cli import app
    app({argv!r})
"""


@pytest.mark.slow
def test_sigkill_during_quantize_force_keeps_the_old_output(tmp_path):
    pytest.importorskip("transformers")
    from conftest import make_hf_model

    make_hf_model("llama", tmp_path / "llama", rope_theta=10000.0, rope_scaling=None)
    env = {"LLMCTL_CACHE": str(tmp_path / "cache")}
    assert CliRunner().invoke(app, ["quantize", "--model", str(tmp_path / "llama"), "--out", str(tmp_path / "q"), "--bits", "4"]).exit_code == 0
    before = digest(tmp_path / "q")
    argv = ["quantize", "--model", "llama", "--out", "q", "--bits", "8", "--force"]
    done = _subprocess(KILL_WHILE_WRITING.format(marker="model.safetensors", argv=argv), tmp_path, env)
    assert done.returncode == -9, done.stderr
    assert digest(tmp_path / "q") == before  # the 4-bit output is whole
    leftovers = [p.name for p in tmp_path.iterdir() if ".tmp-" in p.name]
    assert leftovers  # the killed run left its staged folder behind ...
    result = CliRunner().invoke(app, ["quantize", "--model", str(tmp_path / "llama"), "--out", str(tmp_path / "q"), "--bits", "8", "--force"])
    assert result.exit_code == 0, result.output
    assert not [p.name for p in tmp_path.iterdir() if ".tmp-" in p.name]  # ... which the next run cleaned up
    assert '"bits": 8' in (tmp_path / "q" / "config.json").read_text()


@pytest.mark.slow
def test_sigkill_during_a_checkpoint_keeps_the_newest_complete_one(small_corpus, tmp_path, monkeypatch):
    args = [*TINY, f"data.train={small_corpus / 'textwrap.txt'}", "train.steps=3", "train.save_every=1", "train.keep_last=1",
            "--out", "run", "--backend", "torch"]  # fmt: skip
    env = {"LLMCTL_CACHE": str(tmp_path / "cache")}
    done = _subprocess(KILL_WHILE_WRITING.format(marker=".step-00000002", argv=["train", *args]), tmp_path, env)
    assert done.returncode == -9, done.stderr
    checkpoints = tmp_path / "run" / "checkpoints"
    assert sorted(p.name for p in checkpoints.iterdir() if not p.name.startswith(".")) == ["step-00000001"]
    assert (checkpoints / "step-00000001" / "state.json").is_file()
    from llmctl.io.model_folder import read_model

    assert read_model(checkpoints / "step-00000001" / "model").spec.dim == 64  # whole and loadable
    monkeypatch.chdir(tmp_path)
    resumed = CliRunner().invoke(app, ["train", *args, "--resume"], env=env)
    assert resumed.exit_code == 0, resumed.output
    assert sorted(p.name for p in checkpoints.iterdir()) == ["step-00000003"]  # stale temporaries cleaned


@pytest.mark.slow
def test_keep_last_zero_never_deletes_the_newest_checkpoint(small_corpus, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    args = [*TINY, f"data.train={small_corpus / 'textwrap.txt'}", "train.steps=2", "train.save_every=1", "train.keep_last=0", "--out", "run"]
    result = CliRunner().invoke(app, ["train", "--backend", "torch", *args])
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir()) == ["step-00000002"]


@pytest.mark.slow
@pytest.mark.parametrize("backend", BACKENDS)
def test_train_quantize_chat_chain_with_no_arguments(backend, small_corpus, tmp_path, monkeypatch):
    """`llmctl train`, `llmctl quantize --bits 4`, `llmctl chat` in a fresh folder, each finding what the last wrote."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("LLMCTL_CACHE", str(tmp_path / "cache"))
    runner = CliRunner()
    train = runner.invoke(app, ["train", "--backend", backend, *TINY, f"data.train={small_corpus / 'textwrap.txt'}", "train.steps=2"])
    assert train.exit_code == 0, train.output
    assert (tmp_path / "runs" / "train" / "model" / "model.safetensors").is_file()

    quantize = runner.invoke(app, ["quantize", "--bits", "4", "--backend", backend])
    assert quantize.exit_code == 0, quantize.output
    said = " ".join(quantize.output.split())
    out = tmp_path / "runs" / "train" / "model-q4"
    assert f"-> {Path('runs/train/model-q4').resolve()}" in said or f"-> {out}" in said
    assert '"bits": 4' in (out / "config.json").read_text()

    chat = runner.invoke(app, ["chat", "--backend", backend, "--max-tokens", "4"], input="hello\n/stats\n")
    assert chat.exit_code == 0, chat.output
    first = chat.stderr.strip().splitlines()[0]
    assert "model-q4" in first and "4-bit, group 64" in first, first
    assert "context:" in chat.output

    # the latest model is now the 4-bit one: quantizing again starts from the float model it was made from
    again = runner.invoke(app, ["quantize", "--bits", "8", "--backend", backend])
    assert again.exit_code == 0, again.output
    assert '"bits": 8' in (tmp_path / "runs" / "train" / "model-q8" / "config.json").read_text()


@pytest.mark.parametrize(
    "errno_name, words",
    [("ENOSPC", "the disk is full"), ("EROFS", "the file system is read-only"), ("EDQUOT", "the disk is full")],
)
def test_write_errors_say_what_went_wrong_and_where(errno_name, words, tmp_path):
    import errno

    code = getattr(errno, errno_name)
    with pytest.raises(OutputError, match=f"cannot write .*q4: {words} \\(writing model.safetensors\\)"):
        with replacing(tmp_path / "q4") as staged:
            staged.mkdir()
            raise OSError(code, os.strerror(code), str(staged / f".model.safetensors.tmp-{os.getpid()}"))
    assert sorted(p.name for p in tmp_path.iterdir()) == []


@pytest.mark.slow
def test_a_full_disk_during_a_checkpoint_is_a_message_and_resume_continues(small_corpus, tmp_path, monkeypatch):
    import errno

    from llmctl.io import safetensors as st

    monkeypatch.chdir(tmp_path)
    args = [*TINY, f"data.train={small_corpus / 'textwrap.txt'}", "train.steps=3", "train.save_every=1", "--out", "run"]
    real = st._write_data

    def full(f, data):
        if ".step-00000002" in f.name:
            raise OSError(errno.ENOSPC, "No space left on device", f.name)
        real(f, data)

    monkeypatch.setattr(st, "_write_data", full)
    result = CliRunner().invoke(app, ["train", "--backend", "torch", *args])
    said = " ".join(result.output.split())
    assert result.exit_code == 1 and isinstance(result.exception, SystemExit), said
    assert f"cannot write the checkpoint {Path('run/checkpoints/step-00000002')}: the disk is full" in said
    checkpoints = tmp_path / "run" / "checkpoints"
    assert sorted(p.name for p in checkpoints.iterdir()) == ["step-00000001"]
    monkeypatch.setattr(st, "_write_data", real)
    resumed = CliRunner().invoke(app, ["train", "--backend", "torch", *args, "--resume"])
    assert resumed.exit_code == 0, resumed.output
    assert sorted(p.name for p in checkpoints.iterdir()) == ["step-00000002", "step-00000003"]
