#!/usr/bin/env python3
"""Quantized KV cache (load's kv_bits): what it saves and what it costs.

Through the worker, on one checkpoint loaded three ways (no kv_bits, 8 and 4
bits, group 64):

- KV bytes per token: the prompt-cache entry a prompt leaves (``status``
  ``prompt_cache.bytes``) over the tokens its buffer holds, ÷ unquantized;
- conversations the default prompt-cache budget holds: that budget (a quarter
  of physical memory) over one conversation of ``--conversation`` tokens,
  before the default cap of 16 entries, which applies too;
- greedy agreement over ``--tokens`` tokens vs unquantized: the share of
  positions with the same token and the first position where they part, and
  the largest |Δ logprob| of the chosen token while the runs agree.

    python bench/kv_quant.py [--model small-llama] [--group 64] [--tokens 256] [--prompts 3] [--no-report]
"""

from __future__ import annotations

import argparse
import math
import random

from common import ensure_model, report, spawn

KV_STEP = 256  # the cache buffers grow in steps of this many tokens


def prompts(w, n: int) -> list[list[int]]:
    rng = random.Random(7)
    words = "the sea city tree farm model host token line stream reads writes one time and a of".split()
    texts = [" ".join(rng.choice(words) for _ in range(40 + 20 * i)) for i in range(n)]
    return [w.tokenize(model_id="plain", text=t).tokens for t in texts]


def entry_bytes(w, model_id: str) -> int:
    return next(m for m in w.call("status", {})["models"] if m["model_id"] == model_id)["prompt_cache"]["bytes"]


def greedy(w, model_id: str, ids: list[int], n: int):
    stream = w.generate(model_id=model_id, tokens=ids, max_tokens=n, temperature=0, ignore_eos=True,
                        logprobs=True, prompt_cache=False)
    result = stream.wait()
    lps = [lp.logprob for e in stream.events if getattr(e, "logprobs", None) for lp in e.logprobs]
    return result.tokens, lps


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="small-llama")
    p.add_argument("--tokens", type=int, default=256)
    p.add_argument("--prompts", type=int, default=3)
    p.add_argument("--group", type=int, default=64)
    p.add_argument("--conversation", type=int, default=4096, help="tokens in one stored conversation")
    p.add_argument("--no-report", action="store_true", help="don't write bench/results/kv_quant.json")
    args = p.parse_args()
    path = str(ensure_model(args.model))
    sides = {"plain": {}, "q8": {"kv_bits": 8, "kv_group_size": args.group}, "q4": {"kv_bits": 4, "kv_group_size": args.group}}
    w = spawn()
    for mid, options in sides.items():
        w.load(path, model_id=mid, **options)
    budget = next(m for m in w.call("status", {})["models"])["prompt_cache"]["max_bytes"]
    max_entries = next(m for m in w.call("status", {})["models"])["prompt_cache"]["max_entries"]

    # Bytes per token: one prompt of 2 buffer steps less one token (its last
    # sampled token is not in the cache), so the buffer is exactly full.
    ids = (prompts(w, 1)[0] * 20)[: 2 * KV_STEP - 1]
    per_token = {}
    for mid in sides:
        w.generate(model_id=mid, tokens=ids, max_tokens=1, temperature=0).wait()
        per_token[mid] = entry_bytes(w, mid) / (2 * KV_STEP)

    agree = {mid: {"same": 0, "total": 0, "first_diff": [], "max_dlogprob": 0.0} for mid in ("q8", "q4")}
    for ids in prompts(w, args.prompts):
        base_tokens, base_lps = greedy(w, "plain", ids, args.tokens)
        for mid, stats in agree.items():
            tokens, lps = greedy(w, mid, ids, args.tokens)
            same = [a == b for a, b in zip(base_tokens, tokens)]
            stats["same"] += sum(same)
            stats["total"] += len(same)
            first = same.index(False) if False in same else len(same)
            stats["first_diff"].append(first)
            drift = [abs(a - b) for a, b in zip(base_lps[:first], lps[:first])]
            stats["max_dlogprob"] = max([stats["max_dlogprob"], *drift])
    w.close()

    conv = math.ceil(args.conversation / KV_STEP) * KV_STEP
    print(f"model {args.model}, kv_group_size {args.group}, {args.prompts} prompts × {args.tokens} greedy tokens; "
          f"default prompt-cache budget {budget / 2**30:.2f} GiB (max {max_entries} entries)\n")
    print(f"| kv_bits | KV bytes/token | ÷ unquantized | {args.conversation}-token conversations in the budget "
          "| greedy tokens equal | first differing token (per prompt) | max Δ logprob while equal |")
    print("|---|---:|---:|---:|---:|---|---:|")
    figures = {"model": args.model, "group_size": args.group, "tokens": args.tokens, "prompts": args.prompts,
               "budget_bytes": budget, "max_entries": max_entries}
    for mid, label in (("plain", "none"), ("q8", "8"), ("q4", "4")):
        ratio = per_token[mid] / per_token["plain"]
        held = int(budget // (per_token[mid] * conv))
        figures[f"{mid}_bytes_per_token"] = per_token[mid]
        figures[f"{mid}_conversations"] = held
        if mid == "plain":
            print(f"| {label} | {per_token[mid]:.0f} | 1.000 | {held} | – | – | – |")
            continue
        s = agree[mid]
        share = s["same"] / s["total"]
        figures[f"{mid}_ratio"] = round(ratio, 4)
        figures[f"{mid}_agreement"] = round(share, 4)
        figures[f"{mid}_first_diff"] = s["first_diff"]
        figures[f"{mid}_max_dlogprob"] = round(s["max_dlogprob"], 5)
        print(f"| {label} | {per_token[mid]:.0f} | {ratio:.3f} | {held} | {share:.1%} | {s['first_diff']} "
              f"| {s['max_dlogprob']:.4f} |")
    print(f"\n(the store also keeps at most {max_entries} entries, whatever their size)")
    if not args.no_report:
        report("kv_quant", figures)


if __name__ == "__main__":
    main()
