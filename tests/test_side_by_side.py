"""Two models in one process (a policy and its reference, a teacher and its student, a server's requests): generation
keeps no process-wide state, so each model gives, alternately or from two threads at once, the greedy tokens it gives
alone, and torch's settings are as they were."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
import torch

from conftest import make_hf_model
from llmctl.generation import SamplingParams

N_NEW = 24
PROMPTS = ([1, 17, 42, 7, 99, 3], [5, 200, 64, 9, 77, 130, 12])


def _quantize(source: Path, out: Path) -> Path:
    from llmctl.commands.quantize import QuantizeConfig, run
    from llmctl.config import load_recipe

    cfg = load_recipe(QuantizeConfig, "quantize", "default", ["quant.bits=4", "quant.group_size=32", "quant.keep="],
                      {"model": str(source), "out": out})  # fmt: skip
    return run(cfg, "torch")


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> tuple[Path, Path]:
    """A float Llama and a 4-bit Qwen2 (tied embedding quantized too): different shapes, layers and kernels."""
    root = tmp_path_factory.mktemp("side")
    make_hf_model("llama", root / "llama", seed=0, scale=4.0)
    make_hf_model("qwen2", root / "qwen2", seed=1, scale=4.0)
    return root / "llama", _quantize(root / "qwen2", root / "qwen2-q4")


def _settings() -> tuple:
    return torch.get_num_threads(), torch.backends.mkldnn.enabled


def _alone(backend, folders) -> list[list[int]]:
    return [backend.load(folder).greedy(prompt, N_NEW) for folder, prompt in zip(folders, PROMPTS)]


def test_two_models_alternately(backend, folders):
    want = _alone(backend, folders)
    assert want[0] != want[1]
    models = [backend.load(folder) for folder in folders]
    before = _settings()
    params = SamplingParams(max_tokens=N_NEW)
    streams = [model.generate(prompt, params) for model, prompt in zip(models, PROMPTS)]
    got: list[list[int]] = [[], []]
    for a, b in zip(*streams):  # one token of each in turn: each generation is mid-way while the other runs
        got[0].append(a)
        got[1].append(b)
        assert _settings() == before
    assert got == want
    assert _settings() == before
    # and batches of one model between tokens of the other's chat-style generation with a prompt cache
    cache = models[0].new_cache()
    stream = models[0].generate(PROMPTS[0], params, cache)
    first = [next(stream)]
    assert models[1].generate_batch([PROMPTS[1]], params) == [want[1]]
    assert first + list(stream) == want[0]


def test_two_models_from_two_threads_at_once(backend, folders):
    want = _alone(backend, folders)
    models = [backend.load(folder) for folder in folders]
    before = _settings()
    got: list[list[list[int]]] = [[], []]
    errors: list[BaseException] = []
    start = threading.Barrier(2)

    def run(i: int) -> None:
        try:
            start.wait()
            for _ in range(3):  # several generations each, so that they overlap whatever the scheduling
                got[i].append(models[i].greedy(PROMPTS[i], N_NEW))
        except BaseException as e:  # noqa: BLE001 (reported below, in the test's thread)
            errors.append(e)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    assert got == [[want[0]] * 3, [want[1]] * 3]
    assert _settings() == before
