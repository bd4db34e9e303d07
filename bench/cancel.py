"""Cancel latency: from writing the `cancel` line to the final response
arriving, during decoding and during prompt processing.

    python bench/cancel.py [--model small-llama] [--trials 20]

Target: p99 <= 50 ms during decoding. During prompt processing the cancel
lands at the next chunk boundary, so it scales with prefill_step_size.
"""

from __future__ import annotations

import argparse
import time

from common import ensure_model, report, spawn
from mlx_worker import protocol


def percentile(xs, q):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q / 100 * (len(xs) - 1))))]


def cancel_after(client, params, ready) -> float:
    stream = client.generate(**params)
    it = iter(stream)
    for event in it:
        if ready(event):
            break
    t0 = time.perf_counter()
    client.start("cancel", {"id": stream.id})  # don't wait for the cancel's own reply
    for event in it:
        if isinstance(event, protocol.GenerateResult):
            break
    assert stream.result.stop_reason == "cancelled"
    return (time.perf_counter() - t0) * 1000


def measure(model: str = "small-llama", trials: int = 20, prefill_step: int = 256) -> dict:
    path = str(ensure_model(model))
    client = spawn()
    client.load(path)
    decode, prefill = [], []
    for i in range(trials):
        decode.append(cancel_after(
            client, dict(prompt=f"cancel me {i}", max_tokens=100000, ignore_eos=True, prompt_cache=False),
            lambda e: isinstance(e, protocol.TokenEvent) and e.tokens))
        prefill.append(cancel_after(
            client, dict(tokens=[(i * 7 + k) % 900 + 10 for k in range(2000)], max_tokens=5, prompt_cache=False,
                         prefill_step_size=prefill_step),
            lambda e: isinstance(e, protocol.ProgressEvent) and e.processed > 0))
    client.close()
    return {
        "decode_p50_ms": percentile(decode, 50), "decode_p99_ms": percentile(decode, 99),
        "prefill_p50_ms": percentile(prefill, 50), "prefill_p99_ms": percentile(prefill, 99),
        "prefill_step": prefill_step,
    }


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="small-llama")
    p.add_argument("--trials", type=int, default=20)
    p.add_argument("--prefill-step", type=int, default=256)
    args = p.parse_args()
    r = measure(args.model, args.trials, args.prefill_step)
    report("cancel", r)
    print("| phase | p50 ms | p99 ms |")
    print("|---|---|---|")
    print(f"| decoding | {r['decode_p50_ms']:.1f} | {r['decode_p99_ms']:.1f} |")
    print(f"| prompt processing (chunks of {args.prefill_step}) | {r['prefill_p50_ms']:.1f} | {r['prefill_p99_ms']:.1f} |")


if __name__ == "__main__":
    main()
