"""Mixed passes on and off, side by side: two workers on the same model, one
with packed batches (the default: a prompt chunk rides along in the decode
step, rows of different depths keep their own caches) and one with
``MLX_WORKER_PACKED=0`` (mlx-lm's BatchKVCache, prompt chunks taking turns
with decode steps). Alternating rounds, medians.

    python bench/mixed_passes.py [--model small-llama] [--rounds 3]

Figures per side: 4 streams decoding while a 2,000-token prompt arrives
(with a short request right behind it): the streams' p99 gap during the
prompt over their idle gap, the long prompt's TTFT, the short one's; and
8 streams x 128 tokens sent together: aggregate tok/s.
"""

from __future__ import annotations

import argparse

from common import bind_blas_like_the_worker, ensure_model, median, report, worker_env
from concurrency import behind_long, many, worker_stream
from mlx_worker.client import WorkerClient
from throughput import long_prompt

SIDES = {"packed": "1", "merged": "0"}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="small-llama")
    ap.add_argument("--rounds", type=int, default=3)
    a = ap.parse_args()
    bind_blas_like_the_worker()
    from mlx_lm import load

    path = str(ensure_model(a.model))
    big = long_prompt(load(path)[1], 2000)
    bias = {"0": -1e9, "2": -1e9}
    workers = {}
    try:
        for side, flag in SIDES.items():
            workers[side] = WorkerClient([], env={**worker_env(), "MLX_WORKER_PACKED": flag})
            workers[side].load(path)
            many(worker_stream, workers[side], bias, 2, 8, -1)  # warm up
        res = {side: {"behind": [], "eight": []} for side in SIDES}
        for r in range(a.rounds):
            order = list(SIDES) if r % 2 == 0 else list(SIDES)[::-1]
            for side in order:
                res[side]["behind"].append(behind_long(worker_stream, workers[side], bias, big, r))
            for side in order:
                res[side]["eight"].append(many(worker_stream, workers[side], bias, 8, 128, r))
    finally:
        for w in workers.values():
            w.close()
    med = {side: {k: median([row[k] for row in rows["behind"]]) for k in rows["behind"][0]}
           | {"tps_8": median([row["tps"] for row in rows["eight"]])} for side, rows in res.items()}
    print(f"model {a.model}, median of {a.rounds} alternating rounds\n")
    print("| figure | packed | merged |")
    print("|---|---:|---:|")
    for key, label in [("gap_ratio", "4 streams: gap p99 during a 2,000-token prompt ÷ idle gap"),
                       ("idle_gap_p50", "idle gap p50 (s)"), ("during_gap_p99", "gap p99 during the prompt (s)"),
                       ("long_ttft", "the long prompt's TTFT (s)"), ("short_ttft", "a short request behind it: TTFT (s)"),
                       ("tps_8", "8 x 128 tokens: aggregate tok/s")]:
        print(f"| {label} | {med['packed'][key]:.3f} | {med['merged'][key]:.3f} |")
    report("mixed_passes", {"model": a.model, "rounds": a.rounds, **med})


if __name__ == "__main__":
    main()
