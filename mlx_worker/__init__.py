"""mlx-worker: a stdio JSON-RPC inference worker for MLX models (Spec: protocol/README.md)."""

__version__ = "0.1.0"
