"""Both backends against `transformers`: logits, KV-cache decoding, greedy generation on a real model."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from conftest import FAMILY_CONFIGS, SHARED, make_hf_model, needs_shared
from llmctl.io.hf import load_spec

FAMILIES = list(FAMILY_CONFIGS)


def close(got: np.ndarray, ref: np.ndarray, tol: float = 1e-4) -> None:
    """max|a - b| <= tol * max(1, max|b|): absolute on fp32 logits, scaled by the largest logit."""
    bound = tol * max(1.0, float(np.abs(ref).max()))
    err = float(np.abs(got - ref).max())
    assert err <= bound, f"max abs error {err:.3g} > {bound:.3g}"


@pytest.fixture(scope="module", params=FAMILIES)
def family_model(request, tmp_path_factory):
    folder = tmp_path_factory.mktemp(request.param)
    model = make_hf_model(request.param, folder, seed=1)
    return request.param, folder, model


def test_spec_reads_family(family_model):
    family, folder, model = family_model
    spec = load_spec(folder)
    assert spec.family == family
    n_params = sum(p.numel() for p in model.parameters())
    assert spec.param_count() == n_params


def test_logits_match_transformers(family_model, backend):
    family, folder, model = family_model
    gen = np.random.default_rng(0)
    tokens = gen.integers(0, 256, size=(3, 17)).tolist()
    with torch.no_grad():
        ref = model(torch.tensor(tokens)).logits.numpy()
    got = backend.load(folder).logits(tokens)
    assert got.shape == ref.shape == (3, 17, 256)
    close(got, ref)


def test_kv_cache_matches_full_sequence(family_model, backend):
    family, folder, _ = family_model
    loaded = backend.load(folder)
    tokens = np.random.default_rng(1).integers(0, 256, size=(2, 14)).tolist()
    full = loaded.logits(tokens)
    steps = incremental_logits(backend.name, loaded, tokens, prefill=6)
    close(steps, full)


def incremental_logits(name: str, loaded, tokens: list[list[int]], prefill: int) -> np.ndarray:
    """Logits from a prefill of `prefill` tokens, then one token at a time through the cache."""
    if name == "torch":
        from llmctl.backends.torch.model import make_cache

        cache = make_cache(loaded.spec)
        x = torch.tensor(tokens)
        with torch.no_grad():
            parts = [loaded.module(x[:, :prefill], cache)]
            parts += [loaded.module(x[:, t : t + 1], cache) for t in range(prefill, x.shape[1])]
        return torch.cat(parts, 1).numpy()
    import mlx.core as mx

    from llmctl.backends.mlx.model import make_cache

    cache = make_cache(loaded.spec)
    x = mx.array(tokens)
    parts = [loaded.module(x[:, :prefill], cache)]
    parts += [loaded.module(x[:, t : t + 1], cache) for t in range(prefill, x.shape[1])]
    return np.array(mx.concatenate(parts, 1))


def test_moe_aux_loss_matches_transformers(tmp_path, backend):
    model = make_hf_model("mixtral", tmp_path, seed=3)
    tokens = np.random.default_rng(2).integers(0, 256, size=(2, 9)).tolist()
    with torch.no_grad():
        out = model(torch.tensor(tokens), output_router_logits=True)
    ref = float(out.aux_loss) * model.config.router_aux_loss_coef
    loaded = backend.load(tmp_path)
    if backend.name == "torch":
        _, aux = loaded.module(torch.tensor(tokens), return_aux=True)
    else:
        import mlx.core as mx

        _, aux = loaded.module(mx.array(tokens), return_aux=True)
    assert abs(float(aux.item()) - ref) <= 1e-6 * max(1.0, abs(ref))
    assert ref > 0


@needs_shared
def test_stories260k_greedy_reproduces_reference(backend):
    folder = SHARED / "models" / "stories260K-hf"
    reference = json.loads((folder / "reference_greedy.json").read_text())
    want = reference["greedy_ids"]
    loaded = backend.load(folder)
    got = loaded.greedy([loaded.spec.bos_token_id or 1], max_new_tokens=len(want))
    assert got == want


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_training_forward_and_gradients_match_transformers(family, tmp_path):
    """The training path (one matmul over concatenated q/k/v and gate/up weights) gives transformers' loss and
    every parameter's gradient in float32."""
    from llmctl.backends.torch.runtime import Runtime

    model = make_hf_model(family, tmp_path, seed=3).float().train()
    ours = Runtime().load(tmp_path).module.train()
    tokens = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(0))
    ref = model(input_ids=tokens[:, :-1], labels=tokens[:, :-1]).loss  # transformers shifts the labels itself
    got = ours(tokens[:, :-1][:, :-1], targets=tokens[:, :-1][:, 1:])
    assert abs(got.item() - ref.item()) <= 1e-5 * abs(ref.item())
    ref.backward()
    got.backward()
    theirs = dict(model.named_parameters())
    for name, p in ours.named_parameters():
        g, r = p.grad, theirs[name].grad
        assert g is not None, name
        assert float((g - r).abs().max()) <= 1e-5 * max(1e-3, float(r.abs().max())), name


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_grouped_causal_attention_matches_sdpa(dtype):
    """The eager attention used for reduced-precision CPU training: outputs and gradients against SDPA."""
    from llmctl.backends.torch.model import eager_attention_pays, grouped_causal_attention

    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, h, 37, 16, generator=gen, dtype=torch.float32) for h in (6, 2, 2))
    reference = [t.clone().requires_grad_() for t in (q, k, v)]
    y_ref = torch.nn.functional.scaled_dot_product_attention(*reference, is_causal=True, enable_gqa=True)
    ours = [t.to(dtype).requires_grad_() for t in (q, k, v)]
    y = grouped_causal_attention(*ours)
    tol = 1e-5 if dtype == torch.float32 else 3e-2  # bfloat16 inputs: 8-bit mantissas
    assert float((y.detach().float() - y_ref.detach()).abs().max()) <= tol
    weights = torch.randn(y_ref.shape, generator=gen)
    (y_ref * weights).sum().backward()
    (y.float() * weights).sum().backward()
    for a, b in zip(ours, reference):
        assert float((a.grad.float() - b.grad).abs().max()) <= tol * max(1.0, float(b.grad.abs().max()))
    assert eager_attention_pays(ours[0], ours[1]) == (dtype == torch.bfloat16)
    with torch.no_grad():
        assert not eager_attention_pays(ours[0], ours[1])  # inference keeps SDPA
