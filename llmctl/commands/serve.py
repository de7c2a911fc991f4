"""`llmctl serve`: an OpenAI-compatible HTTP server over the inference engine, batched, safe by default."""

from __future__ import annotations

import ipaddress
from pathlib import Path
from typing import Annotated

import typer

from llmctl.backends import Backend
from llmctl.commands.generate import BackendOpt, DTypeOpt, ModelOpt
from llmctl.commands.options import DType


def _loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def serve(
    model: ModelOpt = None,
    adapter: Annotated[Path | None, typer.Option(help="A LoRA adapter folder to apply (PEFT or mlx-lm layout, or a finetune-lora run).")] = None,
    host: Annotated[str, typer.Option(help="Address to bind; the default answers this machine only.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="TCP port.")] = 8080,
    max_batch: Annotated[int, typer.Option("--max-batch", help="Most requests decoded together.")] = 8,
    max_queue: Annotated[int, typer.Option("--max-queue", help="Most requests waiting; past it, 429 with Retry-After.")] = 64,
    api_key: Annotated[str | None, typer.Option("--api-key", envvar="LLMCTL_API_KEY", help="Require 'Authorization: Bearer KEY' on /v1 and /metrics.")] = None,
    model_name: Annotated[str | None, typer.Option("--model-name", help="The name clients pass as 'model'; default: the model folder's name.")] = None,
    chat_template: Annotated[Path | None, typer.Option("--chat-template", help="A Jinja chat template file to use instead of the model's.")] = None,
    backend: BackendOpt = Backend.auto,
    dtype: DTypeOpt = DType.auto,
) -> None:
    """Serve a model over HTTP with OpenAI's API (/v1/chat/completions, /v1/completions, /v1/models, /health, /metrics)."""
    import logging
    import threading

    from llmctl import ui
    from llmctl.errors import ConfigError, LlmctlError

    if not 1 <= port <= 65535:
        raise typer.BadParameter(f"--port must be in 1..65535, got {port}")
    if max_batch < 1 or max_queue < 0:
        raise typer.BadParameter(f"--max-batch must be >= 1 and --max-queue >= 0, got {max_batch} and {max_queue}")
    if adapter is not None and not adapter.is_dir():
        raise ConfigError(f"--adapter {adapter} is not a folder.", hint="Give the adapter folder finetune-lora wrote (OUT/adapter) or a PEFT/mlx-lm one.")
    if chat_template is not None and not chat_template.is_file():
        raise ConfigError(f"--chat-template {chat_template} does not exist.", hint="Give a Jinja template file.")
    if not _loopback(host) and api_key is None:
        ui.warn(f"--host {host} is reachable from other machines and no --api-key is set: anyone there can use the model.")
    import uvicorn

    from llmctl.serve import ServerState, build_app, load

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    name = model_name or (Path(model).name if model else "llmctl")
    state = ServerState(model_name=name, api_key=api_key)
    loader = threading.Thread(
        target=lambda: _load(state, model, backend.value, None if dtype is DType.auto else dtype.value, max_batch, max_queue, chat_template, adapter),
        name="llmctl-load", daemon=True,
    )
    loader.start()
    ui.info(f"serving '{name}' on http://{host}:{port}/v1 (/health answers 503 until the model has loaded)")
    server = uvicorn.Server(uvicorn.Config(build_app(state), host=host, port=port, log_level="info", access_log=False))
    try:
        server.run()
    finally:
        if state.engine is not None:
            state.engine.stop()
    if state.load_error is not None:
        raise LlmctlError(f"The model could not be loaded: {state.load_error}")


def _load(state, model, backend, dtype, max_batch, max_queue, chat_template, adapter) -> None:
    from llmctl.serve import load

    try:
        load(state, model, backend, dtype, max_batch, max_queue, chat_template, adapter=None if adapter is None else str(adapter))
    except Exception:
        pass  # kept in state.load_error: /health shows it
