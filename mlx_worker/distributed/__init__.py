"""Models larger than one machine: one model run by several processes (ranks)
over ``mlx.distributed`` (protocol/README.md, "Distributed models"). The worker
is rank 0 and keeps every piece of request state; followers mirror what it does
to the model and its caches. ring.py: the followers' processes and faults;
mirror.py: the model and caches rank 0 drives; follower.py: a follower's loop;
loader.py / load.py: ``load {parallel}`` (bench/results/design-notes.md, "models").
"""
