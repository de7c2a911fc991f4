"""llmctl: one toolkit for the whole life of a language model, on PyTorch and MLX."""

from __future__ import annotations

__version__ = "0.1.0"
