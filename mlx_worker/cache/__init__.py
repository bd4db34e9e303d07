"""The prompt cache: the in-memory store, its byte budget, the disk tier and cache files (Spec: protocol/README.md § Prompt cache)."""
