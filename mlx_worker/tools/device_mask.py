"""A call grammar's bitmask as a device array, rebuilt only when it changes.

Inside a string argument the mask is the same step after step: the array
already on the device is reused. When it does change it is unpacked into
buffers allocated once: on glibc, a vocabulary-sized allocation each step
makes malloc consolidate the thousands of small blocks the forward pass just
freed, which costs tens of microseconds per token on CPU.
"""

from __future__ import annotations

from typing import Optional

import numpy as np

import mlx.core as mx

# byte value -> its 8 bits, least significant first (the bitmask's order)
_BITS = np.unpackbits(np.arange(256, dtype=np.uint8)[:, None], axis=1, bitorder="little").view(np.bool_)


class DeviceMask:
    def __init__(self, words: np.ndarray, vocab: int):
        self.bytes = words.view(np.uint8)  # the matcher fills ``words`` in place
        self.vocab = vocab
        # ids past the bitmask stay disallowed (zeros)
        self.flat = np.zeros(max(vocab, self.bytes.size * 8), dtype=np.bool_)
        self.bits = self.flat[: self.bytes.size * 8].reshape(self.bytes.size, 8)
        self.allowed = self.flat[:vocab]
        self.last = np.zeros_like(self.bytes)
        self.same = np.zeros(self.bytes.shape, dtype=np.bool_)
        self.array: Optional[mx.array] = None  # the mask of ``last``; None: it allows nothing
        self.valid = False

    def current(self) -> Optional[mx.array]:
        """The allowed tokens (< vocab) of the bitmask now in the ``words``
        buffer given at construction, or None when it allows none."""
        if self.valid and np.equal(self.bytes, self.last, out=self.same).all():
            return self.array
        np.take(_BITS, self.bytes, axis=0, out=self.bits, mode="clip")
        self.last[:] = self.bytes
        self.array = mx.array(self.allowed) if self.allowed.any() else None
        self.valid = True
        return self.array
