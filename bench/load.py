#!/usr/bin/env python3
"""Load with progress: time to the first load_progress event, and the
worker's load wall time ÷ mlx-lm's own ``load`` of the same folder.

Side by side, alternating: each round loads the model in a warm worker
(request sent → result read; then unload) and with ``mlx_lm.load`` in this
process (then dropped), after one warm-up of each; the figure is the median of the per-round
ratios. The worker reads weights
lazily, group by group, sending a load_progress event after each group;
mlx-lm evaluates them all at once. Medians.

    python bench/load.py [--rounds 21] [--model small-llama]
"""

from __future__ import annotations

import argparse
import gc
import time

from common import bind_blas_like_the_worker, ensure_model, median, report, spawn


LOAD_MS: list = []  # the worker's own load_ms (no pipes, no checks)


def worker_load(w, path: str) -> tuple[float, float, int]:
    """(seconds to the first load_progress, seconds to the result, events)."""
    t0 = time.perf_counter()
    rid, inbox = w.start("load", {"model": path, "model_id": "m"})
    first, events = None, 0
    try:
        while True:
            msg = w._take(inbox, 120)
            if "method" not in msg:
                break
            events += 1
            if first is None:
                first = time.perf_counter() - t0
    finally:
        w._finish(rid)
    total = time.perf_counter() - t0
    assert "result" in msg, msg
    w.unload("m")
    LOAD_MS.append(msg["result"]["load_ms"])
    return first, total, events


def library_load(path: str) -> float:
    import mlx.core as mx
    from mlx_lm import load

    t0 = time.perf_counter()
    model, tokenizer = load(path)
    took = time.perf_counter() - t0
    del model, tokenizer
    gc.collect()
    mx.clear_cache()
    return took


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--rounds", type=int, default=21)
    p.add_argument("--model", default="small-llama")
    args = p.parse_args()
    path = str(ensure_model(args.model))
    bind_blas_like_the_worker()  # the same process set-up as the worker's (fair A/B)
    library_load(path)  # warm-up: imports, page cache
    w = spawn()
    # The first load after `ready` waits for the worker's own imports (mlx-lm, …),
    # which it does after announcing ready: reported apart.
    cold_first, cold_total, _ = worker_load(w, path)
    firsts, worker, library, events = [], [], [], 0
    for i in range(args.rounds):
        order = (0, 1) if i % 2 == 0 else (1, 0)
        for side in order:
            if side == 0:
                first, total, events = worker_load(w, path)
                firsts.append(first)
                worker.append(total)
            else:
                library.append(library_load(path))
    w.close()
    # Other processes on a shared machine swing both sides by 2x between rounds:
    # the ratio is taken per round (its two loads back to back), then the median.
    ratio = median([a / b for a, b in zip(worker, library)])
    print(f"model {args.model}, median of {args.rounds} alternating rounds, {events} load_progress events per load\n")
    print("| side | load wall time (ms) | first load_progress (ms) |\n|---|---:|---:|")
    print(f"| worker (`load` request → result, over the pipes) | {median(worker) * 1000:.1f} | {median(firsts) * 1000:.2f} |")
    print(f"| worker's own `load_ms` (from the end of the checks to the result) | {median(LOAD_MS[1:]):.1f} | – |")
    print(f"| in-process `mlx_lm.load` | {median(library) * 1000:.1f} | – |")
    print(f"| worker, first load after `ready` (includes the worker's deferred imports) | {cold_total * 1000:.1f} | {cold_first * 1000:.1f} |")
    print(f"\nload wall time worker ÷ mlx_lm.load, median of per-round ratios: {ratio:.3f} (target ≤ 1.05); "
          f"ratio of medians {median(worker) / median(library):.3f}")
    report("load", {"load_vs_mlx_lm": round(ratio, 4), "first_progress_ms": round(median(firsts) * 1000, 3),
                    "worker_ms": round(median(worker) * 1000, 2), "mlx_lm_ms": round(median(library) * 1000, 2),
                    "events": events, "cold_first_progress_ms": round(cold_first * 1000, 1), "model": args.model, "rounds": args.rounds})


if __name__ == "__main__":
    main()
