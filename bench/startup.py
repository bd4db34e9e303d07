"""Spawn -> `ready`, and spawn -> first token after `load`, with and without
the worker's cache of transformers' import table (mlx_worker/import_cache.py).

    python bench/startup.py [--model tiny-llama] [--rounds 5]

Targets: spawn -> ready <= 0.3 s (heavy imports happen after `ready`), spawn
-> first token <= 0.8 s. Also the worker's CPU seconds up to the first token
(Linux), which a shared machine's load disturbs far less than wall time.
Runs alternate with / without the cache; medians.
"""

from __future__ import annotations

import argparse
import os
import time

from common import ROOT, ensure_model, median, report, worker_env
from mlx_worker import protocol
from mlx_worker.client import WorkerClient


def cpu_seconds(pid: int) -> float:
    """A process's user + system CPU time so far (Linux /proc)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except OSError:
        return float("nan")


def once(path: str, cache: bool) -> tuple[float, float, float]:
    env = worker_env()
    if not cache:
        env["MLX_WORKER_IMPORT_CACHE"] = "off"
    t0 = time.perf_counter()
    client = WorkerClient((), env=env, cwd=str(ROOT))
    ready = time.perf_counter() - t0
    client.load(path)
    first = cpu = float("nan")
    for event in client.generate(prompt="Hello", max_tokens=1, temperature=0):
        if isinstance(event, protocol.TokenEvent):
            first = time.perf_counter() - t0
            cpu = cpu_seconds(client.proc.pid)
            break
    client.close()
    return ready, first, cpu


def measure(model: str = "tiny-llama", rounds: int = 5) -> dict:
    path = str(ensure_model(model))
    once(path, True)  # the cache is written by the first start after an install
    runs = {True: [], False: []}
    for _ in range(rounds):
        for cache in (True, False):
            runs[cache].append(once(path, cache))
    out = {}
    for cache, name in ((True, "cached"), (False, "uncached")):
        r = runs[cache]
        out[name] = {"ready_s": median([x[0] for x in r]), "first_token_s": median([x[1] for x in r]),
                     "cpu_s": median([x[2] for x in r])}
    out["ready_s"] = out["cached"]["ready_s"]
    out["first_token_s"] = out["cached"]["first_token_s"]
    return out


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="tiny-llama")
    p.add_argument("--rounds", type=int, default=5)
    args = p.parse_args()
    r = measure(args.model, args.rounds)
    report("startup", r)
    print(f"{args.model}, median of {args.rounds} alternating rounds\n")
    print("| import table | spawn -> ready | spawn -> first token (incl. load) | worker CPU to first token |")
    print("|---|---:|---:|---:|")
    for name in ("cached", "uncached"):
        x = r[name]
        print(f"| {name} | {x['ready_s'] * 1000:.0f} ms | {x['first_token_s'] * 1000:.0f} ms | {x['cpu_s']:.2f} s |")


if __name__ == "__main__":
    main()
