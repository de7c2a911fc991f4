"""Command implementations, one module per command."""
