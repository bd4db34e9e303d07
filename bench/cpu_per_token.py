"""Worker CPU time per generated token for two checkouts, alternating: a
load-insensitive check that a refactor did not add per-token work.

    python bench/cpu_per_token.py OLD_CHECKOUT [NEW_CHECKOUT] [--rounds 3] [--tokens 128]

Each checkout's own worker (its code on PYTHONPATH) loads its
fixtures/models/small-llama and decodes 1 and 8 greedy streams; the worker
process's user + system time (/proc) is divided by the tokens generated.
"""

from __future__ import annotations

import argparse
import os
import time

from common import ROOT  # also puts the repo root on sys.path
from mlx_worker.client import WorkerClient


def cpu_seconds(pid: int) -> float:
    fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def run(tree: str, streams: int, tokens: int) -> tuple[float, float]:
    env = dict(os.environ, PYTHONPATH=tree, HF_HUB_OFFLINE="1", TRANSFORMERS_VERBOSITY="error")
    w = WorkerClient([], env=env, cwd=tree)
    try:
        w.load(f"{tree}/fixtures/models/small-llama")
        w.generate(prompt="warm up", max_tokens=8).wait()
        c0, t0 = cpu_seconds(w.proc.pid), time.perf_counter()
        running = [w.generate(prompt=f"{i} the river and the stone", max_tokens=tokens, ignore_eos=True,
                              seed=i, temperature=0.0) for i in range(streams)]
        n = sum(len(s.wait().tokens) for s in running)
        return (cpu_seconds(w.proc.pid) - c0) / n * 1000, n / (time.perf_counter() - t0)
    finally:
        w.close()


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("old")
    p.add_argument("new", nargs="?", default=str(ROOT), help="default: this checkout")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--tokens", type=int, default=128)
    args = p.parse_args()
    trees = {"old": os.path.abspath(args.old), "new": os.path.abspath(args.new)}
    for streams in (1, 8):
        rows: dict = {k: [] for k in trees}
        for _ in range(args.rounds):
            for k, tree in trees.items():
                rows[k].append(run(tree, streams, args.tokens))
        for k, v in rows.items():
            ms = sorted(x[0] for x in v)
            tps = sorted(x[1] for x in v)
            print(f"{streams} stream(s) {k}: worker CPU ms/token median {ms[len(ms) // 2]:.2f} "
                  f"(min {ms[0]:.2f}), tok/s median {tps[len(tps) // 2]:.1f}")


if __name__ == "__main__":
    main()
