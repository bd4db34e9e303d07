#!/usr/bin/env python3
"""How far prompt chunking moves greedy decoding, per dtype, on this backend.

A prompt served partly from the prompt cache, or split into other prefill
chunks, runs matrix products of other shapes than one cold pass. This runs
mlx-lm's ``generate_step`` on the fixture checkpoints three ways — the whole
prompt in one chunk, chunks of 5, and a cached prefix (half the prompt
prefilled with chunks of 16, the rest fed after it) — and reports, against
the one-chunk run:

- ``max_dlogprob``: the largest difference of a chosen token's logprob while
  the runs agree;
- ``diverged``: runs whose greedy tokens parted, and the smallest and largest
  top-1/top-2 gap (in the one-chunk run) at the step where they parted.

protocol/README.md ("Numerics per dtype") states the guarantee these figures
must stay inside. Needs only mlx and mlx-lm (runs on a bare GPU machine):

    python bench/numerics.py [--json out.json] [fixture folder ...]
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DEFAULT = ["tiny-llama", "tiny-llama-bf16", "tiny-llama-q8", "tiny-llama-q4", "tiny-llama-mixed"]


def greedy(model, prompt, n, step, prefix=0):
    import mlx.core as mx
    from mlx_lm.generate import generate_step
    from mlx_lm.models.cache import make_prompt_cache

    cache = make_prompt_cache(model)
    if prefix:
        for _ in generate_step(mx.array(prompt[:prefix]), model, prompt_cache=cache, max_tokens=0,
                               prefill_step_size=16):
            pass
    steps = generate_step(mx.array(prompt[prefix:]), model, prompt_cache=cache, max_tokens=n,
                          sampler=lambda lp: mx.argmax(lp, axis=-1), prefill_step_size=step)
    out = []
    for token, logprobs in steps:
        lp = logprobs.astype(mx.float32)
        top2 = mx.sort(lp)[-2:].tolist()
        out.append((int(token), lp[int(token)].item(), top2[1] - top2[0]))
    return out


def compare(base, other, stats):
    for (t, lp, gap), (u, lq, _) in zip(base, other):
        if t != u:
            stats["diverged"] += 1
            stats["gaps"].append(gap)
            return
        stats["max_dlogprob"] = max(stats["max_dlogprob"], abs(lp - lq))


def measure(path: Path, prompts: int, tokens: int) -> dict:
    import mlx.core as mx
    from mlx_lm.utils import load_model

    model, _ = load_model(path)
    dtype = str(model.model.embed_tokens(mx.array([0])).dtype)
    rng = random.Random(0)
    stats = {"max_dlogprob": 0.0, "diverged": 0, "gaps": [], "runs": 0}
    for _ in range(prompts):
        prompt = [rng.randrange(7, 1000) for _ in range(rng.randrange(40, 200))]
        base = greedy(model, prompt, tokens, step=4096)
        for other in (greedy(model, prompt, tokens, step=5), greedy(model, prompt, tokens, 4096, len(prompt) // 2)):
            stats["runs"] += 1
            compare(base, other, stats)
    gaps = stats.pop("gaps")
    stats["gap_at_divergence"] = [min(gaps), max(gaps)] if gaps else None
    return {"fixture": path.name, "activations": dtype, **stats}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("folders", nargs="*")
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--json")
    args = ap.parse_args()
    sys.path.insert(0, str(ROOT))
    from mlx_worker import blas

    print(f"blas: {blas.bind(None)}")  # as the worker does, before MLX is imported
    import mlx.core as mx

    folders = [Path(f) for f in args.folders] or [ROOT / "fixtures" / "models" / n for n in DEFAULT]
    results = {"device": str(mx.default_device()), "rows": []}
    print(f"device: {results['device']}")
    for folder in folders:
        row = measure(folder, args.prompts, args.tokens)
        results["rows"].append(row)
        print(json.dumps(row), flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
