"""Many streams at once: the worker's continuous batching vs mlx_lm.server's
(its BatchGenerator, batching on: no seed is sent). Same model, prompts,
greedy sampling and BLAS; EOS banned with logit_bias on both sides so every
stream decodes the same count.

    python bench/concurrency.py [--model small-llama] [--tokens 128] [--rounds 2]

Figures (medians over alternating rounds):
- 8 streams x 128 tokens: aggregate tok/s, median and p99 time to first token;
- a short request sent right behind a 2,000-token prompt while 4 streams
  decode: its TTFT, and the p99 gap between tokens of the 4 streams while
  the prompt is processed, over their gap before it arrived;
- one stream alone: decode tok/s over in-process mlx-lm (throughput.py's);
- 1, 8, 16, 32 streams: aggregate tok/s and p99 inter-token gap, drawn to
  bench/results/concurrency.png.
"""

from __future__ import annotations

import argparse
import http.client
import json
import threading
import time

from common import RESULTS, bind_blas_like_the_worker, median, model_path, report
from mlx_worker.protocol import TokenEvent
from throughput import PROMPT, Sides, long_prompt

WORDS = "river stone light harbor window garden winter paper silver mountain".split()


def prompt_for(i: int, r: int) -> str:
    # distinct per stream and round: no side may reuse a prompt cache
    return f"{r}.{i} " + " ".join(WORDS[(i * 3 + k) % len(WORDS)] for k in range(12)) + " " + PROMPT


def p99(xs: list[float]) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(0.99 * len(xs)))] if xs else 0.0


class Stream:
    """One request's event times: send, each token."""

    def __init__(self):
        self.start = 0.0
        self.times: list[float] = []

    @property
    def ttft(self) -> float:
        return self.times[0] - self.start

    def gaps(self, after: float = 0.0, before: float = float("inf")) -> list[float]:
        return [b - a for a, b in zip(self.times, self.times[1:]) if after <= a and b <= before]


# ----------------------------------------------------------------- sides


def worker_stream(client, bias: dict, prompt: str, n: int, out: Stream, **extra) -> None:
    out.start = time.perf_counter()
    for event in client.generate(prompt=prompt, max_tokens=n, temperature=0, logit_bias=bias, **extra):
        if isinstance(event, TokenEvent) and event.tokens:
            now = time.perf_counter()
            out.times.extend([now] * len(event.tokens))


def server_stream(port: int, bias: dict, prompt: str, n: int, out: Stream, **_) -> None:
    out.start = time.perf_counter()
    body = {"prompt": prompt, "max_tokens": n, "temperature": 0, "logit_bias": bias, "stream": True}
    for attempt in range(100):
        # Python's HTTP server listens with a backlog of 5: with many streams
        # at once, connections are reset; retry (the wait counts in TTFT).
        try:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
            conn.request("POST", "/v1/completions", json.dumps(body), {"Content-Type": "application/json"})
            response = conn.getresponse()
            break
        except (ConnectionResetError, http.client.RemoteDisconnected, BrokenPipeError):
            time.sleep(0.02)
    else:
        raise RuntimeError("mlx_lm.server refused the connection 100 times")
    while True:
        line = response.fp.readline()
        if not line:
            break
        if line.startswith(b"data:") and not line.startswith(b"data: [DONE]"):
            out.times.append(time.perf_counter())
    conn.close()


def launch(fn, *args) -> tuple[threading.Thread, Stream]:
    s = Stream()
    t = threading.Thread(target=fn, args=(*args, s), daemon=True)
    t.start()
    return t, s


def many(fn, target, bias, n_streams: int, tokens: int, r: int) -> dict:
    start = time.perf_counter()
    runs = [launch(fn, target, bias, prompt_for(i, r), tokens) for i in range(n_streams)]
    for t, _ in runs:
        t.join()
    wall = time.perf_counter() - start
    streams = [s for _, s in runs]
    total = sum(len(s.times) for s in streams)
    gaps = [g for s in streams for g in s.gaps()]
    ttfts = [s.ttft for s in streams]
    return {"tps": total / wall, "ttft_p50": median(ttfts), "ttft_p99": p99(ttfts), "gap_p99": p99(gaps)}


def behind_long(fn, target, bias, big: str, r: int) -> dict:
    """4 streams decoding; then a 2,000-token prompt; right behind it a short one."""
    runners = [launch(fn, target, bias, prompt_for(10 + i, r), 400) for i in range(4)]
    while any(len(s.times) < 20 for _, s in runners):
        time.sleep(0.01)
    idle_from = time.perf_counter()
    counts = [len(s.times) for _, s in runners]
    # at least 0.5 s and 5 gaps a stream (a slow model: a 4-bit one on a CPU)
    while time.perf_counter() - idle_from < 0.5 or any(len(s.times) < c + 6 for (_, s), c in zip(runners, counts)):
        time.sleep(0.01)
    arrive = time.perf_counter()
    long_t, long_s = launch(fn, target, bias, f"{r} " + big, 1)
    time.sleep(0.005)  # "right behind": after the long prompt is on its way
    short_t, short_s = launch(fn, target, bias, f"{r} short question", 8)
    long_t.join()
    short_t.join()
    long_done = long_s.times[0] if long_s.times else time.perf_counter()
    for t, _ in runners:
        t.join()
    idle = [g for _, s in runners for g in s.gaps(idle_from, arrive)]
    during = [g for _, s in runners for g in s.gaps(arrive, long_done)]
    return {"short_ttft": short_s.ttft, "long_ttft": long_s.ttft, "idle_gap_p50": median(idle),
            "during_gap_p99": p99(during), "gap_ratio": p99(during) / median(idle)}


# ------------------------------------------------------------------ main


def measure(model: str, tokens: int, rounds: int, curve: list[int]) -> dict:
    blas = bind_blas_like_the_worker()
    path = str(model_path(model))
    sides = Sides(path, [0, 2], blas, with_server=True)
    bias = sides.bias
    big = long_prompt(sides.tokenizer, 2000)
    targets = {"worker": (worker_stream, sides.client), "mlx_lm_server": (server_stream, sides.server.port)}
    res: dict = {k: {"eight": [], "behind": [], "curve": {n: [] for n in curve}} for k in targets}
    single = {"worker": [], "inprocess": []}
    try:
        for k, (fn, target) in targets.items():  # warm up
            many(fn, target, bias, 2, 8, -1)
        sides.inprocess(PROMPT, 8)  # (on a GPU: MLX compiles its kernels on first use)
        for r in range(rounds):
            order = list(targets) if r % 2 == 0 else list(targets)[::-1]
            for k in order:
                fn, target = targets[k]
                res[k]["eight"].append(many(fn, target, bias, 8, tokens, r))
            for k in order:
                fn, target = targets[k]
                res[k]["behind"].append(behind_long(fn, target, bias, big, r))
            for n in curve:
                for k in order:
                    fn, target = targets[k]
                    res[k]["curve"][n].append(many(fn, target, bias, n, 64, 100 * n + r))
            for k in (["worker", "inprocess"] if r % 2 == 0 else ["inprocess", "worker"]):
                single[k].append(getattr(sides, k)(PROMPT, 200)[1])
    finally:
        sides.close()

    def med(rows: list[dict]) -> dict:
        return {key: median([row[key] for row in rows]) for key in rows[0]}

    out = {k: {"eight": med(v["eight"]), "behind": med(v["behind"]),
               "curve": {n: med(rows) for n, rows in v["curve"].items()}} for k, v in res.items()}
    out["single"] = {k: median(v) for k, v in single.items()}
    w, s = res["worker"], res["mlx_lm_server"]  # each round's ratios: how far the noise reaches
    out["per_round"] = {
        "tps_vs_server_8": [a["tps"] / b["tps"] for a, b in zip(w["eight"], s["eight"])],
        "gap_during_prompt_over_idle": [a["gap_ratio"] for a in w["behind"]],
        "long_ttft_vs_server": [a["long_ttft"] / b["long_ttft"] for a, b in zip(w["behind"], s["behind"])],
        "single_vs_inprocess": [a / b for a, b in zip(single["worker"], single["inprocess"])],
    }
    out["blas"] = blas
    return out


def plot(r: dict, path) -> None:
    """tok/s and p99 gap vs streams, both sides (PIL: bench/ draws with it)."""
    from PIL import Image, ImageDraw

    ns = sorted(int(n) for n in r["worker"]["curve"])
    panels = [("aggregate tok/s", "tps", 1.0), ("p99 inter-token gap (ms)", "gap_p99", 1000.0)]
    colours = {"worker": "#3a7d44", "mlx_lm_server": "#c0392b"}
    W, H, pad = 420, 300, 50
    img = Image.new("RGB", (W * 2 + pad, H + 60), "white")
    d = ImageDraw.Draw(img)
    for p, (title, key, scale) in enumerate(panels):
        x0, y0 = p * (W + pad // 2) + pad, 30
        vals = [r[s]["curve"][n][key] * scale for s in colours for n in ns]
        top = max(vals) * 1.1 or 1.0
        d.text((x0, 8), title + " vs streams", fill="black")
        d.rectangle([x0, y0, x0 + W - pad, y0 + H - 40], outline="black")
        for i, n in enumerate(ns):
            x = x0 + (W - pad) * (i + 0.5) / len(ns)
            d.text((x - 6, y0 + H - 36), str(n), fill="black")
        for s, c in colours.items():
            pts = []
            for i, n in enumerate(ns):
                x = x0 + (W - pad) * (i + 0.5) / len(ns)
                y = y0 + (H - 40) * (1 - r[s]["curve"][n][key] * scale / top)
                pts.append((x, y))
                d.text((x + 3, y - 12), f"{r[s]['curve'][n][key] * scale:.0f}", fill=c)
            d.line(pts, fill=c, width=2)
        d.text((x0, y0 + H - 8), "green: worker, red: mlx_lm.server", fill="black")
    img.save(path)


def print_tables(r: dict, tokens: int, curve: list[int]) -> None:
    w, s = r["worker"], r["mlx_lm_server"]
    print(f"| 8 streams x {tokens} tokens | worker | mlx_lm.server |")
    print("|---|---:|---:|")
    print(f"| aggregate tok/s | {w['eight']['tps']:.1f} | {s['eight']['tps']:.1f} |")
    print(f"| TTFT median (s) | {w['eight']['ttft_p50']:.3f} | {s['eight']['ttft_p50']:.3f} |")
    print(f"| TTFT p99 (s) | {w['eight']['ttft_p99']:.3f} | {s['eight']['ttft_p99']:.3f} |")
    print("\n| short request behind a 2,000-token prompt, 4 streams decoding | worker | mlx_lm.server |")
    print("|---|---:|---:|")
    for key, label in [("short_ttft", "short request TTFT (s)"), ("long_ttft", "long prompt TTFT (s)"),
                       ("idle_gap_p50", "streams' idle gap p50 (s)"), ("during_gap_p99", "streams' gap p99 during the prompt (s)"),
                       ("gap_ratio", "gap p99 during ÷ idle")]:
        print(f"| {label} | {w['behind'][key]:.3f} | {s['behind'][key]:.3f} |")
    print("\n| streams (64 tokens each) | worker tok/s | server tok/s | worker gap p99 (ms) | server gap p99 (ms) |")
    print("|---:|---:|---:|---:|---:|")
    for n in curve:
        print(f"| {n} | {w['curve'][n]['tps']:.1f} | {s['curve'][n]['tps']:.1f} | "
              f"{w['curve'][n]['gap_p99'] * 1000:.1f} | {s['curve'][n]['gap_p99'] * 1000:.1f} |")
    single = r["single"]["worker"] / r["single"]["inprocess"]
    print(f"\none stream alone: worker {r['single']['worker']:.1f} tok/s, in-process mlx-lm "
          f"{r['single']['inprocess']:.1f} tok/s: {single:.3f} (target ≥ 0.98)")
    print("\neach round (the medians above are of each side's own figures):")
    for key, values in r["per_round"].items():
        print(f"  {key}: {', '.join(f'{v:.2f}' for v in values)}")


def headline(r: dict, model: str) -> dict:
    """The issue's ratios (and every figure behind them)."""
    w, s = r["worker"], r["mlx_lm_server"]
    return {
        "tps_vs_server_8": w["eight"]["tps"] / s["eight"]["tps"],
        "ttft_p50_vs_server_8": w["eight"]["ttft_p50"] / s["eight"]["ttft_p50"],
        "ttft_p99_vs_server_8": w["eight"]["ttft_p99"] / s["eight"]["ttft_p99"],
        "short_ttft_vs_server": w["behind"]["short_ttft"] / s["behind"]["short_ttft"],
        "long_ttft_vs_server": w["behind"]["long_ttft"] / s["behind"]["long_ttft"],
        "gap_during_prompt_over_idle": w["behind"]["gap_ratio"],
        "single_vs_inprocess": r["single"]["worker"] / r["single"]["inprocess"],
        "per_round": r["per_round"],
        "worker": w, "mlx_lm_server": s, "single": r["single"], "model": model,
    }


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="small-llama", help="a fixture's name or a model folder")
    p.add_argument("--tokens", type=int, default=128)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--curve", default="1,8,16,32")
    args = p.parse_args()
    curve = [int(n) for n in args.curve.split(",")]
    r = measure(args.model, args.tokens, args.rounds, curve)
    print(f"model {args.model}, BLAS {r['blas'] or 'built-in'}, median of {args.rounds} alternating rounds\n")
    print_tables(r, args.tokens, curve)
    report("concurrency", headline(r, args.model))
    plot(r, RESULTS / "concurrency.png")


if __name__ == "__main__":
    main()
