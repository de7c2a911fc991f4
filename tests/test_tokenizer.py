"""Tokenizer: loading model folders, SentencePiece parity, BPE training, saving for transformers, streaming."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from llmctl.errors import DataError, TokenizerError
from llmctl.tokenizer import BOS, EOS, IM_END, IM_START, PAD, StreamDecoder, Tokenizer

SHARED = Path(__file__).resolve().parents[2] / "shared"
needs_shared = pytest.mark.skipif(not SHARED.is_dir(), reason=f"shared test data not found at {SHARED}")

# Multi-byte characters (accents, CJK, emoji incl. a ZWJ sequence), odd whitespace, digits and a zero-width space.
UNICODE = (
    "Héllo wörld! 你好，世界 🤖🚀 👨‍👩‍👧  tabs\tand\nnewlines\n\n  double  spaces  ,   trailing   "
    "Ωμέγα ١٢٣ 𝔘𝔫𝔦𝔠𝔬𝔡𝔢 \u200b zero-width ｆｕｌｌ ① 12345678 \r\n"
)
EDGE_CASES = ["", " ", "  a", "a  ", "\n", "First Citizen:", " leading space"]


def shakespeare() -> str:
    return (SHARED / "data" / "tinyshakespeare.txt").read_text(encoding="utf-8")


def slices(text: str, start: int, count: int, size: int) -> list[str]:
    return [text[i : i + size] for i in range(start, start + count * size, size)]


@pytest.fixture(scope="module")
def llama3() -> Tokenizer:
    """The 7 MB llama3 tokenizer.json, loaded once."""
    if not SHARED.is_dir():
        pytest.skip(f"shared test data not found at {SHARED}")
    return Tokenizer.from_dir(SHARED / "tokenizers" / "llama3")


@pytest.fixture(scope="module")
def trained() -> Tokenizer:
    """A byte-level BPE trained on 100 KB of Shakespeare."""
    if not SHARED.is_dir():
        pytest.skip(f"shared test data not found at {SHARED}")
    return Tokenizer.train_bpe(iter(shakespeare()[:100_000].splitlines(keepends=True)), vocab_size=600)


# --- errors ---------------------------------------------------------------------------------------------------------


def test_missing_folder_is_named(tmp_path: Path):
    with pytest.raises(TokenizerError, match="is not a folder") as e:
        Tokenizer.from_dir(tmp_path / "nowhere")
    assert str(tmp_path / "nowhere") in e.value.message


def test_folder_without_tokenizer_names_files_looked_for(tmp_path: Path):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(TokenizerError) as e:
        Tokenizer.from_dir(tmp_path)
    assert str(tmp_path) in e.value.message
    assert "tokenizer.json" in e.value.message and "tokenizer.model" in e.value.message
    assert e.value.hint


@needs_shared
def test_tiktoken_model_is_refused_with_a_reason(tmp_path: Path):
    tiktoken_file = SHARED / "tokenizers" / "llama3" / "tokenizer.model"
    (tmp_path / "tokenizer.model").write_bytes(tiktoken_file.read_bytes()[:4096])
    with pytest.raises(TokenizerError, match="tiktoken"):
        Tokenizer.from_dir(tmp_path)


@pytest.mark.parametrize("content", [b"\xff\xff\xff\xff\xff", b"\x0a\x05ab"], ids=["garbage", "truncated"])
def test_corrupt_sentencepiece_model_is_refused(tmp_path: Path, content: bytes):
    (tmp_path / "tokenizer.model").write_bytes(content)
    with pytest.raises(TokenizerError, match="not a SentencePiece model"):
        Tokenizer.from_dir(tmp_path)


@needs_shared
def test_special_token_missing_from_vocabulary(tmp_path: Path):
    shutil.copy(SHARED / "models" / "stories260K" / "tokenizer.json", tmp_path)
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|eot_id|>"}))
    with pytest.raises(TokenizerError, match=r"eos_token '<\|eot_id\|>' is not in the vocabulary"):
        Tokenizer.from_dir(tmp_path)


# --- loading --------------------------------------------------------------------------------------------------------


@needs_shared
@pytest.mark.parametrize(
    "folder, text, ids, bos, eos, adds_bos, template",
    [
        ("tokenizers/llama2", "First Citizen:", [1, 3824, 21353, 19642, 29901], "<s>", "</s>", True, "llama-2-chat"),
        ("tokenizers/gpt2", "Hello world", [15496, 995], "<|endoftext|>", "<|endoftext|>", False, None),
        ("tokenizers/mistral-7b-v0.3", "[INST] Hi", [1, 3, 29473, 16127], "<s>", "</s>", True, "mistral-instruct"),
        ("tokenizers/smollm2-135m-instruct", "<|im_end|>", [2], "<|im_start|>", "<|im_end|>", False, "smollm2"),
        ("models/stories260K", "Once upon a time", [1, 403, 407, 261, 378], "<s>", "</s>", True, None),
    ],
    ids=["llama2", "gpt2", "mistral-v0.3", "smollm2", "stories260K"],
)
def test_from_dir_reads_shared_tokenizers(folder, text, ids, bos, eos, adds_bos, template):
    tok = Tokenizer.from_dir(SHARED / folder)
    assert tok.encode(text) == ids
    assert (tok.bos_token, tok.eos_token, tok.adds_bos) == (bos, eos, adds_bos)
    assert tok.token_to_id(bos) == tok.bos_id and tok.id_to_token(tok.eos_id) == eos
    assert tok.eos_token_ids == {tok.eos_id}
    expected = None if template is None else (SHARED / "chat_templates" / f"{template}.jinja").read_text()
    assert tok.chat_template == expected


@needs_shared
def test_llama3_ids_match_meta(llama3: Tokenizer):
    assert llama3.encode("This is a test sentence.") == [128000, 2028, 374, 264, 1296, 11914, 13]
    assert (llama3.bos_id, llama3.eos_id, llama3.vocab_size) == (128000, 128001, 128256)
    assert llama3.encode_batch(["a", "b c"], add_special_tokens=False) == [[64], [65, 272]]


@needs_shared
def test_gpt2_tokenizer_json_truncation_is_ignored():
    tok = Tokenizer.from_dir(SHARED / "tokenizers" / "gpt2")  # its tokenizer.json truncates at 50 tokens
    assert len(tok.encode(shakespeare()[:2000])) > 400


@needs_shared
def test_generation_config_and_template_sources(tmp_path: Path):
    shutil.copy(SHARED / "models" / "stories260K" / "tokenizer.json", tmp_path)
    config = {
        "bos_token": {"content": "<s>", "lstrip": False, "normalized": False, "rstrip": False, "special": True},
        "eos_token": "</s>",
        "chat_template": [{"name": "tool_use", "template": "tools"}, {"name": "default", "template": "chat"}],
        "model_max_length": 1_000_000_000_000_000_019_884_624_838_656,  # transformers' "no limit"
    }
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 7]}))
    tok = Tokenizer.from_dir(tmp_path)
    assert (tok.bos_token, tok.bos_id, tok.eos_token_ids) == ("<s>", 1, {2, 7})
    assert tok.chat_template == "chat" and tok.model_max_length is None
    assert tok.encode("Once") == [1, 403]  # tokenizer.json's post-processor adds BOS

    (tmp_path / "chat_template.jinja").write_text("from the file")
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": 5}))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({**config, "add_bos_token": False}))
    tok = Tokenizer.from_dir(tmp_path)
    assert tok.chat_template == "from the file" and tok.eos_token_ids == {2, 5}
    assert tok.encode("Once") == [403] and not tok.adds_bos  # transformers honours add_bos_token: so do we


# --- SentencePiece tokenizer.model --------------------------------------------------------------------------------


@needs_shared
@pytest.mark.parametrize("name", ["llama2", "mistral-7b-v0.1", "mistral-7b-v0.3"])
def test_sentencepiece_model_converts_to_identical_ids(tmp_path: Path, name: str):
    sentencepiece = pytest.importorskip("sentencepiece")
    from tokenizers import Tokenizer as Backend

    source = SHARED / "tokenizers" / name
    shutil.copy(source / "tokenizer.model", tmp_path)  # only the .model: the folder of an old download
    tok = Tokenizer.from_dir(tmp_path)
    sp = sentencepiece.SentencePieceProcessor(model_file=str(source / "tokenizer.model"))
    reference = Backend.from_file(str(source / "tokenizer.json"))
    assert (tok.vocab_size, tok.bos_token, tok.eos_token, tok.unk_token) == (sp.vocab_size(), "<s>", "</s>", "<unk>")
    texts = slices(shakespeare(), 0, 12, 2500) + slices(shakespeare(), 700_000, 4, 2500) + [UNICODE, *EDGE_CASES]
    for text in texts:
        ids = tok.encode(text)
        assert ids == [sp.bos_id(), *sp.encode(text)], text[:60]
        assert ids == reference.encode(text).ids, text[:60]
        assert tok.decode(ids, skip_special_tokens=True) == sp.decode(ids[1:]) == text.replace("\r", "\r")
    if name == "mistral-7b-v0.3":  # control tokens are special: templates write them, decode can skip them
        expected = [1, 3, 29473, 16127, 29473, 4]
        assert tok.encode("[INST] Hi [/INST]") == reference.encode("[INST] Hi [/INST]").ids == expected
        assert tok.decode(tok.encode("[INST] Hi"), skip_special_tokens=True) == " Hi"


@needs_shared
@pytest.mark.parametrize("byte_fallback", [True, False], ids=["byte-fallback", "unk"])
@pytest.mark.parametrize("model_type", ["bpe", "unigram"])
def test_trained_sentencepiece_models_convert_to_identical_ids(tmp_path: Path, model_type: str, byte_fallback: bool):
    """Default SentencePiece options: NFKC character map and collapsed whitespace, which Llama's model has not."""
    sentencepiece = pytest.importorskip("sentencepiece")
    text = shakespeare()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(text[:100_000].splitlines()),
        model_prefix=str(tmp_path / "tokenizer"),
        vocab_size=800,
        model_type=model_type,
        byte_fallback=byte_fallback,
        minloglevel=2,
    )
    tok = Tokenizer.from_dir(tmp_path)
    sp = sentencepiece.SentencePieceProcessor(model_file=str(tmp_path / "tokenizer.model"))
    for sample in slices(text, 200_000, 8, 2000) + [UNICODE, *EDGE_CASES]:
        assert tok.encode(sample, add_special_tokens=False) == sp.encode(sample), sample[:60]
    assert tok.encode("a")[0] == sp.bos_id()


# --- training -------------------------------------------------------------------------------------------------------


@needs_shared
def test_train_bpe_vocab_specials_and_round_trip(trained: Tokenizer):
    assert trained.vocab_size == 600
    assert [trained.token_to_id(t) for t in (BOS, EOS, PAD, IM_START, IM_END)] == [0, 1, 2, 3, 4]
    assert (trained.bos_id, trained.eos_id, trained.pad_id) == (0, 1, 2)
    assert trained.eos_token_ids == {1, 4}
    for text in [shakespeare()[500_000:502_000], UNICODE, "ASCII only: 12 + 30 = 42.", " ", "\x00\x7f"]:
        ids = trained.encode(text)
        assert ids[0] == trained.bos_id and trained.bos_id not in ids[1:]
        assert trained.decode(ids, skip_special_tokens=True) == text
        assert trained.decode(trained.encode(text, add_special_tokens=False)) == text
    # Common words became single tokens; unseen characters fall back to bytes, never to an unknown token
    assert len(trained.encode(" the", add_special_tokens=False)) == 1
    assert len(trained.encode("🤖", add_special_tokens=False)) == 4


@needs_shared
def test_train_bpe_chat_template(trained: Tokenizer):
    messages = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]
    text = trained.apply_chat_template(messages, add_generation_prompt=False)
    assert text == "<|bos|><|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\nHello<|im_end|>\n"
    ids = trained.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    assert ids[:2] == [trained.bos_id, trained.token_to_id(IM_START)] and ids.count(trained.bos_id) == 1
    assert ids.count(trained.token_to_id(IM_END)) == 2
    assert trained.decode(ids) == text + "<|im_start|>assistant\n"


def test_train_bpe_from_files(tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("low lower lowest newer newest wider widest\n" * 50 + "naïve café 東京\n" * 10, encoding="utf-8")
    tok = Tokenizer.train_bpe([corpus], vocab_size=280)
    assert tok.vocab_size == 280
    assert Tokenizer.train_bpe([corpus], vocab_size=1000).vocab_size < 1000  # the text runs out of pairs
    assert "fewer than the 1000 asked for" in " ".join(capsys.readouterr().err.split())
    assert tok.decode(tok.encode("lowest café 東京 unseen ✓"), skip_special_tokens=True) == "lowest café 東京 unseen ✓"
    with pytest.raises(DataError, match="missing.txt"):
        Tokenizer.train_bpe([tmp_path / "missing.txt"], vocab_size=300)
    with pytest.raises(TokenizerError, match="at least 261"):
        Tokenizer.train_bpe([corpus], vocab_size=100)


# --- saving ---------------------------------------------------------------------------------------------------------


def _assert_transformers_parity(tok: Tokenizer, folder: Path, texts: list[str]) -> None:
    transformers = pytest.importorskip("transformers")
    hf = transformers.AutoTokenizer.from_pretrained(str(folder))
    for text in texts:
        assert hf(text)["input_ids"] == tok.encode(text), text[:60]
        assert hf(text, add_special_tokens=False)["input_ids"] == tok.encode(text, add_special_tokens=False)
        ids = tok.encode(text)
        assert hf.decode(ids) == tok.decode(ids)
        assert hf.decode(ids, skip_special_tokens=True) == tok.decode(ids, skip_special_tokens=True)
    assert (hf.bos_token, hf.eos_token, hf.pad_token) == (tok.bos_token, tok.eos_token, tok.pad_token)
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi 🙂"}]
    assert hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=True) == tok.apply_chat_template(
        messages
    )
    assert hf.apply_chat_template(messages, tokenize=True, add_generation_prompt=True, return_dict=False) == (
        tok.apply_chat_template(messages, tokenize=True)
    )


@needs_shared
def test_save_trained_loads_in_transformers_and_back(trained: Tokenizer, tmp_path: Path):
    trained.save(tmp_path)
    written = sorted(p.name for p in tmp_path.iterdir())
    assert written == ["chat_template.jinja", "tokenizer.json", "tokenizer_config.json"]
    assert json.loads((tmp_path / "tokenizer_config.json").read_text())["tokenizer_class"] == "PreTrainedTokenizerFast"
    texts = [shakespeare()[:3000], UNICODE, "<|im_start|>user\nHi<|im_end|>", ""]
    _assert_transformers_parity(trained, tmp_path, texts)
    again = Tokenizer.from_dir(tmp_path)
    assert [again.encode(t) for t in texts] == [trained.encode(t) for t in texts]
    assert (again.chat_template, again.bos_id, again.pad_id) == (trained.chat_template, trained.bos_id, trained.pad_id)


@needs_shared
def test_save_converted_sentencepiece_loads_in_transformers(tmp_path: Path):
    source = tmp_path / "source"
    source.mkdir()
    shutil.copy(SHARED / "tokenizers" / "llama2" / "tokenizer.model", source)
    shutil.copy(SHARED / "tokenizers" / "llama2" / "tokenizer_config.json", source)
    tok = Tokenizer.from_dir(source)
    assert tok.chat_template == (SHARED / "chat_templates" / "llama-2-chat.jinja").read_text()
    with pytest.raises(TokenizerError, match="Conversation roles must alternate"):
        tok.apply_chat_template([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}])
    tok.save(tmp_path / "saved")
    texts = slices(shakespeare(), 0, 2, 2000) + [UNICODE, " leading space", "<s>[INST] x [/INST]"]
    _assert_transformers_parity(tok, tmp_path / "saved", texts)


# --- streaming ------------------------------------------------------------------------------------------------------

STREAM_TEXTS = ["Emoji 🤖🚀👨‍👩‍👧 and CJK 你好，世界！ mixed in", "東京タワー 🗼 ok", " Héllo\n\n  wörld ✓"]


def _stream(tok: Tokenizer, ids: list[int], skip_special_tokens: bool = False) -> list[str]:
    decoder = StreamDecoder(tok, skip_special_tokens=skip_special_tokens)
    pieces = [decoder.feed(i) for i in ids]
    return pieces + [decoder.flush()]


@needs_shared
@pytest.mark.parametrize(
    "folder", ["tokenizers/llama2", "tokenizers/smollm2-135m-instruct"], ids=["byte-fallback", "byte-level"]
)
def test_stream_decoder_emits_whole_characters_once(folder: str):
    tok = Tokenizer.from_dir(SHARED / folder)
    for text in STREAM_TEXTS:
        ids = tok.encode(text)
        pieces = _stream(tok, ids)
        assert "".join(pieces) == tok.decode(ids)
        assert not any("\ufffd" in piece for piece in pieces), pieces
        assert pieces.count("") < len(ids)  # most ids print at once; some wait for the rest of their character
        joined = "".join(_stream(tok, ids, skip_special_tokens=True))
        assert joined == tok.decode(ids, skip_special_tokens=True)


def test_stream_decoder_flushes_an_unfinished_character(tmp_path: Path):
    tok = Tokenizer.train_bpe(iter(["abc"]), vocab_size=300)
    first_byte_of_robot = tok.encode("🤖", add_special_tokens=False)[:1]
    ids = tok.encode("ok ", add_special_tokens=False) + first_byte_of_robot
    pieces = _stream(tok, ids)
    assert pieces[-2] == "" and pieces[-1] == "\ufffd"  # held back while incomplete, given up at the end
    assert "".join(pieces) == tok.decode(ids)


@needs_shared
def test_stream_decoder_keeps_spaces_after_a_flush():
    tok = Tokenizer.from_dir(SHARED / "tokenizers" / "llama2")  # its decoder strips the first leading space
    ids = tok.encode("one two three", add_special_tokens=False)
    decoder = StreamDecoder(tok)
    pieces = [decoder.feed(ids[0]), decoder.flush(), decoder.flush(), *(decoder.feed(i) for i in ids[1:])]
    assert "".join(pieces) == "one two three"
