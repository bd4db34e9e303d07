"""Models larger than one machine: one model run by several processes (ranks)
over ``mlx.distributed``, with mlx-lm's sharded loading.

The worker is rank 0. It starts the other ranks (followers, ``python -m
mlx_worker --role follower``) itself, and keeps every piece of request state
(prompt, sampler, constraint, stop strings, prompt cache) to itself: the
followers only mirror what rank 0 does to the model and its KV caches, in the
order rank 0 does it (mirror.py). Each decode step, rank 0 sends the tokens
the step feeds: that is the continue decision; a request that stops (cancel
included) simply sends nothing more, so every rank runs the same steps.

- ring.py: the followers' processes, the hostfile, the group, faults.
- mirror.py: the model and KV caches rank 0 drives (their operations are
  replayed on every follower).
- follower.py: a follower's loop.
- load.py: ``load {parallel}``: the registry's seam.
"""
