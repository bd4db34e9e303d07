"""Eight different requests at once vs one after another, on one worker:
2 image chats (tiny-qwen2-vl), 2 with a draft model, 2 constrained, 2 plain
(spec-target; the same eight as tests/test_mixed_eight.py, which checks that
each equals its solo run). Aggregate tokens/s of each way, alternating
rounds, medians; issue 22's target: together >= one after another.

    python bench/mixed_eight.py [--rounds 3]
"""

from __future__ import annotations

import argparse
import sys
import threading
import time

from common import ROOT, ensure_model, median, report, spawn

sys.path.insert(0, str(ROOT / "tests"))
from test_mixed_eight import eight  # noqa: E402  (the requests are the test's)


def together(w) -> tuple[float, int]:
    start = time.perf_counter()
    streams = [w.generate(**p) for p in eight()]
    waiters = [threading.Thread(target=s.wait) for s in streams]
    for t in waiters:
        t.start()
    for t in waiters:
        t.join()
    return time.perf_counter() - start, sum(len(s.result.tokens) for s in streams)


def one_by_one(w) -> tuple[float, int]:
    start = time.perf_counter()
    tokens = sum(len(w.generate(**p).wait().tokens) for p in eight())
    return time.perf_counter() - start, tokens


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=3)
    a = ap.parse_args()
    w = spawn()
    try:
        w.load(str(ensure_model("spec-target")), model_id="target")
        w.load(str(ensure_model("spec-draft")), model_id="draft")
        w.load(str(ensure_model("tiny-qwen2-vl")), model_id="vl")
        one_by_one(w)  # warm up: compile every constraint, encode every image once
        runs = {"together": [], "one_by_one": []}
        for r in range(a.rounds):
            for way in (["together", "one_by_one"] if r % 2 == 0 else ["one_by_one", "together"]):
                dt, n = (together if way == "together" else one_by_one)(w)
                runs[way].append(n / dt)
    finally:
        w.close()
    tps = {k: median(v) for k, v in runs.items()}
    print(f"8 mixed requests, median of {a.rounds} alternating rounds")
    print("| together tok/s | one after another tok/s | ratio (target ≥ 1) |\n|---:|---:|---:|")
    print(f"| {tps['together']:.1f} | {tps['one_by_one']:.1f} | {tps['together'] / tps['one_by_one']:.2f} |")
    report("mixed_eight", {"tps": tps, "ratio": tps["together"] / tps["one_by_one"], "rounds": a.rounds})


if __name__ == "__main__":
    main()
