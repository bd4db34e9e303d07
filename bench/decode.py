"""Decode tokens/s: through the worker (spawned, over pipes) vs in-process
``mlx_lm.stream_generate``, same model, prompt and greedy sampling.

    python bench/decode.py [--model small-llama] [--tokens 200] [--rounds 5]

Runs alternate A/B and the median of each is compared; prints a ratio
(target >= 0.98). Both sides use the same BLAS (see mlx_worker/blas.py).
"""

from __future__ import annotations

import argparse
import time

from common import bind_blas_like_the_worker, ensure_model, median, spawn

PROMPT = "Once upon a time, in a small village by the sea, there lived"


def worker_tps(client, n: int) -> float:
    first = last = None
    count = 0
    stream = client.generate(prompt=PROMPT, max_tokens=n, temperature=0, ignore_eos=True, prompt_cache=False)
    for event in stream:
        if getattr(event, "tokens", None):
            now = time.perf_counter()
            first = first or now
            last = now
            count += len(event.tokens)
    return (count - 1) / (last - first)


def inprocess_tps(model, tokenizer, n: int) -> float:
    from mlx_lm import stream_generate

    first = last = None
    count = 0
    for _ in stream_generate(model, tokenizer, PROMPT, max_tokens=n):
        now = time.perf_counter()
        first = first or now
        last = now
        count += 1
    return (count - 1) / (last - first)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="small-llama")
    p.add_argument("--tokens", type=int, default=200)
    p.add_argument("--rounds", type=int, default=5)
    args = p.parse_args()
    blas = bind_blas_like_the_worker()
    from mlx_lm import load

    path = str(ensure_model(args.model))
    model, tokenizer = load(path)
    client = spawn()
    client.load(path)
    worker_tps(client, 20)  # warm both sides
    inprocess_tps(model, tokenizer, 20)
    ours, theirs = [], []
    for _ in range(args.rounds):
        ours.append(worker_tps(client, args.tokens))
        theirs.append(inprocess_tps(model, tokenizer, args.tokens))
    client.close()
    a, b = median(ours), median(theirs)
    print(f"| model | BLAS | worker tok/s | in-process tok/s | ratio |")
    print(f"|---|---|---|---|---|")
    print(f"| {args.model} | {'openblas' if blas else 'default'} | {a:.1f} | {b:.1f} | {a / b:.3f} |")


if __name__ == "__main__":
    main()
