"""Run every benchmark, then print one table of ratios against their targets
and draw it as a chart.

    python bench/run_all.py [--quick]

Each benchmark runs in its own process, one after another (they measure
side by side within themselves: alternating A/B runs, medians). Their full
output goes to bench/results/results.md, the summary table to stdout and to
the top of that file, and the chart to bench/results/summary.png.
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import time
from pathlib import Path

from common import RESULTS, ROOT

HERE = Path(__file__).resolve().parent

# (script, args, args with --quick)
RUNS = [
    ("startup.py", [], ["--rounds", "3"]),
    ("throughput.py", [], ["--rounds", "3", "--tokens", "100"]),
    ("prompt_cache.py", [], ["--rounds", "2"]),
    ("prompt_cache.py", ["--checkpoints"], ["--checkpoints", "--rounds", "2"]),
    ("cancel.py", [], ["--trials", "8"]),
    ("constraints.py", [], ["--rounds", "5"]),
    ("vision.py", [], ["--rounds", "5"]),
    ("tools.py", [], ["--rounds", "4"]),
    ("soak.py", [], ["--requests", "200", "--warmup", "50"]),
    ("kv_quant.py", [], ["--prompts", "1"]),
    ("load.py", [], ["--rounds", "9"]),
    ("concurrency.py", [], ["--rounds", "1", "--curve", "1,8,16"]),
    ("speculative.py", [], ["--rounds", "3", "--tokens", "96", "--sweep-rounds", "1"]),
    ("distributed.py", [], ["--rounds", "2", "--tokens", "32", "--prompt", "256"]),
    ("vision_tower.py", [], ["--rounds", "2"]),
]

# (result file, key, label, target, "higher"|"lower" is better, unit format)
METRICS = [
    ("throughput", "decode_vs_inprocess", "decode tok/s: worker ÷ in-process mlx-lm", 0.98, "higher", "{:.3f}"),
    ("throughput", "decode_vs_server", "decode tok/s: worker ÷ mlx_lm.server", 1.05, "higher", "{:.3f}"),
    ("throughput", "prompt_vs_inprocess", "prompt tok/s (2k): worker ÷ in-process", 0.98, "higher", "{:.3f}"),
    ("throughput", "prompt_vs_server", "prompt tok/s (2k): worker ÷ mlx_lm.server", 1.05, "higher", "{:.3f}"),
    ("prompt_cache", "cached_over_cold", "turn-2 TTFT: cached ÷ cold", 0.03, "lower", "{:.4f}"),
    ("prompt_cache", "server_over_worker", "turn-2 TTFT: mlx_lm.server ÷ worker", 1.0, "higher", "{:.2f}"),
    ("prompt_cache_checkpoints", "tiny-qwen3-5_cached_over_cold", "turn-2 TTFT cached ÷ cold: hybrid (checkpoints)", 0.1, "lower", "{:.4f}"),
    ("prompt_cache_checkpoints", "tiny-gemma3-w8_cached_over_cold", "turn-2 TTFT cached ÷ cold: sliding window (checkpoints)", 0.1, "lower", "{:.4f}"),
    ("cancel", "decode_p99_ms", "cancel latency p99 in decoding (ms)", 50.0, "lower", "{:.1f}"),
    ("cancel", "prefill_p99_ms", "cancel latency p99 in prompt processing (ms)", None, "lower", "{:.1f}"),
    ("startup", "ready_s", "spawn → ready (s)", 0.3, "lower", "{:.3f}"),
    ("startup", "first_token_s", "spawn → first token after load (s)", None, "lower", "{:.2f}"),
    ("constraints", "llguidance_decode_ratio", "decode: llguidance ÷ unconstrained", 0.95, "higher", "{:.3f}"),
    ("constraints", "outlines_decode_ratio", "decode: outlines ÷ unconstrained", None, "higher", "{:.3f}"),
    ("tools", "auto_over_no_tools", "decode: tools + auto grammar ÷ no tools (32k)", 0.95, "higher", "{:.3f}"),
    ("tools", "auto_step_p50_ratio", "decode step p50: no tools ÷ tools + auto grammar", None, "higher", "{:.3f}"),
    ("vision", "prompt + image cache", "vision turn-2 TTFT ÷ turn 1 (both caches)", None, "lower", "{:.3f}"),
    ("concurrency", "tps_vs_server_8", "8 streams aggregate tok/s: worker ÷ mlx_lm.server", 1.2, "higher", "{:.2f}"),
    ("concurrency", "ttft_p50_vs_server_8", "8 streams TTFT median: worker ÷ server", 1.0, "lower", "{:.2f}"),
    ("concurrency", "ttft_p99_vs_server_8", "8 streams TTFT p99: worker ÷ server", 1.0, "lower", "{:.2f}"),
    ("concurrency", "short_ttft_vs_server", "short behind 2k prompt, TTFT: worker ÷ server", 0.25, "lower", "{:.3f}"),
    ("concurrency", "gap_during_prompt_over_idle", "4 streams' gap p99 during a 2k prompt ÷ idle", 3.0, "lower", "{:.2f}"),
    ("concurrency", "long_ttft_vs_server", "that 2k prompt's TTFT: worker ÷ server", 1.1, "lower", "{:.2f}"),
    ("vision_tower", "max_gap_pieces_over_one_go", "streams' longest gap as an image arrives: tower in pieces ÷ in one go", None, "lower", "{:.2f}"),
    ("distributed", "tensor_decode_ratio", "decode tok/s: 2 ranks ÷ 1 process, tensor (loopback, shared cores)", None, "higher", "{:.2f}"),
    ("distributed", "tensor_ttft_ratio", "TTFT: 2 ranks ÷ 1 process, tensor (loopback, shared cores)", None, "lower", "{:.2f}"),
    ("distributed", "pipeline_decode_ratio", "decode tok/s: 2 ranks ÷ 1 process, pipeline", None, "higher", "{:.2f}"),
    ("distributed", "pipeline_ttft_ratio", "TTFT: 2 ranks ÷ 1 process, pipeline", None, "lower", "{:.2f}"),
    ("concurrency", "single_vs_inprocess", "one stream: worker ÷ in-process mlx-lm", 0.98, "higher", "{:.3f}"),
    ("speculative", "draft_over_plain", "greedy decode tok/s: draft ÷ no draft", 1.6, "higher", "{:.2f}"),
    ("speculative", "draft_over_server", "greedy decode tok/s, draft: worker ÷ mlx_lm.server", 1.1, "higher", "{:.2f}"),
    ("soak", "rss_growth", "soak: RSS growth after warm-up", 0.05, "lower", "{:+.2%}"),
    ("kv_quant", "q8_ratio", "KV bytes/token: kv_bits 8 ÷ none", None, "lower", "{:.3f}"),
    ("kv_quant", "q4_ratio", "KV bytes/token: kv_bits 4 ÷ none", None, "lower", "{:.3f}"),
    ("kv_quant", "q8_agreement", "greedy tokens equal: kv_bits 8 vs none", None, "higher", "{:.1%}"),
    ("kv_quant", "q4_agreement", "greedy tokens equal: kv_bits 4 vs none", None, "higher", "{:.1%}"),
    ("load", "first_progress_ms", "load: first load_progress (ms)", None, "lower", "{:.2f}"),
    ("load", "load_vs_mlx_lm", "load wall time: worker ÷ mlx_lm.load", 1.05, "lower", "{:.3f}"),
]


def run(quick: bool) -> str:
    out = []
    for script, args, quick_args in RUNS:
        cmd = [sys.executable, str(HERE / script), *(quick_args if quick else args)]
        print(f"== {' '.join(cmd[1:])}", file=sys.stderr, flush=True)
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, cwd=str(ROOT), capture_output=True, text=True)
        took = time.perf_counter() - t0
        out.append(f"### `bench/{script} {' '.join(quick_args if quick else args)}` ({took:.0f} s)\n\n{proc.stdout}")
        if proc.returncode:
            out.append(f"exit code {proc.returncode}\n\n```\n{proc.stderr[-2000:]}\n```\n")
    return "\n".join(out)


def summary() -> tuple[str, list]:
    rows, bars = [], []
    for name, key, label, target, better, fmt in METRICS:
        path = RESULTS / f"{name}.json"
        value = json.loads(path.read_text()).get(key) if path.exists() else None
        if value is None:
            rows.append(f"| {label} | – | {'' if target is None else fmt.format(target)} | not measured |")
            continue
        ok = "" if target is None else ("✅" if (value >= target if better == "higher" else value <= target) else "❌")
        sign = "≥" if better == "higher" else "≤"
        rows.append(f"| {label} | {fmt.format(value)} | {'' if target is None else sign + ' ' + fmt.format(target)} | {ok} |")
        if target:
            score = value / target if better == "higher" else (target / value if value else 10.0)
            bars.append((label, score, fmt.format(value), f"{sign} {fmt.format(target)}"))
    table = "| figure | measured | target | |\n|---|---:|---:|---|\n" + "\n".join(rows)
    return table, bars


ASCII = str.maketrans({"÷": "/", "≥": ">=", "≤": "<=", "→": "->", "–": "-"})


def chart(bars: list, path: Path, title: str) -> None:
    """Bars of measured ÷ target, oriented so that ≥ 1 meets the target."""
    from PIL import Image, ImageDraw

    # PIL's built-in font has no glyphs for ÷ ≥ ≤ →
    title = title.translate(ASCII)
    bars = [tuple(x.translate(ASCII) if isinstance(x, str) else x for x in bar) for bar in bars]

    row, left, width = 30, 330, 420
    img = Image.new("RGB", (left + width + 170, 50 + row * len(bars)), "white")
    d = ImageDraw.Draw(img)
    d.text((10, 10), title, fill="black")
    top = 40
    scale = width / 2.0  # 0 .. 2x the target
    for i, (label, score, value, target) in enumerate(bars):
        y = top + i * row
        d.text((10, y + 8), label[:52], fill="black")
        length = min(score, 2.0) * scale
        d.rectangle([left, y + 4, left + length, y + row - 6], fill="#3a7d44" if score >= 1 else "#c0392b")
        d.text((left + width + 10, y + 8), f"{value} ({target})", fill="black")
    x = left + scale
    d.line([x, top - 4, x, top + row * len(bars)], fill="black", width=2)
    d.text((x - 30, top + row * len(bars) + 2), "target", fill="black")
    img.save(path)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--quick", action="store_true", help="fewer rounds (minutes, noisier)")
    p.add_argument("--summary-only", action="store_true", help="redraw from bench/results/*.json")
    args = p.parse_args()
    RESULTS.mkdir(parents=True, exist_ok=True)
    details = "" if args.summary_only else run(args.quick)
    table, bars = summary()
    machine = f"{platform.system()} {platform.machine()}, {platform.processor() or 'cpu'}, python {platform.python_version()}"
    head = f"# mlx-worker benchmarks\n\n{time.strftime('%Y-%m-%d %H:%M')} · {machine}\n\n{table}\n"
    print(head)
    if details:
        (RESULTS / "results.md").write_text(head + "\n## Details\n\n" + details)
    chart(bars, RESULTS / "summary.png", "measured / target, oriented so that >= 1 meets it; " + machine)
    print(f"wrote {RESULTS / 'results.md'} and {RESULTS / 'summary.png'}", file=sys.stderr)


if __name__ == "__main__":
    main()
