"""One interactive chat while a background request prefills a long prompt:
the chat's TTFT over its idle TTFT (issue 22's target: at most 1.5), next to
the same chat behind the same prompt sent without a priority (both
interactive: they take turns chunk by chunk); and the long prompt's own TTFT
alone as interactive and as background (what its short chunks cost it).

    python bench/priority.py [--model small-llama-8k] [--long 8000] [--rounds 3]

The long prompt is 8,000 tokens where the model's context allows, else the
longest it allows (small-llama-8k: 8,192; the other fixtures: 4,096).
Medians over rounds.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from common import median, model_path, report, spawn
from mlx_worker.protocol import ProgressEvent, TokenEvent

CHAT = "river stone light harbor window garden winter paper silver mountain"


def chat_ttft(client, r: int) -> float:
    start = time.perf_counter()
    for event in client.generate(prompt=f"{r} {CHAT}", max_tokens=8, temperature=0, prompt_cache=False):
        if isinstance(event, TokenEvent) and event.tokens:
            return time.perf_counter() - start
    raise RuntimeError("the chat produced no token")


def behind(client, tokens: list[int], r: int, **bg) -> tuple[float, bool]:
    """The chat's TTFT sent once the long prompt's prefill has begun; and
    whether that prefill was still going when the chat's first token came."""
    stream = client.generate(tokens=tokens, max_tokens=1, temperature=0, prompt_cache=False, **bg)
    it = iter(stream)
    next(e for e in it if isinstance(e, ProgressEvent))  # prefilling
    ttft = chat_ttft(client, r)
    last = [e for e in it if isinstance(e, ProgressEvent)]
    stream.wait()
    return ttft, bool(last)


def context_of(path: str) -> int:
    cfg = json.loads((Path(path) / "config.json").read_text())
    return int(cfg.get("max_position_embeddings") or 8192)


def measure(path: str, long: int, rounds: int) -> dict:
    n = min(long, context_of(path) - 64)
    client = spawn()
    try:
        client.load(path)
        chat_ttft(client, -1)  # warm-up
        idle, bg, plain, overlapped, alone = [], [], [], [], {}
        for r in range(rounds):
            tokens = [(7 + r + k) % 900 + 5 for k in range(n)]  # no prompt cache reuse across rounds
            idle.append(chat_ttft(client, r))
            t, o = behind(client, tokens, r, priority="background")
            bg.append(t)
            overlapped.append(o)
            plain.append(behind(client, tokens, r + 1000)[0])
            for name in ("interactive", "background"):  # the long prompt alone: what short chunks cost it
                res = client.generate(tokens=tokens[::-1], max_tokens=1, temperature=0, prompt_cache=False,
                                      priority=name).wait()
                alone.setdefault(name, []).append(res.timings.ttft_ms)
    finally:
        client.close()
    return {
        "long_prompt_tokens": n, "rounds": rounds,
        "chat_idle_ttft_ms": round(median(idle) * 1000, 1),
        "chat_ttft_behind_background_ms": round(median(bg) * 1000, 1),
        "chat_ttft_behind_no_priority_ms": round(median(plain) * 1000, 1),
        "ratio_behind_background": round(median(bg) / median(idle), 2),
        "ratio_behind_no_priority": round(median(plain) / median(idle), 2),
        "background_prefill_still_running": all(overlapped),
        "long_prompt_alone_ttft_ms_interactive": round(median(alone["interactive"]), 1),
        "long_prompt_alone_ttft_ms_background": round(median(alone["background"]), 1),
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="small-llama-8k", help="a fixture's name or a model folder")
    ap.add_argument("--long", type=int, default=8000)
    ap.add_argument("--rounds", type=int, default=3)
    a = ap.parse_args()
    figures = {"model": a.model, **measure(str(model_path(a.model)), a.long, a.rounds)}
    for k, v in figures.items():
        print(f"{k:34s} {v}")
    print(f"chat TTFT behind a {figures['long_prompt_tokens']}-token background prefill / idle TTFT: "
          f"{figures['ratio_behind_background']} (target <= 1.5)")
    report("priority", figures)


if __name__ == "__main__":
    main()
