"""A loaded model as every layer above sees it: weights, tokenizer, limits.

The lowest layer that knows a model: prompts, the prompt cache, vision and
generation take a LoadedModel; only the registry (models.py) and the model
loaders create them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from .. import protocol
from .config import context_length_of, vocab_size_of

DEFAULT_PREFILL_STEP = 512


@dataclass
class LoadedModel:
    model_id: str
    path: str
    kind: str  # "text" | "vision"
    model: Any  # the nn.Module that generate_step drives
    tokenizer: Any  # mlx_lm TokenizerWrapper
    config: dict
    context_length: Optional[int]
    vocab_size: int
    eos_token_ids: list[int]
    memory_bytes: int
    prefill_step_size: int = DEFAULT_PREFILL_STEP
    max_kv_size: Optional[int] = None
    kv_quant: Any = None  # kv_quant.KVQuant with load's kv_bits, else None
    prompt_cache: Any = None  # a prompt cache store, when enabled
    vision: Any = None  # the vision adapter, for kind == "vision"
    memory_limit: Optional[int] = None  # load's memory_limit: weights + any one request
    load_options: dict = field(default_factory=dict)  # load's options as sent
    extra: dict = field(default_factory=dict)

    @property
    def hf_tokenizer(self):
        # The Hugging Face tokenizer itself: its apply_chat_template keeps the
        # template's own defaults (mlx-lm's wrapper injects options).
        return getattr(self.tokenizer, "_tokenizer", self.tokenizer)

    def decode(self, tokens: list[int]) -> str:
        """Token ids -> text, the one way both generated text and detokenize
        use: special tokens kept, no clean-up of spaces (it would change the
        text, e.g. " ," -> ",", so the continuation would no longer be exact)."""
        return self.tokenizer.decode(tokens, skip_special_tokens=False, clean_up_tokenization_spaces=False)

    def describe(self) -> protocol.ModelStatus:
        cache = self.prompt_cache.status() if self.prompt_cache is not None else None
        if cache is not None:  # pair stores (speculative.py) count too: they hold memory
            pairs = [held["store"].status() for _, held in list(self.extra.get("draft_stores", {}).values())
                     if "store" in held]
            cache.pair_entries = sum(p.entries for p in pairs)
            cache.pair_bytes = sum(p.bytes for p in pairs)
        return protocol.ModelStatus(
            model_id=self.model_id,
            kind=self.kind,
            path=self.path,
            context_length=self.context_length,
            vocab_size=self.vocab_size,
            memory_bytes=self.memory_bytes,
            prompt_cache=cache,
            memory_limit=self.memory_limit,
            parallel=self.extra.get("parallel"),
            **kv_fields(self),
        )


def kv_fields(m: LoadedModel) -> dict:
    q = m.kv_quant
    return {} if q is None else {"kv_bits": q.bits, "kv_group_size": q.group_size}


def new_loaded_model(path: Path, kind: str, model, tokenizer, config: dict, **extra) -> LoadedModel:
    """A LoadedModel before registration (the registry sets id and memory)."""
    return LoadedModel(
        model_id="",
        path=str(path),
        kind=kind,
        model=model,
        tokenizer=tokenizer,
        config=config,
        context_length=context_length_of(config),
        vocab_size=vocab_size_of(config, tokenizer),
        eos_token_ids=sorted(tokenizer.eos_token_ids),
        memory_bytes=0,
        **extra,
    )
