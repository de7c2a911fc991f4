"""ModelSpec and the config.json mapping: both layouts read, current layout written, bad input refused."""

from __future__ import annotations

import json

import pytest

from conftest import FAMILY_CONFIGS, make_hf_model
from llmctl.errors import CheckpointError, SpecError, UnsupportedModel
from llmctl.io.hf import config_from_spec, load_spec, spec_from_config
from llmctl.spec import ModelSpec, RopeScaling, llama3_inv_freq


@pytest.mark.parametrize("family", list(FAMILY_CONFIGS))
def test_config_round_trip_loads_in_transformers(family, tmp_path):
    transformers = pytest.importorskip("transformers")
    make_hf_model(family, tmp_path)
    spec = load_spec(tmp_path)
    written = config_from_spec(spec)
    assert spec_from_config(written) == spec
    original = json.loads((tmp_path / "config.json").read_text())
    for key in ("rope_parameters", "head_dim", "vocab_size", "num_key_value_heads", "tie_word_embeddings"):
        if original.get(key) is not None:
            assert written[key] == original[key], key
    (tmp_path / "config.json").write_text(json.dumps(written))
    reloaded = transformers.AutoConfig.from_pretrained(tmp_path)
    assert type(reloaded).__name__ == FAMILY_CONFIGS[family][0]
    assert reloaded.num_hidden_layers == spec.n_layers


def test_older_config_layout():
    # Llama 3.1 as it was published: rope_theta/rope_scaling at top level, torch_dtype, no head_dim.
    old = {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 128256, "hidden_size": 4096,
        "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8,
        "rms_norm_eps": 1e-05, "rope_theta": 500000.0, "max_position_embeddings": 131072, "torch_dtype": "bfloat16",
        "rope_scaling": {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                         "original_max_position_embeddings": 8192, "rope_type": "llama3"},
        "bos_token_id": 128000, "eos_token_id": [128001, 128008, 128009], "tie_word_embeddings": False,
    }
    spec = spec_from_config(old)
    assert (spec.head_dim, spec.rope_theta, spec.n_kv_heads) == (128, 500000.0, 8)
    assert spec.rope_scaling == RopeScaling("llama3", 8.0, 1.0, 4.0, 8192)
    assert spec.eos_token_ids == (128001, 128008, 128009)
    assert 8.0e9 < spec.param_count() < 8.1e9  # Llama 3.1 8B has 8.03B parameters
    written = config_from_spec(spec, "bfloat16")
    assert written["rope_parameters"]["rope_type"] == "llama3" and "rope_scaling" not in written
    assert written["dtype"] == "bfloat16"


def test_mistral_older_rope_scaling_key_type():
    cfg = {"model_type": "mistral", "vocab_size": 32, "hidden_size": 64, "intermediate_size": 96,
           "num_hidden_layers": 1, "num_attention_heads": 4, "rope_scaling": {"type": "linear", "factor": 2.0},
           "sliding_window": 4096}
    spec = spec_from_config(cfg)
    assert spec.rope_scaling.rope_type == "linear" and spec.sliding_window == 4096 and spec.n_kv_heads == 4


def test_unsupported_architecture_names_supported_ones(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]}))
    with pytest.raises(UnsupportedModel) as e:
        load_spec(tmp_path)
    for name in ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "MixtralForCausalLM", "gpt2"):
        assert name in str(e.value)


def test_missing_and_malformed_config(tmp_path):
    with pytest.raises(CheckpointError, match="config.json is missing"):
        load_spec(tmp_path)
    (tmp_path / "config.json").write_text('{"model_type": "llama",\n "vocab_size": }')
    with pytest.raises(CheckpointError, match=r"config.json:2: malformed JSON"):
        load_spec(tmp_path)


def test_spec_validation_reports_numbers():
    with pytest.raises(SpecError, match="n_heads 6 is not a multiple of n_kv_heads 4"):
        ModelSpec(vocab_size=10, dim=48, n_layers=1, n_heads=6, n_kv_heads=4, ffn_dim=8)
    with pytest.raises(SpecError, match="dim 50 is not divisible by n_heads 4"):
        ModelSpec(vocab_size=10, dim=50, n_layers=1, n_heads=4, n_kv_heads=4, ffn_dim=8)


def test_moe_active_parameters_and_flops():
    spec = ModelSpec(vocab_size=100, dim=16, n_layers=2, n_heads=2, n_kv_heads=1, ffn_dim=32,
                     n_experts=4, experts_per_token=2, family="mixtral")
    expert = 3 * 16 * 32
    assert spec.param_count() - spec.active_param_count() == 2 * 2 * expert
    # Forward FLOPs: 2 per multiply-add of every active matrix (head included, embedding lookup not).
    matmuls = spec.active_param_count() - 100 * 16 - (2 * 2 + 1) * 16
    attn = 2 * 2 * 2 * spec.q_dim * 64 // 2
    assert spec.flops_per_token(64) == 2 * matmuls + attn
    assert spec.flops_per_token(64, training=True) == 3 * spec.flops_per_token(64)
    assert spec.weight_bytes(32) == 4 * spec.param_count()
    assert spec.weight_bytes(4) < spec.weight_bytes(8) < spec.weight_bytes(16)


def test_llama3_frequencies_match_transformers():
    pytest.importorskip("transformers")
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    scaling = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 64, "rope_theta": 500000.0}
    config = LlamaConfig(hidden_size=64, num_attention_heads=2, rope_parameters=scaling, max_position_embeddings=512)
    ref, _ = ROPE_INIT_FUNCTIONS["llama3"](config, "cpu")
    spec = spec_from_config(config.to_dict())
    got = llama3_inv_freq(spec)
    assert len(got) == 16
    assert max(abs(a - b) / b for a, b in zip(got, ref.tolist())) < 1e-6
