"""Several processes through the real engines (torchrun with gloo, mlx.launch) match one process."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from test_train import TINY, losses

STEPS = 5


def _env() -> dict[str, str]:
    # Children import the same llmctl as this process (installed, or the checkout through PYTHONPATH).
    import llmctl

    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(Path(llmctl.__file__).resolve().parents[1]), env.get("PYTHONPATH", "")])
    return env


def _single(corpus: Path, out: Path, backend: str, extra: list[str] = ()) -> list[float]:
    args = [*TINY, f"data.train={corpus}", f"train.steps={STEPS}", "train.eval_every=100", *extra]
    cmd = [sys.executable, "-m", "llmctl", "train", "--backend", backend, "--out", str(out), *args]
    subprocess.run(cmd, check=True, env=_env(), capture_output=True, timeout=600)
    return losses(out)


@pytest.mark.slow
@pytest.mark.multiprocess
@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_torchrun_two_processes_match_one(strategy, small_corpus, tmp_path):
    one = _single(small_corpus, tmp_path / "one", "torch")
    args = [*TINY, f"data.train={small_corpus}", f"train.steps={STEPS}", "train.eval_every=100"]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", "-m", "llmctl",
           "train", "--backend", "torch", "--strategy", strategy, "--out", str(tmp_path / "two"), *args]
    done = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    two = losses(tmp_path / "two")
    assert len(two) == len(one) == STEPS
    for a, b in zip(one, two):
        assert abs(a - b) <= 1e-5 * abs(a), (one, two)
    # Only rank 0 wrote files: one metrics line per step, one model.
    assert (tmp_path / "two" / "model" / "model.safetensors").is_file()


@pytest.mark.slow
@pytest.mark.multiprocess
def test_nproc_flag_launches_torchrun(small_corpus, tmp_path):
    one = _single(small_corpus, tmp_path / "one", "torch", ["data.batch_size=8"])
    args = [*TINY, f"data.train={small_corpus}", f"train.steps={STEPS}", "train.eval_every=100", "data.batch_size=8"]
    cmd = [sys.executable, "-m", "llmctl", "train", "--nproc", "2", "--out", str(tmp_path / "two"), *args]
    done = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    two = losses(tmp_path / "two")
    assert all(abs(a - b) <= 1e-5 * abs(a) for a, b in zip(one, two)) and len(two) == STEPS
    config = json.loads((tmp_path / "two" / "model" / "config.json").read_text())
    assert config["hidden_size"] == 64


def _mlx_launcher() -> list[str]:
    import shutil

    launcher = shutil.which("mlx.launch", path=str(Path(sys.executable).parent) + os.pathsep + os.environ.get("PATH", ""))
    return [launcher] if launcher else [sys.executable, "-m", "mlx.launch"]


@pytest.mark.slow
@pytest.mark.multiprocess
def test_mlx_launch_two_processes_match_one(small_corpus, tmp_path):
    pytest.importorskip("mlx.core", reason="MLX is not installed")
    import socket

    one = _single(small_corpus, tmp_path / "one", "mlx")
    with socket.socket() as s:  # a free port, so concurrent runs do not meet on the ring's default one
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    args = [*TINY, f"data.train={small_corpus}", f"train.steps={STEPS}", "train.eval_every=100"]
    cmd = [*_mlx_launcher(), "-n", "2", "--backend", "ring", "--starting-port", str(port), "--", sys.executable, "-m",
           "llmctl", "train", "--backend", "mlx", "--out", str(tmp_path / "two"), *args]
    done = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=600)
    # mlx.launch exits 0 even when a process fails; it warns instead.
    assert done.returncode == 0 and "exited with code" not in done.stdout + done.stderr, done.stderr[-3000:]
    two = losses(tmp_path / "two")
    assert len(two) == len(one) == STEPS
    for a, b in zip(one, two):
        assert abs(a - b) <= 1e-5 * abs(a), (one, two)
    assert (tmp_path / "two" / "model" / "model.safetensors").is_file()
