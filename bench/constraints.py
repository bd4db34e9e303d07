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

- 8 constrained streams at once (``--streams``): the masks of a decode
  batch filled in one llguidance call (constraints/batch_masks.py) vs row by
  row: the mask work of one step replayed over 8 matchers, and aggregate
  tokens/s of two workers side by side, one started with the bench switch
  ``MLX_WORKER_BATCH_MASKS=0`` (row by row), rounds alternating.

``--profile llguidance`` runs one constrained generation under cProfile and
prints the top functions. ``--only-streams`` runs just the 8-stream figures.
"""

from __future__ import annotations

import argparse
import cProfile
import os
import pstats
import sys
import time

from common import ROOT, bind_blas_like_the_worker, ensure_model, median, report, worker_env

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


def batch_mask_times(lm, tokens_by_engine, streams):
    """One decode step's mask work for ``streams`` llguidance rows: each row
    filled on its own (the per-row path: fill, EOS bits, unpack) vs one
    ``fill_next_token_bitmask_par`` call (then EOS bits and unpack per row,
    as batch_masks does), replayed over the tokens the constrained runs produced."""
    import numpy as np
    from llguidance.numpy import fill_next_token_bitmask_par

    from mlx_worker import constraints, protocol
    from mlx_worker.constraints import batch_masks, mask

    compiled = constraints.compile_for(lm, protocol.JsonSchemaConstraint(schema=DECODE_SCHEMA))
    info = compiled.info
    seqs = (tokens_by_engine["llguidance"] * streams)[:streams]
    steps = min(len(t) for t in seqs)
    one, per_row, batched = np.zeros(info.mask_words, np.int32), [], []
    words = np.zeros((streams, info.mask_words), np.int32)
    for mode in ("row", "batch"):
        ms = [compiled.program.matcher() for _ in seqs]
        for k in range(steps):
            t0 = time.perf_counter_ns()
            if mode == "row":
                for m in ms:
                    m.fill(one.ctypes.data, one.nbytes)
                    mask.set_bits(one, info.eos_ids, m.accepting())
                    mask.unpack(one, info.logits_vocab).any()
            else:
                fill_next_token_bitmask_par(batch_masks._pool(), [(m.m, j) for j, m in enumerate(ms)], words)
                for j, m in enumerate(ms):  # as batch_masks does: each row checked as alone
                    mask.set_bits(words[j], info.eos_ids, m.accepting())
                    mask.unpack(words[j], info.logits_vocab).any()
            (per_row if mode == "row" else batched).append((time.perf_counter_ns() - t0) / 1000)
            for m, seq in zip(ms, seqs):
                assert m.consume(seq[k])
    print(f"\nmask work of one step, {streams} llguidance rows (µs; {steps} steps)")
    print(f"  row by row  p50 {percentile(per_row, 50):8.1f}  p99 {percentile(per_row, 99):8.1f}")
    print(f"  one call    p50 {percentile(batched, 50):8.1f}  p99 {percentile(batched, 99):8.1f}   "
          f"ratio p50 {percentile(per_row, 50) / percentile(batched, 50):.2f}")
    FIGURES["batch_masks_step_p50_ratio"] = percentile(per_row, 50) / percentile(batched, 50)


def streams_side_by_side(model, streams, n, rounds):
    """Aggregate tokens/s of ``streams`` constrained generates sent at once,
    to a worker filling the batch's masks in one call and to one started
    with MLX_WORKER_BATCH_MASKS=0 (row by row), rounds alternating."""
    from mlx_worker.client import WorkerClient

    workers = {name: WorkerClient((), env={**worker_env(), "MLX_WORKER_BATCH_MASKS": flag}, cwd=str(ROOT))
               for name, flag in (("one call", "1"), ("row by row", "0"))}
    rates: dict = {name: [] for name in workers}
    cpu_ms: dict = {name: [] for name in workers}
    outputs: dict = {name: [] for name in workers}
    try:
        for w in workers.values():
            w.load(str(model), model_id="m")
        for r in range(rounds + 1):  # round 0 warms up (compile, allocations)
            for name in (list(workers) if r % 2 else list(workers)[::-1]):
                w = workers[name]
                params = [dict(model_id="m", prompt=f"{PROMPT} {i}", max_tokens=n, temperature=1.0, seed=i,
                               ignore_eos=True, prompt_cache=False,
                               constraint={"type": "json_schema", "schema": DECODE_SCHEMA}) for i in range(streams)]
                c0, t0 = cpu_seconds(w.proc.pid), time.perf_counter()
                sent = [w.generate(**p) for p in params]
                results = [s.wait() for s in sent]
                wall, cpu = time.perf_counter() - t0, cpu_seconds(w.proc.pid) - c0
                if r:
                    n_out = sum(len(x.tokens) for x in results)
                    rates[name].append(n_out / wall)
                    cpu_ms[name].append(cpu / n_out * 1000)
                    outputs[name].append([x.tokens for x in results])
    finally:
        for w in workers.values():
            w.close()
    assert outputs["one call"] == outputs["row by row"], "batched masks changed the tokens"
    print(f"\n{streams} constrained streams at once, {n} tokens each, {rounds} rounds: aggregate tokens/s (median)")
    print("  and the worker's CPU time per token (user + system, /proc: robust to other load), ms")
    for name in workers:
        print(f"  {name:10}  {median(rates[name]):8.1f} tok/s   {median(cpu_ms[name]):6.2f} ms CPU/token   "
              f"runs {' '.join(f'{x:.0f}' for x in rates[name])}")
    ratio = median(rates["one call"]) / median(rates["row by row"])
    cpu_ratio = median(cpu_ms["row by row"]) / median(cpu_ms["one call"])
    print(f"  one call / row by row: tok/s {ratio:.3f}, CPU per token (row by row ÷ one call) {cpu_ratio:.3f} "
          "(same tokens in every round)")
    FIGURES["batch_masks_streams_tps_ratio"] = ratio
    FIGURES["batch_masks_streams_cpu_ratio"] = cpu_ratio


def cpu_seconds(pid: int) -> float:
    fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


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
    p.add_argument("--streams", type=int, default=8)
    p.add_argument("--stream-rounds", type=int, default=4)
    p.add_argument("--only-streams", action="store_true")
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
    if args.only_streams:
        tokens = {"llguidance": [run_once(lm, args.tokens, "llguidance", seed=i).tokens for i in range(args.streams)]}
        batch_mask_times(lm, tokens, args.streams)
        streams_side_by_side(ensure_model(args.model), args.streams, args.tokens, args.stream_rounds)
        return
    tokens = decode_ratio(lm, args.tokens, args.rounds)
    mask_times(lm, tokens)
    batch_mask_times(lm, tokens, args.streams)
    streams_side_by_side(ensure_model(args.model), args.streams, args.tokens, args.stream_rounds)
    compile_times(lm)
    report("constraints", FIGURES)


if __name__ == "__main__":
    main()
