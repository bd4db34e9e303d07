"""The model and KV caches rank 0 drives; every follower replays the same
operations on its own shard, in the same order: creating, copying, trimming,
dropping a cache list and running the model on it are sent before rank 0 does
them itself (bench/results/design-notes.md, "models").
"""

from __future__ import annotations

import copy
import time

import mlx.core as mx
from mlx_lm.models.cache import KVCache

from .. import faults
from .ring import Ring, RingFailed


class MirroredKVCache(KVCache):
    def __init__(self, ring: Ring, list_id: int, index: int):
        super().__init__()
        self._ring = ring
        self._list = list_id
        self._index = index

    def trim(self, n):
        n = super().trim(n)
        # Once the group has failed there is no one to tell: trim stays local
        # (a failed request gives back its lease by trimming; that must not raise).
        if self._index == 0 and n and self._ring.failure is None:
            self._ring.send({"op": "trim", "list": self._list, "n": n})
        return n

    def __deepcopy__(self, memo):
        key = ("mirrored-list", self._list)
        new_list = memo.get(key)
        if new_list is None:
            new_list = memo[key] = self._ring.new_id()
            self._ring.send({"op": "copy", "src": self._list, "dst": new_list})
        new = MirroredKVCache.__new__(MirroredKVCache)
        memo[id(self)] = new
        for name, value in self.__dict__.items():
            setattr(new, name, value if name == "_ring" else copy.deepcopy(value, memo))
        new._list = new_list
        return new

    def __del__(self):
        if getattr(self, "_index", None) == 0:
            self._ring.free(self._list)


class DistributedModel:
    """Stands in for the mlx-lm model in a LoadedModel (everything else is
    delegated to it)."""

    def __init__(self, ring: Ring, model_id: str, model, n_layers: int):
        self._ring = ring
        self._model_id = model_id
        self._inner = model
        self._n_layers = n_layers

    def __getattr__(self, name):
        return getattr(self._inner, name)

    def make_cache(self) -> list:
        list_id = self._ring.new_id()
        self._ring.send({"op": "make", "model": self._model_id, "list": list_id})
        return [MirroredKVCache(self._ring, list_id, i) for i in range(self._n_layers)]

    def __call__(self, inputs: mx.array, cache=None, **kwargs):
        if kwargs.get("input_embeddings") is not None:
            raise ValueError("input embeddings are not supported on a distributed model")
        list_id = cache[0]._list if cache else None
        self._ring.send({"op": "forward", "model": self._model_id, "list": list_id, "tokens": inputs.tolist()})
        try:
            out = _evaluate(self._ring, lambda: self._inner(inputs, cache=cache))
        except RuntimeError as exc:  # a collective whose peer is gone
            raise self._ring.lost(exc) from None
        self._ring.check()
        return out

    def release(self) -> None:
        try:
            self._ring.send({"op": "unload", "model": self._model_id})
        except RingFailed:
            pass


def _evaluate(ring: Ring, build):
    """Rank 0's forward pass, built and evaluated, watched by the ring's
    watchdog while it runs (one still in MLX after a failure stops the worker:
    ring.py, STUCK_S)."""
    ring.forward_since = time.monotonic()
    try:
        if faults.fires("ring"):
            _lose_a_rank(ring)
        out = build()
        mx.eval(out)
        return out
    finally:
        ring.forward_since = None


def _lose_a_rank(ring: Ring) -> None:
    """Fault ``ring``: rank 1 killed, then two collectives run over the dead
    link before the pass: the pass's own collectives (or those) then meet
    MLX's exited socket threads and wait forever. Real MLX behaviour, not a
    simulated hang."""
    follower = ring.followers[0]
    follower.proc.kill()
    follower.proc.wait()
    try:  # on a stream of their own: the pass's stream records no error, so it queues its collectives
        with mx.stream(mx.new_stream(mx.default_device())):
            first = mx.distributed.all_sum(mx.ones((1 << 16,)), group=ring.group)
            mx.eval(mx.distributed.all_sum(first * 2, group=ring.group))
    except RuntimeError:
        pass
    time.sleep(0.3)  # the socket threads have exited by now
