"""The engine: requests from admission to their result, and every forward pass."""
