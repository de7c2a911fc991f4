"""The OpenAI-compatible HTTP API over the engine, as a Starlette (ASGI) app.

/v1/chat/completions, /v1/completions, /v1/models, /health and /metrics; OpenAI's request fields and response
shapes, server-sent events ending with `data: [DONE]`, and errors as {"error": {message, type, param, code}}.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import time
from dataclasses import dataclass, field
from typing import Any

from starlette.applications import Starlette
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.routing import Route

from llmctl.errors import LlmctlError
from llmctl.serve.engine import Engine, QueueFull, request_id
from llmctl.serve.engine import Request as EngineRequest

MAX_BODY = 1 << 20  # bytes
MAX_TOP_LOGPROBS = 20
MAX_CHOICES = 8     # 'n': choices of one request, each a row of the running batch
RETRY_AFTER = "1"   # seconds a client is asked to wait when the queue is full


class ApiError(Exception):
    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict[str, str] | None = None) -> None:  # fmt: skip
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code, self.headers = status, message, type, param, code, headers

    def response(self) -> JSONResponse:
        body = {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}
        return JSONResponse(body, status_code=self.status, headers=self.headers)


@dataclass
class ServerState:
    """What the app serves; `engine` is None while the model loads (then /health and /v1 answer 503)."""

    model_name: str
    api_key: str | None = None
    engine: Engine | None = None
    tokenizer: Any = None
    stop_ids: frozenset[int] = frozenset()
    chat_stop: tuple[frozenset[int], tuple[str, ...]] = (frozenset(), ())
    defaults: dict[str, Any] = field(default_factory=dict)   # sampling settings from generation_config.json
    load_error: str | None = None
    created: int = field(default_factory=lambda: int(time.time()))


# --- request checking ---------------------------------------------------------------------------------------------

_NUMBER = (int, float)
_TYPES: dict[str, tuple[tuple[type, ...], str]] = {
    "model": ((str,), "a string"),
    "max_tokens": ((int,), "an integer"),
    "max_completion_tokens": ((int,), "an integer"),
    "temperature": (_NUMBER, "a number"),
    "top_p": (_NUMBER, "a number"),
    "top_k": ((int,), "an integer"),
    "min_p": (_NUMBER, "a number"),
    "repetition_penalty": (_NUMBER, "a number"),
    "seed": ((int,), "an integer"),
    "n": ((int,), "an integer"),
    "stream": ((bool,), "a boolean"),
    "stream_options": ((dict,), "an object"),
    "top_logprobs": ((int,), "an integer"),
    "echo": ((bool,), "a boolean"),
    "user": ((str,), "a string"),
}


def _check_types(body: dict[str, Any]) -> None:
    for name, (types, what) in _TYPES.items():
        value = body.get(name)
        if value is None:
            continue
        if isinstance(value, bool) and bool not in types or not isinstance(value, types):
            raise ApiError(400, f"'{name}' must be {what}, got {json.dumps(value)[:60]}.", param=name, code="invalid_type")


async def _read_json(request: Request) -> dict[str, Any]:
    length = request.headers.get("content-length")
    if length is not None and length.isdigit() and int(length) > MAX_BODY:
        raise ApiError(413, f"The request body has {length} bytes; at most {MAX_BODY} are accepted.", code="request_too_large")
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > MAX_BODY:
            raise ApiError(413, f"The request body is over {MAX_BODY} bytes.", code="request_too_large")
    try:
        data = json.loads(body)
    except UnicodeDecodeError as e:
        raise ApiError(400, f"The request body is not UTF-8 (byte {e.start}).", code="invalid_json") from None
    except json.JSONDecodeError as e:
        raise ApiError(400, f"The request body is not valid JSON: {e.msg} at line {e.lineno} column {e.colno}.", code="invalid_json") from None
    if not isinstance(data, dict):
        raise ApiError(400, f"The request body must be a JSON object, got a JSON {type(data).__name__}.", code="invalid_json")
    _check_types(data)
    return data


def _check_key(state: ServerState, request: Request) -> None:
    if state.api_key is None:
        return
    header = request.headers.get("authorization", "")
    scheme, _, given = header.partition(" ")
    if not header:
        raise ApiError(401, "No API key given: send the header 'Authorization: Bearer KEY'.", type="authentication_error", code="invalid_api_key")
    if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), state.api_key.encode()):
        raise ApiError(401, "The API key is wrong.", type="authentication_error", code="invalid_api_key")


def _ready(state: ServerState) -> Engine:
    if state.engine is None:
        message = f"The model failed to load: {state.load_error}" if state.load_error else "The model is still loading; try again shortly."
        raise ApiError(503, message, type="server_error", code="model_loading", headers={"Retry-After": "5"})
    return state.engine


def _check_model(state: ServerState, body: dict[str, Any]) -> None:
    name = body.get("model")
    if name is not None and name != state.model_name:
        raise ApiError(404, f"The model '{name}' does not exist; this server serves '{state.model_name}'.",
                       type="not_found_error", param="model", code="model_not_found")  # fmt: skip


def _sampling(state: ServerState, body: dict[str, Any], prompt_len: int, chat: bool) -> tuple[Any, int | None]:
    """SamplingParams from the request (the model's generation_config.json for what it leaves out), and logprobs."""
    from llmctl.generation import SamplingParams

    engine = state.engine
    context = engine.spec.max_seq_len
    if prompt_len >= context:
        raise ApiError(400, f"The prompt has {prompt_len} tokens; the model's context holds {context}, leaving no room for an answer.",
                       param="messages" if chat else "prompt", code="context_length_exceeded")  # fmt: skip
    room = context - prompt_len
    name = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    max_tokens = body.get(name)
    if max_tokens is None:
        max_tokens = room if chat else min(16, room)
    elif not 1 <= max_tokens <= room:
        raise ApiError(400, f"'{name}' is {max_tokens}; it must be between 1 and {room} (the context holds {context} tokens, "
                       f"the prompt takes {prompt_len}).", param=name, code="invalid_value")  # fmt: skip
    n = body.get("n", 1) if body.get("n") is not None else 1
    if not 1 <= n <= MAX_CHOICES:
        raise ApiError(400, f"'n' is {n}; it must be between 1 and {MAX_CHOICES}.", param="n", code="invalid_value")
    stop = body.get("stop")
    if stop is None:
        stop = []
    elif isinstance(stop, str):
        stop = [stop]
    elif not isinstance(stop, list) or not all(isinstance(s, str) for s in stop):
        raise ApiError(400, "'stop' must be a string or a list of strings.", param="stop", code="invalid_type")
    if len(stop) > 4 or any(not s for s in stop):
        raise ApiError(400, "'stop' holds at most 4 non-empty strings.", param="stop", code="invalid_value")
    values = dict(state.defaults)
    for key in ("temperature", "top_p", "top_k", "min_p", "repetition_penalty", "seed"):
        if body.get(key) is not None:
            values[key] = body[key]
    if "temperature" in values and not 0 <= values["temperature"] <= 2:
        raise ApiError(400, f"'temperature' is {values['temperature']}; it must be between 0 and 2.", param="temperature", code="invalid_value")
    stop_ids, stop_text = state.stop_ids, tuple(stop)
    if chat:
        stop_ids, stop_text = stop_ids | state.chat_stop[0], stop_text + state.chat_stop[1]
    try:
        params = SamplingParams(max_tokens=max_tokens, stop=stop_text, stop_ids=stop_ids,
                                **{k: float(v) if k not in ("top_k", "seed") else v for k, v in values.items()})  # fmt: skip
    except LlmctlError as e:
        raise ApiError(400, e.message.replace("--", "").replace("-", "_"), code="invalid_value") from None
    if chat:
        logprobs = None
        if body.get("logprobs") is not None and not isinstance(body["logprobs"], bool):
            raise ApiError(400, "'logprobs' must be a boolean for chat completions.", param="logprobs", code="invalid_type")
        top = body.get("top_logprobs")
        if top is not None and not 0 <= top <= MAX_TOP_LOGPROBS:
            raise ApiError(400, f"'top_logprobs' must be between 0 and {MAX_TOP_LOGPROBS}.", param="top_logprobs", code="invalid_value")
        if body.get("logprobs"):
            logprobs = top or 0
        elif top:
            raise ApiError(400, "'top_logprobs' needs 'logprobs': true.", param="top_logprobs", code="invalid_value")
    else:
        logprobs = body.get("logprobs")
        if logprobs is not None and (isinstance(logprobs, bool) or not isinstance(logprobs, int) or not 0 <= logprobs <= 5):
            raise ApiError(400, "'logprobs' must be an integer between 0 and 5 for completions.", param="logprobs", code="invalid_value")
    return params, logprobs


def _chat_prompt(state: ServerState, body: dict[str, Any]) -> list[int]:
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise ApiError(400, "'messages' must be a non-empty list of {role, content} objects.", param="messages",
                       code="invalid_type" if messages is not None else "missing_required_parameter")  # fmt: skip
    plain = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise ApiError(400, f"messages[{i}] must be an object with a string 'role'.", param=f"messages[{i}]", code="invalid_type")
        content = m.get("content")
        if isinstance(content, list):  # content parts: text only
            parts = []
            for part in content:
                if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                    raise ApiError(400, f"messages[{i}].content: only text parts are supported.", param=f"messages[{i}].content", code="invalid_value")
                parts.append(part["text"])
            content = "".join(parts)
        elif content is None:
            content = ""
        elif not isinstance(content, str):
            raise ApiError(400, f"messages[{i}].content must be a string or a list of text parts.", param=f"messages[{i}].content", code="invalid_type")
        plain.append({"role": m["role"], "content": content})
    try:
        return state.tokenizer.apply_chat_template(plain, add_generation_prompt=True, tokenize=True)
    except LlmctlError as e:
        raise ApiError(400, f"The chat template refused the messages: {e.message}", param="messages", code="invalid_value") from None


def _completion_prompt(state: ServerState, body: dict[str, Any]) -> list[int]:
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]
    if isinstance(prompt, str):
        ids = state.tokenizer.encode(prompt)
    elif isinstance(prompt, list) and prompt and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
        vocab = state.engine.spec.vocab_size
        if not all(0 <= t < vocab for t in prompt):
            raise ApiError(400, f"'prompt' holds token ids outside 0..{vocab - 1}.", param="prompt", code="invalid_value")
        ids = list(prompt)
    elif prompt is None:
        raise ApiError(400, "'prompt' is required.", param="prompt", code="missing_required_parameter")
    else:
        raise ApiError(400, "'prompt' must be a string, a list of token ids, or a list holding one of those (one prompt per request).",
                       param="prompt", code="invalid_type")  # fmt: skip
    if not ids:
        raise ApiError(400, "The prompt is empty and the tokenizer adds no BOS token: there is nothing to continue.", param="prompt", code="invalid_value")
    return ids


# --- responses ----------------------------------------------------------------------------------------------------


def _token_text(tokenizer: Any, token: int) -> str:
    return tokenizer.decode([token])


def _chat_logprobs(tokenizer: Any, infos: list[tuple]) -> dict[str, Any]:
    def entry(token: int, logprob: float) -> dict[str, Any]:
        text = _token_text(tokenizer, token)
        return {"token": text, "logprob": logprob, "bytes": list(text.encode("utf-8"))}

    return {"content": [entry(t, lp) | {"top_logprobs": [entry(a, alp) for a, alp in top]} for t, lp, top in infos], "refusal": None}


def _completion_logprobs(tokenizer: Any, infos: list[tuple], offset: int) -> dict[str, Any]:
    tokens, token_logprobs, tops, offsets = [], [], [], []
    for t, lp, top in infos:
        text = _token_text(tokenizer, t)
        tokens.append(text)
        token_logprobs.append(lp)
        tops.append({_token_text(tokenizer, a): alp for a, alp in top})
        offsets.append(offset)
        offset += len(text)
    return {"tokens": tokens, "token_logprobs": token_logprobs, "top_logprobs": tops, "text_offset": offsets}


def _usage(reqs: list[EngineRequest]) -> dict[str, int]:
    """The prompt once, the completions of every choice."""
    prompt, completion = len(reqs[0].prompt), sum(req.completion_tokens for req in reqs)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def _sse(data: dict[str, Any]) -> str:
    return f"data: {json.dumps(data, ensure_ascii=False)}\n\n"


async def _complete(state: ServerState, request: Request, chat: bool) -> Response:
    _check_key(state, request)
    engine = _ready(state)
    body = await _read_json(request)
    _check_model(state, body)
    prompt = _chat_prompt(state, body) if chat else _completion_prompt(state, body)
    params, logprobs = _sampling(state, body, len(prompt), chat)
    stream = bool(body.get("stream"))
    options = body.get("stream_options") or {}
    include_usage = bool(options.get("include_usage")) if stream else False
    loop = asyncio.get_running_loop()
    events: asyncio.Queue = asyncio.Queue()  # (choice index, engine event)
    rid = request_id("chatcmpl" if chat else "cmpl")
    reqs = [EngineRequest(rid if i == 0 else f"{rid}-{i}", prompt, _choice_params(params, i),
                          lambda event, i=i: loop.call_soon_threadsafe(events.put_nowait, (i, event)), state.tokenizer, logprobs)
            for i in range(body.get("n") or 1)]  # fmt: skip
    try:
        engine.submit(*reqs)
    except QueueFull:
        raise ApiError(429, f"The server is busy: {engine.max_queue} requests are already waiting. Retry shortly.",
                       type="rate_limit_error", code="queue_full", headers={"Retry-After": RETRY_AFTER}) from None  # fmt: skip
    created, model = int(time.time()), state.model_name
    obj = ("chat.completion" if chat else "text_completion")
    if stream:
        return StreamingResponse(_stream(state, reqs, events, chat, include_usage, created), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Request-Id": rid})  # fmt: skip
    texts, infos = [[] for _ in reqs], [[] for _ in reqs]
    running = len(reqs)
    while running:
        try:
            i, event = await asyncio.wait_for(events.get(), timeout=0.5)
        except asyncio.TimeoutError:
            if await request.is_disconnected():
                for req in reqs:
                    req.cancel()
                return Response(status_code=499)
            continue
        if event[0] == "text":
            texts[i].append(event[1])
            if event[2] is not None:
                infos[i].append(event[2])
        elif event[0] == "error":
            for req in reqs:
                req.cancel()
            raise ApiError(500, event[1], type="server_error", code="internal_error")
        else:
            running -= 1
    choices = []
    for i, req in enumerate(reqs):
        answer, reason = "".join(texts[i]), _finish_reason(req.finish_reason)
        if chat:
            choices.append({"index": i, "message": {"role": "assistant", "content": answer, "refusal": None}, "finish_reason": reason,
                            "logprobs": _chat_logprobs(state.tokenizer, infos[i]) if logprobs is not None else None})  # fmt: skip
        else:
            choices.append({"index": i, "text": answer, "finish_reason": reason,
                            "logprobs": _completion_logprobs(state.tokenizer, infos[i], 0) if logprobs is not None else None})  # fmt: skip
    return JSONResponse({"id": rid, "object": obj, "created": created, "model": model, "choices": choices,
                         "usage": _usage(reqs), "system_fingerprint": None}, headers={"X-Request-Id": rid})  # fmt: skip


def _choice_params(params: Any, index: int) -> Any:
    """Choice `index`'s sampling: the request's, with its own random stream (seed + index) when a seed is given."""
    if index == 0 or params.seed is None:
        return params
    return params.with_updates(seed=params.seed + index)


def _finish_reason(reason: str | None) -> str:
    return "stop" if reason == "stop" else "length"


async def _stream(state: ServerState, reqs: list[EngineRequest], events: asyncio.Queue, chat: bool, include_usage: bool,
                  created: int):  # fmt: skip
    base = {"id": reqs[0].id, "object": "chat.completion.chunk" if chat else "text_completion", "created": created,
            "model": state.model_name, "system_fingerprint": None}  # fmt: skip
    extra = {"usage": None} if include_usage else {}
    offsets = [0] * len(reqs)
    try:
        if chat:
            for i in range(len(reqs)):
                yield _sse(base | {"choices": [{"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                                                "finish_reason": None}]} | extra)  # fmt: skip
        running = len(reqs)
        while running:
            i, event = await events.get()
            if event[0] == "text":
                piece, info = event[1], event[2]
                if chat:
                    lp = _chat_logprobs(state.tokenizer, [info]) if info is not None else None
                    choice = {"index": i, "delta": {"content": piece}, "logprobs": lp, "finish_reason": None}
                else:
                    lp = _completion_logprobs(state.tokenizer, [info], offsets[i]) if info is not None else None
                    choice = {"index": i, "text": piece, "logprobs": lp, "finish_reason": None}
                    offsets[i] += len(piece)
                yield _sse(base | {"choices": [choice]} | extra)
            elif event[0] == "error":
                yield _sse({"error": {"message": event[1], "type": "server_error", "param": None, "code": "internal_error"}})
                break
            else:
                running -= 1
                reason = _finish_reason(reqs[i].finish_reason)
                last = {"index": i, "delta": {}, "logprobs": None, "finish_reason": reason} if chat else \
                    {"index": i, "text": "", "logprobs": None, "finish_reason": reason}
                yield _sse(base | {"choices": [last]} | extra)
        else:
            if include_usage:
                yield _sse(base | {"choices": [], "usage": _usage(reqs)})
        yield "data: [DONE]\n\n"
    finally:
        for req in reqs:
            if req.finish_reason is None:  # the client left (or a choice failed): the engine frees the slot at its next step
                req.cancel()


def build_app(state: ServerState) -> Starlette:
    """The ASGI app over `state` (its engine may be set later, once the model has loaded)."""

    def handle(endpoint):
        async def wrapped(request: Request) -> Response:
            try:
                return await endpoint(request)
            except ApiError as e:
                return e.response()
            except ClientDisconnect:
                return Response(status_code=499)

        return wrapped

    async def chat_completions(request: Request) -> Response:
        return await _complete(state, request, chat=True)

    async def completions(request: Request) -> Response:
        return await _complete(state, request, chat=False)

    async def models(request: Request) -> Response:
        _check_key(state, request)
        return JSONResponse({"object": "list", "data": [{"id": state.model_name, "object": "model", "created": state.created, "owned_by": "llmctl"}]})

    async def health(request: Request) -> Response:
        if state.engine is None:
            status = "error" if state.load_error else "loading"
            return JSONResponse({"status": status, "error": state.load_error}, status_code=503)
        return JSONResponse({"status": "ok"})

    async def metrics(request: Request) -> Response:
        _check_key(state, request)
        if state.engine is None:
            return PlainTextResponse("", status_code=503)
        return PlainTextResponse(state.engine.metrics.render(state.model_name), media_type="text/plain; version=0.0.4")

    async def not_found(request: Request, exc: Exception) -> Response:
        status = getattr(exc, "status_code", 404)
        message = f"No route {request.method} {request.url.path}." if status == 404 else f"{request.method} is not allowed on {request.url.path}."
        return ApiError(status, message, code="not_found" if status == 404 else "method_not_allowed").response()

    async def server_error(request: Request, exc: Exception) -> Response:
        return ApiError(500, f"Internal error: {type(exc).__name__}: {exc}", type="server_error", code="internal_error").response()

    routes = [
        Route("/v1/chat/completions", handle(chat_completions), methods=["POST"]),
        Route("/v1/completions", handle(completions), methods=["POST"]),
        Route("/v1/models", handle(models), methods=["GET"]),
        Route("/health", health, methods=["GET"]),
        Route("/metrics", handle(metrics), methods=["GET"]),
    ]
    return Starlette(routes=routes, exception_handlers={404: not_found, 405: not_found, 500: server_error})
