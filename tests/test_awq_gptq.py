"""AWQ and GPTQ: exact MLX-layout output, output-preserving scaling, and better quality than round-to-nearest."""

from __future__ import annotations

import copy
import json
import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from conftest import SHARED
from llmctl import kernels
from llmctl.backends.torch.model import Transformer
from llmctl.cli import app
from llmctl.errors import DataError
from llmctl.quant.awq import apply_scale, quantize_awq, scale_groups
from llmctl.quant.calib import calibration_tokens
from llmctl.quant.gptq import Hessian, gptq_weight, quantize_gptq
from llmctl.quant.layers import capture_inputs, dequantize, fake_quantize, inputs_of, linears, run_block
from llmctl.spec import ModelSpec

METHODS = {"awq": quantize_awq, "gptq": quantize_gptq}
DENSE = ModelSpec(vocab_size=256, dim=128, n_layers=2, n_heads=4, n_kv_heads=4, ffn_dim=96, attn_bias=True)
MOE = ModelSpec(vocab_size=256, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=128, n_experts=4, family="mixtral",
                tie_embeddings=True)

pytestmark = pytest.mark.usefixtures("one_thread")


def random_model(spec: ModelSpec, seed: int = 0) -> Transformer:
    model = Transformer(spec)
    model.init_weights(seed)
    with torch.no_grad():  # trained-looking norms: some channels much larger than others
        generator = torch.Generator().manual_seed(seed + 1)
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(torch.rand(p.shape, generator=generator) * 3 + 0.1)
    return model.eval()


def correlated_inputs(n: int, width: int, seed: int = 0) -> torch.Tensor:
    """Inputs with a few large channels and correlations, as real activations have."""
    generator = torch.Generator().manual_seed(seed)
    mix = torch.randn(width, width, generator=generator) / width**0.5
    channel = torch.ones(width)
    channel[torch.randperm(width, generator=generator)[:4]] = 10.0
    return (torch.randn(n, width, generator=generator) @ mix + 0.3) * channel


@pytest.mark.parametrize("spec", [DENSE, MOE], ids=["dense", "moe"])
def test_capture_inputs_sees_what_the_whole_block_gives_and_stops_after_the_last(spec):
    """Inputs captured for a group equal those a full run of the block hands those layers, batch by batch; the layers
    after the group's last one never run."""
    model = random_model(spec)
    block = model.model.layers[0]
    x = torch.randn(5, 12, spec.dim, generator=torch.Generator().manual_seed(0))
    modules = linears(block)
    group = {name: modules[name] for name in list(modules)[:3]}  # the first layers of the block (q, k, v)
    want, got, later = {}, {}, []
    with inputs_of(group, lambda name, inp: want.setdefault(name, []).append(inp)):
        run_block(model, block, x, batch_size=2)
    last = list(modules.values())[-1]
    handle = last.register_forward_hook(lambda *args: later.append(1))
    try:
        capture_inputs(model, block, x, group, lambda name, inp: got.setdefault(name, []).append(inp), batch_size=2)
    finally:
        handle.remove()
    assert set(got) == set(group) and not later
    for name in group:
        assert len(got[name]) == 3  # three batches of at most 2 windows
        torch.testing.assert_close(torch.cat(got[name]), torch.cat(want[name]), rtol=0, atol=0)


# --- GPTQ on one layer -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("bits", [3, 4, 8])
@pytest.mark.parametrize("act_order", [False, True], ids=["in-order", "act-order"])
def test_gptq_codes_dequantize_exactly_and_beat_rtn(bits, act_order):
    generator = torch.Generator().manual_seed(0)
    W = torch.randn(96, 256, generator=generator)
    X = correlated_inputs(2048, 256)
    hessian = Hessian(256)
    hessian.add(X)
    codes, scales, biases, Q = gptq_weight(W, hessian.value(), bits, 64, act_order=act_order)
    assert codes.dtype == torch.uint8 and codes.shape == (96, 256) and int(codes.max()) <= 2**bits - 1
    assert scales.shape == biases.shape == (96, 4)
    # What `llmctl quantize` stores is exactly what GPTQ computed with.
    assert torch.equal(kernels.dequantize(kernels.pack(codes, bits), scales, biases, 64, bits), Q)
    error = lambda w: float(((X @ (W - w).T) ** 2).mean())  # noqa: E731
    assert error(Q) < 0.6 * error(fake_quantize(W, bits, 64))


def test_gptq_sets_each_group_by_the_mlx_formula():
    """The first group sees no earlier error: its scale and bias, and its first column's codes, are mx.quantize's."""
    W = torch.randn(32, 128, generator=torch.Generator().manual_seed(3))
    hessian = Hessian(128)
    hessian.add(correlated_inputs(512, 128))
    codes, scales, biases, _ = gptq_weight(W, hessian.value(), 4, 32)
    wq, rtn_scales, rtn_biases = kernels.quantize(W, 32, 4)
    assert torch.equal(scales[:, 0], rtn_scales[:, 0]) and torch.equal(biases[:, 0], rtn_biases[:, 0])
    assert torch.equal(codes[:, 0], kernels.unpack(wq, 4, 128)[:, 0])
    assert not torch.equal(codes[:, 1:32], kernels.unpack(wq, 4, 128)[:, 1:32])  # later columns absorb earlier errors


def test_gptq_survives_dead_inputs_and_a_singular_hessian():
    W = torch.randn(16, 64, generator=torch.Generator().manual_seed(0))
    X = correlated_inputs(8, 64)  # 8 rows: rank-8 H
    X[:, 5] = 0
    hessian = Hessian(64)
    hessian.add(X)
    codes, scales, biases, Q = gptq_weight(W, hessian.value(), 4, 32)
    assert torch.isfinite(Q).all()
    assert torch.equal(kernels.dequantize(kernels.pack(codes, 4), scales, biases, 32, 4), Q)


# --- AWQ scaling -----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("spec", [DENSE, MOE], ids=["dense", "moe"])
def test_awq_scaling_leaves_the_float_model_unchanged(spec):
    model = random_model(spec)
    tokens = torch.randint(0, spec.vocab_size, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        before = model(tokens)
        for block in model.model.layers:
            for group in scale_groups(model, block):
                width = block.get_submodule(group.layers[0]).in_features
                apply_scale(block, group, torch.rand(width, generator=torch.Generator().manual_seed(width)) * 4 + 0.25)
        after = model(tokens)
    names = [g.prev for g in scale_groups(model, model.model.layers[0])]
    assert ("self_attn.v_proj" in names) == (spec.n_kv_heads == spec.n_heads)  # o_proj only when shapes allow
    torch.testing.assert_close(after, before, atol=1e-4, rtol=1e-4)


# --- whole models: the returned tensors are the fake-quantized model ---------------------------------------------------


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("spec", [DENSE, MOE], ids=["dense", "moe"])
def test_returned_tensors_rebuild_the_quantized_model(method, spec):
    model = random_model(spec)
    calib = np.random.default_rng(0).integers(0, spec.vocab_size, (4, 32))
    skip = {"lm_head", "model.layers.0.self_attn.k_proj"}
    quantized = copy.deepcopy(model)
    triples, floats = METHODS[method](quantized, calib, 4, 64, skip)
    quantizable = {
        f"model.layers.{i}.{name}" for i, block in enumerate(model.model.layers) for name, m in linears(block).items()
        if m.in_features % 64 == 0
    } - skip
    assert set(triples) == quantizable | {"model.embed_tokens"}
    for path, (wq, scales, biases) in triples.items():
        rows, cols = model.get_parameter(path + ".weight").shape
        assert wq.dtype == torch.uint32 and wq.shape == (rows, cols * 4 // 32)
        assert scales.shape == biases.shape == (rows, cols // 64)
    # The returned tensors, put into a fresh copy of the float model, give exactly the quantized model.
    rebuilt = copy.deepcopy(model)
    state = rebuilt.state_dict()
    state.update(floats)
    state.update({path + ".weight": dequantize(triple, 4, 64) for path, triple in triples.items()})
    rebuilt.load_state_dict(state)
    tokens = torch.as_tensor(calib[:2])
    with torch.no_grad():
        assert torch.equal(rebuilt(tokens), quantized(tokens))
    if method == "gptq":
        assert floats == {}
    else:
        assert all("norm" in name or name.endswith(".bias") or name.endswith("k_proj.weight") for name in floats)
        assert "model.layers.0.self_attn.k_proj.weight" in floats  # kept in float, yet scaled with q and v
    if spec is DENSE:  # ffn_dim 96: down_proj cannot be grouped by 64 and stays float, untouched
        torch.testing.assert_close(quantized.model.layers[1].mlp.down_proj.weight, model.model.layers[1].mlp.down_proj.weight,
                                   rtol=0, atol=0)
        assert torch.equal(quantized.lm_head.weight, model.lm_head.weight)


# --- calibration data --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tokenizer(small_corpus):
    from llmctl.tokenizer import Tokenizer

    return Tokenizer.train_bpe(sorted(small_corpus.glob("*.txt")), 320)


def test_calibration_windows_from_a_file_and_from_the_default(tokenizer, small_corpus):
    tokens = calibration_tokens(tokenizer, small_corpus / "difflib.txt", 6, 64, seed=1)
    assert tokens.dtype == np.int64 and tokens.shape == (6, 64)
    assert 0 <= tokens.min() and tokens.max() < tokenizer.vocab_size
    assert np.array_equal(tokens, calibration_tokens(tokenizer, small_corpus / "difflib.txt", 6, 64, seed=1))
    stream = tokenizer.encode((small_corpus / "difflib.txt").read_text(encoding="utf-8"), add_special_tokens=False)
    starts = [i for i in range(0, len(stream) - 64, 64) if stream[i : i + 64] == tokens[0].tolist()]
    assert starts, "each window is a run of the file's tokens"
    default = calibration_tokens(tokenizer, None, 4, 128)
    assert default.shape == (4, 128)


def test_calibration_errors_name_the_file(tokenizer, tmp_path):
    with pytest.raises(DataError, match="missing.txt: no such file") as info:
        calibration_tokens(tokenizer, tmp_path / "missing.txt")
    assert "--calib" in info.value.hint
    short = tmp_path / "short.txt"
    short.write_text("just a few words", encoding="utf-8")
    with pytest.raises(DataError, match="fewer than one calibration window"):
        calibration_tokens(tokenizer, short, 4, 64)
    model = random_model(DENSE)
    with pytest.raises(DataError, match="outside the model's vocabulary"):
        quantize_gptq(model, np.full((2, 8), 999), 4, 64, set())


# --- a trained model: quality against round-to-nearest ---------------------------------------------------------------

STORIES = SHARED / "models" / "stories260K-hf"
GROUP = 32  # the model is 64 wide; its MLP is 172 wide, so down_proj stays float at every group size
CALIB_ROWS = 8  # calibration windows of 128 tokens
HELD_OUT = 4000  # tokens scored


def sample_texts(module: Transformer, tokenizer, rows: int, length: int, seed: int) -> list[str]:
    """Stories sampled from the model at temperature 1, each from BOS to its first EOS."""
    from llmctl.backends.torch.model import make_cache

    generator = torch.Generator().manual_seed(seed)
    cache = make_cache(module.spec)
    x = torch.full((rows, 1), tokenizer.bos_id)
    steps = []
    with torch.no_grad():
        for _ in range(length):
            x = torch.multinomial(torch.softmax(module(x, cache)[:, -1], -1), 1, generator=generator)  # (rows, 1)
            steps.append(x)
    texts = []
    for row in torch.cat(steps, 1).tolist():
        row = row[: row.index(tokenizer.eos_id)] if tokenizer.eos_id in row else row
        texts.append(tokenizer.decode(row, skip_special_tokens=True).strip())
    return texts


@pytest.fixture(scope="session")
def stories(tmp_path_factory) -> dict:
    """stories260K (a trained Llama) with calibration and held-out text sampled from it (TinyStories is not here)."""
    if not STORIES.is_dir():
        pytest.skip(f"the trained test model is not at {STORIES}")
    from llmctl.backends import get_backend
    from llmctl.commands.eval import tokens_and_bytes
    from llmctl.tokenizer import Tokenizer

    root = tmp_path_factory.mktemp("stories")
    model = get_backend("torch").load(STORIES).module
    tokenizer = Tokenizer.from_dir(STORIES)
    texts = {}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a session fixture starts before the module's one-thread fixture; sampling is 20x slower
    for seed, name in enumerate(("calib", "heldout")):  # with a second thread on a busy machine
        texts[name] = root / f"{name}.txt"
        texts[name].write_text("\n\n".join(sample_texts(model, tokenizer, 24, 256, seed)), encoding="utf-8")
    torch.set_num_threads(threads)
    ids, n_bytes = tokens_and_bytes(tokenizer, texts["heldout"].read_text(encoding="utf-8"), HELD_OUT)
    assert len(ids) == HELD_OUT + 1
    return {"model": model, "calib": calibration_tokens(tokenizer, texts["calib"], CALIB_ROWS, 128),
            "ids": ids, "bytes": n_bytes, "texts": texts, "cache": {}}


def perplexity(module: Transformer, ids: list[int], n_bytes: int) -> float:
    from llmctl import scoring

    with torch.no_grad():
        totals = scoring.score(lambda rows: module(torch.tensor(rows)).numpy(), ids, 128, 128, 16)
    return scoring.summary(totals, n_bytes)["perplexity"]


def block_error(quantized: Transformer, reference: Transformer, ids: list[int]) -> float:
    """Sum over blocks of |quantized block - float block|^2 / |float block's update|^2 on the float model's inputs."""
    x = reference.model.embed_tokens(torch.tensor(ids[: 8 * 128]).view(8, 128)).detach()
    total = 0.0
    for ours, theirs in zip(quantized.model.layers, reference.model.layers):
        want = run_block(reference, theirs, x, 8)
        got = run_block(quantized, ours, x, 8)
        total += float(((got - want) ** 2).sum() / ((want - x) ** 2).sum())
        x = want
    return total


def quantized(stories: dict, method: str, bits: int) -> dict:
    """Perplexity and block error of the model quantized by `method` (cached across tests)."""
    key = (method, bits)
    if key not in stories["cache"]:
        model = copy.deepcopy(stories["model"])
        if method == "rtn":
            for block in model.model.layers:
                for m in linears(block).values():
                    if m.in_features % GROUP == 0:
                        with torch.no_grad():
                            m.weight.copy_(fake_quantize(m.weight, bits, GROUP))
        else:
            METHODS[method](model, stories["calib"], bits, GROUP, {"model.embed_tokens"})
        stories["cache"][key] = {
            "perplexity": perplexity(model, stories["ids"], stories["bytes"]),
            "block_error": block_error(model, stories["model"], stories["ids"]),
        }
    return stories["cache"][key]


@pytest.mark.slow
@pytest.mark.parametrize("bits", [4, 3])
@pytest.mark.parametrize("method", METHODS)
def test_calibrated_methods_beat_round_to_nearest(stories, method, bits):
    ours, rtn = quantized(stories, method, bits), quantized(stories, "rtn", bits)
    assert ours["block_error"] < 0.9 * rtn["block_error"], (ours, rtn)
    assert ours["perplexity"] < rtn["perplexity"] - 0.01, (ours, rtn)


@pytest.mark.slow
@pytest.mark.parametrize("method", ["rtn", *METHODS])
def test_8_bit_is_within_one_percent_of_full_precision(stories, method):
    full = perplexity(stories["model"], stories["ids"], stories["bytes"])
    assert abs(quantized(stories, method, 8)["perplexity"] / full - 1) < 0.01


@pytest.mark.slow
@pytest.mark.parametrize("method", METHODS)
def test_quantize_command_then_eval(stories, method, tmp_path):
    """`llmctl quantize --method awq|gptq` writes a folder whose perplexity under `llmctl eval` is the fake-quantized one."""
    out = tmp_path / method
    calib = ["--calib", str(stories["texts"]["calib"]), f"calib.samples={CALIB_ROWS}", "calib.seq_len=128"]
    result = CliRunner().invoke(app, ["quantize", "--model", str(STORIES), "--bits", "4", "--group-size", str(GROUP),
                                      "--method", method, *calib, "--keep", "model.embed_tokens", "--out", str(out)])
    assert result.exit_code == 0, result.output
    config = json.loads((out / "config.json").read_text())
    assert config["quantization"]["bits"] == 4 and config["quantization"]["group_size"] == GROUP
    want = quantized(stories, method, 4)["perplexity"]
    for backend in ("torch", "mlx"):
        if backend == "mlx":
            pytest.importorskip("mlx.core")
        data = ["--data", str(stories["texts"]["heldout"]), "--seq-len", "128", "--max-tokens", str(HELD_OUT)]
        args = ["eval", "--model", str(out), *data, "--batch-size", "16", "--backend", backend, "--json"]
        result = CliRunner().invoke(app, args)
        assert result.exit_code == 0, result.output
        got = json.loads(result.output[result.output.index("{") :])
        assert got["tokens"] == HELD_OUT
        assert got["perplexity"] == pytest.approx(want, rel=1e-3), backend
    assert want < quantized(stories, "rtn", 4)["perplexity"]
    assert not (STORIES / "llmctl_quantize.yaml").exists()  # the source folder is never written to


@pytest.mark.slow
def test_stories_layers_that_do_not_fit_stay_float(stories):
    model = copy.deepcopy(stories["model"])
    triples, _ = quantize_gptq(model, stories["calib"][:2], 4, GROUP, {"model.embed_tokens"})
    assert len(triples) == 6 * len(model.model.layers)
    assert not any(path.endswith("down_proj") for path in triples)
