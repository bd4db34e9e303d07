"""A loaded model as every layer above sees it: weights, tokenizer, limits.

The lowest layer that knows a model (it imports only the wire types and
config helpers); the registry builds one, complete, per load. Per-model memos
of the layers above are theirs, keyed by the LoadedModel (hashed by identity).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Sequence

from .. import protocol

DEFAULT_PREFILL_STEP = 512


@dataclass(eq=False)
class Parallel:
    """A model run by several processes (distributed/): what status reports,
    its group's failure (None while it works), and how its shards are dropped."""

    status: protocol.ParallelStatus
    failure: Callable[[], Optional[str]]
    release: Callable[[], None]


@dataclass(eq=False)  # identity hash: memos above key on the model (weakref.WeakKeyDictionary)
class LoadedModel:
    model_id: str
    path: str
    kind: str  # "text" | "vision" | "embedding"
    model: Any  # the nn.Module that generate_step drives
    tokenizer: Any  # mlx_lm TokenizerWrapper
    config: dict
    context_length: Optional[int]
    vocab_size: int
    eos_token_ids: list[int]
    memory_bytes: int
    load_options: dict = field(default_factory=dict)  # load's options as sent
    memory_limit: Optional[int] = None  # load's memory_limit: weights + any one request
    prefill_step_size: int = DEFAULT_PREFILL_STEP
    max_kv_size: Optional[int] = None
    kv_quant: Any = None  # kv_quant.KVQuant with load's kv_bits, else None
    vision: Any = None  # the vision adapter, for kind == "vision"
    parallel: Optional[Parallel] = None  # a distributed model
    pooling: Optional[str] = None  # an embedding model's pooling
    dimensions: Optional[int] = None  # an embedding model's full vector size
    prompt_cache: Any = None  # attached once by the registry: the store makes this model's caches

    @property
    def hf_tokenizer(self):
        # The Hugging Face tokenizer itself: its apply_chat_template keeps the
        # template's own defaults (mlx-lm's wrapper injects options).
        return getattr(self.tokenizer, "_tokenizer", self.tokenizer)

    @property
    def failed(self) -> bool:
        """A distributed model whose group failed: gone for the host at once."""
        return self.parallel is not None and self.parallel.failure() is not None

    def decode(self, tokens: list[int]) -> str:
        """Token ids -> text, the one way both generated text and detokenize
        use: special tokens kept, no clean-up of spaces (it would change the
        text, e.g. " ," -> ",", so the continuation would no longer be exact)."""
        return self.tokenizer.decode(tokens, skip_special_tokens=False, clean_up_tokenization_spaces=False)

    def describe(self, pair_stores: Sequence = ()) -> protocol.ModelStatus:
        """Its status line; ``pair_stores`` (speculative decoding's, with this
        model as target) count in its prompt cache: they hold memory."""
        cache = self.prompt_cache.status() if self.prompt_cache is not None else None
        if cache is not None:
            pairs = [store.status() for store in pair_stores]
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
            parallel=self.parallel.status if self.parallel is not None else None,
            **kv_fields(self),
        )


def kv_fields(m: LoadedModel) -> dict:
    q = m.kv_quant
    return {} if q is None else {"kv_bits": q.bits, "kv_group_size": q.group_size}
