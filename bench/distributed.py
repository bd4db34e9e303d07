"""Distributed loads (issue 14): 2 ranks ÷ 1 process, per mode, on this machine.

    python bench/distributed.py [--rounds 3] [--tokens 64] [--prompt 512]

One worker holds the model twice: as one process ("one") and over 2 ring
ranks on loopback ("dist"); requests alternate between them, medians are
reported. Both ranks share this machine's cores, so this measures the cost
of the lockstep protocol and the collectives, not a speed-up: it is a
correctness vehicle here. Also measured: the bytes each rank sends per
decoded token and per prompt token (TCP ``bytes_sent`` of the rank's
sockets, from ``ss``), the figures the two-machine estimate in the README
starts from.
"""

from __future__ import annotations

import argparse
import json
import random
import re
import subprocess

from common import ensure_model, median, report, spawn

CASES = [("tensor", "small-llama"), ("pipeline", "tiny-qwen2")]


def tcp_bytes_sent(pid: int) -> int:
    """Bytes sent so far over the TCP sockets of ``pid`` (the ring's)."""
    out = subprocess.run(["ss", "-tinpH"], capture_output=True, text=True).stdout
    total = 0
    for entry in re.split(r"\n(?=\S)", out):
        if f"pid={pid}," in entry:
            m = re.search(r"bytes_sent:(\d+)", entry)
            total += int(m.group(1)) if m else 0
    return total


def run_case(mode: str, name: str, rounds: int, n_tokens: int, n_prompt: int) -> dict:
    path = str(ensure_model(name))
    w = spawn()
    try:
        pids = w.load(path, model_id="dist", parallel={"mode": mode, "ranks": 2}).parallel.pids
        w.load(path, model_id="one")
        rng = random.Random(0)
        decode = {"one": [], "dist": []}
        ttft = {"one": [], "dist": []}
        sent_decode, sent_prompt = [], []
        base = dict(temperature=0, ignore_eos=True, prompt_cache=False)
        for model_id in ("one", "dist"):  # warm-up
            w.generate(model_id=model_id, tokens=[5, 6, 7], max_tokens=8, **base).wait()
        for _ in range(rounds):
            for model_id in ("one", "dist"):
                before = [tcp_bytes_sent(p) for p in pids]
                r = w.generate(model_id=model_id, tokens=[5, 6, 7], max_tokens=n_tokens, **base).wait()
                after = [tcp_bytes_sent(p) for p in pids]
                decode[model_id].append(r.timings.generation_tps)
                if model_id == "dist":
                    sent_decode.append([(b - a) / n_tokens for a, b in zip(before, after)])
                prompt = [rng.randrange(10, 1000) for _ in range(n_prompt)]
                before = [tcp_bytes_sent(p) for p in pids]
                r = w.generate(model_id=model_id, tokens=prompt, max_tokens=1, **base).wait()
                after = [tcp_bytes_sent(p) for p in pids]
                ttft[model_id].append(r.timings.ttft_ms)
                if model_id == "dist":
                    sent_prompt.append([(b - a) / n_prompt for a, b in zip(before, after)])
        cfg = json.loads((ensure_model(name) / "config.json").read_text())
        return {
            "model": name,
            "hidden_size": cfg["hidden_size"],
            "layers": cfg["num_hidden_layers"],
            "decode_tps_one": median(decode["one"]),
            "decode_tps_dist": median(decode["dist"]),
            "decode_ratio": median(decode["dist"]) / median(decode["one"]),
            "ttft_ms_one": median(ttft["one"]),
            "ttft_ms_dist": median(ttft["dist"]),
            "ttft_ratio": median(ttft["dist"]) / median(ttft["one"]),
            # Per rank, rank 0 first (includes TCP/IP headers' payload only: bytes_sent counts payload).
            "bytes_per_token_per_rank": [round(median(x)) for x in zip(*sent_decode)],
            "bytes_per_prompt_token_per_rank": [round(median(x)) for x in zip(*sent_prompt)],
        }
    finally:
        w.close()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--prompt", type=int, default=512)
    args = ap.parse_args()
    figures: dict = {}
    print("| mode | model | decode tok/s 1 proc | 2 ranks | ratio | TTFT ms 1 proc | 2 ranks | ratio "
          "| bytes/token/rank (decode) | bytes/prompt token/rank |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for mode, name in CASES:
        r = run_case(mode, name, args.rounds, args.tokens, args.prompt)
        figures[mode] = r
        figures[f"{mode}_decode_ratio"] = r["decode_ratio"]
        figures[f"{mode}_ttft_ratio"] = r["ttft_ratio"]
        print(f"| {mode} | {name} | {r['decode_tps_one']:.1f} | {r['decode_tps_dist']:.1f} | {r['decode_ratio']:.2f} "
              f"| {r['ttft_ms_one']:.1f} | {r['ttft_ms_dist']:.1f} | {r['ttft_ratio']:.2f} "
              f"| {r['bytes_per_token_per_rank']} | {r['bytes_per_prompt_token_per_rank']} |")
    figures["settings"] = vars(args)
    report("distributed", figures)


if __name__ == "__main__":
    main()
