"""The generation engine on both backends against `transformers`, sampling, stop handling, streaming, `llmctl generate`."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from conftest import FAMILY_CONFIGS, SHARED, make_hf_model, needs_shared
from llmctl.cli import app
from llmctl.generation import SamplingParams, TextStream
from llmctl.tokenizer import Tokenizer

FAMILIES = list(FAMILY_CONFIGS)
PROMPT = [1, 17, 42, 7, 99, 3]       # longer than Mistral's sliding window of 5
N_NEW = 40                           # at least 32 must match before any near-tie
NEAR_TIE = 1e-3
SENTENCES = [
    "The quick brown fox jumps over the lazy dog.", "Once upon a time there was a little girl named Lily.",
    "She liked to play in the park with her friends.", "How are you today? I am fine, thank you.",
    "Numbers like 123 and 4567 appear in text too.", "A chat model answers questions in a helpful way.",
] * 20


def tiny_chat_model(folder: Path, context: int = 512, seed: int = 0) -> Path:
    """A tiny Llama with a trained byte-level BPE (ChatML template, <|im_end|> ends a turn) saved beside it."""
    tokenizer = Tokenizer.train_bpe(SENTENCES, vocab_size=320)
    make_hf_model("llama", folder, seed=seed, scale=4.0, vocab_size=tokenizer.vocab_size, max_position_embeddings=context,
                  bos_token_id=tokenizer.bos_id, eos_token_id=tokenizer.eos_id, pad_token_id=tokenizer.pad_id)
    tokenizer.save(folder)
    return folder


@pytest.fixture(scope="module", params=FAMILIES)
def family(request, tmp_path_factory):
    """(family, folder, transformers model) with weights scaled up so greedy decisions are clear."""
    folder = tmp_path_factory.mktemp(request.param)
    return request.param, folder, make_hf_model(request.param, folder, seed=0, scale=4.0)


def reference_greedy(model, prompt: list[int], n: int) -> tuple[list[int], int]:
    """transformers' greedy ids and the first position whose top-two logits are closer than NEAR_TIE (n if none)."""
    model.generation_config.eos_token_id = None  # run all n steps
    model.generation_config.pad_token_id = 0
    out = model.generate(torch.tensor([prompt]), max_new_tokens=n, do_sample=False, output_logits=True, return_dict_in_generate=True)
    top2 = torch.stack(out.logits)[:, 0].float().topk(2, dim=-1).values       # (n, 2)
    gaps = (top2[:, 0] - top2[:, 1]).tolist()
    return out.sequences[0, len(prompt) :].tolist(), next((i for i, g in enumerate(gaps) if g < NEAR_TIE), n)


def test_greedy_matches_transformers(family, backend):
    name, folder, model = family
    ref, trusted = reference_greedy(model, PROMPT, N_NEW)
    assert trusted >= 32, f"{name}: the reference has a near-tie at step {trusted}; pick a test model without one"
    got = backend.load(folder).greedy(PROMPT, N_NEW)
    assert len(got) == N_NEW
    assert got[:trusted] == ref[:trusted]


def test_batched_greedy_equals_one_by_one(family, backend):
    _, folder, _ = family
    loaded = backend.load(folder)
    prompts = [PROMPT, [5, 9], PROMPT + [11, 200, 31, 8, 2, 64, 7], [250]]
    params = SamplingParams(max_tokens=12)
    assert loaded.generate_batch(prompts, params) == [loaded.greedy(p, 12) for p in prompts]


def test_chunked_prefill_and_cache_reuse_match(family, backend, monkeypatch):
    _, folder, _ = family
    loaded = backend.load(folder)
    prompt = list(range(3, 40))
    want = loaded.greedy(prompt, 10)
    monkeypatch.setattr(f"llmctl.backends.{backend.name}.generate.PREFILL_CHUNK", 4)
    assert loaded.greedy(prompt, 10) == want
    cache = loaded.new_cache()
    params = SamplingParams(max_tokens=10)
    list(loaded.generate(prompt[:20] + [77, 78], params, cache))
    assert len(cache.tokens) == 22 + 9 and cache.tokens[:22] == prompt[:20] + [77, 78]
    assert list(loaded.generate(prompt, params, cache)) == want         # reuses the first 20 positions


def test_stop_id_ends_generation_and_is_yielded_last(family, backend):
    _, folder, _ = family
    loaded = backend.load(folder)
    free = loaded.greedy(PROMPT, 20)
    stop = free[6]
    got = list(loaded.generate(PROMPT, SamplingParams(max_tokens=20, stop_ids=frozenset({stop}))))
    assert got == free[: free.index(stop) + 1]


def test_seeded_sampling_is_reproducible(backend, tmp_path):
    make_hf_model("llama", tmp_path, seed=2)
    loaded = backend.load(tmp_path)
    params = SamplingParams(max_tokens=24, temperature=1.0, top_k=50, top_p=0.95, min_p=0.01, repetition_penalty=1.1, seed=7)
    first = list(loaded.generate(PROMPT, params))
    assert list(loaded.generate(PROMPT, params)) == first and len(first) == 24
    assert list(loaded.generate(PROMPT, params.with_updates(seed=8))) != first
    batch = loaded.generate_batch([PROMPT, PROMPT[:3]], params)
    assert loaded.generate_batch([PROMPT, PROMPT[:3]], params) == batch


def _sample(backend_name: str, logits: np.ndarray, params: SamplingParams) -> np.ndarray:
    if backend_name == "torch":
        from llmctl.backends.torch.generate import sample

        return sample(torch.tensor(logits), params, torch.Generator().manual_seed(0)).numpy()
    import mlx.core as mx

    from llmctl.backends.mlx.generate import sample

    return np.array(sample(mx.array(logits), params, mx.random.key(0)))


def test_sampling_filters(backend):
    rows = 4000
    logits = np.tile(np.log(np.array([0.1, 0.2, 0.3, 0.4], dtype=np.float32)), (rows, 1))
    plain = _sample(backend.name, logits, SamplingParams(temperature=1.0))
    np.testing.assert_allclose(np.bincount(plain, minlength=4) / rows, [0.1, 0.2, 0.3, 0.4], atol=0.03)
    assert set(_sample(backend.name, logits, SamplingParams(temperature=1.0, top_k=2))) == {2, 3}
    assert set(_sample(backend.name, logits, SamplingParams(temperature=1.0, top_p=0.65))) == {2, 3}   # 0.4 + 0.3 reach it
    assert set(_sample(backend.name, logits, SamplingParams(temperature=1.0, min_p=0.6))) == {2, 3}    # >= 0.24
    assert set(_sample(backend.name, logits, SamplingParams(temperature=1e-4))) == {3}
    assert set(_sample(backend.name, logits, SamplingParams(temperature=0.0))) == {3}


def test_repetition_penalty_matches_transformers(backend):
    from transformers import RepetitionPenaltyLogitsProcessor

    logits = np.random.default_rng(0).normal(size=(2, 50)).astype(np.float32)
    seen_ids = [[1, 5, 5, 30], [2, 49, 7, 7]]
    ref = RepetitionPenaltyLogitsProcessor(1.3)(torch.tensor(seen_ids), torch.tensor(logits)).numpy()
    seen = np.zeros((2, 50), dtype=bool)
    for row, ids in enumerate(seen_ids):
        seen[row, ids] = True
    if backend.name == "torch":
        from llmctl.backends.torch.generate import penalize

        got = penalize(torch.tensor(logits), torch.tensor(seen), 1.3).numpy()
    else:
        import mlx.core as mx

        from llmctl.backends.mlx.generate import penalize

        got = np.array(penalize(mx.array(logits), mx.array(seen), 1.3))
    np.testing.assert_allclose(got, ref, rtol=1e-6)


def test_bad_sampling_values_are_refused():
    from llmctl.errors import ConfigError

    for bad in (dict(temperature=-1), dict(top_p=0), dict(top_p=1.5), dict(min_p=1), dict(top_k=-2), dict(max_tokens=0), dict(stop=("",))):
        with pytest.raises(ConfigError):
            SamplingParams(**bad)


# --- streamed text --------------------------------------------------------------------------------------------------

MULTIBYTE = "Hi 😀 你好, café ✓ 🎉🎉 naïve 日本語のテキスト 👩‍👩‍👧"


@pytest.fixture(scope="module")
def byte_bpe() -> Tokenizer:
    return Tokenizer.train_bpe(SENTENCES, vocab_size=320)  # English only: every emoji / CJK character is split into bytes


def _tokenizers(byte_bpe: Tokenizer) -> list[Tokenizer]:
    found = [byte_bpe]
    for name in ("llama2", "llama3"):  # SentencePiece byte fallback, and byte-level BPE with a large vocabulary
        if (SHARED / "tokenizers" / name).is_dir():
            found.append(Tokenizer.from_dir(SHARED / "tokenizers" / name))
    return found


def test_streaming_multibyte_text_prints_exactly_the_decoded_string(byte_bpe):
    for tokenizer in _tokenizers(byte_bpe):
        ids = tokenizer.encode(MULTIBYTE, add_special_tokens=False)
        assert len(ids) > len(MULTIBYTE) // 2  # characters really are split across tokens
        stream = TextStream(tokenizer)
        pieces = [stream.feed(i) for i in ids] + [stream.flush()]
        assert "".join(pieces) == tokenizer.decode(ids, skip_special_tokens=True) == MULTIBYTE
        assert not any("\ufffd" in p for p in pieces)


def test_stop_strings_are_cut_even_across_tokens(byte_bpe):
    text = "Lily said hello. User: and then more text"
    ids = byte_bpe.encode(text, add_special_tokens=False)
    stream = TextStream(byte_bpe, stop=("User:", "never"))
    shown = ""
    for i in ids:
        shown += stream.feed(i)
        assert "Lily said hello. ".startswith(shown)  # nothing of the stop string is ever shown
    shown += stream.flush()
    assert stream.stopped and shown == "Lily said hello. "
    stream = TextStream(byte_bpe, stop=("tex!",))  # a prefix held back is released at the end
    assert "".join(stream.feed(i) for i in ids) + stream.flush() == text and not stream.stopped


# --- llmctl generate -----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def chat_folder(tmp_path_factory) -> Path:
    return tiny_chat_model(tmp_path_factory.mktemp("tiny-chat"))


def run_cli(*args: str, input: str | None = None):
    return CliRunner().invoke(app, list(args), input=input)


def test_generate_streams_what_the_engine_decodes(chat_folder, backend):
    backend_name = backend.name
    tokenizer = Tokenizer.from_dir(chat_folder)
    loaded = backend.load(chat_folder)
    ids = loaded.greedy(tokenizer.encode("Once upon a time"), 30, tuple(tokenizer.eos_token_ids))
    ids = ids[:-1] if ids[-1] in tokenizer.eos_token_ids else ids
    result = run_cli("generate", "--model", str(chat_folder), "--prompt", "Once upon a time", "--max-tokens", "30", "--backend", backend_name)
    assert result.exit_code == 0, result.output
    assert result.stdout == tokenizer.decode(ids, skip_special_tokens=True)
    result = run_cli("generate", "--model", str(chat_folder), "--prompt", "-", "--max-tokens", "30", "--json", "--backend", backend_name,
                     input="Once upon a time")
    record = json.loads(result.stdout)
    assert record["text"] == tokenizer.decode(ids, skip_special_tokens=True) and record["prompt"] == "Once upon a time"
    assert record["new_tokens"] == 30 and record["decode_tokens_per_s"] > 0 and record["time_to_first_token_s"] > 0
    assert record["peak_memory_bytes"] > 10 * 2**20 and record["finish_reason"] == "length"


def test_generate_prompt_file_writes_one_line_per_prompt(chat_folder, tmp_path):
    prompts = ["Once upon a time", "The quick", "How are you today? I am"]
    path = tmp_path / "prompts.jsonl"
    path.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in prompts))
    result = run_cli("generate", "--model", str(chat_folder), "--prompt-file", str(path), "--max-tokens", "16", "--batch-size", "2")
    assert result.exit_code == 0, result.output
    records = [json.loads(line) for line in result.stdout.splitlines()]
    assert [r["prompt"] for r in records] == prompts
    for record in records:
        single = run_cli("generate", "--model", str(chat_folder), "--prompt", record["prompt"], "--max-tokens", "16")
        assert record["text"] == single.stdout
    path.write_text('{"prompt": "ok"}\n{"text": "no prompt"}\n')
    result = run_cli("generate", "--model", str(chat_folder), "--prompt-file", str(path))
    assert result.exit_code == 1 and f"{path}:2" in " ".join(result.output.split())


def test_generate_chat_template_and_stop_string(chat_folder):
    plain = run_cli("generate", "--model", str(chat_folder), "--prompt", "Hello", "--chat", "--max-tokens", "20").stdout
    assert plain
    cut = plain[len(plain) // 2 :][:3]
    result = run_cli("generate", "--model", str(chat_folder), "--prompt", "Hello", "--chat", "--max-tokens", "20", "--stop", cut)
    assert result.exit_code == 0 and result.stdout == plain[: plain.index(cut)]


def test_generate_errors_are_clear(chat_folder, tmp_path, monkeypatch):
    result = run_cli("generate", "--model", str(tmp_path / "missing"), "--prompt", "hi")
    assert result.exit_code == 1 and "does not exist" in result.output and "Traceback" not in result.output
    result = run_cli("generate", "--model", str(chat_folder), "--prompt", "hi", "--top-p", "3")
    assert result.exit_code == 1 and "--top-p must be in (0, 1]" in result.output
    assert run_cli("generate", "--model", str(chat_folder), "--prompt", "hi", "--no-such-flag").exit_code == 2
    assert run_cli("generate", "--model", str(chat_folder)).exit_code == 2  # neither --prompt nor --prompt-file
    monkeypatch.setenv("LLMCTL_CACHE", str(tmp_path / "empty-cache"))
    result = run_cli("generate", "--prompt", "hi")
    assert result.exit_code == 1 and "llmctl train" in result.output and "--model" in result.output


def test_generate_defaults_to_the_latest_trained_model(chat_folder, tmp_path, monkeypatch):
    from llmctl.run import remember_model

    monkeypatch.setenv("LLMCTL_CACHE", str(tmp_path / "cache"))
    remember_model(chat_folder)
    result = run_cli("generate", "--prompt", "Once", "--max-tokens", "5")
    assert result.exit_code == 0, result.output
    assert "the latest model" in result.stderr and str(chat_folder.resolve()) in " ".join(result.stderr.split())


@needs_shared
def test_stories260k_generate_text(backend):
    folder = SHARED / "models" / "stories260K-hf"
    reference = json.loads((folder / "reference_greedy.json").read_text())
    loaded = backend.load(folder)
    assert list(loaded.generate([1], SamplingParams(max_tokens=50))) == reference["greedy_ids"][:50]


def test_training_still_works_after_generating(tmp_path):
    from llmctl.backends import get_backend

    make_hf_model("llama", tmp_path, seed=4)
    loaded = get_backend("torch").load(tmp_path)
    list(loaded.generate(PROMPT, SamplingParams(max_tokens=3)))  # leaves RoPE tables made under inference_mode
    loaded.module.train()
    loaded.module(torch.tensor([PROMPT])).float().logsumexp(-1).mean().backward()
    assert loaded.module.model.layers[0].self_attn.q_proj.weight.grad is not None
