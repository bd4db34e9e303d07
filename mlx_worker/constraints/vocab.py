"""What both engines need to know about a model's tokenizer, built once.

llguidance reads the Hugging Face tokenizer itself and knows the exact bytes
of every token; the outlines engine reuses those bytes for its ``Vocabulary``
(token strings lose partial UTF-8 tokens). Spec: protocol/README.md § Constrained generation.
"""

from __future__ import annotations

import hashlib
import json
import weakref
from dataclasses import dataclass
from typing import Any

from .. import errors
from ..errors import WorkerError


# Per loaded model: its tokenizer's content hash.
_KEYS: "weakref.WeakKeyDictionary[object, str]" = weakref.WeakKeyDictionary()


@dataclass
class TokenizerInfo:
    key: str  # identifies the tokenizer + mask geometry; part of every cache key
    lltok: Any  # llguidance.LLTokenizer
    n_vocab: int  # ids the engines know about (>= the tokenizer's size)
    logits_vocab: int  # width of the model's logits
    eos_ids: tuple[int, ...]
    _outlines_vocab: Any = None

    @property
    def mask_words(self) -> int:
        return (self.n_vocab + 31) // 32

    def token_bytes(self) -> dict[bytes, list[int]]:
        """Ordinary tokens by their bytes; special, EOS and empty tokens left out
        (the processor decides EOS itself)."""
        lltok, out = self.lltok, {}
        for i in range(self.n_vocab):
            if lltok.is_special_token(i) or i in self.eos_ids:
                continue
            data = lltok.decode_bytes([i])
            if data:
                out.setdefault(data, []).append(i)
        return out

    def outlines_vocabulary(self):
        if self._outlines_vocab is None:
            from outlines_core import Vocabulary

            self._outlines_vocab = Vocabulary(self.eos_ids[0], self.token_bytes())
        return self._outlines_vocab


def hf_tokenizer_of(lm) -> Any:
    tok = lm.hf_tokenizer
    if not hasattr(tok, "backend_tokenizer") and hasattr(tok, "tokenizer"):
        tok = tok.tokenizer  # a vision processor wraps the tokenizer
    return tok


def tokenizer_key(lm) -> str:
    """A content hash of the tokenizer, computed once per loaded model: two
    models sharing a tokenizer share compiled constraints, and an unloaded
    model's id can never alias a new one."""
    key = _KEYS.get(lm)
    if key is None:
        tok = hf_tokenizer_of(lm)
        backend = getattr(tok, "backend_tokenizer", None)
        if backend is None:
            raise WorkerError(
                errors.CONSTRAINT_INVALID,
                "constrained generation needs a fast (tokenizers-based) tokenizer; this model has "
                f"{type(tok).__name__}",
                {"field": "params.constraint"},
            )
        digest = hashlib.sha256(backend.to_str().encode("utf-8"))
        digest.update(f"|{lm.vocab_size}|{sorted(lm.eos_token_ids)}".encode())
        key = _KEYS[lm] = digest.hexdigest()[:24]
    return key


def build(lm, key: str) -> TokenizerInfo:
    import llguidance.hf

    tok = hf_tokenizer_of(lm)
    eos = tuple(sorted(lm.eos_token_ids)) or (tok.eos_token_id,)
    n_vocab = max(int(lm.vocab_size), len(tok))
    try:
        lltok = llguidance.hf.from_tokenizer(tok, n_vocab=n_vocab, eos_token=list(eos))
        lltok = _text_without_added_tokens(lltok, tok, n_vocab, eos)
    except Exception as exc:
        raise WorkerError(
            errors.CONSTRAINT_INVALID,
            f"this model's tokenizer cannot be used for constrained generation: {exc}",
            {"field": "params.constraint"},
        ) from None
    return TokenizerInfo(key=key, lltok=lltok, n_vocab=n_vocab, logits_vocab=int(lm.vocab_size), eos_ids=eos)


def _text_without_added_tokens(lltok, tok, n_vocab: int, eos: tuple):
    """llguidance reads every added token as a special one (bytes
    ``\\xff[id]``: only ``<[id]>`` in a grammar matches it), but tokenizes
    text with the Hugging Face tokenizer, which splits a non-special added
    token (Qwen3's ``<think>``, ``<tool_call>``) out of text: the mask for
    the text ``<tool_call>`` let that token through and consume refused it.
    Text is tokenized here without those tokens, so mask and matcher agree:
    constrained text is written in ordinary tokens, and a marker token is
    written only where a grammar names it (the tool grammar does)."""
    import llguidance
    from tokenizers import Tokenizer

    data = json.loads(tok.backend_tokenizer.to_str())
    special = [t for t in data.get("added_tokens", []) if t.get("special")]
    if len(special) == len(data.get("added_tokens", [])):
        return lltok
    data["added_tokens"] = special
    text_tokenizer = Tokenizer.from_str(json.dumps(data))

    class Vocabulary:  # what llguidance.TokenizerWrapper reads: llguidance's own token bytes
        eos_token_id = eos[0]
        bos_token_id = None
        tokens = [(b"\xff" if lltok.is_special_token(i) else b"") + lltok.decode_bytes([i]) for i in range(n_vocab)]
        special_token_ids = [i for i in range(n_vocab) if lltok.is_special_token(i)]

        def __call__(self, text):
            if not isinstance(text, str):
                raise TypeError("text only")  # llguidance then passes str
            return text_tokenizer.encode(text, add_special_tokens=False).ids

    return llguidance.LLTokenizer(llguidance.TokenizerWrapper(Vocabulary()), n_vocab=n_vocab, eos_token=list(eos))
