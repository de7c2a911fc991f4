"""The shared training loop and its pieces on both backends: loss normalization over a whole step, packed example
batches, the chunked log-prob and divergence primitives, loading for training (frozen, quantized), a frozen teacher."""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest

from conftest import BACKENDS, make_hf_model
from llmctl.spec import ModelSpec
from llmctl.training.batch import Batch, pack
from llmctl.training.config import DType, LoopConfig, OptimConfig

SPEC = ModelSpec(vocab_size=256, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=128, max_seq_len=128)
MOE = ModelSpec(vocab_size=256, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=128, max_seq_len=128, n_experts=4,
                router_aux_loss_coef=0.02, family="mixtral")


def modules(backend: str):
    if backend == "torch":
        from llmctl.backends.torch import engine, objectives
    else:
        from llmctl.backends.mlx import engine, objectives
    return engine, objectives


def make_engine(backend: str, **loop):
    engine, _ = modules(backend)
    return engine.Engine(LoopConfig(dtype=DType.fp32, **loop), OptimConfig(lr=1e-2, warmup_steps=0))


def gradients(backend: str, eng) -> dict[str, np.ndarray]:
    if backend == "torch":
        return {n: p.grad.detach().numpy().copy() for n, p in eng.model.named_parameters() if p.grad is not None}
    from mlx.utils import tree_flatten

    return {n: np.array(g) for n, g in tree_flatten(eng.grads)}


def params(backend: str, model) -> dict[str, np.ndarray]:
    if backend == "torch":
        return {n: p.detach().float().numpy().copy() for n, p in model.named_parameters()}
    from mlx.utils import tree_flatten

    return {n: np.array(p) for n, p in tree_flatten(model.parameters())}


def uneven_batch(rows: int = 8, seq: int = 24, seed: int = 0) -> Batch:
    """Rows whose loss masks cover very different numbers of positions (2 to 24), some packed with two examples."""
    rng = np.random.default_rng(seed)
    examples = []
    for i in range(rows * 2):
        n = int(rng.integers(3, 14)) if i % 3 else 25
        tokens = rng.integers(1, 256, size=n).tolist()
        weights = (np.arange(n - 1) >= rng.integers(0, n - 2)).astype(np.float32).tolist()  # a prompt, then targets
        examples.append((tokens, weights))
    batch = pack(examples, seq)
    assert batch.rows >= 8
    return batch.slice(0, 8)


# -- 2. loss normalization --------------------------------------------------------------------------------------

# The load-balancing loss is a product of batch statistics, so it does not split over micro-batches; the MoE case
# holds the routed experts' cross-entropy to the rule.
@pytest.mark.parametrize("spec", [SPEC, replace(MOE, router_aux_loss_coef=0.0)], ids=["dense", "moe"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_accumulating_four_micro_batches_gives_the_gradient_of_one(backend, spec):
    """grad_accum=4 on masked rows of uneven target counts = grad_accum=1 = the mean over the step's target tokens."""
    from llmctl.training.loop import accumulate

    _, objectives = modules(backend)
    batch = uneven_batch()
    counts = [int(np.count_nonzero(batch.slice(i, i + 2).loss_mask)) for i in range(0, 8, 2)]
    assert len(set(counts)) > 1  # micro-batches of different sizes: a mean of means would differ
    grads, losses = [], []
    for parts in (1, 4):
        eng = make_engine(backend)
        eng.build(spec)
        rows = 8 // parts
        totals = accumulate(eng, objectives.NextToken(), [batch.slice(i * rows, (i + 1) * rows) for i in range(parts)])
        grads.append(gradients(backend, eng))
        losses.append(totals["loss"])
    assert abs(losses[0] - losses[1]) < 1e-5
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) > 10
    for name in grads[0]:
        np.testing.assert_allclose(grads[1][name], grads[0][name], atol=1e-6, rtol=1e-4, err_msg=name)
    # ...and it is the mean over all target tokens, computed directly on whole logits
    eng = make_engine(backend)
    eng.build(spec)
    want = direct_masked_mean(backend, eng.model, batch)
    assert abs(losses[0] - want) < 1e-5, (losses[0], want)
    mean_of_means = np.mean([direct_masked_mean(backend, eng.model, batch.slice(i, i + 2)) for i in range(0, 8, 2)])
    assert abs(mean_of_means - want) > 1e-4  # the test can tell the two apart


def direct_masked_mean(backend: str, model, batch: Batch) -> float:
    logp = full_logprobs(backend, model, batch)
    mask = batch.loss_mask
    return float(-(logp * mask).sum() / mask.sum())


def full_logprobs(backend: str, model, batch: Batch) -> np.ndarray:
    """log p(target) at every position, from whole logits (the direct computation), (B, T)."""
    targets = batch.targets.clip(min=0)
    positions = batch.positions()
    if backend == "torch":
        import torch

        with torch.no_grad():
            logits = model(torch.from_numpy(batch.input_ids),
                           segment_ids=None if batch.segment_ids is None else torch.from_numpy(batch.segment_ids),
                           positions=None if positions is None else torch.from_numpy(positions)).double()
            return logits.log_softmax(-1).gather(-1, torch.from_numpy(targets)[..., None])[..., 0].numpy()
    import mlx.core as mx

    logits = model(mx.array(batch.input_ids), segment_ids=None if batch.segment_ids is None else mx.array(batch.segment_ids),
                   positions=None if positions is None else mx.array(positions))
    logits = np.array(logits.astype(mx.float32)).astype(np.float64)
    logp = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True)) - logits.max(-1, keepdims=True)
    return np.take_along_axis(logp, targets[..., None], -1)[..., 0]


# -- 3. example batches -----------------------------------------------------------------------------------------

def test_pack_places_examples_whole_with_positions_restarting():
    examples = [([5, 6, 7, 8], [0, 1, 1]), ([9, 10, 11], [1, 1]), ([12, 13, 14, 15, 16, 17], [0, 0, 1, 1, 1])]
    batch = pack(examples, seq_len=8)
    # 3 + 2 positions fit the first row, 5 do not: the third example starts a second row
    np.testing.assert_array_equal(batch.input_ids[0], [5, 6, 7, 9, 10, 0, 0, 0])
    np.testing.assert_array_equal(batch.targets[0], [6, 7, 8, 10, 11, -100, -100, -100])
    np.testing.assert_array_equal(batch.loss_mask[0], [0, 1, 1, 1, 1, 0, 0, 0])
    np.testing.assert_array_equal(batch.segment_ids[0], [1, 1, 1, 2, 2, 0, 0, 0])
    np.testing.assert_array_equal(batch.positions()[0], [0, 1, 2, 0, 1, 0, 1, 2])
    np.testing.assert_array_equal(batch.segment_ids[1], [1, 1, 1, 1, 1, 0, 0, 0])
    assert batch.target_count == 4 + 3
    windows = np.arange(20).reshape(2, 10)
    plain = Batch.from_windows(windows)
    assert plain.segment_ids is None and plain.positions() is None and plain.target_count == 18


@pytest.mark.parametrize("backend", BACKENDS)
def test_packed_row_gives_each_example_the_losses_it_has_alone(backend):
    """Block-diagonal causal attention and positions restarting per example: packing changes no example's
    per-token log-probabilities (1e-5, float32)."""
    rng = np.random.default_rng(1)
    examples = [(rng.integers(1, 256, size=n).tolist(), [1.0] * (n - 1)) for n in (7, 12, 4, 9)]
    packed = pack(examples, seq_len=32)
    assert packed.rows == 1 and packed.segment_ids.max() == 4
    eng = make_engine(backend)
    eng.build(SPEC)
    got = full_logprobs(backend, eng.model, packed)[0]
    at = 0
    for tokens, _ in examples:
        alone = Batch.from_windows(np.array([tokens]))
        want = full_logprobs(backend, eng.model, alone)[0]
        np.testing.assert_allclose(got[at : at + len(want)], want, atol=1e-5, rtol=0)
        at += len(want)
    # without the segments the same row mixes the examples: the test can tell
    mixed = full_logprobs(backend, eng.model, Batch(packed.input_ids, packed.targets, packed.loss_mask))[0]
    assert np.abs(mixed[7:at] - got[7:at]).max() > 1e-3


# -- 4. model primitives ----------------------------------------------------------------------------------------

def _direct_divergence(logp: np.ndarray, logq: np.ndarray, kind: str, beta: float) -> np.ndarray:
    p, q = np.exp(logp), np.exp(logq)
    if kind == "forward_kl":
        return (q * (logq - logp)).sum(-1)
    if kind == "reverse_kl":
        return (p * (logp - logq)).sum(-1)
    m = beta * q + (1 - beta) * p
    return beta * (q * (logq - np.log(m))).sum(-1) + (1 - beta) * (p * (logp - np.log(m))).sum(-1)


def _log_softmax(x: np.ndarray) -> np.ndarray:
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


@pytest.mark.parametrize("backend", BACKENDS)
def test_chunked_logprobs_and_divergences_match_whole_logits(backend, monkeypatch):
    """Values and gradients of the chunked primitives against the direct computation on whole logits; 300 rows at
    a vocabulary of 512 run as three chunks of 128 rows."""
    _, objectives = modules(backend)
    monkeypatch.setattr(objectives, "CHUNK", 128 * 512)
    rng = np.random.default_rng(0)
    N, D, V = 300, 16, 512
    h, w = rng.normal(size=(N, D)).astype(np.float32), rng.normal(size=(V, D)).astype(np.float32) * 0.5
    h_ref, w_ref = rng.normal(size=(N, 24)).astype(np.float32), rng.normal(size=(V, 24)).astype(np.float32) * 0.5
    targets = rng.integers(0, V, size=N)
    mask = (rng.random(N) > 0.3).astype(np.float32)
    logp, logq = _log_softmax(h.astype(np.float64) @ w.T), _log_softmax(h_ref.astype(np.float64) @ w_ref.T)
    cases = {"logprobs": np.take_along_axis(logp, targets[:, None], -1)[:, 0] * mask}
    cases |= {kind: _direct_divergence(logp, logq, kind, 0.3) * mask for kind in ("forward_kl", "reverse_kl", "jsd")}
    for name, want in cases.items():
        got, grad_h = _run_primitive(backend, objectives, name, h, w, h_ref, w_ref, targets, mask)
        np.testing.assert_allclose(got, want, atol=2e-5, rtol=1e-4, err_msg=name)
        # gradient of the sum wrt h, by central differences of the direct computation along one random direction
        direction = rng.normal(size=h.shape)
        eps = 1e-4

        def direct(hh: np.ndarray) -> float:
            lp = _log_softmax(hh @ w.T.astype(np.float64))
            if name == "logprobs":
                return float((np.take_along_axis(lp, targets[:, None], -1)[:, 0] * mask).sum())
            return float((_direct_divergence(lp, logq, name, 0.3) * mask).sum())

        slope = (direct(h + eps * direction) - direct(h - eps * direction)) / (2 * eps)
        assert abs(float((grad_h * direction).sum()) - slope) < 1e-3 * max(1.0, abs(slope)), name


@pytest.mark.parametrize("head_trains", [True, False], ids=["head-trains", "head-frozen"])
def test_fused_cross_entropy_skips_weightless_rows_and_a_frozen_head(head_trains, monkeypatch):
    """The torch fused cross-entropy (chunks of 128 rows) against whole logits: loss and gradients, with rows of weight
    0 (prompts) dropped before the head and no head gradient made for a frozen head."""
    import torch

    from llmctl.backends.torch import model

    monkeypatch.setattr(model, "CE_CHUNK", 128 * 512)
    gen = torch.Generator().manual_seed(0)
    N, D, V = 300, 16, 512
    h = torch.randn(N, D, generator=gen, dtype=torch.float64).float().requires_grad_()
    w = (torch.randn(V, D, generator=gen) * 0.5).requires_grad_(head_trains)
    targets = torch.randint(0, V, (N,), generator=gen)
    weights = (torch.rand(N, generator=gen) > 0.4).float() * torch.rand(N, generator=gen)
    got = model.linear_cross_entropy(h, w, targets, weights)
    got.backward()
    h2, w2 = h.detach().clone().requires_grad_(), w.detach().clone().requires_grad_(head_trains)
    want = (torch.nn.functional.cross_entropy(h2 @ w2.t(), targets, reduction="none") * weights).sum()
    want.backward()
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(h.grad, h2.grad, atol=1e-5, rtol=1e-4)
    assert h.grad[weights == 0].abs().max() == 0
    if head_trains:
        torch.testing.assert_close(w.grad, w2.grad, atol=1e-5, rtol=1e-4)
    else:
        assert w.grad is None


def _run_primitive(backend, objectives, name, h, w, h_ref, w_ref, targets, mask):
    if backend == "torch":
        import torch

        th = torch.tensor(h, requires_grad=True)
        args = (torch.tensor(w), torch.tensor(h_ref), torch.tensor(w_ref))
        if name == "logprobs":
            out = objectives.token_logprobs(th, args[0], torch.tensor(targets), torch.tensor(mask))
        else:
            out = objectives.token_divergence(th, *args, kind=name, beta=0.3, mask=torch.tensor(mask))
        out.sum().backward()
        return out.detach().numpy(), th.grad.numpy()
    import mlx.core as mx

    arrays = [mx.array(a) for a in (w, h_ref, w_ref)]

    def f(x):
        if name == "logprobs":
            return objectives.token_logprobs(x, arrays[0], mx.array(targets), mx.array(mask))
        return objectives.token_divergence(x, *arrays, kind=name, beta=0.3, mask=mx.array(mask))

    out = f(mx.array(h))
    grad = mx.grad(lambda x: f(x).sum())(mx.array(h))
    return np.array(out), np.array(grad)


@pytest.mark.parametrize("backend", BACKENDS)
def test_hidden_states_times_the_head_are_the_logits(backend):
    eng = make_engine(backend)
    eng.build(SPEC)
    tokens = np.array([[1, 17, 42, 7, 3, 99, 250, 12]])
    if backend == "torch":
        import torch

        with torch.no_grad():
            x = torch.from_numpy(tokens)
            hidden, logits = eng.model(x, head=False), eng.model(x)
            got = (hidden @ eng.model.head_weight().t()).numpy()
        logits = logits.numpy()
    else:
        import mlx.core as mx

        x = mx.array(tokens)
        hidden = eng.model(x, head=False)
        assert hidden.shape == (1, 8, 64)
        got, logits = np.array(hidden @ eng.model.head_weight().T), np.array(eng.model(x))
    np.testing.assert_allclose(got, logits, atol=1e-5)


# -- 5. loading for training ------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def float_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("base") / "float"
    make_hf_model("llama", folder, rope_theta=10000.0, rope_scaling=None)
    return folder


@pytest.fixture(scope="module", params=["affine", "nf4"])
def quantized_folder(request, float_folder, tmp_path_factory):
    from llmctl.commands.quantize import QuantizeConfig, run
    from llmctl.config import load_recipe

    method = ["quant.bits=4", "quant.group_size=32"] if request.param == "affine" else ["quant.method=nf4", "quant.group_size=32"]
    out = tmp_path_factory.mktemp("q") / request.param
    cfg = load_recipe(QuantizeConfig, "quantize", "default", method, {"model": str(float_folder), "out": out})
    return run(cfg, "torch")


class RandomBatches:
    """A batch source of masked, packed rows that depend only on (step, part)."""

    def batch(self, step: int, part: int, parts: int) -> Batch:
        return uneven_batch(seed=step).slice(part * (8 // parts), (part + 1) * (8 // parts))

    def val_batches(self, rows: int):
        yield uneven_batch(seed=1000)


def _dequantized_twin(backend: str, folder):
    """The quantized model with every quantized layer replaced by a float layer holding its dequantized weight."""
    engine, _ = modules(backend)
    model = engine.load_module(folder, "float32")
    if backend == "torch":
        import torch

        for name, module in list(model.named_modules()):
            if hasattr(module, "dequantized"):
                parent = model.get_submodule(name.rpartition(".")[0]) if "." in name else model
                w = module.dequantized(torch.float32)
                if name.endswith("embed_tokens"):
                    new = torch.nn.Embedding(*w.shape)
                else:
                    new = torch.nn.Linear(w.shape[1], w.shape[0], bias=module.bias is not None)
                    if module.bias is not None:
                        new.bias.data = module.bias.data.clone()
                new.weight.data = w
                setattr(parent, name.rpartition(".")[2], new)
        return model
    import mlx.nn as nn

    def swap(owner, key, module):
        w = module.dequantized()
        new = nn.Embedding(*w.shape) if key == "embed_tokens" else nn.Linear(w.shape[1], w.shape[0], bias="bias" in module)
        new.weight = w
        if "bias" in module and key != "embed_tokens":
            new.bias = module.bias
        setattr(owner, key, new)

    for layer in model.model.layers:
        for owner in (layer.self_attn, layer.mlp):
            for key in list(owner.children()):
                if hasattr(getattr(owner, key), "dequantized"):
                    swap(owner, key, getattr(owner, key))
    for owner, key in ((model.model, "embed_tokens"), (model, "lm_head")):
        if key in owner and hasattr(getattr(owner, key), "dequantized"):
            swap(owner, key, getattr(owner, key))
    return model


@pytest.mark.parametrize("backend", BACKENDS)
def test_quantized_base_trains_chosen_parameters_through_frozen_layers(backend, quantized_folder, tmp_path):
    from llmctl.run import RunFolder
    from llmctl.training import loop

    _, objectives = modules(backend)
    eng = make_engine(backend, steps=3, save_every=3, eval_every=3)
    eng.load(quantized_folder, trainable=lambda name: name.endswith("norm.weight"))
    assert eng.trainable and all(name.endswith("norm.weight") for name in eng.trainable)
    before = params(backend, eng.model)
    # gradients reach the first layer's norm only through the frozen quantized layers above it: they must be those
    # of the float model holding the dequantized weights (the straight dequantized product)
    batch = uneven_batch()
    loop.accumulate(eng, objectives.NextToken(), [batch])
    got = gradients(backend, eng)
    assert set(got) == set(eng.trainable)
    twin = make_engine(backend)
    twin._attach(_dequantized_twin(backend, quantized_folder))
    loop.accumulate(twin, objectives.NextToken(), [batch])
    want = gradients(backend, twin)
    for name in got:
        assert np.abs(got[name]).max() > 0, name
        np.testing.assert_allclose(got[name], want[name], atol=2e-3 * np.abs(want[name]).max(), rtol=0, err_msg=name)
    eng.zero_grad()
    # the loop trains only the chosen parameters; the checkpoint and optimizer state hold only those
    job = loop.Job(loop=eng.loop, optim=eng.optim, run=RunFolder(tmp_path / "run"), source=RandomBatches(),
                   objective=objectives.NextToken(), resume_key={}, config_text="x: 1\n", tokens_per_step=8 * 24)
    assert loop.run(eng, job)
    after = params(backend, eng.model)
    changed = {n for n in before if not np.array_equal(before[n], after[n])}
    assert changed == set(eng.trainable)
    from llmctl.io.safetensors import read_safetensors

    ckpt = tmp_path / "run" / "checkpoints" / "step-00000003"
    assert set(read_safetensors(ckpt / "trainable.safetensors")) == set(eng.trainable)
    assert {k.split("::")[0] for k in read_safetensors(ckpt / "optimizer.safetensors")} == set(eng.trainable)
    assert not (ckpt / "model").exists()
    # and resuming restores exactly those
    again = make_engine(backend)
    again.load(quantized_folder, trainable=lambda name: name.endswith("norm.weight"))
    again.load_checkpoint(ckpt, json.loads((ckpt / "state.json").read_text()))
    restored = params(backend, again.model)
    for name in after:
        np.testing.assert_array_equal(restored[name], after[name], err_msg=name)


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_frozen_teacher_beside_the_student(backend, float_folder):
    """A second model in the same process: the student learns to match it (forward KL falls), it stays unchanged."""
    from llmctl.training import loop

    _, objectives = modules(backend)
    eng = make_engine(backend)
    teacher = eng.load_frozen(float_folder)
    eng.build(ModelSpec(vocab_size=256, dim=32, n_layers=1, n_heads=2, n_kv_heads=2, ffn_dim=64, max_seq_len=128))
    teacher_before = params(backend, teacher)
    objective = objectives.Distill(teacher, "forward_kl")
    batch = uneven_batch()
    first = None
    for _ in range(8):
        kl = loop.accumulate(eng, objective, [batch])["loss"]
        first = kl if first is None else first
        eng.optimizer_step(1e-2, 1.0)
    assert kl < first / 2, (first, kl)
    teacher_after = params(backend, teacher)
    for name in teacher_before:
        np.testing.assert_array_equal(teacher_after[name], teacher_before[name], err_msg=name)
    if backend == "torch":
        assert all(p.grad is None for p in teacher.parameters())
