"""Tokenizer: a `tokenizers` tokenizer with its special tokens and chat template, loaded from a model folder."""

from __future__ import annotations

import json
import re
import struct
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tokenizers import AddedToken, Regex, decoders, models, normalizers, pre_tokenizers, processors, trainers
from tokenizers import Tokenizer as Backend

from llmctl import ui
from llmctl.chat_template import DEFAULT_CHAT_TEMPLATE, render_chat
from llmctl.errors import DataError, TokenizerError

# Special tokens of tokenizers that `Tokenizer.train_bpe` makes; the last two frame ChatML turns.
BOS, EOS, PAD, IM_START, IM_END = "<|bos|>", "<|eos|>", "<|pad|>", "<|im_start|>", "<|im_end|>"
TRAINED_SPECIAL_TOKENS = (BOS, EOS, PAD, IM_START, IM_END)

# Llama 3's split: letters with one leading non-letter, numbers in groups of up to 3 digits, punctuation runs,
# newlines, other whitespace. Used before byte-level BPE in trained tokenizers.
_SPLIT_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
    r"|\s+(?!\S)|\s+"
)


class Tokenizer:
    """Text <-> ids, special tokens, and the chat template of one model."""

    def __init__(
        self,
        backend: Backend,
        *,
        bos_token: str | None = None,
        eos_token: str | None = None,
        pad_token: str | None = None,
        unk_token: str | None = None,
        chat_template: str | None = None,
        eos_token_ids: Iterable[int] = (),
        model_max_length: int | None = None,
    ) -> None:
        # Lengths are llmctl's business (packing, truncation); a tokenizer.json that pads or truncates (GPT-2's
        # truncates at 50) would silently cut text.
        backend.no_truncation()
        backend.no_padding()
        self.backend = backend
        self.bos_token, self.bos_id = bos_token, self._id_of(bos_token, "bos_token")
        self.eos_token, self.eos_id = eos_token, self._id_of(eos_token, "eos_token")
        self.pad_token, self.pad_id = pad_token, self._id_of(pad_token, "pad_token")
        self.unk_token, self.unk_id = unk_token, self._id_of(unk_token, "unk_token")
        self.chat_template = chat_template
        self.model_max_length = model_max_length
        # Generation stops at any of these: chat models end turns with a token other than the tokenizer's EOS.
        self.eos_token_ids: set[int] = set(eos_token_ids) | ({self.eos_id} if self.eos_id is not None else set())

    def _id_of(self, token: str | None, name: str) -> int | None:
        if token is None:
            return None
        token_id = self.backend.token_to_id(token)
        if token_id is None:
            raise TokenizerError(
                f"{name} {token!r} is not in the vocabulary ({self.vocab_size} tokens).",
                hint="Fix tokenizer_config.json so that its special tokens name tokens of tokenizer.json.",
            )
        return token_id

    def add_special_tokens(self, tokens: Sequence[str]) -> list[int]:
        """Add `tokens` (special: matched whole in raw text) at the end of the vocabulary; their ids."""
        self.backend.add_special_tokens([AddedToken(t, normalized=False, special=True) for t in tokens])
        return [self.backend.token_to_id(t) for t in tokens]

    @property
    def vocab_size(self) -> int:
        """Number of ids, added tokens included."""
        return self.backend.get_vocab_size(with_added_tokens=True)

    @property
    def adds_bos(self) -> bool:
        """Whether `encode(text)` prepends BOS (the post-processor does it)."""
        return self.bos_id is not None and self.backend.encode("", add_special_tokens=True).ids[:1] == [self.bos_id]

    # --- loading and saving ---------------------------------------------------------------------------------------

    @classmethod
    def from_dir(cls, path: Path | str) -> Tokenizer:
        """Load tokenizer.json (or a SentencePiece tokenizer.model), tokenizer_config.json and the chat template."""
        path = Path(path)
        if not path.is_dir():
            raise TokenizerError(
                f"{path} is not a folder; a tokenizer is loaded from a model folder.",
                hint="Pass the folder that holds tokenizer.json and tokenizer_config.json.",
            )
        from llmctl.io.paths import inside

        for name in ("tokenizer_config.json", "special_tokens_map.json", "tokenizer.json", "tokenizer.model",
                     "generation_config.json", "chat_template.jinja"):  # fmt: skip
            inside(path, name)  # a symlink leaving the folder is refused before anything is read
        config = _read_json(path / "tokenizer_config.json")
        special_map = _read_json(path / "special_tokens_map.json")
        if (path / "tokenizer.json").is_file():
            try:
                backend = Backend.from_file(str(path / "tokenizer.json"))
            except Exception as e:  # tokenizers raises plain Exception for malformed files
                raise TokenizerError(f"{path / 'tokenizer.json'} does not load: {e}") from e
            defaults: dict[str, str | None] = {}
        elif (path / "tokenizer.model").is_file():
            backend, defaults = _from_sentencepiece(path / "tokenizer.model")
        else:
            raise TokenizerError(
                f"{path} has no tokenizer: looked for tokenizer.json and tokenizer.model (SentencePiece).",
                hint="Copy the tokenizer files of the model into the folder, or train one with `Tokenizer.train_bpe`.",
            )

        tokens = {}
        for name in ("bos", "eos", "pad", "unk"):
            key = f"{name}_token"
            value = config[key] if key in config else special_map.get(key, defaults.get(key))
            tokens[key] = _token_content(value)

        # transformers rebuilds the post-processor when the config says whether to add BOS/EOS; so do we, or ids differ
        if "add_bos_token" in config or "add_eos_token" in config:
            _set_post_processor(
                backend,
                bos=tokens["bos_token"] if config.get("add_bos_token") else None,
                eos=tokens["eos_token"] if config.get("add_eos_token") else None,
            )

        generation = _read_json(path / "generation_config.json")
        eos_ids = generation.get("eos_token_id")
        eos_ids = [] if eos_ids is None else [eos_ids] if isinstance(eos_ids, int) else eos_ids
        if not isinstance(eos_ids, list) or not all(type(i) is int and i >= 0 for i in eos_ids):
            raise TokenizerError(
                f"{path / 'generation_config.json'}: eos_token_id is {generation.get('eos_token_id')!r}; "
                "expected a token id or a list of token ids.",
                hint="Write the id(s) of the end-of-text token, e.g. \"eos_token_id\": 2.",
            )

        max_length = config.get("model_max_length")
        return cls(
            backend,
            **tokens,
            chat_template=_read_chat_template(path, config),
            eos_token_ids=eos_ids,
            # transformers writes a huge sentinel (1e30) when the length is unknown
            model_max_length=max_length if isinstance(max_length, int) and max_length < 10**9 else None,
        )

    def save(self, path: Path | str) -> None:
        """Write tokenizer.json, tokenizer_config.json and chat_template.jinja the way transformers lays them out."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        config: dict[str, Any] = {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "bos_token": self.bos_token,
            "eos_token": self.eos_token,
            "pad_token": self.pad_token,
            "unk_token": self.unk_token,
            # The post-processor in tokenizer.json decides about BOS; no add_bos_token, or transformers rebuilds it.
            "clean_up_tokenization_spaces": False,
        }
        if self.model_max_length is not None:
            config["model_max_length"] = self.model_max_length
        _write_atomic(path / "tokenizer.json", self.backend.to_str(pretty=False))
        _write_atomic(path / "tokenizer_config.json", json.dumps(config, indent=2, ensure_ascii=False) + "\n")
        if self.chat_template is not None:
            _write_atomic(path / "chat_template.jinja", self.chat_template)

    @classmethod
    def train_bpe(
        cls,
        data: Path | Sequence[Path] | Iterable[str],
        vocab_size: int,
        *,
        min_frequency: int = 2,
        extra_special_tokens: Sequence[str] = (),
    ) -> Tokenizer:
        """Train a byte-level BPE on text files (Paths) or an iterator of texts; BOS is prepended, ChatML is set."""
        if isinstance(data, Path):
            data = [data]
        special = [*TRAINED_SPECIAL_TOKENS, *extra_special_tokens]
        smallest = 256 + len(special)
        if vocab_size < smallest:
            raise TokenizerError(
                f"vocab_size={vocab_size} is too small for a byte-level BPE: it needs at least {smallest} "
                f"(256 bytes + {len(special)} special tokens).",
                hint=f"Ask for more, e.g. vocab_size={max(1024, smallest)}.",
            )
        backend = Backend(models.BPE())
        backend.pre_tokenizer = pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(_SPLIT_PATTERN), behavior="isolated"),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
            ]
        )
        backend.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            min_frequency=min_frequency,
            special_tokens=[AddedToken(token, normalized=False, special=True) for token in special],
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        )
        if isinstance(data, Sequence) and data and all(isinstance(item, Path) for item in data):
            for file in data:
                if not file.is_file():
                    raise DataError(f"{file} does not exist; train_bpe needs text files to read.")
            backend.train([str(file) for file in data], trainer)
        else:
            backend.train_from_iterator(iter(data), trainer)
        _set_post_processor(backend, bos=BOS, eos=None)
        tokenizer = cls(
            backend,
            bos_token=BOS,
            eos_token=EOS,
            pad_token=PAD,
            chat_template=DEFAULT_CHAT_TEMPLATE,
            eos_token_ids=[backend.token_to_id(IM_END)],
        )
        if tokenizer.vocab_size < vocab_size:
            ui.warn(
                f"the trained vocabulary has {tokenizer.vocab_size} tokens, fewer than the {vocab_size} asked for: "
                f"the text has too few pairs seen {min_frequency}+ times."
            )
        return tokenizer

    # --- text <-> ids ---------------------------------------------------------------------------------------------

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Ids of `text`; special tokens written in the text are recognised, BOS is added if the tokenizer adds it."""
        return self.backend.encode(text, add_special_tokens=add_special_tokens).ids

    def encode_batch(self, texts: Sequence[str], add_special_tokens: bool = True) -> list[list[int]]:
        """`encode` of many texts, in parallel threads."""
        return [e.ids for e in self.backend.encode_batch(list(texts), add_special_tokens=add_special_tokens)]

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str:
        return self.backend.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def id_to_token(self, token_id: int) -> str | None:
        return self.backend.id_to_token(token_id)

    def token_to_id(self, token: str) -> int | None:
        return self.backend.token_to_id(token)

    # --- chat -----------------------------------------------------------------------------------------------------

    def apply_chat_template(
        self,
        messages: list[dict[str, Any]],
        add_generation_prompt: bool = True,
        tokenize: bool = False,
        **kwargs: Any,
    ) -> str | list[int]:
        """The conversation as the model saw it in training: text, or ids (the template prints BOS itself)."""
        special = {"unk_token": self.unk_token, "pad_token": self.pad_token}
        text = render_chat(
            self.chat_template or DEFAULT_CHAT_TEMPLATE,
            messages,
            add_generation_prompt=add_generation_prompt,
            bos_token=self.bos_token or "",
            eos_token=self.eos_token or "",
            **{key: value for key, value in special.items() if value is not None},
            **kwargs,
        )
        return self.encode(text, add_special_tokens=False) if tokenize else text

    def __repr__(self) -> str:
        return (
            f"Tokenizer(vocab_size={self.vocab_size}, bos={self.bos_token!r}, eos={self.eos_token!r}, "
            f"pad={self.pad_token!r}, chat_template={'yes' if self.chat_template else 'no'})"
        )


class StreamDecoder:
    """Turns ids arriving one by one into text pieces: only complete characters, nothing printed twice."""

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = False) -> None:
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.ids: list[int] = []
        # Text is decoded from `prefix` on, not from 0, so each step costs O(new tokens); the tokens between
        # `prefix` and `read` are decoded again only to learn how much of the longer decode is new.
        self._prefix = 0
        self._read = 0

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens)

    def feed(self, token_id: int) -> str:
        """Add one id; return the text it completes ("" while a multi-byte character is still partial)."""
        self.ids.append(token_id)
        known = self._decode(self.ids[self._prefix : self._read])
        text = self._decode(self.ids[self._prefix :])
        # U+FFFD at the end: the last ids are the first bytes of a character (byte fallback / byte-level BPE)
        if len(text) <= len(known) or text.endswith("\ufffd"):
            return ""
        self._prefix, self._read = self._read, len(self.ids)
        return text[len(known) :]

    def flush(self) -> str:
        """Text still held back, e.g. at the end of generation (a character never completed shows as U+FFFD)."""
        known = self._decode(self.ids[self._prefix : self._read])
        text = self._decode(self.ids[self._prefix :])
        if len(text) <= len(known):
            return ""
        self._prefix, self._read = self._read, len(self.ids)
        return text[len(known) :]


# --- files --------------------------------------------------------------------------------------------------------


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise TokenizerError(f"{path} is not valid JSON: {e}") from e
    if not isinstance(value, dict):
        raise TokenizerError(f"{path} holds a {type(value).__name__}; expected a JSON object.")
    return value


def _write_atomic(path: Path, text: str) -> None:
    # A crash mid-write leaves the old file, never half a new one (and a temporary name a later run cleans up)
    from llmctl.io.safetensors import atomic_write_text

    atomic_write_text(path, text)


def _token_content(value: Any) -> str | None:
    # tokenizer_config.json writes special tokens as strings or as AddedToken dicts {"content": ..., ...}
    if isinstance(value, dict):
        return value.get("content")
    return value if isinstance(value, str) else None


def _read_chat_template(path: Path, config: dict[str, Any]) -> str | None:
    file = path / "chat_template.jinja"
    if file.is_file():
        try:
            return file.read_text(encoding="utf-8")
        except UnicodeDecodeError as e:
            raise TokenizerError(
                f"{file} is not UTF-8 text (byte {e.start} is {e.object[e.start]:#04x}).",
                hint="Save the chat template as UTF-8, or delete the file to use the default template.",
            ) from None
    template = config.get("chat_template")
    if isinstance(template, list):
        # Named templates ([{"name", "template"}]): "default" is the chat one ("tool_use", "rag" are variants)
        named = {entry.get("name"): entry.get("template") for entry in template if isinstance(entry, dict)}
        template = named.get("default", next(iter(named.values()), None))
    return template if isinstance(template, str) else None


def _set_post_processor(backend: Backend, *, bos: str | None, eos: str | None) -> None:
    single = " ".join([*([f"{bos}:0"] if bos else []), "$A:0", *([f"{eos}:0"] if eos else [])])
    pair = " ".join([single, *([f"{bos}:1"] if bos else []), "$B:1", *([f"{eos}:1"] if eos else [])])
    special = [(token, backend.token_to_id(token)) for token in (bos, eos) if token]
    backend.post_processor = processors.TemplateProcessing(single=single, pair=pair, special_tokens=special)


# --- SentencePiece tokenizer.model -> tokenizers BPE --------------------------------------------------------------

_NORMAL, _UNKNOWN, _CONTROL, _USER_DEFINED, _UNUSED, _BYTE = 1, 2, 3, 4, 5, 6  # SentencePiece piece types
_UNIGRAM, _BPE = 1, 2  # SentencePiece model types


@dataclass
class _SentencePieceModel:
    """The parts of a SentencePiece ModelProto that decide how text is split."""

    pieces: list[tuple[str, float, int]]  # (piece, score, type), index = id
    model_type: int
    byte_fallback: bool
    unk_id: int
    bos_id: int
    eos_id: int
    pad_id: int
    charsmap: bytes  # precompiled normalization (empty for "identity", e.g. Llama 2 and Mistral)
    add_dummy_prefix: bool
    remove_extra_whitespaces: bool
    treat_whitespace_as_suffix: bool


def _varint(data: bytes, pos: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        byte = data[pos]  # IndexError on a truncated file: reported as "not a SentencePiece model"
        value |= (byte & 0x7F) << shift
        pos += 1
        if byte < 0x80:
            return value, pos
        shift += 7


def _proto_fields(data: bytes) -> dict[int, list[Any]]:
    """One protobuf message as field number -> values (varints as int, other wire types as bytes)."""
    fields: dict[int, list[Any]] = {}
    pos = 0
    while pos < len(data):
        key, pos = _varint(data, pos)
        wire = key & 7
        if wire == 0:
            value, pos = _varint(data, pos)
        elif wire == 2:
            length, pos = _varint(data, pos)
            value, pos = data[pos : pos + length], pos + length
        elif wire in (1, 5):
            size = 8 if wire == 1 else 4
            value, pos = data[pos : pos + size], pos + size
        else:
            raise ValueError(f"wire type {wire}")
        if pos > len(data):
            raise ValueError("truncated message")
        fields.setdefault(key >> 3, []).append(value)
    return fields


def _read_sentencepiece(path: Path) -> _SentencePieceModel:
    # Field numbers are those of sentencepiece_model.proto; defaults are the proto's defaults.
    data = path.read_bytes()
    if re.match(rb"[A-Za-z0-9+/=]+ \d+\n", data[:200]):
        raise TokenizerError(
            f"{path} is a tiktoken file (base64 token and rank per line, as Llama 3 ships), not SentencePiece.",
            hint="llmctl reads such a tokenizer only as tokenizer.json; put the model's tokenizer.json beside it.",
        )
    try:
        model = _proto_fields(data)
        trainer = _proto_fields(model.get(2, [b""])[-1])
        normalizer = _proto_fields(model.get(3, [b""])[-1])
        pieces = []
        for raw in model.get(1, []):
            piece = _proto_fields(raw)
            score = struct.unpack("<f", piece[2][-1])[0] if 2 in piece else 0.0
            pieces.append((piece[1][-1].decode("utf-8"), score, piece.get(3, [_NORMAL])[-1]))
    except (ValueError, IndexError, KeyError, UnicodeDecodeError, struct.error) as e:
        raise TokenizerError(f"{path} is not a SentencePiece model ({e}).") from e
    if not pieces:
        raise TokenizerError(f"{path} is not a SentencePiece model: it has no pieces.")

    def number(message: dict[int, list[Any]], field: int, default: int) -> int:
        value = message.get(field, [default])[-1]
        return value - (1 << 64) if value >= 1 << 63 else value  # int32 -1 is stored as a 10-byte varint

    return _SentencePieceModel(
        pieces=pieces,
        model_type=number(trainer, 3, _UNIGRAM),
        byte_fallback=bool(number(trainer, 35, 0)),
        unk_id=number(trainer, 40, 0),
        bos_id=number(trainer, 41, 1),
        eos_id=number(trainer, 42, 2),
        pad_id=number(trainer, 43, -1),
        charsmap=normalizer.get(2, [b""])[-1],
        add_dummy_prefix=bool(number(normalizer, 3, 1)),
        remove_extra_whitespaces=bool(number(normalizer, 4, 1)),
        treat_whitespace_as_suffix=bool(number(trainer, 24, 0)),
    )


def _bpe_merges(pieces: list[tuple[str, float, int]]) -> list[tuple[str, str]]:
    """SentencePiece BPE merges the adjacent pair whose joined piece scores highest; as ranked merges that is every
    split of every normal piece into two normal pieces, ordered by the joined piece's score."""
    normal = {piece: i for i, (piece, _, kind) in enumerate(pieces) if kind == _NORMAL}
    ranked = []
    for i, (piece, score, kind) in enumerate(pieces):
        if kind != _NORMAL:
            continue
        for cut in range(1, len(piece)):
            left, right = piece[:cut], piece[cut:]
            if left in normal and right in normal:
                ranked.append((-score, i, normal[left], normal[right], left, right))
    ranked.sort()
    return [(left, right) for *_, left, right in ranked]


def _from_sentencepiece(path: Path) -> tuple[Backend, dict[str, str | None]]:
    """A tokenizers tokenizer giving exactly SentencePiece's ids, and the model's own special tokens."""
    return _sentencepiece_backend(_read_sentencepiece(path), path)


def _sentencepiece_backend(sp: _SentencePieceModel, path: Path) -> tuple[Backend, dict[str, str | None]]:
    """_from_sentencepiece for a model already read (also rebuilt from GGUF metadata); `path` names it in errors."""
    if sp.treat_whitespace_as_suffix:
        raise TokenizerError(f"{path} puts whitespace after words (treat_whitespace_as_suffix); llmctl cannot read it.")
    unk = sp.pieces[sp.unk_id][0] if 0 <= sp.unk_id < len(sp.pieces) else None
    if sp.model_type == _BPE:
        vocab = {piece: i for i, (piece, _, _) in enumerate(sp.pieces)}
        model = models.BPE(vocab, _bpe_merges(sp.pieces), unk_token=unk, fuse_unk=True, byte_fallback=sp.byte_fallback)
    elif sp.model_type == _UNIGRAM:
        # Control and unused pieces never match text in SentencePiece; a very low score keeps Viterbi off them too.
        vocab_scores = [(p, s if kind in (_NORMAL, _USER_DEFINED) else -1e9) for p, s, kind in sp.pieces]
        model = models.Unigram(vocab_scores, unk_id=sp.unk_id, byte_fallback=sp.byte_fallback)
    else:
        raise TokenizerError(
            f"{path} is a SentencePiece model of type {sp.model_type} (word or char); llmctl converts BPE and unigram."
        )
    backend = Backend(model)

    # SentencePiece normalizes in this order: character map, collapse/strip spaces, dummy prefix, " " -> "▁"
    steps: list[normalizers.Normalizer] = []
    if sp.charsmap:
        steps.append(normalizers.Precompiled(sp.charsmap))
    if sp.remove_extra_whitespaces:
        steps += [normalizers.Replace(Regex(r"^ +| +$"), ""), normalizers.Replace(Regex(r" {2,}"), " ")]
    if sp.add_dummy_prefix:
        steps.append(normalizers.Prepend("▁"))
    steps.append(normalizers.Replace(" ", "▁"))
    backend.normalizer = normalizers.Sequence(steps)

    steps_back: list[decoders.Decoder] = [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
    if sp.add_dummy_prefix:
        steps_back.append(decoders.Strip(content=" ", left=1, right=0))
    backend.decoder = decoders.Sequence(steps_back)

    # Control pieces (<s>, [INST]) never match text in SentencePiece, but templates write them, so they are special
    # tokens matched in the raw text; user-defined pieces are ordinary tokens matched whole (as in transformers).
    kinds = {_UNKNOWN: True, _CONTROL: True, _USER_DEFINED: False}
    backend.add_tokens(
        [AddedToken(p, normalized=False, special=kinds[kind]) for p, _, kind in sp.pieces if kind in kinds]
    )
    named = {"bos_token": sp.bos_id, "eos_token": sp.eos_id, "pad_token": sp.pad_id, "unk_token": sp.unk_id}
    tokens = {key: sp.pieces[i][0] if 0 <= i < len(sp.pieces) else None for key, i in named.items()}
    if tokens["bos_token"] is not None:
        _set_post_processor(backend, bos=tokens["bos_token"], eos=None)
    return backend, tokens
