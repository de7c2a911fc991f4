"""The bad-input corpus (issue 14): every case exits 1 with a message that names the file, key, tensor or flag,
shows no traceback, and leaves everything the user had (inputs, old outputs, the current folder) unchanged."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import struct
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from llmctl.cli import app

SECRET = "TOPSECRET-do-not-print"
TEXT = "The quick brown fox jumps over the lazy dog. " * 40 + "def main():\n    return 0\n" * 40


def _build_model(folder: Path, vocab: int = 320) -> None:
    from llmctl.io.hf import parameter_shapes
    from llmctl.io.model_folder import write_model
    from llmctl.io.safetensors import RawTensor
    from llmctl.spec import ModelSpec
    from llmctl.tokenizer import Tokenizer

    corpus = folder.parent / "_text.txt"
    corpus.write_text(TEXT)
    tokenizer = Tokenizer.train_bpe([corpus], vocab_size=300)
    corpus.unlink()
    spec = ModelSpec(vocab_size=vocab, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=128, max_seq_len=128,
                     eos_token_ids=tuple(sorted(tokenizer.eos_token_ids)), bos_token_id=tokenizer.bos_id)  # fmt: skip
    rng = np.random.default_rng(0)
    tensors = {
        name: RawTensor.from_numpy((rng.standard_normal(shape) * (0.02 if len(shape) == 2 else 1)).astype(np.float32))
        for name, shape in parameter_shapes(spec).items()
    }
    write_model(folder, spec, tensors)
    tokenizer.save(folder)


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    """What every case starts from: zoo/llama (a tiny float model), zoo/notes.txt, corpus/shk.txt, secret.txt, and
    runs/old (a finished run folder) and q4old (an earlier quantized output) standing in for outputs --force replaces."""
    root = tmp_path_factory.mktemp("bad-input")
    (root / "zoo").mkdir()
    _build_model(root / "zoo" / "llama")
    (root / "zoo" / "notes.txt").write_text("my notes\n")
    (root / "corpus").mkdir()
    (root / "corpus" / "shk.txt").write_text(TEXT)
    (root / "secret.txt").write_text(SECRET + "\n")
    old = root / "runs" / "old"
    (old / "checkpoints").mkdir(parents=True)
    (old / "config.yaml").write_text("model: {}\n")
    (old / "metrics.jsonl").write_text('{"step": 1, "loss": 5.0}\n')
    shutil.copytree(root / "zoo" / "llama", root / "q4old")
    return root


def tree(root: Path) -> dict[str, str]:
    """Every file, folder and link under `root` with its content hash (or link target)."""
    out = {}
    for path in sorted(root.rglob("*")):
        key = str(path.relative_to(root))
        if path.is_symlink():
            out[key] = "-> " + os.readlink(path)
        elif path.is_dir():
            out[key] = "dir"
        else:
            out[key] = hashlib.sha256(path.read_bytes()).hexdigest()
    return out


# ---- ways to damage a copy of `base` (each takes the case's root folder)


def edit_json(relative: str, **changes: object) -> Callable[[Path], None]:
    def apply(root: Path) -> None:
        path = root / relative
        data = json.loads(path.read_text())
        for key, value in changes.items():
            if value is _DELETE:
                data.pop(key, None)
            else:
                data[key] = value
        path.write_text(json.dumps(data))

    return apply


_DELETE = object()


def write(relative: str, content: str | bytes) -> Callable[[Path], None]:
    def apply(root: Path) -> None:
        path = root / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.unlink(missing_ok=True)
        path.write_bytes(content if isinstance(content, bytes) else content.encode())

    return apply


def link(relative: str, target: str) -> Callable[[Path], None]:
    def apply(root: Path) -> None:
        path = root / relative
        path.unlink(missing_ok=True)
        path.symlink_to(target)

    return apply


def header(relative: str, change: Callable[[dict], str]) -> Callable[[Path], None]:
    """Rewrite a safetensors header (`change` returns the new JSON text), keeping the data buffer."""

    def apply(root: Path) -> None:
        path = root / relative
        data = path.read_bytes()
        (length,) = struct.unpack("<Q", data[:8])
        text = change(json.loads(data[8 : 8 + length])).encode()
        text += b" " * (-len(text) % 8)
        path.write_bytes(struct.pack("<Q", len(text)) + text + data[8 + length :])

    return apply


def _overlap(h: dict) -> str:
    a, b = "model.layers.0.input_layernorm.weight", "model.layers.0.post_attention_layernorm.weight"
    h[b]["data_offsets"] = list(h[a]["data_offsets"])
    return json.dumps(h)


def _duplicate(h: dict) -> str:
    name = "model.norm.weight"
    text = json.dumps(h)
    return text[:-1] + f', "{name}": ' + json.dumps(h[name]) + "}"


def _huge_shape(h: dict) -> str:
    h["model.norm.weight"]["shape"] = [2**64, 4]
    return json.dumps(h)


def _bigger_tokenizer(root: Path) -> None:
    path = root / "zoo/llama/tokenizer.json"
    data = json.loads(path.read_text())
    start = max(t["id"] for t in data["added_tokens"]) + 1
    vocab = len(data["model"]["vocab"])
    for i in range(max(start, vocab), 400):
        data["added_tokens"].append({"id": i, "content": f"<extra_{i}>", "single_word": False, "lstrip": False,
                                     "rstrip": False, "normalized": False, "special": True})  # fmt: skip
    path.write_text(json.dumps(data))


def _gguf(root: Path, **changes: object) -> None:
    """zoo/llama.gguf written by convert, with metadata values replaced (same types, so offsets stay valid)."""
    pytest.importorskip("gguf")
    out = root / "zoo" / "llama.gguf"
    result = CliRunner().invoke(app, ["convert", str(root / "zoo" / "llama"), "--out", str(out)])
    assert result.exit_code == 0, result.output
    import gguf

    reader = gguf.GGUFReader(out, "r+")
    for key, value in changes.items():
        reader.fields[key].parts[reader.fields[key].data[0]][0] = value
    del reader


def gguf_with(**changes: object) -> Callable[[Path], None]:
    return lambda root: _gguf(root, **changes)


def _little_memory(monkeypatch: pytest.MonkeyPatch) -> None:
    """A machine with 64 KiB available: jobs over a whole model are refused before they allocate it."""
    monkeypatch.setattr("llmctl.memory.available_bytes", lambda: 1 << 16)


def _gguf_huge_dim(root: Path) -> None:
    """zoo/llama.gguf whose embedding's first dimension claims 2**64 - 1 values (a crafted shape that overflows)."""
    _gguf(root)
    data = bytearray((root / "zoo" / "llama.gguf").read_bytes())
    at = data.index(b"token_embd.weight") + len(b"token_embd.weight") + 4  # after the name: n_dims (u32), then dims
    struct.pack_into("<Q", data, at, 2**64 - 1)
    (root / "zoo" / "llama.gguf").write_bytes(data)


def _disk_full(monkeypatch: pytest.MonkeyPatch) -> None:
    import errno

    from llmctl.io import safetensors as st

    real = st._write_data

    def full(f, data):
        real(f, data[: len(data) // 2])
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(st, "_write_data", full)


def _no_latest(monkeypatch: pytest.MonkeyPatch, root: Path) -> None:
    cache = root.parent / (root.name + "-cache")
    cache.mkdir(exist_ok=True)
    monkeypatch.setenv("LLMCTL_CACHE", str(cache))


@dataclass
class Case:
    id: str
    argv: list[str]
    says: list[str]                                   # all of these are in the output
    setup: list[Callable[[Path], None]] = field(default_factory=list)
    stdin: str | bytes | None = None
    never: list[str] = field(default_factory=list)    # none of these are in the output
    code: int = 1                                     # chat survives its errors: 0
    patch: Callable[..., None] | None = None


GEN = ["generate", "--model", "zoo/llama", "--prompt", "hi", "--max-tokens", "2"]
FT = ["finetune-lora", "--model", "zoo/llama", "--out", "runs/ft", "--steps", "1", "--backend", "torch", "data.seq_len=64",
      "data.batch_size=2"]


def _wide_adapter(root: Path) -> None:
    """A PEFT adapter made for a model twice as wide as zoo/llama."""
    from llmctl.io.safetensors import RawTensor, write_safetensors

    (root / "wide-adapter").mkdir()
    key = "base_model.model.model.layers.0.self_attn.q_proj"
    write_safetensors(root / "wide-adapter" / "adapter_model.safetensors", {
        f"{key}.lora_A.weight": RawTensor.from_numpy(np.zeros((2, 128), np.float32)),
        f"{key}.lora_B.weight": RawTensor.from_numpy(np.zeros((128, 2), np.float32))})
    (root / "wide-adapter" / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 2, "lora_alpha": 4}))
CHAT_GEN = [*GEN, "--chat"]
TRAIN = ["train", "data.train=corpus/shk.txt", "train.steps=1", "data.seq_len=16", "data.batch_size=2",
         "model.dim=32", "model.n_layers=1", "model.n_heads=2", "data.vocab_size=300"]  # fmt: skip
CONFIG = "zoo/llama/config.json"
WEIGHTS = "zoo/llama/model.safetensors"
TEMPLATE = "zoo/llama/chat_template.jinja"
GENCONFIG = "zoo/llama/generation_config.json"
INDEX = "zoo/llama/model.safetensors.index.json"


def _template(text: str) -> Callable[[Path], None]:
    return write(TEMPLATE, text)


CASES = [
    # ---- data loss: --out that is or holds an input or the current folder, refused before anything is deleted
    Case("train-out-cwd-force", ["train", "-o", ".", "--force", "data.train=/nonexistent.txt"], ["--out . is the current folder"]),
    Case("train-out-holds-corpus", ["train", "-o", "corpus", "--force", "data.train=corpus/shk.txt"], ["--out corpus holds the input corpus/shk.txt"]),
    Case("train-out-holds-from", ["train", "-o", "zoo", "--force", "model.from=zoo/llama"], ["--out zoo holds the input zoo/llama"]),
    Case("train-out-is-tokenizer", ["train", "-o", "zoo/llama", "--force", "data.tokenizer=zoo/llama", "data.train=corpus/shk.txt"], ["is the input zoo/llama"]),
    Case("train-out-parent-of-cwd", ["train", "-o", "..", "--force"], ["is the current folder or holds it"]),
    Case("train-force-not-a-run", ["train", "-o", "zoo", "--force", "data.train=corpus/shk.txt"], ["not a run folder"]),
    Case("train-force-missing-data", [*TRAIN, "-o", "runs/old", "--force", "data.train=nonexistent.txt"], ["nonexistent.txt"]),
    Case("train-force-bad-heads", [*TRAIN, "-o", "runs/old", "--force", "model.n_heads=3"], ["model.n_heads"], never=["set head_dim"]),
    Case("train-empty-out-missing-data", [*TRAIN, "-o", "empty", "data.train=nonexistent.txt"], ["nonexistent.txt"], setup=[lambda root: (root / "empty").mkdir()]),
    Case("train-out-exists", [*TRAIN, "-o", "runs/old"], ["runs/old already exists", "--force"]),
    Case("train-resume-nothing", [*TRAIN, "-o", "runs/old", "--resume"], ["holds no checkpoint"]),
    Case("train-out-is-file", [*TRAIN, "-o", "zoo/notes.txt", "--force"], ["zoo/notes.txt is a file"]),
    Case("quantize-out-holds-model", ["quantize", "--model", "zoo/llama", "--out", "zoo", "--force"], ["--out zoo holds the input zoo/llama"]),
    Case("quantize-out-is-model", ["quantize", "--model", "zoo/llama", "--out", "zoo/llama", "--force"], ["--out zoo/llama is the input"]),
    Case("quantize-out-cwd", ["quantize", "--model", "zoo/llama", "--out", ".", "--force"], ["current folder"]),
    Case("quantize-out-holds-calib", ["quantize", "--model", "zoo/llama", "--out", "corpus", "--calib", "corpus/shk.txt", "--method", "awq", "--force"], ["holds the input corpus/shk.txt"]),
    Case("quantize-out-exists", ["quantize", "--model", "zoo/llama", "--out", "q4old"], ["q4old already exists"]),
    Case("quantize-force-bad-bits", ["quantize", "--model", "zoo/llama", "--out", "q4old", "--force", "--bits", "7"], ["--bits 7"]),
    Case("quantize-bad-head-bits", ["quantize", "--model", "zoo/llama", "--out", "q4new", "quant.head_bits=7"], ["quant.head_bits=7"]),
    Case("quantize-force-corrupt-source", ["quantize", "--model", "zoo/llama", "--out", "q4old", "--force"], ["model.safetensors"], setup=[write(WEIGHTS, b"\x10\x00")]),
    Case("quantize-force-disk-full", ["quantize", "--model", "zoo/llama", "--out", "q4old", "--force"], ["cannot write q4old", "the disk is full", "model.safetensors"], patch=_disk_full),
    Case("quantize-out-under-file", ["quantize", "--model", "zoo/llama", "--out", "zoo/notes.txt/q4"], ["cannot write zoo/notes.txt/q4: zoo/notes.txt is a file, not a folder"]),
    Case("quantize-keep-everything", ["quantize", "--model", "zoo/llama", "--out", "q4new", "--keep", "*"], ["no layer of zoo/llama would be quantized"]),
    Case("quantize-gguf-out-folder", ["quantize", "--model", "zoo/llama", "--out", "q4old", "--format", "gguf", "--force"], ["q4old is a folder"]),
    Case("quantize-no-model", ["quantize", "--bits", "4"], ["no --model given"], patch=_no_latest),
    Case("quantize-quantized", ["quantize", "--model", "zoo/llama", "--out", "q4new"], ["already quantized"], setup=[edit_json(CONFIG, quantization={"group_size": 64, "bits": 4})]),
    Case("convert-out-holds-model", ["convert", "zoo/llama", "--out", "zoo", "--dtype", "fp16", "--force"], ["--out zoo holds the input zoo/llama"]),
    Case("convert-out-exists", ["convert", "zoo/llama", "--out", "q4old", "--dtype", "fp16"], ["q4old already exists"]),
    Case("convert-out-cwd", ["convert", "zoo/llama", "--out", ".", "--dtype", "fp16", "--force"], ["current folder"]),
    # ---- files of a model are read only from inside its folder
    Case("template-symlink-out", GEN, ["chat_template.jinja is a symbolic link", "outside the model folder"], setup=[link(TEMPLATE, "../../secret.txt")], never=[SECRET]),
    Case("template-symlink-convert", ["convert", "zoo/llama", "--out", "x.gguf"], ["outside the model folder"], setup=[link(TEMPLATE, "../../secret.txt")], never=[SECRET]),
    Case("template-symlink-quantize", ["quantize", "--model", "zoo/llama", "--out", "q4new"], ["chat_template.jinja", "outside the model folder"], setup=[link(TEMPLATE, "../../secret.txt")], never=[SECRET]),
    Case("tokenizer-symlink-out", GEN, ["tokenizer.json is a symbolic link"], setup=[link("zoo/llama/tokenizer.json", "../../secret.txt")]),
    Case("config-symlink-out", ["info", "zoo/llama"], ["config.json is a symbolic link"], setup=[link(CONFIG, "../../secret.txt")], never=[SECRET]),
    Case("weights-symlink-out", GEN, ["model.safetensors is a symbolic link"], setup=[link(WEIGHTS, "../../secret.txt")], never=[SECRET]),
    Case("index-climbs-out", GEN, ["model.safetensors.index.json", "'../../../../secret.txt'", "outside the model folder"],
         setup=[write(INDEX, json.dumps({"weight_map": {"model.norm.weight": "../../../../secret.txt"}}))], never=[SECRET]),
    Case("index-absolute", GEN, ["model.safetensors.index.json", "outside the model folder"],
         setup=[write(INDEX, json.dumps({"weight_map": {"model.norm.weight": "/etc/passwd"}}))], never=["root:"]),
    # ---- sizes claimed by headers are checked before anything is built
    Case("config-3m-layers", GEN, ["num_hidden_layers=3000000", "the weights hold 2 layers"], setup=[edit_json(CONFIG, num_hidden_layers=3000000)]),
    Case("config-wrong-width", GEN, ["hidden_size=128", "model.embed_tokens.weight"], setup=[edit_json(CONFIG, hidden_size=128, head_dim=32)]),
    Case("train-from-disagrees", [*TRAIN, "-o", "runs/new", "model.from=zoo/llama"], ["config.json", "num_hidden_layers=5"], setup=[edit_json(CONFIG, num_hidden_layers=5)]),
    Case("train-dim-65536", [*TRAIN, "-o", "runs/new", "model.dim=65536", "model.n_heads=512"], ["GiB of memory", "GiB available"]),
    Case("gguf-block-count", ["info", "zoo/llama.gguf"], ["llama.gguf", "num_hidden_layers=1000000"], setup=[gguf_with(**{"llama.block_count": 1000000})]),
    Case("quantize-no-memory", ["quantize", "--model", "zoo/llama", "--out", "q4new"], ["quantizing zoo/llama", "GiB of memory", "GiB available"], patch=_little_memory),
    Case("convert-no-memory", ["convert", "zoo/llama", "--out", "x.gguf"], ["converting zoo/llama", "GiB of memory", "GiB available"], patch=_little_memory),
    Case("gguf-huge-shape", ["info", "zoo/llama.gguf"], ["llama.gguf", "not a readable GGUF file"], setup=[_gguf_huge_dim]),
    Case("gguf-head-count-0", ["info", "zoo/llama.gguf"], ["llama.attention.head_count is 0"], setup=[gguf_with(**{"llama.attention.head_count": 0})]),
    Case("st-overlap", GEN, ["model.safetensors", "overlap"], setup=[header(WEIGHTS, _overlap)]),
    Case("st-duplicate-key", GEN, ["model.safetensors", "'model.norm.weight' twice"], setup=[header(WEIGHTS, _duplicate)]),
    Case("st-huge-shape", GEN, ["model.safetensors", "model.norm.weight", "18446744073709551616"], setup=[header(WEIGHTS, _huge_shape)]),
    Case("st-truncated", GEN, ["model.safetensors"], setup=[write(WEIGHTS, b"\x00" * 4)]),
    Case("config-not-json", GEN, ["config.json:1", "malformed JSON"], setup=[write(CONFIG, "{not json")]),
    Case("only-pickles", GEN, ["pickled weights"], setup=[lambda root: (root / WEIGHTS).rename(root / "zoo/llama/pytorch_model.bin")]),
    # ---- chat templates are bounded
    Case("template-huge-repeat", CHAT_GEN, ["chat template was stopped", "3000000000 times"], setup=[_template("{{ 'A' * 3000000000 }}")]),
    Case("template-nested-ranges", CHAT_GEN, ["chat template was stopped", "1,000,000 characters"],
         setup=[_template("{% for i in range(99999) %}{% for j in range(99999) %}xx{% endfor %}{% endfor %}")]),
    Case("template-range-1e9", CHAT_GEN, ["chat template", "MAX_RANGE"], setup=[_template("{{ range(10**9)|list }}")]),
    Case("template-recursion", CHAT_GEN, ["recursive macro"], setup=[_template("{% macro f(n) %}{{ f(n) }}{% endmacro %}{{ f(1) }}")]),
    Case("template-power", CHAT_GEN, ["chat template was stopped", "2 ** 100000000"], setup=[_template("{{ 2 ** 100000000 }}")]),
    Case("template-doubling", CHAT_GEN, ["chat template was stopped", "namespace().s"],
         setup=[_template("{% set ns = namespace(s='ab') %}{% for i in range(40) %}{% set ns.s = ns.s ~ ns.s %}{% endfor %}{{ ns.s }}")]),
    Case("template-not-utf8", GEN, ["chat_template.jinja is not UTF-8"], setup=[write(TEMPLATE, b"{{ '\xff\xfe' }}")]),
    # ---- wrong-typed config.json values
    Case("config-hidden-abc", GEN, ["config.json: hidden_size is \"abc\"", "whole number"], setup=[edit_json(CONFIG, hidden_size="abc")]),
    Case("config-hidden-null", GEN, ["config.json: hidden_size is null"], setup=[edit_json(CONFIG, hidden_size=None)]),
    Case("config-hidden-float", GEN, ["config.json: hidden_size is 288.9"], setup=[edit_json(CONFIG, hidden_size=288.9)]),
    Case("config-eos-string", GEN, ["config.json: eos_token_id is \"</s>\""], setup=[edit_json(CONFIG, eos_token_id="</s>")]),
    Case("config-rope-factor", GEN, ["rope_parameters.factor is \"x\""], setup=[edit_json(CONFIG, rope_parameters={"rope_type": "linear", "factor": "x"})]),
    Case("config-eps-tiny", GEN, ["rms_norm_eps is \"tiny\""], setup=[edit_json(CONFIG, rms_norm_eps="tiny")]),
    Case("config-rope-params-str", GEN, ["rope_parameters is \"abc\""], setup=[edit_json(CONFIG, rope_parameters="abc")]),
    Case("config-quantization-str", ["convert", "zoo/llama", "--out", "x.gguf"], ["quantization is 'q4'"], setup=[edit_json(CONFIG, quantization="q4")]),
    Case("config-quantization-str-gen", GEN, ["config.json", "quantization"], setup=[edit_json(CONFIG, quantization="q4")]),
    Case("config-rope-yarn", GEN, ["rope type 'yarn'"], setup=[edit_json(CONFIG, rope_parameters={"rope_type": "yarn", "factor": 4.0})], never=["llmctl info"]),
    Case("config-heads-zero", GEN, ["config.json", "n_heads"], setup=[edit_json(CONFIG, num_attention_heads=0)]),
    Case("tokenizer-bigger-than-vocab", GEN, ["the tokenizer has 400 tokens", "vocab_size is 320"], setup=[_bigger_tokenizer]),
    Case("genconfig-temperature-hot", GEN, ["generation_config.json: temperature is \"hot\""], setup=[edit_json(GENCONFIG, do_sample=True, temperature="hot")]),
    Case("genconfig-top-p-5", GEN, ["generation_config.json: top_p is 5"], setup=[edit_json(GENCONFIG, do_sample=True, top_p=5)], never=["--top-p must"]),
    Case("genconfig-eos-string", GEN, ["generation_config.json: eos_token_id is '</s>'"], setup=[edit_json(GENCONFIG, eos_token_id="</s>")]),
    Case("genconfig-not-json", GEN, ["generation_config.json is not valid JSON"], setup=[write(GENCONFIG, "{")]),
    # ---- prompts that are not UTF-8, empty prompt files
    Case("prompt-stdin-not-utf8", ["generate", "--model", "zoo/llama", "--prompt", "-"], ["stdin", "not UTF-8"], stdin=b"hello \xff\xfe"),
    Case("prompt-arg-not-utf8", ["generate", "--model", "zoo/llama", "--prompt", "caf\udce9"], ["--prompt is not UTF-8"]),
    Case("prompt-file-not-utf8", ["generate", "--model", "zoo/llama", "--prompt-file", "p.jsonl"], ["p.jsonl:2", "not UTF-8"],
         setup=[write("p.jsonl", b'{"prompt": "a"}\n{"prompt": "\xff"}\n')]),
    Case("prompt-file-empty", ["generate", "--model", "zoo/llama", "--prompt-file", "p.jsonl"], ["p.jsonl holds no prompts"], setup=[write("p.jsonl", "\n")]),
    # ---- messages that misled
    Case("val-fraction-2", [*TRAIN, "-o", "runs/new", "data.val_fraction=2"], ["data.val_fraction=2"], never=["too few"]),
    Case("n-heads-3", [*TRAIN, "-o", "runs/new", "model.n_heads=3"], ["model.dim 32 is not divisible by model.n_heads 3"], never=["set head_dim"]),
    Case("info-folder-named-gguf", ["info", "dir.gguf"], ["dir.gguf/config.json is missing"], setup=[lambda root: (root / "dir.gguf").mkdir()], never=["does not exist"]),
    Case("missing-model", ["generate", "--model", "nothere", "--prompt", "hi"], ["nothere does not exist"]),
    # ---- chat survives command errors (exit 0 at the end of stdin, the error printed, the next command answered)
    Case("chat-save-missing-folder", ["chat", "--model", "zoo/llama", "--max-tokens", "1"], ["cannot write", "its folder does not exist", "context:"],
         stdin="/save nofolder/x.json\n/stats\n", code=0),
    Case("chat-save-onto-folder", ["chat", "--model", "zoo/llama", "--max-tokens", "1"], ["/save zoo: that is a folder", "context:"], stdin="/save zoo\n/stats\n", code=0),
    Case("chat-save-under-file", ["chat", "--model", "zoo/llama", "--max-tokens", "1"], ["cannot write zoo/notes.txt/x.json: zoo/notes.txt is a file, not a folder", "context:"],
         stdin="/save zoo/notes.txt/x.json\n/stats\n", code=0),
    Case("chat-line-not-utf8", ["chat", "--model", "zoo/llama", "--max-tokens", "1"], ["stdin", "not UTF-8", "context:"], stdin=b"\xff\xfe\n/stats\n", code=0),
    Case("chat-load-missing", ["chat", "--model", "zoo/llama", "--max-tokens", "1"], ["missing.json does not exist", "context:"], stdin="/load missing.json\n/stats\n", code=0),
    # ---- finetune-lora and adapters (issue 15)
    Case("ft-line-in-no-format", [*FT, "--data", "data/bad.jsonl"], ["data/bad.jsonl:2", "none of the formats"],
         setup=[write("data/bad.jsonl", '{"prompt": "a", "completion": "b"}\n{"question": "q", "answer": "a"}\n')]),
    Case("ft-unknown-target", [*FT, "--data", "data/ok.jsonl", "--targets", "q_proj,qkv"],
         ["no layer of this model is called qkv", "Valid targets: all-linear, down_proj, gate_proj, k_proj, o_proj, q_proj, up_proj, v_proj"],
         setup=[write("data/ok.jsonl", '{"prompt": "a", "completion": "b"}\n' * 4)]),
    Case("ft-rank-above-width", [*FT, "--data", "data/ok.jsonl", "--rank", "999"],
         ["--rank 999 is larger than layer model.layers.0.self_attn.q_proj's width (64 -> 64)"],
         setup=[write("data/ok.jsonl", '{"prompt": "a", "completion": "b"}\n' * 4)]),
    Case("adapter-for-another-model", [*GEN, "--adapter", "wide-adapter", "--backend", "torch"],
         ["model.layers.0.self_attn.q_proj.lora_A is [2, 128]", "needs [2, 64]"], setup=[_wide_adapter]),
]  # fmt: skip


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input(case: Case, base: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root = tmp_path / "home"
    shutil.copytree(base, root, symlinks=True)
    for step in case.setup:
        step(root)
    monkeypatch.chdir(root)
    monkeypatch.setenv("LLMCTL_MEMORY_CHECK", "1")
    if case.patch is not None:
        case.patch(monkeypatch, *([root] if case.patch is _no_latest else []))
    before = tree(root)
    result = CliRunner().invoke(app, case.argv, input=case.stdin)
    output = " ".join(result.output.split())  # rich wraps long lines
    assert result.exit_code == case.code, output
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    assert "Traceback" not in result.output
    for text in case.says:
        assert " ".join(text.split()) in output, f"{text!r} not in: {output}"
    for text in case.never:
        assert text not in output, f"{text!r} in: {output}"
    assert tree(root) == before, "a refused command changed the user's files"


def test_the_corpus_is_large() -> None:
    assert len(CASES) >= 60 and len({c.id for c in CASES}) == len(CASES)


def _refuse_nan(name: str) -> None:
    raise ValueError(f"bare {name} is not JSON")


def test_nan_weights_warn_and_eval_json_stays_json(base: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from llmctl.io.model_folder import read_model, write_model
    from llmctl.io.safetensors import RawTensor

    root = tmp_path / "home"
    shutil.copytree(base, root, symlinks=True)
    monkeypatch.chdir(root)
    folder = read_model(root / "zoo" / "llama")
    tensors = dict(folder.tensors)
    bad = tensors["model.layers.0.mlp.up_proj.weight"].data.copy()
    bad[0, 0] = np.nan
    tensors["model.layers.0.mlp.up_proj.weight"] = RawTensor.from_numpy(bad)
    write_model(root / "nan", folder.spec, tensors, source=root / "zoo" / "llama")

    result = CliRunner().invoke(app, ["eval", "--model", "nan", "--data", "corpus/shk.txt", "--json", "--max-tokens", "64"])
    assert result.exit_code == 0, result.output
    record = json.loads(result.stdout, parse_constant=_refuse_nan)
    assert record["perplexity"] is None
    assert "non-finite scores" in " ".join(result.stderr.split())

    result = CliRunner().invoke(app, ["quantize", "--model", "nan", "--out", "nan-q4"])
    assert result.exit_code == 1 and "Traceback" not in result.output
    said = " ".join(result.output.split())
    assert "nan has NaN or infinite weights in model.layers.0.mlp.up_proj.weight; such weights cannot be quantized" in said
    assert not (root / "nan-q4").exists()


@pytest.mark.parametrize("how", ["--debug", "LLMCTL_DEBUG=1"])
def test_debug_shows_the_traceback(how: str, base: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from llmctl.errors import CheckpointError

    monkeypatch.chdir(base)
    argv = ["info", "nothere"]
    if how == "--debug":
        result = CliRunner().invoke(app, ["--debug", *argv])
    else:
        result = CliRunner().invoke(app, argv, env={"LLMCTL_DEBUG": "1"})
    assert isinstance(result.exception, CheckpointError)  # raised through, so the traceback is printed
    plain = CliRunner().invoke(app, argv, env={"LLMCTL_DEBUG": ""})
    assert plain.exit_code == 1 and isinstance(plain.exception, SystemExit)
