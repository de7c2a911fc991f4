"""Hugging Face `config.json` <-> ModelSpec (one table per family) and the parameter-name table."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any

from llmctl.errors import CheckpointError, SpecError, UnsupportedModel
from llmctl.spec import ModelSpec, RopeScaling

# model_type -> (architecture class, family); the order is the one error messages list.
ARCHITECTURES = {
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "mixtral": "MixtralForCausalLM",
}
SUPPORTED = ", ".join(f"{arch} ({mt})" for mt, arch in ARCHITECTURES.items())
TRANSFORMERS_VERSION = "5.23.0"  # the writer whose layout we follow
_LAYER = re.compile(r"model\.layers\.(\d+)\.")


def _unsupported(path: Path, what: str) -> UnsupportedModel:
    return UnsupportedModel(
        f"{path} has {what}; llmctl loads {SUPPORTED}.",
        hint="Pick a model of a supported family, or run `llmctl info PATH` to see what was read.",
    )


def read_config(folder: Path) -> dict[str, Any]:
    """The raw config.json of a model folder, with a clear error when it is missing or malformed."""
    from llmctl.io.paths import inside

    path = inside(folder, "config.json")
    if not path.is_file():
        raise CheckpointError(f"{path} is missing: a model folder needs a Hugging Face config.json.")
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}:{e.lineno}: malformed JSON ({e.msg}).") from None
    except UnicodeDecodeError as e:
        raise CheckpointError(f"{path} is not UTF-8 text (byte {e.start}).") from None
    if not isinstance(config, dict):
        raise CheckpointError(f"{path} must hold a JSON object, found {type(config).__name__}.")
    return config


def _bad_value(path: Path, key: str, value: Any, expected: str) -> CheckpointError:
    return CheckpointError(
        f"{path}: {key} is {json.dumps(value)[:80]}; expected {expected}.",
        hint="Fix config.json (it may have been edited by hand), or download the model again.",
    )


_REQUIRED = object()


def _int(config: dict[str, Any], key: str, path: Path, default: Any = None, where: str = "") -> Any:
    """config[key] as an int; a whole-number float (288.0) is accepted, 288.9, "abc" or a required null are refused."""
    value = config.get(key)
    if value is None:
        if default is _REQUIRED:
            raise _bad_value(path, where + key, value, "a whole number")
        return default
    if type(value) is float and value.is_integer() and abs(value) < 2**63:
        return int(value)
    if type(value) is not int:
        raise _bad_value(path, where + key, value, "a whole number")
    return value


def _float(config: dict[str, Any], key: str, path: Path, default: float, where: str = "") -> float:
    value = config.get(key)
    if value is None:
        return default
    if type(value) not in (int, float) or not math.isfinite(value):
        raise _bad_value(path, where + key, value, "a number")
    return float(value)


def _rope(config: dict[str, Any], path: Path) -> tuple[float, RopeScaling | None]:
    """RoPE theta and scaling from `rope_parameters` (transformers 5) or `rope_theta`/`rope_scaling` (older)."""
    key = "rope_parameters" if config.get("rope_parameters") is not None else "rope_scaling"
    params = config.get(key) or {}
    if not isinstance(params, dict):
        raise _bad_value(path, key, params, "an object such as {\"rope_type\": \"default\", \"rope_theta\": 10000.0}")
    theta = _float(params, "rope_theta", path, _float(config, "rope_theta", path, 10_000.0), f"{key}.")
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type == "default":
        return theta, None
    if rope_type not in ("linear", "llama3"):
        raise UnsupportedModel(
            f"{path} has rope type {rope_type!r}; llmctl implements default, linear and llama3.",
            hint="Pick a model whose RoPE is one of those (most Llama, Mistral and Qwen2 models).",
        )
    floats = {k: _float(params, k, path, 0.0, f"{key}.") for k in ("factor", "low_freq_factor", "high_freq_factor") if k in params}
    ints = {k: _int(params, k, path, None, f"{key}.") for k in ("original_max_position_embeddings",) if k in params}
    return theta, RopeScaling(rope_type=rope_type, **floats, **ints)


def _eos_ids(value: Any, path: Path) -> tuple[int, ...]:
    if value is None:
        return ()
    ids = value if isinstance(value, list) else [value]
    if not all(type(i) is int and i >= 0 for i in ids):
        raise _bad_value(path, "eos_token_id", value, "a token id or a list of token ids")
    return tuple(ids)


def _token_id(config: dict[str, Any], key: str, path: Path) -> int | None:
    value = config.get(key)
    if value is not None and (type(value) is not int or value < 0):
        raise _bad_value(path, key, value, "a token id (a whole number) or null")
    return value


def spec_from_config(config: dict[str, Any], path: Path = Path("config.json")) -> ModelSpec:
    """Map a Hugging Face config (current or older layout) to a ModelSpec, refusing what we cannot run."""
    model_type = config.get("model_type")
    if model_type not in ARCHITECTURES:
        archs = config.get("architectures") or []
        raise _unsupported(path, f"model_type={model_type!r} (architectures {archs})")
    act = config.get("hidden_act", "silu")
    if act not in ("silu", "swish"):
        raise _unsupported(path, f"hidden_act={act!r} (llmctl's MLP is SwiGLU with silu)")
    if config.get("mlp_bias") or (model_type != "qwen2" and config.get("attention_bias")):
        raise _unsupported(path, "biases on the attention output or MLP (attention_bias/mlp_bias)")
    if model_type == "qwen2" and config.get("use_sliding_window"):
        raise _unsupported(path, "use_sliding_window=true (per-layer windows of Qwen2 are not implemented)")
    missing = [k for k in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size") if k not in config]
    if missing:
        raise CheckpointError(f"{path} lacks {', '.join(missing)}.")
    theta, scaling = _rope(config, path)
    n_heads = _int(config, "num_attention_heads", path, _REQUIRED)
    window = _int(config, "sliding_window", path) if model_type in ("mistral", "mixtral") else None
    head_dim = _int(config, "head_dim", path)
    known = {
        "architectures", "model_type", "vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
        "num_key_value_heads", "intermediate_size", "head_dim", "rms_norm_eps", "rope_theta", "rope_scaling",
        "rope_parameters", "max_position_embeddings", "attention_bias", "mlp_bias", "tie_word_embeddings",
        "sliding_window", "num_local_experts", "num_experts_per_tok", "router_aux_loss_coef", "bos_token_id",
        "eos_token_id", "pad_token_id", "initializer_range", "hidden_act", "transformers_version", "dtype",
        "torch_dtype", "use_sliding_window", "max_window_layers", "layer_types", "use_cache", "attention_dropout",
        "pretraining_tp", "output_router_logits", "router_jitter_noise",
    }
    try:
        return ModelSpec(
            vocab_size=_int(config, "vocab_size", path, _REQUIRED),
            dim=_int(config, "hidden_size", path, _REQUIRED),
            n_layers=_int(config, "num_hidden_layers", path, _REQUIRED),
            n_heads=n_heads,
            n_kv_heads=_int(config, "num_key_value_heads", path) or n_heads,
            ffn_dim=_int(config, "intermediate_size", path, _REQUIRED),
            head_dim=head_dim,
            norm_eps=_float(config, "rms_norm_eps", path, 1e-6),
            rope_theta=theta,
            rope_scaling=scaling,
            max_seq_len=_int(config, "max_position_embeddings", path, 2048),
            attn_bias=model_type == "qwen2",
            tie_embeddings=bool(config.get("tie_word_embeddings", False)),
            sliding_window=window or None,
            n_experts=_int(config, "num_local_experts", path, 0) if model_type == "mixtral" else 0,
            experts_per_token=_int(config, "num_experts_per_tok", path, 2),
            router_aux_loss_coef=_float(config, "router_aux_loss_coef", path, 0.0) if model_type == "mixtral" else 0.0,
            family=model_type,
            bos_token_id=_token_id(config, "bos_token_id", path),
            eos_token_ids=_eos_ids(config.get("eos_token_id"), path),
            pad_token_id=_token_id(config, "pad_token_id", path),
            init_std=_float(config, "initializer_range", path, 0.02),
            extra={k: v for k, v in config.items() if k not in known},
        )
    except SpecError as e:
        raise CheckpointError(f"{path}: {e.message}") from None


def config_from_spec(spec: ModelSpec, dtype: str = "float32") -> dict[str, Any]:
    """The config.json that current `transformers` writes for this model (keys sorted as it sorts them)."""
    rope: dict[str, Any] = {"rope_theta": spec.rope_theta, "rope_type": "default"}
    if spec.rope_scaling is not None:
        s = spec.rope_scaling
        rope = {"rope_theta": spec.rope_theta, "rope_type": s.rope_type, "factor": s.factor}
        if s.rope_type == "llama3":
            rope |= {
                "low_freq_factor": s.low_freq_factor,
                "high_freq_factor": s.high_freq_factor,
                "original_max_position_embeddings": s.original_max_position_embeddings,
            }
    eos = list(spec.eos_token_ids) if len(spec.eos_token_ids) > 1 else (spec.eos_token_ids[0] if spec.eos_token_ids else None)
    config: dict[str, Any] = {
        "architectures": [ARCHITECTURES[spec.family]],
        "attention_dropout": 0.0,
        "bos_token_id": spec.bos_token_id,
        "dtype": dtype,
        "eos_token_id": eos,
        "head_dim": spec.head_dim,
        "hidden_act": "silu",
        "hidden_size": spec.dim,
        "initializer_range": spec.init_std,
        "intermediate_size": spec.ffn_dim,
        "max_position_embeddings": spec.max_seq_len,
        "model_type": spec.family,
        "num_attention_heads": spec.n_heads,
        "num_hidden_layers": spec.n_layers,
        "num_key_value_heads": spec.n_kv_heads,
        "pad_token_id": spec.pad_token_id,
        "rms_norm_eps": spec.norm_eps,
        "rope_parameters": rope,
        "rope_theta": spec.rope_theta,  # also at the top level: mlx-lm and older readers look for it there
        "tie_word_embeddings": spec.tie_embeddings,
        "transformers_version": TRANSFORMERS_VERSION,
        "use_cache": True,
        "vocab_size": spec.vocab_size,
    }
    if spec.family == "llama":
        config |= {"attention_bias": False, "mlp_bias": False, "pretraining_tp": 1}
    elif spec.family == "mistral":
        config["sliding_window"] = spec.sliding_window
    elif spec.family == "qwen2":
        del config["head_dim"]  # Qwen2's config has no head_dim: it is always hidden_size / heads
        config |= {
            "layer_types": ["full_attention"] * spec.n_layers,
            "max_window_layers": spec.n_layers,
            "sliding_window": None,
            "use_sliding_window": False,
        }
    elif spec.family == "mixtral":
        config |= {
            "num_experts_per_tok": spec.experts_per_token,
            "num_local_experts": spec.n_experts,
            "output_router_logits": False,
            "router_aux_loss_coef": spec.router_aux_loss_coef,
            "router_jitter_noise": 0.0,
            "sliding_window": spec.sliding_window,
        }
    config |= spec.extra
    return dict(sorted(config.items()))


def load_spec(folder: Path) -> ModelSpec:
    return spec_from_config(read_config(folder), folder / "config.json")


def parameter_shapes(spec: ModelSpec) -> dict[str, tuple[int, ...]]:
    """Every tensor a checkpoint of this spec holds, by its Hugging Face name."""
    D, F, V = spec.dim, spec.ffn_dim, spec.vocab_size
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (V, D)}
    for i in range(spec.n_layers):
        p = f"model.layers.{i}."
        shapes[p + "input_layernorm.weight"] = (D,)
        shapes[p + "post_attention_layernorm.weight"] = (D,)
        for name, out in (("q", spec.q_dim), ("k", spec.kv_dim), ("v", spec.kv_dim)):
            shapes[p + f"self_attn.{name}_proj.weight"] = (out, D)
            if spec.attn_bias:
                shapes[p + f"self_attn.{name}_proj.bias"] = (out,)
        shapes[p + "self_attn.o_proj.weight"] = (D, spec.q_dim)
        if spec.n_experts:
            shapes[p + "block_sparse_moe.gate.weight"] = (spec.n_experts, D)
            for e in range(spec.n_experts):
                q = p + f"block_sparse_moe.experts.{e}."
                shapes |= {q + "w1.weight": (F, D), q + "w2.weight": (D, F), q + "w3.weight": (F, D)}
        else:
            shapes |= {p + "mlp.gate_proj.weight": (F, D), p + "mlp.up_proj.weight": (F, D), p + "mlp.down_proj.weight": (D, F)}
    shapes["model.norm.weight"] = (D,)
    if not spec.tie_embeddings:
        shapes["lm_head.weight"] = (V, D)
    return shapes


def _ignorable(name: str, spec: ModelSpec) -> bool:
    # Old checkpoints store RoPE buffers; tied checkpoints sometimes store the head anyway.
    return name.endswith("rotary_emb.inv_freq") or (spec.tie_embeddings and name == "lm_head.weight")


def check_size(spec: ModelSpec, shapes: dict[str, tuple[int, ...]], folder: Path) -> None:
    """Depth and width from config.json against the tensor headers, before listing every expected tensor (which a
    config.json claiming millions of layers would make huge)."""
    layers = {int(m.group(1)) for name in shapes if (m := _LAYER.match(name))}
    embed = shapes.get("model.embed_tokens.weight")
    problems = []
    if len(layers) != spec.n_layers:
        problems.append(f"config.json says num_hidden_layers={spec.n_layers}, the weights hold {len(layers)} layers")
    if embed is not None and tuple(embed) != (spec.vocab_size, spec.dim):
        problems.append(
            f"config.json says vocab_size={spec.vocab_size}, hidden_size={spec.dim}; "
            f"tensor model.embed_tokens.weight has shape {list(embed)}"
        )
    if problems:
        raise CheckpointError(
            f"{folder} does not match its config.json:\n  " + "\n  ".join(problems),
            hint="The weights may belong to a different model, or config.json was edited.",
        )


def check_tensors(
    spec: ModelSpec, shapes: dict[str, tuple[int, ...]], folder: Path, where: dict[str, str],
    quantization: dict[str, Any] | None = None,
) -> list[str]:
    """Raise CheckpointError naming file and tensor when names or shapes disagree; returns names to drop.

    Quantized layers (config.json's "quantization", passed as `quantization`) are checked by the float shapes their
    packed weights, scales and biases stand for.
    """
    from llmctl.quant import float_shapes

    shapes = float_shapes(quantization, shapes, folder)
    check_size(spec, shapes, folder)
    expected = parameter_shapes(spec)
    problems = []
    for name, shape in expected.items():
        if name not in shapes:
            problems.append(f"tensor {name} {list(shape)} is missing")
        elif tuple(shapes[name]) != shape:
            file = where.get(name, "model.safetensors")
            problems.append(f"{folder / file}: tensor {name} has shape {list(shapes[name])}, config.json implies {list(shape)}")
    extra = [n for n in shapes if n not in expected]
    unknown = [n for n in extra if not _ignorable(n, spec)]
    for name in unknown[:5]:
        problems.append(f"{folder / where.get(name, 'model.safetensors')}: unexpected tensor {name}")
    if problems:
        more = f" (and {len(unknown) - 5} more unexpected)" if len(unknown) > 5 else ""
        raise CheckpointError(
            f"{folder} does not match its config.json:\n  " + "\n  ".join(problems[:12]) + more,
            hint="The weights may belong to a different model, or config.json was edited.",
        )
    return extra
