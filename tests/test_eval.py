"""`llmctl eval`: perplexity against transformers on the same windows, bits per byte, KL to a base, both backends."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from conftest import make_hf_model
from llmctl.cli import app

SEQ_LEN = 32

pytestmark = pytest.mark.usefixtures("one_thread")


def run_eval(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(app, ["eval", *args])
    if result.exception and not isinstance(result.exception, SystemExit):
        raise result.exception
    return result.exit_code, result.output


def eval_json(*args: str) -> dict:
    code, out = run_eval(*args, "--json")
    assert code == 0, out
    return json.loads(out[out.index("{") :])


@pytest.fixture(scope="module")
def tiny(small_corpus, tmp_path_factory) -> tuple[Path, Path, Path]:
    """A random Llama with a BPE tokenizer trained on the corpus, the same model with perturbed weights, a text."""
    import torch

    from llmctl.tokenizer import Tokenizer

    root = tmp_path_factory.mktemp("eval")
    tokenizer = Tokenizer.train_bpe(sorted(small_corpus.glob("*.txt")), 384)
    model_dir, perturbed_dir = root / "model", root / "perturbed"
    # Larger weights than the default init give a peaked, non-uniform next-token distribution.
    model = make_hf_model("llama", model_dir, seed=0, scale=8.0, vocab_size=tokenizer.vocab_size)
    tokenizer.save(model_dir)
    with torch.no_grad():
        generator = torch.Generator().manual_seed(1)
        for name, p in model.named_parameters():
            if "norm" not in name:
                p.add_(torch.randn(p.shape, generator=generator) * 0.2 * p.std())
    model.save_pretrained(perturbed_dir)
    tokenizer.save(perturbed_dir)
    data = root / "text.txt"
    data.write_text((small_corpus / "textwrap.txt").read_text(encoding="utf-8")[:6000], encoding="utf-8")
    return model_dir, perturbed_dir, data


def hf_token_ids(folder: Path, text: str) -> list[int]:
    import transformers

    return transformers.AutoTokenizer.from_pretrained(folder)(text, add_special_tokens=False)["input_ids"]


def hf_log_probs(folder: Path, rows: list[list[int]]):
    """log_softmax of transformers' logits for each row, (T, V) each."""
    import torch
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(folder).eval()
    with torch.no_grad():
        return [torch.log_softmax(model(torch.tensor([row])).logits[0].double(), -1) for row in rows]


def test_perplexity_matches_transformers_on_non_overlapping_windows(tiny):
    model_dir, _, data = tiny
    got = eval_json("--model", str(model_dir), "--data", str(data), "--seq-len", str(SEQ_LEN), "--backend", "torch")
    ids = hf_token_ids(model_dir, data.read_text(encoding="utf-8"))
    # Window k feeds ids[k L : k L + L] and predicts the next token of each: every token but the first, once.
    rows = [ids[start : start + SEQ_LEN] for start in range(0, len(ids) - 1, SEQ_LEN)]
    targets = [ids[start + 1 : start + 1 + SEQ_LEN] for start in range(0, len(ids) - 1, SEQ_LEN)]
    rows = [row[: len(t)] for row, t in zip(rows, targets)]
    nll = -sum(float(lp[range(len(t)), t].sum()) for lp, t in zip(hf_log_probs(model_dir, rows), targets))
    assert got["tokens"] == len(ids) - 1
    assert got["perplexity"] == pytest.approx(math.exp(nll / (len(ids) - 1)), rel=1e-4)
    assert got["nll"] == pytest.approx(nll / (len(ids) - 1), rel=1e-4)


def test_strided_windows_match_the_transformers_recipe(tiny):
    """The sliding-window recipe of transformers' perplexity guide, with windows of SEQ_LEN + 1 tokens."""
    import torch
    import transformers

    model_dir, _, data = tiny
    stride = 12
    got = eval_json("--model", str(model_dir), "--data", str(data), "--seq-len", str(SEQ_LEN), "--stride", str(stride),
                    "--backend", "torch")
    ids = torch.tensor(hf_token_ids(model_dir, data.read_text(encoding="utf-8")))
    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir).eval()
    nll, count, prev_end = 0.0, 0, 0
    for begin in range(0, len(ids), stride):
        end = min(begin + SEQ_LEN + 1, len(ids))
        new = end - prev_end
        inputs = ids[begin:end][None]
        labels = inputs.clone()
        labels[:, :-new] = -100
        with torch.no_grad():
            logits = model(inputs).logits[0, :-1].double()
        target = labels[0, 1:]
        keep = target != -100
        nll += float(torch.nn.functional.cross_entropy(logits[keep], target[keep], reduction="sum"))
        count += int(keep.sum())
        prev_end = end
        if end == len(ids):
            break
    assert got["tokens"] == count == len(ids) - 1
    assert got["perplexity"] == pytest.approx(math.exp(nll / count), rel=1e-4)


def test_bits_per_byte_follow_from_tokens_and_bytes(tiny):
    model_dir, _, data = tiny
    got = eval_json("--model", str(model_dir), "--data", str(data), "--seq-len", str(SEQ_LEN), "--backend", "torch")
    total = len(data.read_text(encoding="utf-8").encode("utf-8"))
    first = len(hf_token_ids(model_dir, data.read_text(encoding="utf-8")[:40])[:1])
    # Scored tokens cover the whole text but the first token (a few bytes).
    assert 0 < total - got["bytes"] <= 8 * first
    nats = got["tokens"] * math.log(got["perplexity"])
    assert got["bits_per_byte"] == pytest.approx(nats / math.log(2) / got["bytes"], rel=1e-9)
    few = eval_json("--model", str(model_dir), "--data", str(data), "--seq-len", str(SEQ_LEN), "--max-tokens", "50",
                    "--backend", "torch")
    assert few["tokens"] == 50
    assert 50 <= few["bytes"] < got["bytes"] / 5


def test_kl_to_itself_is_zero_and_to_a_perturbed_model_positive(tiny):
    model_dir, perturbed_dir, data = tiny
    common = ["--data", str(data), "--seq-len", str(SEQ_LEN), "--max-tokens", "400", "--backend", "torch"]
    same = eval_json("--model", str(model_dir), "--base", str(model_dir), *common)
    assert same["kl_mean"] == 0.0 and same["kl_max"] == 0.0
    assert same["top1_agreement"] == 1.0
    assert same["base_perplexity"] == same["perplexity"]
    other = eval_json("--model", str(perturbed_dir), "--base", str(model_dir), *common)
    assert other["kl_mean"] > 1e-3 and other["top1_agreement"] < 1.0
    assert other["base_perplexity"] == pytest.approx(same["perplexity"], rel=1e-6)
    # The same statistics from transformers' logits on the same windows.
    ids = hf_token_ids(model_dir, data.read_text(encoding="utf-8"))[:401]
    rows = [ids[start : start + SEQ_LEN] for start in range(0, 400, SEQ_LEN)]
    rows = [row[: min(SEQ_LEN, 400 - start)] for row, start in zip(rows, range(0, 400, SEQ_LEN))]
    kl, agree, n = 0.0, 0, 0
    for p, q in zip(hf_log_probs(model_dir, rows), hf_log_probs(perturbed_dir, rows)):
        kl += float((p.exp() * (p - q)).sum())
        agree += int((p.argmax(-1) == q.argmax(-1)).sum())
        n += len(p)
    assert n == other["tokens"] == 400
    assert other["kl_mean"] == pytest.approx(kl / n, rel=1e-3)
    assert other["top1_agreement"] == agree / n
    code, out = run_eval("--model", str(perturbed_dir), "--base", str(model_dir), *common)
    assert code == 0 and "top-1 agreement" in out and "KL" in out


def test_backends_agree(tiny):
    pytest.importorskip("mlx.core")
    model_dir, _, data = tiny
    common = ["--model", str(model_dir), "--data", str(data), "--seq-len", str(SEQ_LEN)]
    torch_ppl = eval_json(*common, "--backend", "torch")["perplexity"]
    mlx_ppl = eval_json(*common, "--backend", "mlx")["perplexity"]
    assert mlx_ppl == pytest.approx(torch_ppl, rel=1e-4)


def test_missing_data_file_is_a_clear_error(tiny, tmp_path):
    model_dir, _, _ = tiny
    code, out = run_eval("--model", str(model_dir), "--data", str(tmp_path / "nope.txt"))
    assert code == 1
    assert "nope.txt" in out and "no such file" in out


def test_missing_model_is_a_clear_error(tiny, tmp_path):
    _, _, data = tiny
    code, out = run_eval("--model", str(tmp_path / "no-model"), "--data", str(data))
    assert code == 1
    assert "no-model" in out and "does not exist" in out


def test_base_with_another_vocabulary_is_refused(tiny, tmp_path):
    model_dir, _, data = tiny
    other = tmp_path / "other"
    make_hf_model("llama", other, vocab_size=256)
    code, out = run_eval("--model", str(model_dir), "--base", str(other), "--data", str(data), "--backend", "torch")
    assert code == 1
    assert "vocabulary" in out and "256" in out


def test_text_too_short_is_refused(tiny, tmp_path):
    model_dir, _, _ = tiny
    short = tmp_path / "short.txt"
    short.write_text("a", encoding="utf-8")
    code, out = run_eval("--model", str(model_dir), "--data", str(short), "--backend", "torch")
    assert code == 1 and "at least 2" in out


def test_windows_score_every_token_once():
    from llmctl.scoring import windows

    for n, seq_len, stride in [(10, 4, 4), (10, 4, 2), (2, 8, 8), (100, 7, 3), (33, 32, 32)]:
        scored = []
        for start, length, skip in windows(n, seq_len, stride):
            assert 1 <= length <= seq_len
            scored += list(range(start + 1 + skip, start + 1 + length))
        assert scored == list(range(1, n)), (n, seq_len, stride)
    assert np.array_equal(windows(10, 4, 4), [(0, 4, 0), (4, 4, 0), (8, 1, 0)])
