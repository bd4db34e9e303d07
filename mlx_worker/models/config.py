"""Reading a model's config.json: the language model's part and its limits."""

from __future__ import annotations

from typing import Optional

_CONTEXT_KEYS = ("max_position_embeddings", "max_seq_len", "n_positions", "seq_length", "n_ctx")


def text_config(config: dict) -> dict:
    """The language model's part of a config (a VLM nests it)."""
    return config.get("text_config") or config.get("llm_config") or config


def context_length_of(config: dict) -> Optional[int]:
    for cfg in (text_config(config), config):
        for key in _CONTEXT_KEYS:
            value = cfg.get(key)
            if isinstance(value, int) and value > 0:
                return value
    return None


def vocab_size_of(config: dict, tokenizer) -> int:
    """config.json's vocabulary size, else the tokenizer's."""
    vocab = text_config(config).get("vocab_size", config.get("vocab_size"))
    return vocab if isinstance(vocab, int) else len(tokenizer._tokenizer)
