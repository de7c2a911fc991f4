"""`python -m llmctl` runs the CLI (also how torchrun launches it)."""

from __future__ import annotations

from llmctl.cli import app

app()
