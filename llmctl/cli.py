"""The `llmctl` typer app: registers commands and turns LlmctlError into a clean message and exit code 1."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Annotated, Any

import typer

from llmctl import __version__
from llmctl.commands import chat, generate, info, train
from llmctl.commands import align, convert, distill, finetune_lora, merge, prune, quantize, serve
from llmctl.commands import eval as evaluate

app = typer.Typer(
    name="llmctl",
    help="Pretrain, quantize, convert, evaluate and chat with language models, on PyTorch or MLX.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
_state = {"debug": False}


def handled(command: Callable[..., Any]) -> Callable[..., Any]:
    """Print our errors as one message and exit 1; keep the traceback only under --debug."""

    @functools.wraps(command)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        from llmctl.errors import LlmctlError

        try:
            return command(*args, **kwargs)
        except LlmctlError as e:
            if _state["debug"]:
                raise
            from llmctl import ui

            ui.error(e.message, e.hint)
            raise typer.Exit(1) from None

    return wrapper


def _version(value: bool) -> None:
    if value:
        typer.echo(f"llmctl {__version__}")
        raise typer.Exit()


@app.callback()
def main(
    version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version.")] = False,
    debug: Annotated[bool, typer.Option("--debug", envvar="LLMCTL_DEBUG", help="Show tracebacks for errors (also LLMCTL_DEBUG=1).")] = False,
) -> None:
    _state["debug"] = debug


app.command(name="train")(handled(train.train))
app.command(name="info")(handled(info.info))
app.command(name="generate")(handled(generate.generate))
app.command(name="chat")(handled(chat.chat))
app.command(name="eval")(handled(evaluate.eval_command))
app.command(name="convert")(handled(convert.convert))
app.command(name="quantize")(handled(quantize.quantize))
app.command(name="prune")(handled(prune.prune))
app.command(name="finetune-lora")(handled(finetune_lora.finetune_lora))
app.command(name="distill")(handled(distill.distill))
app.command(name="align")(handled(align.align))
app.command(name="merge")(handled(merge.merge))
app.command(name="serve")(handled(serve.serve))
