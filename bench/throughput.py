"""Decode tokens/s and prompt tokens/s: the worker (spawned, over pipes) vs
in-process ``mlx_lm.stream_generate`` vs ``mlx_lm.server`` streaming over
HTTP on loopback. Same model, prompt, greedy sampling, same BLAS; EOS is
banned with logit_bias on every side so each run decodes the same count.

    python bench/throughput.py [--model small-llama] [--tokens 200] [--prompt-tokens 2000] [--rounds 5]

Runs alternate worker / in-process / server; medians are compared.
Targets: decode worker ÷ in-process ≥ 0.98, worker ÷ server ≥ 1.05.
"""

from __future__ import annotations

import argparse
import time

from common import bind_blas_like_the_worker, ensure_model, median, report, spawn
from mlx_worker.protocol import TokenEvent

PROMPT = "Once upon a time, in a small village by the sea, there lived"


def long_prompt(tokenizer, n: int) -> str:
    words = "river stone light harbor window garden winter paper silver mountain".split()
    text, i = "", 0
    while len(tokenizer.encode(text)) < n:
        text += " ".join(words[(i * 7 + j) % len(words)] for j in range(50)) + f" {i}.\n"
        i += 1
    ids = tokenizer.encode(text)[:n]
    return tokenizer.decode(ids)


class Sides:
    def __init__(self, path: str, eos: list[int], blas: str | None, with_server: bool):
        from mlx_lm import load

        from peers import MlxLmServer

        self.bias = {str(t): -1e9 for t in eos}
        self.model, self.tokenizer = load(path)
        self.client = spawn()
        self.client.load(path)
        self.server = MlxLmServer(path, blas) if with_server else None

    # each returns (ttft seconds, decode tokens/s)
    def worker(self, prompt: str, n: int) -> tuple[float, float]:
        start = time.perf_counter()
        first = last = None
        after_first = 0  # tokens that arrived after the first event
        for event in self.client.generate(prompt=prompt, max_tokens=n, temperature=0, logit_bias=self.bias,
                                          prompt_cache=False):
            if isinstance(event, TokenEvent) and event.tokens:
                last = time.perf_counter()
                if first is None:
                    first = last  # (this event may carry several merged tokens)
                else:
                    after_first += len(event.tokens)
        return first - start, after_first / (last - first) if after_first else 0.0

    def inprocess(self, prompt: str, n: int) -> tuple[float, float]:
        from mlx_lm import stream_generate
        from mlx_lm.sample_utils import make_logits_processors

        processors = make_logits_processors(logit_bias={int(k): v for k, v in self.bias.items()})
        start = time.perf_counter()
        first = last = None
        count = 0
        for _ in stream_generate(self.model, self.tokenizer, prompt, max_tokens=n, logits_processors=processors):
            last = time.perf_counter()
            first = first or last
            count += 1
        return first - start, (count - 1) / (last - first) if count > 1 else 0.0

    def mlx_lm_server(self, prompt: str, n: int) -> tuple[float, float]:
        start, first, last, chunks = self.server.stream(
            "/v1/completions",
            {"prompt": prompt, "max_tokens": n, "temperature": 0, "logit_bias": self.bias},
        )
        return first - start, (chunks - 1) / (last - first) if chunks > 1 else 0.0

    def close(self) -> None:
        self.client.close()
        if self.server:
            self.server.close()


def measure(model="small-llama", tokens=200, prompt_tokens=2000, rounds=5, with_server=True) -> dict:
    blas = bind_blas_like_the_worker()
    path = str(ensure_model(model))
    sides = Sides(path, [0, 2], blas, with_server)
    names = ["worker", "inprocess"] + (["mlx_lm_server"] if with_server else [])
    big = long_prompt(sides.tokenizer, prompt_tokens)
    decode = {k: [] for k in names}
    prefill = {k: [] for k in names}
    try:
        for k in names:  # warm up every side
            getattr(sides, k)(PROMPT, 10)
        for r in range(rounds):
            order = names if r % 2 == 0 else names[::-1]
            for k in order:
                decode[k].append(getattr(sides, k)(PROMPT, tokens)[1])
            for k in order:
                # a distinct prompt per round and side: no side may reuse a cache
                ttft, _ = getattr(sides, k)(f"{r}{k[:2]} " + big, 1)
                prefill[k].append(prompt_tokens / ttft)
    finally:
        sides.close()
    out = {"model": model, "blas": blas, "decode": {k: median(v) for k, v in decode.items()},
           "prompt_tps": {k: median(v) for k, v in prefill.items()}}
    return out


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="small-llama")
    p.add_argument("--tokens", type=int, default=200)
    p.add_argument("--prompt-tokens", type=int, default=2000)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--no-server", action="store_true")
    args = p.parse_args()
    r = measure(args.model, args.tokens, args.prompt_tokens, args.rounds, not args.no_server)
    print(f"model {r['model']}, BLAS {r['blas'] or 'built-in'}, median of {args.rounds} alternating rounds\n")
    print("| side | decode tok/s | prompt tok/s |")
    print("|---|---:|---:|")
    for k in r["decode"]:
        print(f"| {k} | {r['decode'][k]:.1f} | {r['prompt_tps'][k]:.0f} |")
    w = r["decode"]["worker"]
    print(f"\ndecode worker ÷ in-process: {w / r['decode']['inprocess']:.3f} (target ≥ 0.98)")
    if "mlx_lm_server" in r["decode"]:
        print(f"decode worker ÷ mlx_lm.server: {w / r['decode']['mlx_lm_server']:.3f} (target ≥ 1.05)")
        print(f"prompt worker ÷ mlx_lm.server: {r['prompt_tps']['worker'] / r['prompt_tps']['mlx_lm_server']:.3f}")
    print(f"prompt worker ÷ in-process: {r['prompt_tps']['worker'] / r['prompt_tps']['inprocess']:.3f}")
    figures = {"decode_vs_inprocess": w / r["decode"]["inprocess"],
               "prompt_vs_inprocess": r["prompt_tps"]["worker"] / r["prompt_tps"]["inprocess"],
               "decode_tps": r["decode"], "prompt_tps": r["prompt_tps"], "model": r["model"]}
    if "mlx_lm_server" in r["decode"]:
        figures["decode_vs_server"] = w / r["decode"]["mlx_lm_server"]
        figures["prompt_vs_server"] = r["prompt_tps"]["worker"] / r["prompt_tps"]["mlx_lm_server"]
    report("throughput", figures)


if __name__ == "__main__":
    main()
