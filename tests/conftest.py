"""Shared fixtures: tiny Hugging Face checkpoints of each family, the ../shared folder, backends."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("COLUMNS", "400")  # rich wraps messages at the terminal width; tests read them whole

from llmctl.backends import available_backends

# The folder that holds the llmctl this process imported (installed, or a checkout): child processes import the
# same one through PYTHONPATH (a checkout in CI has no built extension; the installed package has).
LLMCTL_ROOT = Path(__import__("llmctl").__file__).resolve().parents[1]
SHARED = Path(os.environ.get("LLMCTL_SHARED", Path(__file__).resolve().parents[2] / "shared"))
BACKENDS = available_backends()

needs_shared = pytest.mark.skipif(not SHARED.is_dir(), reason=f"shared test data not found at {SHARED}")

# Tiny configs of each supported family (2 layers, width 64, vocab 256), in transformers' own terms.
TINY = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=512, rms_norm_eps=1e-5)
FAMILY_CONFIGS = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", dict(TINY, rope_theta=500000.0, rope_scaling={
        "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 64})),
    "mistral": ("MistralConfig", "MistralForCausalLM", dict(TINY, sliding_window=5, num_key_value_heads=1)),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", dict(TINY, tie_word_embeddings=True, num_key_value_heads=4)),
    "mixtral": ("MixtralConfig", "MixtralForCausalLM", dict(TINY, num_local_experts=4, num_experts_per_tok=2,
                                                          router_aux_loss_coef=0.02)),
}


def make_hf_model(family: str, folder: Path, seed: int = 0, scale: float = 1.0, **overrides):
    """Build a random `transformers` model of a family, save it with save_pretrained, return the model."""
    transformers = pytest.importorskip("transformers")
    import torch

    config_name, model_name, kwargs = FAMILY_CONFIGS[family]
    config = getattr(transformers, config_name)(**(kwargs | overrides))
    torch.manual_seed(seed)
    model = getattr(transformers, model_name)(config).eval()
    if scale != 1.0:
        # Larger weights make the argmax decisive, so greedy paths have no near-ties.
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "norm" not in name:
                    p.mul_(scale)
    model.save_pretrained(folder)
    return model


@pytest.fixture(params=BACKENDS)
def backend(request):
    from llmctl.backends import get_backend

    return get_backend(request.param)


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models: a second intra-op thread only adds synchronisation (and spins when cores are busy). A module
    takes it with `pytestmark = pytest.mark.usefixtures("one_thread")`."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True, scope="session")
def _private_cache(tmp_path_factory):
    """Token caches and the last-model marker go to a temporary folder, not the user's ~/.cache."""
    os.environ["LLMCTL_CACHE"] = str(tmp_path_factory.mktemp("llmctl-cache"))
    yield


@pytest.fixture(scope="session")
def small_corpus(tmp_path_factory) -> Path:
    """About 300 KB of real text every machine has: a few of the Python standard library's own modules."""
    import sysconfig

    folder = tmp_path_factory.mktemp("corpus")
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    for name in ("argparse.py", "textwrap.py", "difflib.py", "shutil.py", "tarfile.py", "pathlib.py"):
        text = (stdlib / name).read_text(encoding="utf-8")
        (folder / name.replace(".py", ".txt")).write_text(text, encoding="utf-8")
    return folder
