"""Data: pretraining text, instruction and preference sets."""
