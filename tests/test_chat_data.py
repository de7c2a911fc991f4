"""Chat and instruction data: record formats, exact assistant-turn loss masks for every shared chat template,
packing with segment ids, truncation counted, bad lines named by file and line."""

from __future__ import annotations

import json

import numpy as np
import pytest

from conftest import SHARED, needs_shared
from llmctl.data.chat import ChatEncoder, PackedBatches, encode_files, pack_examples, read_records, to_messages
from llmctl.errors import DataError

TEMPLATES = sorted(p.stem for p in (SHARED / "chat_templates").glob("*.jinja")) if SHARED.is_dir() else []
# The text that ends an assistant turn, per template, written down here from reading each template (None: EOS).
END_OF_TURN = {"chatml": "<|im_end|>", "smollm2": "<|im_end|>", "qwen2.5-instruct": "<|im_end|>",
               "gemma-it": "<end_of_turn>", "llama-3-instruct": "<|eot_id|>", "phi-3": "<|end|>"}
TOKENIZER_OF = {"llama-3-instruct": "llama3", "llama-2-chat": "llama2", "mistral-instruct": "mistral-7b-v0.3"}
REPLIES = ["First reply about apples.", "Second reply, on pears!", "Third: plums 42."]


def conversation(system: bool) -> list[dict[str, str]]:
    msgs = [{"role": "system", "content": "Be terse."}] if system else []
    for i, reply in enumerate(REPLIES):
        msgs += [{"role": "user", "content": f"Question number {i + 1}?"}, {"role": "assistant", "content": reply}]
    return msgs


def tokenizer_for(name: str):
    from llmctl.tokenizer import Tokenizer

    tok = Tokenizer.from_dir(SHARED / "tokenizers" / TOKENIZER_OF.get(name, "smollm2-135m-instruct"))
    tok.chat_template = (SHARED / "chat_templates" / f"{name}.jinja").read_text()
    return tok


@needs_shared
@pytest.mark.parametrize("system", [False, True], ids=["no-system", "system"])
@pytest.mark.parametrize("name", TEMPLATES)
def test_mask_covers_exactly_the_replies_and_their_end_of_turn(name, system):
    tok = tokenizer_for(name)
    msgs = conversation(system)
    ex = ChatEncoder(tok).encode(msgs)
    # Independent construction: in the whole rendered text, each reply runs from its content to the end of the
    # template's end-of-turn text that follows it; the mask is the tokens that overlap those characters.
    text = tok.apply_chat_template(msgs, add_generation_prompt=False)
    eot = END_OF_TURN.get(name, tok.eos_token)
    expected_chars = np.zeros(len(text), bool)
    for reply in REPLIES:
        start = text.index(reply)
        end = text.index(eot, start + len(reply)) + len(eot)
        assert text[start + len(reply) : end - len(eot)].strip() == ""  # only the end-of-turn follows the reply
        expected_chars[start:end] = True
    enc = tok.backend.encode(text, add_special_tokens=False)
    assert ex.tokens == enc.ids
    expected = [float(any(expected_chars[a:b])) if b > a else 0.0 for a, b in enc.offsets]
    assert ex.trained == expected
    trained_text = tok.decode([t for t, m in zip(ex.tokens, ex.trained) if m])
    for reply in REPLIES:
        assert reply in trained_text.replace("▁", " ")
    assert trained_text.count(eot) == 3 or eot not in tok.backend.get_vocab()  # each turn's end token, once
    assert "Question" not in trained_text and "Be terse" not in trained_text
    assert ChatEncoder(tok, train_on_prompt=True).encode(msgs).trained == [1.0] * len(ex.tokens)


def test_record_formats_and_bad_lines(tmp_path):
    good = [{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]},
            {"prompt": "p", "completion": "c"}, {"instruction": "i", "input": "x", "output": "o"}, {"text": "t"}]
    f = tmp_path / "d.jsonl"
    f.write_text("\n".join(json.dumps(r) for r in good) + "\n\n")
    items = [item for _, item in read_records(f)]
    assert items[1] == [{"role": "user", "content": "p"}, {"role": "assistant", "content": "c"}]
    assert items[2][0]["content"] == "i\n\nx" and items[3] == "t"
    f.write_text(json.dumps(good[0]) + "\n" + json.dumps({"question": "q", "answer": "a"}) + "\n")
    with pytest.raises(DataError, match=rf"{f}:2: .*none of the formats"):
        list(read_records(f))
    with pytest.raises(DataError, match="no assistant message"):
        to_messages({"messages": [{"role": "user", "content": "x"}]}, "f:1")


@needs_shared
def test_packing_truncation_and_batches(tmp_path):
    tok = tokenizer_for("chatml")
    f = tmp_path / "d.jsonl"
    rows = [{"prompt": f"say {i}", "completion": "ok " * (1 + i % 5)} for i in range(20)] + [{"prompt": "long", "completion": "x " * 200}]
    f.write_text("\n".join(json.dumps(r) for r in rows))
    examples, truncated, skipped = encode_files([f], ChatEncoder(tok), 64)
    assert truncated == 1 and skipped == 0 and len(examples) == 21
    packed = pack_examples(examples, 64, seed=0)
    assert packed.rows < 21 and packed.segment_ids.max() > 1
    assert packed.target_count == sum(int(sum(e.weights())) for e in examples)
    source = PackedBatches(packed, packed, 4, seed=1, eval_batches=2)
    a, b = source.batch(3, 0, 2), source.batch(3, 1, 2)
    whole = source.batch(3, 0, 1)
    assert np.array_equal(np.concatenate([a.input_ids, b.input_ids]), whole.input_ids)
    assert np.array_equal(PackedBatches(packed, packed, 4, 1, 2).batch(3, 0, 1).input_ids, whole.input_ids)


def test_builtin_tasks_are_checkable_and_held_out():
    from llmctl.data.tasks import task_records

    train, val = task_records(seed=3, n_train=500, n_val=50)
    assert len(train) == 500 and len(val) == 50
    assert not {c[0]["content"] for c in val} & {c[0]["content"] for c in train}
    for conv in train + val:
        q, a = conv[0]["content"], conv[1]["content"]
        if q.startswith("What is "):
            x, y = q.removeprefix("What is ").removesuffix("?").split(" plus ")
            assert int(a) == int(x) + int(y)
        elif q.startswith("Reverse the word "):
            assert a == q.removeprefix("Reverse the word ").removesuffix(".")[::-1]
        elif q.startswith("Sort these digits: "):
            assert a.split() == sorted(q.removeprefix("Sort these digits: ").split())
    assert task_records(seed=3, n_train=500, n_val=50) == (train, val)
