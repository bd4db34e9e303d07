"""Cost of tools on decode, on a 32k-vocabulary model with a Qwen3-style tool
template (tiny-qwen3-tools-32k).

    python bench/tools.py [--tokens 200] [--rounds 12]
    python bench/tools.py --per-format [--tokens 100] [--rounds 6] [--only gpt-oss ...]

``--per-format``: no tools vs ``auto`` on each tool-call format's fixture
(the vendored family templates, tiny models with 1k vocabularies), one row
per family: tokens/s of each, the ratio (target ≥ 0.95) and the auto
processor's own work per token.

Same prompt (a chat rendered with the tools), seed and length on every side;
EOS is banned with logit_bias so each run decodes the same count. Runs
alternate (order rotating):

- no tools: plain generation (the channel splitter still labels the text);
- auto: ``tools`` given, ``tool_choice: "auto"``: the lazy tool processor
  runs on every token (free text until ``<tool_call>``: the last token read,
  no work over the vocabulary; the call grammar takes over once a call starts);
- required: a forced call (the whole output is under the call grammar and
  the tool's schema; the schema keeps it going until max_tokens).

Prints median and best tokens/s and pooled per-token step p50 of each, and
their ratios to "no tools" (best-of and step p50 resist load from other
processes on a shared machine). Target: auto ÷ no tools ≥ 0.95.
"""

from __future__ import annotations

import argparse
import time

from common import bind_blas_like_the_worker, ensure_model, median, report

LONG_CALL = {  # a call that can't close before max_tokens: the required run decodes under the schema
    "type": "object",
    "properties": {"items": {"type": "array", "minItems": 200, "items": {
        "type": "object",
        "properties": {"name": {"type": "string", "maxLength": 10}, "n": {"type": "integer"}},
        "required": ["name", "n"], "additionalProperties": False}}},
    "required": ["items"], "additionalProperties": False,
}
TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "description": "Weather for a city", "parameters": {
        "type": "object", "properties": {"city": {"type": "string"}, "days": {"type": "integer", "minimum": 1}},
        "required": ["city", "days"]}}},
    {"type": "function", "function": {"name": "record", "description": "Record items", "parameters": LONG_CALL}},
]
MESSAGES = [{"role": "user", "content": "What is the weather in Paris this week?"}]


def percentile(xs, q):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q / 100 * len(xs)))]


def run_once(lm, prompt, n, variant, seed, stamps):
    import msgspec

    from mlx_worker.engine import request, scheduler
    from mlx_worker import protocol

    extra: dict = {}
    if variant == "auto":
        extra = {"tools": TOOLS, "tool_choice": "auto"}
    elif variant == "required":
        extra = {"tools": TOOLS, "tool_choice": {"name": "record"}}
    bias = {str(t): -1e9 for t in lm.eos_token_ids}
    params = msgspec.convert(
        {"prompt": prompt, "max_tokens": n, "temperature": 1.0, "seed": seed, "logit_bias": bias,
         "prompt_cache": False, **extra},
        protocol.GenerateParams,
    )
    events = request.Events(progress=lambda e: None, token=lambda e, sent: stamps.append(time.perf_counter()) if e.tokens else None)
    return scheduler.run(lm, params, "bench", events, lambda: False)


def grammar_cost_us(lm, prompt: str, outputs: list[list[int]]) -> list[float]:
    """The auto tool processor's own work per token, replayed over tokens
    the auto runs produced: robust to load from other processes, which swamps
    a few percent in whole-run tokens/s."""
    import msgspec

    import mlx.core as mx

    from mlx_worker import protocol
    from mlx_worker.tools import grammar as tool_grammar

    params = msgspec.convert({"prompt": prompt, "tools": TOOLS}, protocol.GenerateParams)
    logits = mx.random.normal((1, lm.vocab_size))
    mx.eval(logits)
    prompt_ids = lm.tokenizer.encode(prompt)
    out = []
    for tokens in outputs:
        proc = tool_grammar.processor_for(lm, params)
        context = list(prompt_ids)
        mx.eval(proc(mx.array(context), logits))
        for t in tokens[:-1]:
            context.append(t)
            proc.observe(t)
            ids = mx.array(context)
            mx.eval(ids)
            t0 = time.perf_counter()
            mx.eval(proc(ids, logits))
            out.append((time.perf_counter() - t0) * 1e6)
    return out


PER_FORMAT = {  # family -> fixture (tests/test_tool_families.py)
    f: f"tiny-{f}-tools" for f in ("llama31", "llama32", "gpt-oss", "deepseek-v31", "functionary-v32", "granite33",
                                   "command-r7b", "qwen3-coder", "glm46", "kimi-k2", "hermes3", "qwen25", "qwen3-real",
                                   "mistral-nemo", "mistral-small32")
}


def per_format(args) -> None:
    """No tools vs auto on every format's fixture: tokens/s ratio per format."""
    import msgspec

    from mlx_worker import protocol
    from mlx_worker.methods import LOADERS
    from mlx_worker.models.registry import ModelRegistry
    from mlx_worker.prompt import render_chat

    registry = ModelRegistry(LOADERS)
    figures = {}
    print(f"  {'family':16} {'format':16} {'no tools':>9} {'auto':>9}  ratio (median)  best   "
          "processor p50 us  share of a step")
    for family, fixture in PER_FORMAT.items():
        if args.only and family not in args.only:
            continue
        registry.load(protocol.LoadParams(model=str(ensure_model(fixture)), model_id=family))
        lm = registry.get(family)
        prompt = render_chat(lm, msgspec.convert({"messages": MESSAGES, "tools": TOOLS}, protocol.TokenizeParams))
        for v in ("no_tools", "auto"):
            run_once(lm, prompt, 10, v, 0, [])
        rates: dict = {"no_tools": [], "auto": []}
        outputs = []
        for r in range(args.rounds):
            for v in (("no_tools", "auto") if r % 2 else ("auto", "no_tools")):
                result = run_once(lm, prompt, args.tokens, v, r, [])
                rates[v].append(result.timings.generation_tps)
                if v == "auto":
                    outputs.append(result.tokens)
        cost = grammar_cost_us(lm, prompt, outputs[:2])
        base, auto = median(rates["no_tools"]), median(rates["auto"])
        best = max(rates["auto"]) / max(rates["no_tools"])
        fmt = lm.tokenizer.tool_format.name
        share = percentile(cost, 50) * 1e-6 * max(rates["no_tools"])  # of the fastest no-tools step
        print(f"  {family:16} {fmt:16} {base:9.1f} {auto:9.1f}  {auto / base:8.3f}  {best:12.3f}  "
              f"{percentile(cost, 50):10.1f}  {share:12.2%}")
        figures[f"{family}_auto_over_no_tools"] = auto / base
        figures[f"{family}_processor_share_of_step"] = share
        figures[f"{family}_auto_best_ratio"] = best
        registry.unload(family)
    report("tools_per_format", figures)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--tokens", type=int, default=200)
    p.add_argument("--rounds", type=int, default=12)  # a multiple of 3: each order equally often
    p.add_argument("--model", default="tiny-qwen3-tools-32k")
    p.add_argument("--per-format", action="store_true")
    p.add_argument("--only", nargs="*", help="--per-format: just these families")
    args = p.parse_args()
    blas = bind_blas_like_the_worker()
    if args.per_format:
        print(f"BLAS {blas or 'reference'}; {args.tokens} tokens x {args.rounds} rounds per side")
        return per_format(args)
    import msgspec

    from mlx_worker import protocol
    from mlx_worker.methods import LOADERS
    from mlx_worker.models.registry import ModelRegistry
    from mlx_worker.prompt import render_chat

    registry = ModelRegistry(LOADERS)
    registry.load(protocol.LoadParams(model=str(ensure_model(args.model)), model_id="bench"))
    lm = registry.get("bench")
    prompt = render_chat(lm, msgspec.convert({"messages": MESSAGES, "tools": TOOLS}, protocol.TokenizeParams))
    print(f"model {args.model}: vocab {lm.vocab_size}, BLAS {blas or 'reference'}, "
          f"prompt {len(lm.tokenizer.encode(prompt))} tokens")

    variants = ["no_tools", "auto", "required"]
    for v in variants:  # warm up: grammar compile, first-run allocations
        run_once(lm, prompt, 20, v, 0, [])
    rates = {v: [] for v in variants}
    steps = {v: [] for v in variants}
    calls = 0
    outputs: list = []
    for r in range(args.rounds):
        for v in variants[r % 3:] + variants[: r % 3]:
            stamps: list = []
            result = run_once(lm, prompt, args.tokens, v, r, stamps)
            assert len(result.tokens) == args.tokens, (v, result.stop_reason, len(result.tokens))
            if v == "auto":
                calls += len(result.tool_calls) + len(result.invalid_tool_calls)
                outputs.append(result.tokens)
            rates[v].append(result.timings.generation_tps)
            steps[v].extend(b - a for a, b in zip(stamps, stamps[1:]))
    base, base_steps = median(rates["no_tools"]), percentile(steps["no_tools"], 50)
    print(f"\ndecode, {args.tokens} tokens x {args.rounds} rounds (auto runs started {calls} calls)")
    print(f"  {'':10} tokens/s (median, best)  step p50 ms   ratio: median  best  step p50")
    figures = {}
    best_base = max(rates["no_tools"])
    for v in variants:
        rate, best, step = median(rates[v]), max(rates[v]), percentile(steps[v], 50)
        print(f"  {v:10} {rate:8.1f} {best:8.1f}       {step * 1e3:8.3f}          {rate / base:.3f}  "
              f"{best / best_base:.3f}  {base_steps / step:.3f}")
        figures[f"{v}_decode_ratio"] = rate / base
        figures[f"{v}_best_ratio"] = best / best_base
        figures[f"{v}_step_p50_ratio"] = base_steps / step
    figures["auto_over_no_tools"] = figures.pop("auto_decode_ratio")
    cost = grammar_cost_us(lm, prompt, outputs[:3])
    figures["auto_processor_us_p50"] = percentile(cost, 50)
    figures["auto_processor_share_of_step"] = percentile(cost, 50) / 1e6 / base_steps
    print(f"\nauto tool processor's own work per token, replayed: p50 {percentile(cost, 50):.1f} us, "
          f"p99 {percentile(cost, 99):.1f} us = {figures['auto_processor_share_of_step']:.2%} of a no-tools step")
    report("tools", figures)


if __name__ == "__main__":
    main()
