"""`llmctl serve`'s machinery: the engine (continuous batching), the OpenAI-compatible app, and running them."""

from __future__ import annotations

import logging
import socket
import threading
from pathlib import Path
from typing import Any

from llmctl.serve.app import ServerState, build_app
from llmctl.serve.engine import Engine

__all__ = ["ServerState", "build_app", "load", "ServerThread", "free_port"]


def load(state: ServerState, model: str | None, backend: str, dtype: str | None, max_batch: int, max_queue: int,
         chat_template: Path | None = None, per_row: bool | None = None, adapter: str | None = None) -> None:  # fmt: skip
    """Load the model into `state` (its engine appears when ready); a failure is kept as `state.load_error`."""
    from llmctl.backends import open_model
    from llmctl.chat_session import turn_end
    from llmctl.generation import generation_defaults, stop_ids

    try:
        loaded, tokenizer = open_model(model, backend, dtype, adapter)
        if chat_template is not None:
            tokenizer.chat_template = Path(chat_template).read_text(encoding="utf-8")
        state.tokenizer = tokenizer
        state.stop_ids = stop_ids(loaded, tokenizer)
        state.chat_stop = turn_end(tokenizer)
        state.defaults = generation_defaults(loaded.source) if loaded.source else {}
        state.engine = Engine(loaded, max_batch=max_batch, max_queue=max_queue, per_row=per_row)
    except Exception as e:  # shown by /health and the /v1 endpoints (503), and logged
        state.load_error = str(e)
        logging.getLogger("llmctl.serve").error("loading %s failed: %s", model, e)
        raise


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


class ServerThread:
    """A uvicorn server for `state` on its own thread (tests, and `llmctl serve` through `run`)."""

    def __init__(self, state: ServerState, host: str = "127.0.0.1", port: int = 0, log_level: str = "warning") -> None:
        import uvicorn

        self.state = state
        self.host, self.port = host, port or free_port(host)
        config = uvicorn.Config(build_app(state), host=self.host, port=self.port, log_level=log_level, access_log=False,
                                timeout_graceful_shutdown=2)  # fmt: skip
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, name="llmctl-http", daemon=True)

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self, timeout: float = 30.0) -> ServerThread:
        import time

        self.thread.start()
        deadline = time.monotonic() + timeout
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(f"the server did not start on {self.url}")
            time.sleep(0.02)
        return self

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)
        if self.state.engine is not None:
            self.state.engine.stop()

    def __enter__(self) -> ServerThread:
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()
