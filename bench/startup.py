"""Spawn -> `ready`, and spawn -> first token after `load`.

    python bench/startup.py [--model tiny-llama] [--rounds 5]

Target: spawn -> ready <= 0.3 s (heavy imports happen after `ready`).
"""

from __future__ import annotations

import argparse
import time

from common import ensure_model, median, report, spawn
from mlx_worker import protocol


def measure(model: str = "tiny-llama", rounds: int = 5) -> dict:
    path = str(ensure_model(model))
    ready, first = [], []
    for _ in range(rounds):
        t0 = time.perf_counter()
        client = spawn()
        ready.append(time.perf_counter() - t0)
        client.load(path)
        for event in client.generate(prompt="Hello", max_tokens=1, temperature=0):
            if isinstance(event, protocol.TokenEvent):
                first.append(time.perf_counter() - t0)
                break
        client.close()
    return {"ready_s": median(ready), "first_token_s": median(first)}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="tiny-llama")
    p.add_argument("--rounds", type=int, default=5)
    args = p.parse_args()
    r = measure(args.model, args.rounds)
    report("startup", r)
    print("| spawn -> ready | spawn -> first token (incl. load) |")
    print("|---|---|")
    print(f"| {r['ready_s'] * 1000:.0f} ms | {r['first_token_s'] * 1000:.0f} ms |")


if __name__ == "__main__":
    main()
