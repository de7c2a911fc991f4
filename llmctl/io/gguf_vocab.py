"""GGUF tokenizer metadata <-> llmctl Tokenizer: byte-level BPE (gpt2) and SentencePiece-style BPE (llama)."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

from llmctl import ui
from llmctl.errors import TokenizerError

if TYPE_CHECKING:
    from llmctl.tokenizer import Tokenizer

_GPT2_SPLIT = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)"
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
    r"|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
    r"|\s+(?!\S)|\s+"
)
_DIGITS_THEN_GPT2 = (r"\p{N}", _GPT2_SPLIT)
# llama.cpp's pre-tokenizer names -> the regexes it splits text with, one after the other (llama-vocab.cpp)
PRE_TOKENIZERS: dict[str, tuple[str, ...]] = {
    "default": (r"[\p{P}\$\+<=>\^~\|]+", _GPT2_SPLIT, r"\p{N}+", r"[0-9][0-9][0-9]"),
    **{name: (_GPT2_SPLIT,) for name in ("gpt2", "mpt", "olmo", "jais")},
    **{name: _DIGITS_THEN_GPT2 for name in ("smollm", "starcoder", "refact", "command-r", "codeshell", "exaone")},
    **{name: (_LLAMA3_SPLIT,) for name in ("llama-bpe", "llama3", "llama-v3", "smaug-bpe", "falcon3", "dbrx")},
    **{name: (_QWEN2_SPLIT,) for name in ("qwen2", "stablelm2", "deepseek-r1-qwen", "megrez")},
}
_LLAMA3_NAMES = ("llama-bpe", "llama3", "llama-v3")  # llama.cpp merges these without BPE's merge order first
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6  # llama.cpp's token types


def _byte_level_pre_tokenizer(pre: str, path: Path) -> Any:
    from tokenizers import Regex, pre_tokenizers

    splits = PRE_TOKENIZERS.get(pre)
    if splits is None:
        ui.warn(f"{path.name}: pre-tokenizer {pre!r} is unknown to llmctl; text is split as GPT-2 splits it.")
        splits = PRE_TOKENIZERS["gpt2"]
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if splits == _DIGITS_THEN_GPT2:  # the form of these in a Hugging Face tokenizer.json (SmolLM's, StarCoder's)
        return pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
    if splits == (_GPT2_SPLIT,):  # ByteLevel's own regex is GPT-2's
        return byte_level
    steps = [pre_tokenizers.Split(Regex(split), behavior="isolated") for split in splits]
    return pre_tokenizers.Sequence([*steps, pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])


def tokenizer_from_metadata(meta: dict[str, Any], path: Path) -> Tokenizer:
    """Rebuild a model's tokenizer (vocabulary, merges, pre-tokenizer, special tokens, chat template)."""
    from tokenizers import AddedToken, decoders, models
    from tokenizers import Tokenizer as Backend

    from llmctl.tokenizer import Tokenizer, _sentencepiece_backend, _SentencePieceModel, _set_post_processor

    kind = meta.get("tokenizer.ggml.model")
    tokens: list[str] = list(meta.get("tokenizer.ggml.tokens") or [])
    if not tokens:
        raise TokenizerError(f"{path} has no tokenizer in its metadata (tokenizer.ggml.tokens is missing).")
    types = list(meta.get("tokenizer.ggml.token_type") or [NORMAL] * len(tokens))
    keys = {"bos": "bos_token_id", "eos": "eos_token_id", "pad": "padding_token_id", "unk": "unknown_token_id"}
    ids = {name: meta.get(f"tokenizer.ggml.{key}") for name, key in keys.items()}
    if kind == "gpt2":
        pre = meta.get("tokenizer.ggml.pre", "default")
        merges = [tuple(merge.split(" ", 1)) for merge in meta.get("tokenizer.ggml.merges") or []]
        vocab = {token: i for i, token in enumerate(tokens)}
        backend = Backend(models.BPE(vocab, merges, ignore_merges=pre in _LLAMA3_NAMES))
        backend.pre_tokenizer = _byte_level_pre_tokenizer(pre, path)
        backend.decoder = decoders.ByteLevel()
        special = {CONTROL: True, USER_DEFINED: False}  # control tokens are special; user-defined ones match whole
        backend.add_tokens(
            [AddedToken(t, normalized=False, special=special[k]) for t, k in zip(tokens, types) if k in special]
        )
        add_bos = meta.get("tokenizer.ggml.add_bos_token", pre in _LLAMA3_NAMES)
    elif kind == "llama":
        scores = list(meta.get("tokenizer.ggml.scores") or [0.0] * len(tokens))
        model = _SentencePieceModel(
            pieces=list(zip(tokens, (float(s) for s in scores), types)),
            model_type=2,  # BPE: llama.cpp's SentencePiece tokenizer joins the best-scoring pair first
            byte_fallback=BYTE in types,
            unk_id=-1 if ids["unk"] is None else ids["unk"],
            bos_id=-1 if ids["bos"] is None else ids["bos"],
            eos_id=-1 if ids["eos"] is None else ids["eos"],
            pad_id=-1 if ids["pad"] is None else ids["pad"],
            charsmap=b"",
            add_dummy_prefix=bool(meta.get("tokenizer.ggml.add_space_prefix", True)),
            remove_extra_whitespaces=False,
            treat_whitespace_as_suffix=False,
        )
        backend, _ = _sentencepiece_backend(model, path)
        add_bos = meta.get("tokenizer.ggml.add_bos_token", True)
    else:
        raise TokenizerError(
            f"{path} has a tokenizer of type {kind!r}; llmctl rebuilds 'gpt2' (byte-level BPE) and 'llama' "
            "(SentencePiece) tokenizers from GGUF metadata.",
            hint="Put the model's tokenizer.json beside the weights in a model folder instead.",
        )
    named = {name: tokens[i] if i is not None and 0 <= i < len(tokens) else None for name, i in ids.items()}
    add_eos = meta.get("tokenizer.ggml.add_eos_token", False)
    _set_post_processor(backend, bos=named["bos"] if add_bos else None, eos=named["eos"] if add_eos else None)
    stop_keys = ("tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id", "tokenizer.ggml.eom_token_id")
    context = meta.get("llama.context_length")
    return Tokenizer(
        backend,
        bos_token=named["bos"],
        eos_token=named["eos"],
        pad_token=named["pad"],
        unk_token=named["unk"],
        chat_template=meta.get("tokenizer.chat_template"),
        eos_token_ids=[int(meta[key]) for key in stop_keys if key in meta],
        model_max_length=int(context) if context else None,
    )


def _pre_tokenizer_name(pre: dict[str, Any] | None) -> str | None:
    """llama.cpp's name for the pre-tokenizer of a byte-level BPE tokenizer.json, or None when it has none."""
    if not pre:
        return None
    steps = pre["pretokenizers"] if pre.get("type") == "Sequence" else [pre]
    kinds = [step.get("type") for step in steps]
    if kinds == ["ByteLevel"] and steps[0].get("use_regex", True):
        return "gpt2"
    if kinds == ["Digits", "ByteLevel"] and steps[0].get("individual_digits") and steps[1].get("use_regex", True):
        return "smollm"
    if kinds == ["Split", "ByteLevel"] and not steps[1].get("use_regex", True):
        pattern = steps[0].get("pattern", {}).get("Regex", "")
        return {_LLAMA3_SPLIT: "llama-bpe", _QWEN2_SPLIT: "qwen2", _GPT2_SPLIT: "gpt2"}.get(pattern)
    return None


def _token_table(tokenizer: Tokenizer, data: dict[str, Any], vocab_size: int) -> tuple[list[str], list[int]]:
    """Every id's token and llama.cpp type; embedding rows past the tokenizer become unused [PAD<id>] tokens."""
    n = tokenizer.vocab_size
    if n > vocab_size:
        raise TokenizerError(
            f"The tokenizer has {n} tokens but the model's embedding only {vocab_size} rows.",
            hint="The tokenizer does not belong to this model.",
        )
    tokens: list[str | None] = [None] * vocab_size
    for token, token_id in tokenizer.backend.get_vocab(with_added_tokens=True).items():
        tokens[token_id] = token
    types = [NORMAL] * vocab_size
    for added in data.get("added_tokens", []):
        types[added["id"]] = CONTROL if added.get("special") else USER_DEFINED
    for i, token in enumerate(tokens):
        if token is None:  # as llama.cpp's converter pads them
            tokens[i], types[i] = f"[PAD{i}]", UNUSED
    return tokens, types  # type: ignore[return-value]


def tokenizer_metadata(tokenizer: Tokenizer, vocab_size: int) -> dict[str, tuple[Any, str]]:
    """GGUF tokenizer key -> (value, kind) for a byte-level BPE or a SentencePiece-style BPE tokenizer.json.

    kind is how the value is stored: str, u32, bool, array (of str), int_array or float_array.
    """
    data = json.loads(tokenizer.backend.to_str())
    model = data.get("model", {})
    tokens, types = _token_table(tokenizer, data, vocab_size)
    byte_level = (
        "ByteLevel" in json.dumps(data.get("pre_tokenizer")) or (data.get("decoder") or {}).get("type") == "ByteLevel"
    )
    merges = [m.split(" ", 1) if isinstance(m, str) else m for m in model.get("merges", [])]
    meta: dict[str, tuple[Any, str]] = {}
    if model.get("type") == "BPE" and byte_level:
        pre = _pre_tokenizer_name(data.get("pre_tokenizer"))
        if pre is None:
            pre = "default"
            ui.warn(
                "the tokenizer's pre-tokenizer has no llama.cpp name; writing 'default', "
                "so llama.cpp may split text differently."
            )
        meta["tokenizer.ggml.model"] = ("gpt2", "str")
        meta["tokenizer.ggml.pre"] = (pre, "str")
        meta["tokenizer.ggml.merges"] = ([f"{left} {right}" for left, right in merges], "array")
    elif model.get("type") == "BPE" and model.get("byte_fallback"):
        # llama.cpp's SentencePiece tokenizer joins the adjacent pair whose joined piece scores highest; scoring
        # each piece minus the rank of the first merge that makes it keeps BPE's order
        ranks: dict[str, int] = {}
        for rank, (left, right) in enumerate(merges):
            ranks.setdefault(left + right, rank)
        scores = [-float(ranks.get(t, len(ranks))) if types[i] == NORMAL else 0.0 for i, t in enumerate(tokens)]
        for i, token in enumerate(tokens):
            if re.fullmatch(r"<0x[0-9A-F]{2}>", token):
                types[i] = BYTE
        if tokenizer.unk_id is not None:
            types[tokenizer.unk_id] = UNKNOWN
        prefix = "Prepend" in json.dumps(data.get("normalizer")) or '"prepend_scheme": "always"' in json.dumps(
            data.get("pre_tokenizer")
        )
        meta["tokenizer.ggml.model"] = ("llama", "str")
        meta["tokenizer.ggml.pre"] = ("default", "str")
        meta["tokenizer.ggml.scores"] = (scores, "float_array")
        meta["tokenizer.ggml.add_space_prefix"] = (prefix, "bool")
    else:
        raise TokenizerError(
            f"The tokenizer is a {model.get('type')} model; llmctl writes byte-level BPE (gpt2) and "
            "SentencePiece-style BPE (llama) tokenizers into GGUF.",
            hint="Write the model as a folder instead.",
        )
    meta["tokenizer.ggml.tokens"] = (tokens, "array")
    meta["tokenizer.ggml.token_type"] = (types, "int_array")
    specials = (("bos_token_id", tokenizer.bos_id), ("eos_token_id", tokenizer.eos_id),
                ("unknown_token_id", tokenizer.unk_id), ("padding_token_id", tokenizer.pad_id))  # fmt: skip
    for key, token_id in specials:
        if token_id is not None:
            meta[f"tokenizer.ggml.{key}"] = (token_id, "u32")
    others = sorted(tokenizer.eos_token_ids - {tokenizer.eos_id})
    if len(others) == 1:  # the end-of-turn token of a chat model whose EOS is another token
        meta["tokenizer.ggml.eot_token_id"] = (others[0], "u32")
    meta["tokenizer.ggml.add_bos_token"] = (tokenizer.adds_bos, "bool")
    meta["tokenizer.ggml.add_eos_token"] = (False, "bool")
    if tokenizer.chat_template:
        meta["tokenizer.chat_template"] = (tokenizer.chat_template, "str")
    return meta
