"""MLX backend."""
