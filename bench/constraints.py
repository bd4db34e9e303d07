"""Constrained decoding cost on a 32k-vocabulary model (tiny-llama-32k).

    python bench/constraints.py [--tokens 200] [--rounds 15] [--profile ENGINE]

Prints, for each engine:

- decode tokens/s constrained / unconstrained: the same generation loop
  (``mlx_worker.engine.scheduler.run``, in-process, no pipes), same prompt, seed
  and length; runs alternate unconstrained / llguidance / outlines; the
  ratio of median tokens/s, and of the pooled per-token step time p25/p50
  (robust to other load on a shared machine);
- compile time per schema of the test corpus: cold (first request) and
  cached (repeat), median and max;
- per-token mask time p50/p99: the matcher work of one step (compute the
  bitmask, set EOS bits, unpack to a bool vector) replayed over the tokens
  the constrained runs produced, and the matcher's consume time.

``--profile llguidance`` runs one constrained generation under cProfile and
prints the top functions.
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import sys
import time

from common import ROOT, bind_blas_like_the_worker, ensure_model, median, report

sys.path.insert(0, str(ROOT / "tests"))

# Long outputs on both sides: the array can't be complete before max_tokens.
DECODE_SCHEMA = {
    "type": "array",
    "minItems": 100,
    "items": {
        "type": "object",
        "properties": {
            "id": {"type": "integer"},
            "name": {"type": "string", "maxLength": 12},
            "tags": {"type": "array", "items": {"enum": ["red", "green", "blue"]}, "maxItems": 3},
            "ok": {"type": "boolean"},
        },
        "required": ["id", "name", "tags", "ok"],
        "additionalProperties": False,
    },
}
ENGINES = ("llguidance", "outlines")
FIGURES: dict = {}  # headline numbers for bench/results/constraints.json
PROMPT = "Return a JSON list of records:"


def percentile(xs, q):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q / 100 * len(xs)))]


def run_once(lm, n, engine=None, schema=DECODE_SCHEMA, seed=0, stamps=None):
    """One generation through the worker's generation loop; ``stamps`` gets
    the time of every token event."""
    from mlx_worker.engine import request, scheduler
    from mlx_worker import protocol

    constraint = protocol.JsonSchemaConstraint(schema=schema, engine=engine) if engine else None
    params = protocol.GenerateParams(prompt=PROMPT, max_tokens=n, temperature=1.0, seed=seed,
                                     ignore_eos=True, prompt_cache=False, constraint=constraint)
    record = (lambda e, sent: stamps.append(time.perf_counter())) if stamps is not None else (lambda e, sent: None)
    events = request.Events(progress=lambda e: None, token=record)
    return scheduler.run(lm, params, "bench", events, lambda: False)


def decode_ratio(lm, n, rounds):
    """Each round runs unconstrained, llguidance and outlines back to back
    (order rotating). This machine is shared, so besides whole-run tokens/s
    the time between consecutive tokens is pooled over all runs and its
    percentiles compared: load from other processes inflates some steps,
    and the lower percentiles show the cost of the step itself."""
    variants = [None, *ENGINES]
    rates = {v: [] for v in variants}
    steps = {v: [] for v in variants}
    tokens = {e: [] for e in ENGINES}
    for r in range(rounds):
        order = variants[r % 3 :] + variants[: r % 3]
        for engine in order:
            stamps: list = []
            result = run_once(lm, n, engine, seed=r, stamps=stamps)
            assert len(result.tokens) == n, (engine, result.stop_reason, len(result.tokens))
            rates[engine].append(result.timings.generation_tps)
            steps[engine].extend(b - a for a, b in zip(stamps, stamps[1:]))
            if engine:
                tokens[engine].append(result.tokens)
    base, base_steps = rates[None], steps[None]
    print(f"\ndecode, {n} tokens x {rounds} rounds; tokens/s = median of runs; step = ms between tokens")
    print(f"  {'':13}  tokens/s   step p25  step p50   ratio: tokens/s  step p25  step p50")
    for v in variants:
        xs, st = rates[v], steps[v]
        print(f"  {v or 'unconstrained':13}  {median(xs):8.1f}  {percentile(st, 25) * 1e3:8.2f}  "
              f"{percentile(st, 50) * 1e3:8.2f}          {median(xs) / median(base):.3f}     "
              f"{percentile(base_steps, 25) / percentile(st, 25):.3f}     "
              f"{percentile(base_steps, 50) / percentile(st, 50):.3f}")
    for e in ENGINES:
        FIGURES[f"{e}_decode_ratio"] = median(rates[e]) / median(base)
        FIGURES[f"{e}_step_p50_ratio"] = percentile(base_steps, 50) / percentile(steps[e], 50)
    return tokens


def compile_times(lm):
    from mlx_worker import constraints, protocol
    from mlx_worker.errors import WorkerError
    from schema_corpus import SCHEMAS

    print(f"\ncompile time per schema ({len(SCHEMAS)} corpus schemas; refused ones excluded), ms")
    for engine in ENGINES:
        cold, warm = [], []
        for schema in SCHEMAS.values():
            c = protocol.JsonSchemaConstraint(schema=schema, engine=engine)
            t0 = time.perf_counter()
            try:
                constraints.compile_for(lm, c)
            except WorkerError:
                continue
            t1 = time.perf_counter()
            constraints.compile_for(lm, c)
            t2 = time.perf_counter()
            cold.append((t1 - t0) * 1000)
            warm.append((t2 - t1) * 1000)
        print(f"  {engine:11} cold p50 {median(cold):7.2f}  max {max(cold):8.2f}   "
              f"cached p50 {median(warm):6.3f}  max {max(warm):6.3f}   ({len(cold)} schemas)")


def mask_times(lm, tokens_by_engine):
    import numpy as np

    from mlx_worker import constraints, protocol
    from mlx_worker.constraints import mask

    print("\nper-token matcher time, replaying the generated tokens (µs)")
    for engine in ENGINES:
        compiled = constraints.compile_for(lm, protocol.JsonSchemaConstraint(schema=DECODE_SCHEMA, engine=engine))
        info = compiled.info
        words = np.zeros(info.mask_words, np.int32)
        ptr, nbytes = words.ctypes.data, words.nbytes
        fill_us, consume_us = [], []
        for seq in tokens_by_engine[engine]:
            m = compiled.program.matcher()
            for token in seq:
                t0 = time.perf_counter_ns()
                m.fill(ptr, nbytes)
                mask.set_bits(words, info.eos_ids, m.accepting())
                allowed = mask.unpack(words, info.logits_vocab)
                allowed.any()
                t1 = time.perf_counter_ns()
                assert m.consume(token)
                t2 = time.perf_counter_ns()
                fill_us.append((t1 - t0) / 1000)
                consume_us.append((t2 - t1) / 1000)
        print(f"  {engine:11} mask p50 {percentile(fill_us, 50):7.1f}  p99 {percentile(fill_us, 99):8.1f}   "
              f"consume p50 {percentile(consume_us, 50):6.1f}  p99 {percentile(consume_us, 99):7.1f}   "
              f"({len(fill_us)} tokens)")


def profile(lm, engine, n):
    run_once(lm, n, engine)
    prof = cProfile.Profile()
    prof.enable()
    run_once(lm, n, engine, seed=1)
    prof.disable()
    pstats.Stats(prof).sort_stats("tottime").print_stats(15)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--tokens", type=int, default=200)
    p.add_argument("--rounds", type=int, default=15)
    p.add_argument("--model", default="tiny-llama-32k")
    p.add_argument("--profile", choices=ENGINES)
    args = p.parse_args()
    blas = bind_blas_like_the_worker()
    from mlx_worker import protocol
    from mlx_worker.methods import LOADERS
    from mlx_worker.models.registry import ModelRegistry

    registry = ModelRegistry(LOADERS)
    t0 = time.perf_counter()
    lm = registry.load(protocol.LoadParams(model=str(ensure_model(args.model)), model_id="bench"))
    lm = registry.get("bench")
    print(f"model {args.model}: vocab {lm.vocab_size}, BLAS {blas or 'reference'}, loaded in "
          f"{time.perf_counter() - t0:.2f} s")

    from mlx_worker.constraints import vocab

    t0 = time.perf_counter()
    vocab.build(lm, vocab.tokenizer_key(lm))
    print(f"tokenizer tables for constraints (once per tokenizer): {(time.perf_counter() - t0) * 1000:.0f} ms")

    if args.profile:
        profile(lm, args.profile, args.tokens)
        return
    for engine in (None, *ENGINES):  # warm up: compile, first-run allocations
        run_once(lm, 20, engine)
    tokens = decode_ratio(lm, args.tokens, args.rounds)
    mask_times(lm, tokens)
    compile_times(lm)
    report("constraints", FIGURES)


if __name__ == "__main__":
    main()
