"""mlx-worker: a stdio JSON-RPC inference worker for MLX models."""

__version__ = "0.1.0"
