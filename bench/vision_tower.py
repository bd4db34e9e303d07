#!/usr/bin/env python3
"""Streams decoding while an image chat arrives: its tower in pieces or in one go.

    python bench/vision_tower.py [--rounds 5] [--streams 2] [--size 448]

Two workers on the small-qwen2-vl fixture (a ~1 s tower for a 448 px image):
"pieces" (today: the tower's blocks run between decode steps,
vision/tower_pieces.py) and "one go" (MLX_WORKER_TOWER_PIECES=0: the tower
runs whole, the streams wait). Each round, on each worker in turn: text
streams decode; an image chat (a new picture) arrives. Printed, medians over
rounds: the streams' longest and p99 gap while the chat's tower and prompt
run ÷ their idle gap, and the chat's time to first token.
"""

from __future__ import annotations

import argparse
import sys
import threading
import time

from common import ROOT, ensure_model, median, report, worker_env
from vision_batch import picture

from mlx_worker.protocol import TokenEvent

TEXT = {"model_id": "m", "max_tokens": 2000, "temperature": 0, "ignore_eos": True, "prompt_cache": False}


def chat(seed: int, size: int) -> dict:
    content = [{"type": "image", "image": "data:image/png;base64," + picture(seed, size)},
               {"type": "text", "text": "Describe this picture."}]
    return {"model_id": "m", "max_tokens": 4, "temperature": 0, "prompt_cache": False,
            "messages": [{"role": "user", "content": content}]}


def one_round(w, seed: int, size: int, n_streams: int) -> dict:
    times: list[list[float]] = [[] for _ in range(n_streams)]
    streams = [w.generate(**{**TEXT, "prompt": f"{seed}.{i} sea ship wind"}) for i in range(n_streams)]

    def read(i: int) -> None:
        for event in streams[i]:
            if isinstance(event, TokenEvent) and event.tokens:
                times[i].extend([time.perf_counter()] * len(event.tokens))

    readers = [threading.Thread(target=read, args=(i,), daemon=True) for i in range(n_streams)]
    for t in readers:
        t.start()
    while any(len(ts) < 20 for ts in times):
        time.sleep(0.01)
    idle_from = time.perf_counter()
    time.sleep(0.3)
    arrive = time.perf_counter()
    image = w.generate(**chat(seed, size))
    first = None
    for event in image:
        if isinstance(event, TokenEvent) and event.tokens:
            first = time.perf_counter()
            break
    image.wait()
    for s in streams:
        s.cancel()
    for t in readers:
        t.join()

    def gaps(a: float, b: float) -> list[float]:
        return [y - x for ts in times for x, y in zip(ts, ts[1:]) if a <= x and y <= b]

    idle, during = median(gaps(idle_from, arrive)), sorted(gaps(arrive, first)) or [0.0]
    return {"ttft": first - arrive, "max_gap_ratio": during[-1] / idle,
            "p99_gap_ratio": during[min(len(during) - 1, int(0.99 * len(during)))] / idle}


def main() -> int:
    from mlx_worker.client import WorkerClient

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--streams", type=int, default=2)
    ap.add_argument("--size", type=int, default=448, help="image side in pixels")
    args = ap.parse_args()
    model = str(ensure_model("small-qwen2-vl"))
    envs = {"pieces": worker_env(), "one go": {**worker_env(), "MLX_WORKER_TOWER_PIECES": "0"}}
    workers = {name: WorkerClient((), env=env, cwd=str(ROOT)) for name, env in envs.items()}
    rows: dict[str, list[dict]] = {name: [] for name in workers}
    try:
        for w in workers.values():
            w.load(model, model_id="m")
            one_round(w, 10_000, 64, 1)  # warm-up
        for r in range(args.rounds):
            order = list(workers) if r % 2 == 0 else list(workers)[::-1]
            for name in order:
                rows[name].append(one_round(workers[name], r, args.size, args.streams))
    finally:
        for w in workers.values():
            w.close()
    print(f"model small-qwen2-vl, {args.streams} streams decoding, a {args.size} px image chat arrives; "
          f"median of {args.rounds} alternating rounds\n")
    print("| tower | streams' longest gap ÷ idle | p99 gap ÷ idle | image chat TTFT (s) |")
    print("|---|---:|---:|---:|")
    figures = {}
    for name, rs in rows.items():
        f = {k: median([r[k] for r in rs]) for k in rs[0]}
        figures[name] = f
        print(f"| {name} | {f['max_gap_ratio']:.1f} | {f['p99_gap_ratio']:.1f} | {f['ttft']:.2f} |")
    figures["max_gap_pieces_over_one_go"] = figures["pieces"]["max_gap_ratio"] / figures["one go"]["max_gap_ratio"]
    report("vision_tower", figures)
    return 0


if __name__ == "__main__":
    sys.exit(main())
