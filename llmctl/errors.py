"""Errors that reach the user: each says what was expected, what was found and what to do."""

from __future__ import annotations


class LlmctlError(Exception):
    """Base of every error the CLI prints without a traceback (exit code 1)."""

    def __init__(self, message: str, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return self.message if not self.hint else f"{self.message}\n{self.hint}"


class SpecError(LlmctlError):
    """A model specification whose numbers do not fit together."""


class UnsupportedModel(LlmctlError):
    """A checkpoint of an architecture llmctl does not implement."""


class CheckpointError(LlmctlError):
    """A model folder that is missing, malformed, or disagrees with its config."""


class ConfigError(LlmctlError):
    """A recipe or override that is unknown or of the wrong type."""


class DataError(LlmctlError):
    """Input data that cannot be used; the message names the file and line."""


class TokenizerError(LlmctlError):
    """A tokenizer or chat template that cannot be loaded or rendered."""


class BackendUnavailable(LlmctlError):
    """The requested backend is not installed or cannot run on this machine."""


class OutputError(LlmctlError):
    """An output that cannot be written (full disk, read-only file system, missing folder); names the file."""

    def __init__(self, message: str, hint: str | None = None, reason: str = "", path: str = "") -> None:
        super().__init__(message, hint)
        self.reason = reason or message  # "the disk is full"
        self.path = path                 # the file being written when it failed
