"""Memory estimates vs measured peaks, per fixture kind, through a real worker.

    python bench/memory.py [--quick]

Each case runs alone on a fresh worker (prompt cache off, so nothing from
an earlier request is resident): ``memory_estimate`` (memory in use at
admission + the request's estimated need) ÷ ``peak_memory`` (MLX's measured
peak) must lie in [1.0, 1.15]. The need alone is printed too: estimated need
÷ (peak - memory in use before the request), the stricter figure.
"""

from __future__ import annotations

import argparse
import base64
import io
import sys

from common import ensure_model, report, spawn

MiB = 1 << 20
LOW, HIGH = 1.0, 1.15


def tokens(n: int, salt: int = 0) -> list[int]:
    return [7 + (i * 7 + salt) % 900 for i in range(n)]


def image_b64(seed: int, size=(224, 224)) -> str:
    import numpy as np
    from PIL import Image

    arr = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, "PNG")
    return base64.b64encode(buf.getvalue()).decode()


# (label, fixture, load options, generate params, draft fixture)
CASES = [
    ("fp32", "tiny-llama", {}, dict(tokens=tokens(1500), max_tokens=40, prefill_step_size=512), None),
    ("fp32 long answer", "tiny-llama", {}, dict(tokens=tokens(300), max_tokens=700, prefill_step_size=512), None),
    ("fp32 20M", "small-llama", {}, dict(tokens=tokens(1200), max_tokens=20, prefill_step_size=256), None),
    ("bf16", "tiny-llama-bf16", {}, dict(tokens=tokens(1500), max_tokens=40, prefill_step_size=512), None),
    ("4-bit", "tiny-llama-q4", {}, dict(tokens=tokens(1500), max_tokens=40, prefill_step_size=512), None),
    ("8-bit", "tiny-llama-q8", {}, dict(tokens=tokens(1500), max_tokens=40, prefill_step_size=512), None),
    ("mixed 3/6-bit", "tiny-llama-mixed", {}, dict(tokens=tokens(1500), max_tokens=40, prefill_step_size=512), None),
    ("sliding window", "tiny-gemma3", {}, dict(tokens=tokens(1500), max_tokens=40, prefill_step_size=512), None),
    ("max_kv_size", "tiny-llama", {"max_kv_size": 512}, dict(tokens=tokens(1500), max_tokens=40, prefill_step_size=256), None),
    ("recurrent", "tiny-mamba", {}, dict(tokens=tokens(1500), max_tokens=40, prefill_step_size=512), None),
    ("kv_bits 8", "tiny-llama", {"kv_bits": 8, "kv_group_size": 32}, dict(tokens=tokens(1500), max_tokens=40, prefill_step_size=512), None),
    ("kv_bits 4", "tiny-llama", {"kv_bits": 4, "kv_group_size": 32}, dict(tokens=tokens(1500), max_tokens=40, prefill_step_size=512), None),
    ("draft", "spec-target", {}, dict(tokens=tokens(1000), max_tokens=40, prefill_step_size=512), "spec-draft"),
    ("vision + image", "tiny-qwen2-vl", {}, dict(max_tokens=20, messages=[{"role": "user", "content": [
        {"type": "text", "text": "Describe " * 200}, {"type": "image", "image": image_b64(1)},
        {"type": "text", "text": "and this " * 100}, {"type": "image", "image": image_b64(2)}]}]), None),
]


def run_case(label, fixture, load_opts, params, draft):
    w = spawn()
    try:
        if draft:
            w.load(str(ensure_model(draft)), model_id="draft", prompt_cache_entries=0)
            load_opts = {**load_opts, "draft_model_id": "draft"}
        w.load(str(ensure_model(fixture)), model_id="m", prompt_cache_entries=0, **load_opts)
        warm = {k: v for k, v in params.items() if k != "max_tokens"}
        w.generate(model_id="m", max_tokens=2, ignore_eos=True, temperature=0, prompt_cache=False, **warm).wait()
        base = w.status().memory.active
        r = w.generate(model_id="m", ignore_eos=True, temperature=0, prompt_cache=False, **params).wait()
    finally:
        w.close()
    return {"label": label, "estimate": r.memory_estimate, "peak": r.peak_memory, "base": base,
            "ratio": r.memory_estimate / r.peak_memory,
            "need_ratio": (r.memory_estimate - base) / max(1, r.peak_memory - base)}


def run_batch(repeats: int = 3):
    """Two requests of different lengths decoding in one batch (left padding).
    Their peak depends on timing (whether the second prompt arrives in time
    to be prefilled together with a chunk of the first, padded to it), so the
    case runs ``repeats`` times and the estimate is held against the largest
    peak: admission has to cover the worst interleaving."""
    estimate, peak, base = 0, 0, 0
    for _ in range(repeats):
        w = spawn()
        try:
            w.load(str(ensure_model("tiny-llama")), model_id="m", prompt_cache_entries=0)
            w.generate(model_id="m", tokens=tokens(64), max_tokens=2, ignore_eos=True, prompt_cache=False).wait()
            base = w.status().memory.active
            streams = [w.generate(model_id="m", tokens=tokens(n, salt=n), max_tokens=m, ignore_eos=True,
                                  temperature=0, prompt_cache=False, prefill_step_size=512)
                       for n, m in ((1200, 200), (200, 400))]
            results = [s.wait() for s in streams]
        finally:
            w.close()
        peaks = [r.peak_memory for r in results]
        print(f"  batch run: estimate {max(r.memory_estimate for r in results) / MiB:.2f} MiB, "
              f"peak {max(peaks) / MiB:.2f} MiB")
        estimate = max(estimate, max(r.memory_estimate for r in results))
        peak = max(peak, max(peaks))
    return {"label": "batch with padding", "estimate": estimate, "peak": peak, "base": base,
            "ratio": estimate / peak, "need_ratio": (estimate - base) / max(1, peak - base)}


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--only", help="comma-separated labels")
    args = p.parse_args()
    rows = []
    for case in CASES:
        if args.only and case[0] not in args.only.split(","):
            continue
        rows.append(run_case(*case))
        print_row(rows[-1])
    if not args.only or "batch with padding" in args.only:
        rows.append(run_batch())
        print_row(rows[-1])
    bad = [r["label"] for r in rows if not LOW <= r["ratio"] <= HIGH]
    print(f"\n{len(rows) - len(bad)}/{len(rows)} ratios in [{LOW}, {HIGH}]" + (f"; outside: {bad}" if bad else ""))
    if not args.only:
        report("memory", {r["label"]: round(r["ratio"], 3) for r in rows})
    return 1 if bad else 0


def print_row(r):
    print(f"{r['label']:20s} estimate {r['estimate'] / MiB:8.2f} MiB  peak {r['peak'] / MiB:8.2f} MiB  "
          f"ratio {r['ratio']:.3f}   need ratio {r['need_ratio']:.3f} (base {r['base'] / MiB:.2f} MiB)", flush=True)


if __name__ == "__main__":
    sys.exit(main())
