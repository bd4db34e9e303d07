#!/usr/bin/env python3
"""Four image chats at once vs one after another, vision rows batched or not.

    python bench/vision_batch.py [--rounds 5] [--tokens 128] [--model PATH]

Two workers on the same model: "batched" (today: a vision model's rows decode
in one batch, issue 22) and "alone" (MLX_WORKER_VISION_BATCH=0: each vision
request decodes in a group of its own, stepped in turn, as before). Each round
sends 4 image chats (new pictures: the tower runs every time) to each worker
both ways, the order rotating. Printed: median aggregate tokens/s (all tokens
÷ wall time from the first send to the last result) per worker and way.
"""

from __future__ import annotations

import argparse
import base64
import io
import sys
import time

from common import ROOT, ensure_model, median, report, worker_env


def picture(seed: int, size: int) -> str:
    import numpy as np
    from PIL import Image

    arr = np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, "PNG")
    return base64.b64encode(buf.getvalue()).decode()


def chat(seed: int, size: int, tokens: int) -> dict:
    text = ["Describe this picture.", "What stands out here?", "Any colours?", "Tell me about it in detail."][seed % 4]
    return {"model_id": "m", "max_tokens": tokens, "temperature": 0, "ignore_eos": True, "prompt_cache": False,
            "messages": [{"role": "user", "content": [{"type": "text", "text": text},
                                                      {"type": "image", "image": picture(seed, size)}]}]}


def at_once(w, params: list[dict]) -> float:
    t0 = time.perf_counter()
    streams = [w.generate(**p) for p in params]
    n = sum(len(s.wait().tokens) for s in streams)
    return n / (time.perf_counter() - t0)


def in_turn(w, params: list[dict]) -> float:
    t0 = time.perf_counter()
    n = sum(len(w.generate(**p).wait().tokens) for p in params)
    return n / (time.perf_counter() - t0)


def main() -> int:
    from mlx_worker.client import WorkerClient

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--tokens", type=int, default=128, help="max_tokens of each chat")
    ap.add_argument("--size", type=int, default=96, help="image side in pixels")
    ap.add_argument("--model", default=None, help="a VLM folder (default: the tiny-qwen2-vl fixture)")
    args = ap.parse_args()
    model = args.model or str(ensure_model("tiny-qwen2-vl"))
    envs = {"batched": worker_env(), "alone": {**worker_env(), "MLX_WORKER_VISION_BATCH": "0"}}
    workers = {name: WorkerClient((), env=env, cwd=str(ROOT)) for name, env in envs.items()}
    ways = {"at once": at_once, "one after another": in_turn}
    rates: dict[tuple[str, str], list[float]] = {(n, k): [] for n in workers for k in ways}
    try:
        for w in workers.values():
            w.load(model, model_id="m")
            at_once(w, [chat(10_000 + i, args.size, 8) for i in range(4)])  # warm-up
        seed = 0
        runs = [(n, k) for n in workers for k in ways]
        for r in range(args.rounds):
            for name, way in runs[r % len(runs):] + runs[: r % len(runs)]:
                params = [chat(seed + i, args.size, args.tokens) for i in range(4)]
                seed += 4
                rates[(name, way)].append(ways[way](workers[name], params))
    finally:
        for w in workers.values():
            w.close()
    print(f"model {model}, 4 image chats of {args.tokens} tokens, image {args.size}px, {args.rounds} rounds")
    figures = {}
    for (name, way), xs in rates.items():
        figures[f"{name}, {way}"] = median(xs)
        print(f"{name:>8}, {way:>17}: {median(xs):7.1f} tok/s (median; min {min(xs):.1f}, max {max(xs):.1f})")
    gain = figures["batched, at once"] / figures["alone, at once"]
    print(f"at once, batched ÷ alone: {gain:.2f}; batched at once ÷ one after another: "
          f"{figures['batched, at once'] / figures['batched, one after another']:.2f}")
    report("vision_batch", figures)
    return 0


if __name__ == "__main__":
    sys.exit(main())
