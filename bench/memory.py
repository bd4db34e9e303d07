"""Memory estimates vs measured peaks, per fixture kind, through a real worker.

    python bench/memory.py [--only LABEL,...]

Each case runs alone on a fresh worker (prompt cache off, so nothing from
an earlier request is resident): ``memory_estimate`` (memory in use at
admission + the request's estimated need) ÷ ``peak_memory`` (MLX's measured
peak) must lie in [1.0, 1.15]. The need alone is printed too: estimated need
÷ (peak - memory in use before the request), the stricter figure. The batch
cases run two requests, the second arriving with the first, during its
prefill or during its decode; every request's estimate must bound its peak.
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


def send_together(w, requests):
    """Requests in one write: the worker reads them in one go and admits
    them all before its next step (server.py takes arrived jobs in a burst)."""
    real, held = w.proc.stdin, io.BytesIO()
    w.proc.stdin = held
    try:
        streams = [w.generate(**r) for r in requests]
    finally:
        w.proc.stdin = real
    real.write(held.getvalue())
    return streams


def batch_request(n: int, m: int) -> dict:
    return dict(model_id="m", tokens=tokens(n, salt=n), max_tokens=m, ignore_eos=True, temperature=0,
                prompt_cache=False, prefill_step_size=512)


def run_batch(label: str, when: str, order=((1200, 200), (200, 400)), repeats: int = 2):
    """Two requests of different lengths decoding in one batch (left padding).
    ``when`` the second arrives: with the first (their prompts prefilled
    together, padded to the longest chunk), after the first's first chunk
    (together from there, over its keys), or once the first decodes (it
    prefills alone, then joins: the merge copy). Each request's estimate
    (the worker's expected peak, raised as the second is admitted) is held
    against its measured peak; the worst of ``repeats`` runs is reported."""
    from mlx_worker import protocol

    runs = []
    for _ in range(repeats):
        w = spawn()
        try:
            w.load(str(ensure_model("tiny-llama")), model_id="m", prompt_cache_entries=0)
            w.generate(model_id="m", tokens=tokens(64), max_tokens=2, ignore_eos=True, prompt_cache=False).wait()
            base = w.status().memory.active
            first, second = (batch_request(*r) for r in order)
            if when == "together":
                streams = send_together(w, [first, second])
            else:
                wanted = protocol.ProgressEvent if when == "mid-prefill" else protocol.TokenEvent
                a = w.generate(**first)
                events = iter(a)
                while not isinstance(next(events), wanted):
                    pass
                streams = [a, w.generate(**second)]
            results = [s.wait() for s in streams]
        finally:
            w.close()
        for r in results:
            runs.append({"estimate": r.memory_estimate, "peak": r.peak_memory, "base": base,
                         "ratio": r.memory_estimate / r.peak_memory})
        print(f"  {label}: estimates {[round(r.memory_estimate / MiB, 2) for r in results]} MiB, "
              f"peaks {[round(r.peak_memory / MiB, 2) for r in results]} MiB")
    low = min(runs, key=lambda r: r["ratio"])
    worst = low if low["ratio"] < LOW else max(runs, key=lambda r: r["ratio"])
    need_ratio = (worst["estimate"] - worst["base"]) / max(1, worst["peak"] - worst["base"])
    return {"label": label, **worst, "need_ratio": need_ratio}


# (label, when the second request arrives, (prompt, max_tokens) of the first and second)
BATCHES = [
    ("batch with padding", "together", ((1200, 200), (200, 400))),
    ("batch joins prefill", "mid-prefill", ((1200, 200), (200, 400))),
    ("batch joins decode", "decoding", ((1200, 200), (200, 400))),
]
# Upper bound only: a long prompt arriving while another decodes is
# prefilled in chunks sized to the decode steps (a controller that may grow
# them up to prefill_step_size), so its estimate counts full-size chunks.
BOUND_ONLY = [("batch long joins decode", "decoding", ((200, 400), (1200, 200)))]


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
    for label, when, order in BATCHES:
        if not args.only or label in args.only.split(","):
            rows.append(run_batch(label, when, order))
            print_row(rows[-1])
    bounds = []
    for label, when, order in BOUND_ONLY:
        if not args.only or label in args.only.split(","):
            bounds.append(run_batch(label, when, order))
            print_row(bounds[-1])
    bad = [r["label"] for r in rows if not LOW <= r["ratio"] <= HIGH]
    under = [r["label"] for r in bounds if r["ratio"] < LOW]
    print(f"\n{len(rows) - len(bad)}/{len(rows)} ratios in [{LOW}, {HIGH}]" + (f"; outside: {bad}" if bad else "")
          + "".join(f"; {r['label']} (upper bound only): {r['ratio']:.3f}" for r in bounds)
          + (f"; under the peak: {under}" if under else ""))
    bad += under
    if not args.only:
        report("memory", {r["label"]: round(r["ratio"], 3) for r in rows + bounds})
    return 1 if bad else 0


def print_row(r):
    print(f"{r['label']:20s} estimate {r['estimate'] / MiB:8.2f} MiB  peak {r['peak'] / MiB:8.2f} MiB  "
          f"ratio {r['ratio']:.3f}   need ratio {r['need_ratio']:.3f} (base {r['base'] / MiB:.2f} MiB)", flush=True)


if __name__ == "__main__":
    sys.exit(main())
