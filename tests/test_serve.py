"""`llmctl serve`: the official openai client against the server on loopback; batching gives batch-1's answers;
bad input gets the right status and the server goes on serving."""

from __future__ import annotations

import json
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from typer.testing import CliRunner

from conftest import BACKENDS
from test_generate import tiny_chat_model

openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")

from llmctl.cli import app  # noqa: E402
from llmctl.serve import ServerState, ServerThread, load  # noqa: E402

KEY = "test-key-123"
NEAR_TIE = 1e-3
PROMPTS = ["Hello there", "Tell me a story about a fox", "How are you today?", "What did the fox do next?"]


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    return tiny_chat_model(tmp_path_factory.mktemp("serve-model"))


def start(folder: Path, backend: str = "torch", **limits) -> ServerThread:
    state = ServerState(model_name="tiny", api_key=KEY)
    server = ServerThread(state).start()
    load(state, str(folder), backend, None, limits.get("max_batch", 8), limits.get("max_queue", 64), per_row=limits.get("per_row"))
    return server


@pytest.fixture(scope="module")
def server(folder):
    s = start(folder)
    yield s
    s.stop()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0, timeout=60)


def metrics(server: ServerThread) -> dict[str, float]:
    text = httpx.get(server.url + "/metrics", headers={"Authorization": f"Bearer {KEY}"}).text
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            out[name] = float(value)
    return out


def chat(client, text: str, **kw):
    return client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": text}], **kw)


def test_chat_completion_and_models(client):
    r = chat(client, "Hello there", max_tokens=12)
    assert r.object == "chat.completion" and r.model == "tiny" and r.id.startswith("chatcmpl-")
    choice = r.choices[0]
    assert choice.message.role == "assistant" and choice.message.content
    assert choice.finish_reason == "length" and r.usage.completion_tokens == 12
    assert r.usage.total_tokens == r.usage.prompt_tokens + 12
    assert [m.id for m in client.models.list().data] == ["tiny"]


def test_streamed_chat_with_usage_equals_the_whole_answer(client):
    whole = chat(client, "Tell me a story about a fox", max_tokens=20).choices[0].message.content
    chunks = list(chat(client, "Tell me a story about a fox", max_tokens=20, stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == whole
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 20
    assert all(c.usage is None for c in chunks[:-1])


def test_sse_ends_with_done(server):
    body = {"model": "tiny", "prompt": "Once upon a time", "max_tokens": 5, "stream": True}
    with httpx.stream("POST", server.url + "/v1/completions", json=body, headers={"Authorization": f"Bearer {KEY}"}) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        events = [line for line in r.iter_lines() if line]
    assert events[-1] == "data: [DONE]"
    assert all(e.startswith("data: ") for e in events)
    assert json.loads(events[-2][6:])["choices"][0]["finish_reason"] == "length"


def test_completion_greedy_equals_llmctl_generate(client, folder):
    for prompt in PROMPTS[:2]:
        r = client.completions.create(model="tiny", prompt=prompt, max_tokens=16, temperature=0)
        result = CliRunner().invoke(app, ["generate", "--model", str(folder), "--prompt", prompt, "--max-tokens", "16",
                                          "--json", "--backend", "torch"])  # fmt: skip
        assert result.exit_code == 0, result.output
        expected = json.loads(result.stdout.strip().splitlines()[-1])
        assert r.object == "text_completion"
        assert r.choices[0].text == expected["text"]
        assert r.usage.completion_tokens == expected["new_tokens"]


def test_stop_strings_cut_the_answer(client):
    full = client.completions.create(model="tiny", prompt="Once upon a time", max_tokens=24).choices[0].text
    cut = next(i for i in range(2, len(full)) if full[i].isprintable() and full[i] != " " and full[i] not in full[:i])
    stop = full[cut]
    r = client.completions.create(model="tiny", prompt="Once upon a time", max_tokens=24, stop=[stop, "\x00never"])
    assert r.choices[0].text == full[: full.index(stop)]
    assert r.choices[0].finish_reason == "stop"


def test_logprobs_in_openais_shape(client):
    r = chat(client, "Hello there", max_tokens=6, logprobs=True, top_logprobs=3)
    content = r.choices[0].logprobs.content
    assert len(content) == 6
    for entry in content:
        assert len(entry.top_logprobs) == 3 and entry.logprob <= 0
        assert entry.top_logprobs[0].logprob >= entry.top_logprobs[1].logprob >= entry.top_logprobs[2].logprob
        assert entry.logprob == pytest.approx(entry.top_logprobs[0].logprob)  # greedy takes the likeliest
    c = client.completions.create(model="tiny", prompt="Once upon a time", max_tokens=5, logprobs=2)
    lp = c.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) == 5
    assert all(len(top) <= 2 for top in lp.top_logprobs) and lp.text_offset[0] == 0


def test_seed_makes_sampling_reproducible(client):
    a = chat(client, "Hello there", max_tokens=12, temperature=1.0, seed=7).choices[0].message.content
    b = chat(client, "Hello there", max_tokens=12, temperature=1.0, seed=7).choices[0].message.content
    assert a == b


def test_n_choices_each_sampled_on_its_own(client):
    """n=3 greedy: three copies of the one answer; n=3 sampled with a seed: choice i is what a lone request with
    seed + i samples, streamed or not; usage counts the prompt once and every choice's tokens."""
    alone = chat(client, "Hello there", max_tokens=10).choices[0].message.content
    r = chat(client, "Hello there", max_tokens=10, n=3)
    assert [c.index for c in r.choices] == [0, 1, 2] and {c.message.content for c in r.choices} == {alone}
    assert r.usage.completion_tokens == 30 and r.usage.total_tokens == r.usage.prompt_tokens + 30
    lone = [chat(client, "Hello there", max_tokens=10, temperature=1.0, seed=11 + i) for i in range(3)]
    sampled = [r.choices[0].message.content for r in lone]
    assert len(set(sampled)) > 1  # the seeds differ, so (almost surely) do the samples
    r = chat(client, "Hello there", max_tokens=10, temperature=1.0, seed=11, n=3)
    assert [c.message.content for c in r.choices] == sampled
    chunks = list(chat(client, "Hello there", max_tokens=10, temperature=1.0, seed=11, n=3, stream=True,
                       stream_options={"include_usage": True}))
    streamed = ["".join(c.choices[0].delta.content or "" for c in chunks if c.choices and c.choices[0].index == i) for i in range(3)]
    assert streamed == sampled and chunks[-1].usage.completion_tokens == sum(r.usage.completion_tokens for r in lone)
    assert sorted(c.choices[0].index for c in chunks if c.choices and c.choices[0].finish_reason) == [0, 1, 2]
    c = client.completions.create(model="tiny", prompt="Once upon a time", max_tokens=5, n=2, logprobs=1)
    assert len(c.choices) == 2 and c.choices[0].text == c.choices[1].text and len(c.choices[1].logprobs.tokens) == 5


def _ask(client, i: int, stream: bool):
    """One of 16 different requests: its tokens (with the top-two logprobs at each) and finish reason."""
    prompt = PROMPTS[i % 4] + " " * (i // 4) + "!" * (i % 3)
    kw = dict(max_tokens=8 + 3 * i, logprobs=True, top_logprobs=2, stop=["\x00zz"] if i % 2 else None)
    if not stream:
        r = chat(client, prompt, **kw)
        return [(e.token, [t.logprob for t in e.top_logprobs]) for e in r.choices[0].logprobs.content], r.choices[0].finish_reason
    tokens, reason = [], None
    for chunk in chat(client, prompt, stream=True, **kw):
        if chunk.choices and chunk.choices[0].logprobs is not None:
            tokens += [(e.token, [t.logprob for t in e.top_logprobs]) for e in chunk.choices[0].logprobs.content]
        if chunk.choices and chunk.choices[0].finish_reason:
            reason = chunk.choices[0].finish_reason
    return tokens, reason


def _same_or_near_tie(alone, together) -> bool:
    """Equal tokens, or they part after a step whose top two were within NEAR_TIE in either run."""
    for (a, top_a), (b, top_b) in zip(alone, together):
        if a != b:
            return top_a[0] - top_a[1] < NEAR_TIE or top_b[0] - top_b[1] < NEAR_TIE
        if top_a[0] - top_a[1] < NEAR_TIE:
            return True  # a near-tie here: what follows may rightly differ
    return len(alone) == len(together)


@pytest.fixture(params=["per-row", "joint"])
def batch_server(request, server, folder):
    """The default server (a tiny model: each row through the C++ step) and one decoding rows in one forward."""
    if request.param == "per-row":
        yield server
        return
    joint = start(folder, per_row=False)
    yield joint
    joint.stop()


def test_16_concurrent_clients_get_their_batch_1_answers(batch_server):
    server = batch_server
    client = openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0, timeout=60)
    alone = [_ask(client, i, stream=False) for i in range(16)]
    before = metrics(server)
    start = threading.Barrier(16)

    def run(i):
        start.wait()
        return _ask(client, i, stream=i % 2 == 0)

    with ThreadPoolExecutor(16) as pool:
        together = list(pool.map(run, range(16)))
    for i, ((a, reason_a), (b, reason_b)) in enumerate(zip(alone, together)):
        assert _same_or_near_tie(a, b), f"client {i}: batched answer differs from its batch-1 answer"
        assert len(a) == 8 + 3 * i and reason_a == reason_b == "length"
    after = metrics(server)
    assert after['llmctl_batch_size_max{model_name="tiny"}'] > 1
    steps = after['llmctl_decode_steps_total{model_name="tiny"}'] - before['llmctl_decode_steps_total{model_name="tiny"}']
    rows = after['llmctl_decode_step_rows_total{model_name="tiny"}'] - before['llmctl_decode_step_rows_total{model_name="tiny"}']
    assert rows / steps > 2  # the batch really held several requests at once


def test_a_client_that_leaves_frees_its_slot(client, server):
    before = metrics(server).get('llmctl_requests_total{model_name="tiny",finish_reason="cancelled"}', 0)
    body = {"model": "tiny", "prompt": "Once upon a time", "max_tokens": 400, "stream": True}
    with httpx.stream("POST", server.url + "/v1/completions", json=body, headers={"Authorization": f"Bearer {KEY}"}) as r:
        next(r.iter_lines())
    for _ in range(100):
        after = metrics(server).get('llmctl_requests_total{model_name="tiny",finish_reason="cancelled"}', 0)
        if after > before:
            break
        threading.Event().wait(0.05)
    assert after == before + 1
    assert chat(client, "Hello there", max_tokens=3).choices[0].finish_reason == "length"


def _decode_with_joins(model, prompts: list[list[int]], per_row: bool | None, n: int = 16):
    """Greedy ids of each prompt through one BatchDecoder, a newcomer joining every third step (reusing earlier
    prompts' prefixes) and each leaving after n tokens; with the top-two logit gap at each step."""
    import numpy as np

    decoder = model.batch_decoder(per_row)
    active, out, gaps, step = [], [[] for _ in prompts], [[] for _ in prompts], 0
    while step < 3 * len(prompts) or active:
        if step % 3 == 0 and step // 3 < len(prompts):
            i = step // 3
            (slot, logits, _), = decoder.prefill([prompts[i]], [s.cache for _, s, _ in active])
            active.append([i, slot, logits])
        for row in active:
            top2 = np.sort(row[2])[-2:]
            out[row[0]].append(int(np.argmax(row[2])))
            gaps[row[0]].append(top2[1] - top2[0])
        active = [row for row in active if len(out[row[0]]) < n]
        if active:
            for row, logits in zip(active, decoder.step([r[1] for r in active], [out[r[0]][-1] for r in active])):
                row[2] = logits
        step += 1
    return out, gaps


def _check_against_batch_1(model, prompts, per_row) -> None:
    got, gaps = _decode_with_joins(model, prompts, per_row)
    for prompt, tokens, gap in zip(prompts, got, gaps):
        want = model.greedy(prompt, len(tokens))
        first = next((k for k, (a, b) in enumerate(zip(want, tokens)) if a != b), None)
        assert first is None or min(gap[: first + 1]) < NEAR_TIE, (want, tokens)


PREFIXED = [[1, 5, 9, 30, 40], [1, 7, 8], [1, 5, 9, 30, 40, 50, 60, 70, 80, 2, 3], [1, 100, 101, 102], [1, 5, 9]]


@pytest.mark.parametrize("name", BACKENDS)
@pytest.mark.parametrize("per_row", [False, True])
def test_batch_decoder_equals_batch_1_with_joins_and_leaves(folder, name, per_row):
    """Sequences joining and leaving a running batch get generate_step's greedy tokens (near-ties allowed)."""
    from llmctl.backends import get_backend

    _check_against_batch_1(get_backend(name).load(folder), PREFIXED, per_row)


@pytest.mark.parametrize("family", ["mistral", "qwen2", "mixtral"])
def test_batch_decoder_other_families(family, backend, tmp_path):
    """Sliding window (prompts longer than it), tied head and biases, mixture of experts: the joint batch too."""
    from conftest import make_hf_model

    make_hf_model(family, tmp_path, scale=4.0)
    _check_against_batch_1(backend.load(tmp_path), PREFIXED, per_row=False)


def post(server, path: str, body, key: str | None = KEY, **kw) -> httpx.Response:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    if isinstance(body, (bytes, str)):
        return httpx.post(server.url + path, content=body, headers=headers | {"Content-Type": "application/json"}, **kw)
    return httpx.post(server.url + path, json=body, headers=headers, **kw)


def error_of(response: httpx.Response, status: int) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    return error


CHAT = {"model": "tiny", "messages": [{"role": "user", "content": "Hello there"}], "max_tokens": 4}


def test_bad_input_gets_the_right_status(server, client):
    assert "not valid JSON" in error_of(post(server, "/v1/chat/completions", b'{"model": "tiny", "messages": ['), 400)["message"]
    assert error_of(post(server, "/v1/chat/completions", b"[1, 2]"), 400)["code"] == "invalid_json"
    error = error_of(post(server, "/v1/chat/completions", CHAT | {"max_tokens": "ten"}), 400)
    assert error["param"] == "max_tokens" and "integer" in error["message"]
    assert error_of(post(server, "/v1/chat/completions", CHAT | {"temperature": [1]}), 400)["param"] == "temperature"
    assert error_of(post(server, "/v1/chat/completions", CHAT | {"stream": "yes"}), 400)["param"] == "stream"
    assert post(server, "/v1/chat/completions", CHAT | {"frobnicate": {"x": 1}}).status_code == 200  # unknown: ignored
    error = error_of(post(server, "/v1/chat/completions", CHAT | {"model": "gpt-4"}), 404)
    assert error["code"] == "model_not_found" and "gpt-4" in error["message"]
    long = {"model": "tiny", "prompt": "the fox " * 400, "max_tokens": 4}
    assert error_of(post(server, "/v1/completions", long), 400)["code"] == "context_length_exceeded"
    for bad in (0, -1, 100_000):
        assert error_of(post(server, "/v1/chat/completions", CHAT | {"max_tokens": bad}), 400)["param"] == "max_tokens"
    assert error_of(post(server, "/v1/chat/completions", CHAT | {"temperature": -1}), 400)["param"] == "temperature"
    for bad in (0, 9):
        assert error_of(post(server, "/v1/chat/completions", CHAT | {"n": bad}), 400)["param"] == "n"
    assert error_of(post(server, "/v1/chat/completions", {"model": "tiny"}), 400)["param"] == "messages"
    assert error_of(post(server, "/v1/completions", b"{" + b" " * (1 << 20) + b"}"), 413)["code"] == "request_too_large"
    # keys: /v1 and /metrics need one, /health does not
    assert error_of(post(server, "/v1/chat/completions", CHAT, key=None), 401)["type"] == "authentication_error"
    assert error_of(post(server, "/v1/chat/completions", CHAT, key="test-key-124"), 401)["code"] == "invalid_api_key"
    assert httpx.get(server.url + "/v1/models").status_code == 401
    assert httpx.get(server.url + "/metrics").status_code == 401
    assert httpx.get(server.url + "/health").status_code == 200
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=server.url + "/v1", api_key="wrong", max_retries=0).models.list()
    # the server goes on serving
    assert chat(client, "Hello there", max_tokens=3).usage.completion_tokens == 3


def test_a_flood_past_the_queue_gets_429_and_the_rest_are_served(folder):
    server = start(folder, max_batch=1, max_queue=1)
    try:
        body = {"model": "tiny", "prompt": "Once upon a time", "max_tokens": 200}
        with ThreadPoolExecutor(8) as pool:
            responses = list(pool.map(lambda _: post(server, "/v1/completions", body, timeout=120), range(8)))
        refused = [r for r in responses if r.status_code == 429]
        served = [r for r in responses if r.status_code == 200]
        assert refused and served and len(refused) + len(served) == 8
        assert refused[0].headers["Retry-After"] == "1" and error_of(refused[0], 429)["type"] == "rate_limit_error"
        assert len({r.json()["choices"][0]["text"] for r in served}) == 1  # the same greedy answer for each
        assert post(server, "/v1/completions", body | {"max_tokens": 3}).status_code == 200
    finally:
        server.stop()


def test_health_is_503_while_loading(folder):
    state = ServerState(model_name="tiny")
    with ServerThread(state) as server:
        r = httpx.get(server.url + "/health")
        assert r.status_code == 503 and r.json()["status"] == "loading"
        error = error_of(post(server, "/v1/chat/completions", CHAT, key=None), 503)
        assert error["code"] == "model_loading"
        load(state, str(folder), "torch", None, 2, 4)
        assert httpx.get(server.url + "/health").status_code == 200
        assert post(server, "/v1/chat/completions", CHAT, key=None).status_code == 200


@pytest.mark.skipif("mlx" not in BACKENDS, reason="mlx is not installed")
def test_mlx_serves_the_same_greedy_answers(folder, client):
    server = start(folder, backend="mlx")
    try:
        mlx_client = openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0, timeout=60)
        with ThreadPoolExecutor(4) as pool:
            got = list(pool.map(lambda i: _ask(mlx_client, i, stream=i % 2 == 0), range(4)))
        for i, (tokens, reason) in enumerate(got):
            assert _same_or_near_tie(_ask(client, i, stream=False)[0], tokens) and reason == "length"
    finally:
        server.stop()


def test_llmctl_serve_command_end_to_end(folder, tmp_path):
    """The real command in its own process: loopback, /health 503 then 200, a request, and its one log line."""
    import os
    import subprocess
    import sys
    import time

    from llmctl.serve import free_port

    port = free_port()
    log = tmp_path / "serve.log"
    from conftest import LLMCTL_ROOT

    env = os.environ | {"PYTHONPATH": str(LLMCTL_ROOT)}
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "llmctl", "serve", "--model", str(folder), "--port", str(port),
                                 "--backend", "torch", "--api-key", KEY, "--model-name", "tiny"],
                                stdout=out, stderr=subprocess.STDOUT, env=env)  # fmt: skip
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                if httpx.get(url + "/health").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert proc.poll() is None, log.read_text()
            time.sleep(0.2)
        r = openai.OpenAI(base_url=url + "/v1", api_key=KEY, max_retries=0).chat.completions.create(
            model="tiny", messages=[{"role": "user", "content": "Hello there"}], max_tokens=5)
        assert r.usage.completion_tokens == 5
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    text = log.read_text()
    assert f"{r.id} length: {r.usage.prompt_tokens} tokens in" in text and "5 out" in text and "tokens/s" in text


def test_serve_refuses_bad_flags(folder, tmp_path):
    result = CliRunner().invoke(app, ["serve", "--model", str(folder), "--chat-template", str(tmp_path / "none.jinja")])
    assert result.exit_code == 1 and "none.jinja does not exist" in result.output
    result = CliRunner().invoke(app, ["serve", "--model", str(folder), "--port", "0"])
    assert result.exit_code != 0 and "--port" in result.output


def test_adapter_is_served_as_llmctl_generate_applies_it(folder, tmp_path):
    """`llmctl serve --adapter`: a PEFT adapter on the served model gives `llmctl generate --adapter`'s greedy text,
    which differs from the base model's."""
    peft = pytest.importorskip("peft")
    import torch
    import transformers

    hf = transformers.AutoModelForCausalLM.from_pretrained(folder, torch_dtype=torch.float32)
    wrapped = peft.get_peft_model(hf, peft.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, p in wrapped.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.5)
    wrapped.save_pretrained(tmp_path / "adapter")
    state = ServerState(model_name="tiny", api_key=KEY)
    server = ServerThread(state).start()
    try:
        load(state, str(folder), "torch", None, 4, 8, adapter=str(tmp_path / "adapter"))
        client = openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0, timeout=60)
        texts = {}
        for name, extra in {"adapter": ["--adapter", str(tmp_path / "adapter")], "base": []}.items():
            result = CliRunner().invoke(app, ["generate", "--model", str(folder), *extra, "--prompt", PROMPTS[1],
                                              "--max-tokens", "16", "--json", "--backend", "torch"])  # fmt: skip
            assert result.exit_code == 0, result.output
            texts[name] = json.loads(result.stdout.strip().splitlines()[-1])["text"]
        served = client.completions.create(model="tiny", prompt=PROMPTS[1], max_tokens=16, temperature=0)
        assert served.choices[0].text == texts["adapter"]
        assert texts["adapter"] != texts["base"]
    finally:
        server.stop()
