#!/usr/bin/env python3
"""Soak: many mixed requests against one worker; does resident memory grow?

    python bench/soak.py [--requests 500] [--model tiny-llama] [--seed 1]

Runs a seeded mix of generate (varied params, some cancelled mid-way),
tokenize, detokenize, status, bad requests and an occasional unload/load
through one real worker, and samples the worker's RSS and MLX active memory every 10 requests.
The figure of merit is RSS growth after warm-up: the high-water mark over
the last fifth of the run against the one over the first fifth after
warm-up (target: <= 5 %).
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from fixtures.build import ensure_model  # noqa: E402
from mlx_worker.client import RpcError, WorkerClient  # noqa: E402

WORDS = "the sea a ship sails over waves under clouds while birds call and wind sings { } [ ] : , 1 2 3 é ü 中 😀".split()


@dataclass
class SoakStats:
    requests: int = 0
    counts: dict = field(default_factory=dict)
    samples: list = field(default_factory=list)  # (iteration, rss, active outside the prompt cache)
    warmup: int = 0
    seconds: float = 0.0

    def _window(self, first: bool) -> list:
        after = [s for s in self.samples if s[0] >= self.warmup]
        n = max(1, len(after) // 5)
        return after[:n] if first else after[-n:]

    @property
    def rss_warm(self) -> int:
        """RSS high-water mark over the first fifth of the run after warm-up."""
        return max(s[1] for s in self._window(True))

    @property
    def rss_end(self) -> int:
        """RSS high-water mark over the last fifth of the run. High-water marks,
        because the prompt cache's fill level moves RSS by a few MiB either way."""
        return max(s[1] for s in self._window(False))

    @property
    def rss_max(self) -> int:
        return max(s[1] for s in self.samples)

    @property
    def active_warm(self) -> int:
        return max(s[2] for s in self._window(True))

    @property
    def active_end(self) -> int:
        return max(s[2] for s in self._window(False))

    @property
    def growth(self) -> float:
        return (self.rss_end - self.rss_warm) / self.rss_warm


def _text(rng: random.Random, n: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n))


def _generate_params(rng: random.Random, model_id: str) -> dict:
    p: dict = {"model_id": model_id, "max_tokens": rng.randint(1, 40), "seed": rng.randrange(1 << 30)}
    source = rng.random()
    if source < 0.5:
        p["prompt"] = _text(rng, rng.randint(1, 60))
    elif source < 0.75:
        p["tokens"] = [rng.randrange(7, 1000) for _ in range(rng.randint(1, 200))]
    else:
        p["messages"] = [{"role": "user", "content": _text(rng, rng.randint(1, 30))}]
    if rng.random() < 0.5:
        p["temperature"] = 0
    else:
        p["temperature"] = rng.choice([0.5, 0.8, 1.2])
        p["top_p"] = rng.choice([1.0, 0.9, 0.5])
        p["top_k"] = rng.choice([0, 5, 50])
    if rng.random() < 0.2:
        p["stop"] = [rng.choice(WORDS)]
    if rng.random() < 0.2:
        p["top_logprobs"] = rng.randint(1, 5)
    if rng.random() < 0.2:
        p["repetition_penalty"] = 1.2
    if rng.random() < 0.3:
        p["ignore_eos"] = True
    if rng.random() < 0.2:
        p["prefill_step_size"] = rng.choice([16, 64, 512])
    return p


def soak(client: WorkerClient, model_path: str, requests: int, seed: int = 1, warmup: int = 100,
         model_id: str = "soak") -> SoakStats:
    """Run the mix; ``client`` must have ``model_path`` loaded as ``model_id``."""
    rng = random.Random(seed)
    stats = SoakStats(warmup=warmup)
    start = time.perf_counter()

    def count(kind: str) -> None:
        stats.counts[kind] = stats.counts.get(kind, 0) + 1
        stats.requests += 1

    def sample(i: int) -> None:
        # MLX memory other than the prompt caches, whose fill level varies
        status = client.status()
        cached = sum(m.prompt_cache.bytes for m in status.models if m.prompt_cache is not None)
        stats.samples.append((i, status.memory.rss, status.memory.active - cached))
        stats.requests += 1

    for i in range(requests):
        if i % 10 == 0:
            sample(i)
        r = rng.random()
        if r < 0.40:
            client.generate(**_generate_params(rng, model_id)).wait()
            count("generate")
        elif r < 0.52:
            stream = client.generate(**dict(_generate_params(rng, model_id), max_tokens=100_000, ignore_eos=True))
            timer = threading.Timer(rng.uniform(0.0, 0.05), stream.cancel)
            timer.start()
            result = stream.wait()
            timer.join()
            assert result.stop_reason in ("cancelled", "max_tokens", "stop_string"), result.stop_reason
            count("generate+cancel")
            stats.requests += 1  # the cancel
        elif r < 0.67:
            if rng.random() < 0.5:
                client.tokenize(model_id=model_id, text=_text(rng, rng.randint(1, 80)))
            else:
                client.tokenize(model_id=model_id, messages=[{"role": "user", "content": _text(rng, 10)}])
            count("tokenize")
        elif r < 0.77:
            client.detokenize([rng.randrange(0, 1000) for _ in range(rng.randint(1, 50))], model_id=model_id)
            count("detokenize")
        elif r < 0.90:
            client.status()
            count("status")
        elif r < 0.97:
            bad = rng.choice([
                ("generate", {"model_id": model_id, "prompt": "x", "max_tokens": "many"}),
                ("generate", {"model_id": "nope", "prompt": "x"}),
                ("tokenize", {"model_id": model_id}),
                ("detokenize", {"model_id": model_id, "tokens": [10**9]}),
                ("no_such_method", {}),
            ])
            try:
                client.call(*bad)
            except RpcError:
                pass
            count("error")
        else:
            client.unload(model_id)
            client.load(model_path, model_id=model_id)
            count("unload+load")
            stats.requests += 1
    sample(requests)
    stats.seconds = time.perf_counter() - start
    return stats


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--requests", type=int, default=500)
    ap.add_argument("--warmup", type=int, default=100)
    ap.add_argument("--model", default="tiny-llama")
    ap.add_argument("--seed", type=int, default=1)
    args = ap.parse_args()

    model = str(ensure_model(args.model))
    env = dict(os.environ, PYTHONPATH=str(ROOT), HF_HUB_OFFLINE="1", TRANSFORMERS_VERBOSITY="error")
    with WorkerClient(env=env, cwd=str(ROOT)) as client:
        client.load(model, model_id="soak")
        s = soak(client, model, args.requests, args.seed, args.warmup)
    mib = 1 << 20
    print(f"soak: {s.requests} requests ({args.model}, seed {args.seed}) in {s.seconds:.1f} s")
    print("  mix: " + ", ".join(f"{k} {v}" for k, v in sorted(s.counts.items())))
    print(f"  RSS high-water mark after {args.warmup} warm-up requests (first fifth): {s.rss_warm / mib:.1f} MiB; "
          f"last fifth: {s.rss_end / mib:.1f} MiB; max seen: {s.rss_max / mib:.1f} MiB")
    print(f"  MLX active memory outside the prompt cache: {s.active_warm / mib:.2f} MiB -> {s.active_end / mib:.2f} MiB")
    print(f"  RSS growth after warm-up: {s.growth * 100:+.2f} % (target <= 5 %)")
    from common import report

    report("soak", {"rss_growth": s.growth, "requests": s.requests})
    return 0 if s.growth <= 0.05 else 1


if __name__ == "__main__":
    sys.exit(main())
