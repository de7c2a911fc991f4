"""`llmctl serve`'s prefill: prompts prefilled together give each prompt's logits, cache and tokens alone; the
groups it forms; and the order of the engine's events (no request's first token waits for others' prompts)."""

from __future__ import annotations

import threading

import numpy as np
import pytest

from conftest import BACKENDS
from test_generate import tiny_chat_model
from test_serve import NEAR_TIE

from llmctl.generation import PromptCache, SamplingParams, prefill_groups
from llmctl.serve.engine import Engine, Request

SYSTEM = list(range(40, 80))  # a shared "system prompt"
PROMPTS = [[1, 5, 9, 30, 40, 41, 42], [1, 7], [1, 5, 9, 30, 40, 50, 60, 70, 80, 2, 3, 4, 6, 8], [1, *SYSTEM, 11, 12],
           [1, *SYSTEM, 13], [1, 100, 101, 102, 103, 104, 105, 106, 107, 108, 109, 110, 111, 112, 113, 114, 115, 116, 117]]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return tiny_chat_model(tmp_path_factory.mktemp("prefill-model"))


def cached(tokens: list[int]) -> PromptCache:
    cache = PromptCache([])
    cache.tokens = tokens
    return cache


def test_prefill_groups_pack_short_prompts_and_wait_for_shared_prefixes():
    short = [[1, i, i + 1] for i in range(10)]
    assert prefill_groups(short, [], tokens=12) == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]  # 4 rows of 3 padded tokens
    assert prefill_groups([[1] * 9, [2] * 3, [3] * 5], []) == [[1, 2, 0]]  # shortest first
    system = [[1, *SYSTEM, 7 + i] for i in range(4)]
    # all share the system prompt: the first runs it, the others reuse it in a later group
    assert prefill_groups(system, []) == [[0], [1, 2, 3]]
    # a cache already holds it: all run together
    assert prefill_groups(system, [cached([1, *SYSTEM, 99])]) == [[0, 1, 2, 3]]
    # identical prompts (n choices) wait for the first one, not for each other
    assert prefill_groups([[1, *SYSTEM]] * 3 + [[2, 3]], []) == [[3, 0], [1, 2]]
    # a short shared prefix is not worth the wait
    assert prefill_groups([[1, 2, 3, 4, 5, 6], [1, 2, 7, 8, 9, 10]], []) == [[0, 1]]


def _keys(slot) -> tuple[np.ndarray, np.ndarray]:
    layer = slot.cache.layers[0]
    keys, values = layer.keys[:, :, : slot.length], layer.values[:, :, : slot.length]
    return (keys.numpy(), values.numpy()) if hasattr(keys, "numpy") else (np.array(keys), np.array(values))


@pytest.mark.parametrize("name", BACKENDS)
def test_prompts_prefilled_together_equal_each_alone(folder, name):
    """Rows of different lengths, some reusing cached prefixes of different lengths: each row's logits, keys and
    values equal its prefill alone's, and decoding on gives generate's greedy tokens (near-ties allowed)."""
    from llmctl.backends import get_backend

    model = get_backend(name).load(folder)
    decoder = model.batch_decoder(False)
    (first, _, _), (second, _, _) = decoder.prefill([PROMPTS[0], [1, *SYSTEM, 14, 15]])
    reuse = [first.cache, second.cache]
    together = decoder.prefill(PROMPTS, reuse)
    # the batch runs 18 columns (the last prompt's new tokens): rows reuse what comes before them, computing in
    # place of padding what else they would reuse
    assert [n for _, _, n in together] == [0, 0, 0, 25, 24, 1]
    for prompt, (slot, logits, reused) in zip(PROMPTS, together):
        (alone, alone_logits, _), = decoder.prefill([prompt], reuse)
        assert slot.length == alone.length == len(prompt) and slot.cache.tokens == prompt
        assert all(layer.offset == len(prompt) for layer in slot.cache.layers)  # where decoding writes next
        np.testing.assert_allclose(logits, alone_logits, rtol=1e-4, atol=1e-4)
        for got, want in zip(_keys(slot), _keys(alone)):
            np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
    # decode on from the batched prefill: generate's greedy tokens
    slots, logits = [s for s, _, _ in together], [lg for _, lg, _ in together]
    out, gaps = [[] for _ in PROMPTS], [[] for _ in PROMPTS]
    for _ in range(12):
        for i, row in enumerate(logits):
            top2 = np.sort(row)[-2:]
            out[i].append(int(np.argmax(row)))
            gaps[i].append(top2[1] - top2[0])
        logits = decoder.step(slots, [tokens[-1] for tokens in out])
    for prompt, tokens, gap in zip(PROMPTS, out, gaps):
        want = model.greedy(prompt, len(tokens))
        parted = next((k for k, (a, b) in enumerate(zip(want, tokens)) if a != b), None)
        assert parted is None or min(gap[: parted + 1]) < NEAR_TIE, (want, tokens)


class Recorder:
    """The engine's events in order: ("prefill", prompts), ("step", rows), ("token", request id)."""

    def __init__(self, engine: Engine, tokenizer) -> None:
        self.tokenizer = tokenizer
        self.events: list[tuple] = []
        self.lock = threading.Lock()
        prefill, step = engine.decoder.prefill, engine.decoder.step

        def record_prefill(prompts, reuse=()):
            self.add("prefill", [tuple(p) for p in prompts])
            return prefill(prompts, reuse)

        def record_step(slots, tokens):
            self.add("step", len(slots))
            return step(slots, tokens)

        engine.decoder.prefill, engine.decoder.step = record_prefill, record_step

    def add(self, *event) -> None:
        with self.lock:
            self.events.append(event)

    def request(self, name: str, prompt: list[int], max_tokens: int) -> Request:
        done = threading.Event()

        def emit(event):
            if event[0] == "text":
                self.add("token", name)
            else:
                done.set()

        request = Request(name, prompt, SamplingParams(max_tokens=max_tokens), emit, self.tokenizer, logprobs=0)  # an event per token
        request.done = done
        return request


@pytest.mark.parametrize("per_row", [False, True])
def test_first_tokens_come_before_other_prompts_prefill(folder, per_row):
    """A running stream's token is sent before newcomers' prefills, and each group's first tokens before the next
    group's prefill."""
    from llmctl.backends import get_backend
    from llmctl.tokenizer import Tokenizer

    engine = Engine(get_backend("torch").load(folder), max_batch=8, per_row=per_row)
    engine.prefill_tokens = 40  # groups of few short prompts
    recorder = Recorder(engine, Tokenizer.from_dir(folder))
    try:
        running = recorder.request("running", [1, 2, 3], 500)
        engine.submit(running)
        while ("token", "running") not in recorder.events:
            running.done.wait(0.01)
        newcomers = [recorder.request(f"new{i}", [1, 10 + i, 20 + i, 30 + i][: 2 + i % 3] * 4, 4) for i in range(6)]
        with engine.cond:  # all waiting when the engine next looks: admitted in one round
            engine.submit(*newcomers)
        assert all(request.done.wait(60) for request in newcomers)
        running.cancel()
        assert running.done.wait(60)
        events = list(recorder.events)
    finally:
        engine.stop()
    prefills = [i for i, e in enumerate(events) if e[0] == "prefill" and len(e[1][0]) > 3]
    assert len(prefills) >= 3  # several groups
    before = events[max(i for i, e in enumerate(events[: prefills[0]]) if e[0] == "step") : prefills[0]]
    assert ("token", "running") in before  # the running stream's pending token did not wait for the prefills
    for n, at in enumerate(prefills):
        group = events[at][1]
        names = [r.id for r in newcomers if tuple(r.prompt) in group]
        following = events[at : prefills[n + 1] if n + 1 < len(prefills) else len(events)]
        for name in names:  # its first token right after its own group's prefill, before the next group's
            assert ("token", name) in following
            assert ("token", name) not in events[:at]
