"""Speculative decoding: greedy decode tok/s with a draft model ÷ without, and
÷ ``mlx_lm.server --draft-model`` on the same pair; tok/s vs
num_draft_tokens (1…8) and vs acceptance rate (plot).

    python bench/speculative.py [--tokens 128] [--rounds 5] [--draft-tokens 4] [--sweep-rounds 3]
    python bench/speculative.py --by-acceptance [--rounds 3]   # plain vs fixed vs adaptive draft length
    python bench/speculative.py --batched [--streams 4] [--tokens 64] [--rounds 3] [--target spec-target-mid]
        # N draft streams at once: one speculative batch vs a group each
        # (the worker's bench switch MLX_WORKER_DRAFT_BATCH=0) vs no draft
        # (one plain batch), aggregate tok/s

The pair (fixtures/build.py): ``spec-target`` is ``spec-draft`` plus 14
layers whose output projections are scaled by 1e-3 (high acceptance);
``spec-target-mid`` / ``-far`` scale them by 0.5 / 2.0 (lower acceptance).
EOS is banned with logit_bias on every side so each run decodes the same
count. Decode tok/s is measured by the client, first token to last, on every
side. Runs alternate plain / draft / server; medians are compared.
Targets: draft ÷ plain ≥ 1.6, draft ÷ mlx_lm.server with the draft ≥ 1.1,
output identical to plain.
"""

from __future__ import annotations

import argparse
import http.client
import json
import time

from common import RESULTS, bind_blas_like_the_worker, ensure_model, median, report, spawn
from mlx_worker.protocol import GenerateResult, TokenEvent

PROMPT = "the model token server request response error value result stream cache"
TARGETS = {"spec-target": "high", "spec-target-mid": "mid", "spec-target-far": "low"}


class Worker:
    def __init__(self, bias: dict):
        self.client = spawn()
        self.client.load(str(ensure_model("spec-draft")), model_id="draft")
        for name in TARGETS:
            self.client.load(str(ensure_model(name)), model_id=name)
        self.bias = bias

    def cpu(self) -> float:
        """The worker's CPU seconds so far (Linux /proc; 0 elsewhere)."""
        import os

        try:
            with open(f"/proc/{self.client.proc.pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
        except OSError:
            return 0.0

    def decode(self, target: str, n: int, k: int | None, adaptive: bool = True) -> tuple[float, GenerateResult]:
        params = dict(model_id=target, prompt=PROMPT, max_tokens=n, temperature=0, logit_bias=self.bias,
                      prompt_cache=False)
        if k:
            params.update(draft_model_id="draft", num_draft_tokens=k, draft_adaptive=adaptive)
        first = last = None
        after_first = 0
        stream = self.client.generate(**params)
        for event in stream:
            if isinstance(event, TokenEvent) and event.tokens:
                last = time.perf_counter()
                if first is None:
                    first = last
                else:
                    after_first += len(event.tokens)
        return after_first / (last - first), stream.result


def server_decode(server, n: int, k: int, bias: dict) -> float:
    start, first, last, chunks = server.stream(
        "/v1/completions", {"prompt": PROMPT, "max_tokens": n, "temperature": 0, "logit_bias": bias,
                            "num_draft_tokens": k})
    return (chunks - 1) / (last - first)


def server_text(server, n: int, k: int, bias: dict) -> str:
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=600)
    body = {"prompt": PROMPT, "max_tokens": n, "temperature": 0, "logit_bias": bias, "num_draft_tokens": k}
    conn.request("POST", "/v1/completions", json.dumps(body), {"Content-Type": "application/json"})
    text = json.loads(conn.getresponse().read())["choices"][0]["text"]
    conn.close()
    return text


def reference(n: int, bias: dict) -> tuple[list[int], str]:
    import mlx.core as mx
    from mlx_lm import generate, load
    from mlx_lm.generate import generate_step
    from mlx_lm.sample_utils import make_logits_processors

    model, tok = load(str(ensure_model("spec-target")))
    processors = make_logits_processors(logit_bias={int(t): v for t, v in bias.items()})
    prompt = mx.array(tok.encode(PROMPT))
    tokens = [int(t) for t, _ in generate_step(prompt, model, max_tokens=n, logits_processors=processors)]
    return tokens, generate(model, tok, PROMPT, max_tokens=n, logits_processors=processors)


def plot(sweep: dict, accept: list, path) -> None:
    """Speedup over no draft vs num_draft_tokens, and vs acceptance (PIL: bench/ draws with it)."""
    from PIL import Image, ImageDraw

    W, H, pad = 420, 300, 50
    img = Image.new("RGB", (W * 2 + pad, H + 40), "white")
    d = ImageDraw.Draw(img)
    panels = [
        ("speedup over no draft vs num_draft_tokens (spec-target)", [(k, v) for k, v in sorted(sweep.items())], "k"),
        ("speedup over no draft vs acceptance rate (k=4)", [(a, s) for a, s, _ in sorted(accept)], "acceptance"),
    ]
    for p, (title, pts, xlabel) in enumerate(panels):
        x0, y0 = p * (W + pad // 2) + pad, 30
        d.text((x0 - 30, 8), title, fill="black")
        d.rectangle([x0, y0, x0 + W - pad, y0 + H - 40], outline="black")
        xs = [x for x, _ in pts]
        ys = [y for _, y in pts]
        xmin, xmax = (0.0, 1.0) if p else (min(xs) - 0.5, max(xs) + 0.5)
        top = max(ys + [1.0]) * 1.15
        xy = []
        for x, y in pts:
            px = x0 + (W - pad) * (x - xmin) / (xmax - xmin)
            py = y0 + (H - 40) * (1 - y / top)
            xy.append((px, py))
            d.ellipse([px - 3, py - 3, px + 3, py + 3], fill="#3a7d44")
            d.text((px + 4, py - 14), f"{y:.2f}x", fill="black")
            d.text((px - 6, y0 + H - 36), f"{x:g}" if not p else f"{x:.2f}", fill="black")
        if len(xy) > 1:
            d.line(xy, fill="#3a7d44", width=2)
        py = y0 + (H - 40) * (1 - 1.0 / top)  # the no-draft level
        d.line([x0, py, x0 + W - pad, py], fill="#c0392b", width=1)
        d.text((x0, y0 + H - 20), xlabel, fill="black")
    img.save(path)


def by_acceptance(n: int, k: int, rounds: int) -> None:
    """Per target pair: plain, fixed draft length, adaptive draft length, each
    round's three runs back to back; medians of the rounds' ratios."""
    from mlx_lm import load

    _, tok = load(str(ensure_model("spec-target")))
    worker = Worker({str(t): -1e9 for t in tok.eos_token_ids})
    rows = []
    try:
        for name in TARGETS:
            fixed, adaptive, cpu_fixed, cpu_adaptive, identical = [], [], [], [], True
            for _ in range(rounds):
                # plain, fixed, adaptive, adaptive, fixed, plain: order effects cancel
                runs: dict = {"plain": [], "fixed": [], "adaptive": []}
                for mode in ("plain", "fixed", "adaptive", "adaptive", "fixed", "plain"):
                    c0 = worker.cpu()
                    tps, out = worker.decode(name, n, None if mode == "plain" else k, adaptive=mode == "adaptive")
                    runs[mode].append((tps, worker.cpu() - c0, out))
                a, f, b = (runs[m][0][2] for m in ("plain", "fixed", "adaptive"))
                identical &= a.tokens == f.tokens == b.tokens
                tps = {m: sum(r[0] for r in v) for m, v in runs.items()}
                cpu = {m: sum(r[1] for r in v) for m, v in runs.items()}
                fixed.append(tps["fixed"] / tps["plain"])
                adaptive.append(tps["adaptive"] / tps["plain"])
                cpu_fixed.append(cpu["plain"] / max(cpu["fixed"], 1e-9))
                cpu_adaptive.append(cpu["plain"] / max(cpu["adaptive"], 1e-9))
            rate = f.usage.accepted_draft_tokens / max(f.usage.draft_tokens, 1)
            rows.append((name, rate, median(fixed), median(adaptive), b.usage.draft_rounds, identical,
                         median(cpu_fixed), median(cpu_adaptive)))
    finally:
        worker.client.close()
    print(f"greedy, {n} tokens, num_draft_tokens {k} (adaptive: at most {k}), median of {rounds} rounds "
          f"(plain, fixed, adaptive, adaptive, fixed, plain)\n")
    print("| target | acceptance (fixed) | fixed ÷ plain | adaptive ÷ plain | by worker CPU time: fixed, adaptive "
          "| adaptive rounds per draft length 0…k | output identical |\n|---|---:|---:|---:|---:|---|---|")
    for name, rate, fx, ad, lengths, same, cf, ca in rows:
        print(f"| {name} | {rate:.2f} | {fx:.2f} | {ad:.2f} | {cf:.2f}, {ca:.2f} | {lengths} | {same} |")
    print("\n(÷ plain: decode tok/s ratios, wall clock; by worker CPU time: plain's CPU seconds ÷ the mode's, "
          "for the same tokens — steadier on a shared machine)")
    report("speculative_adaptive", {"tokens": n, "num_draft_tokens": k, "rows": [
        {"target": r[0], "acceptance": r[1], "fixed": r[2], "adaptive": r[3], "draft_rounds": r[4], "identical": r[5],
         "cpu_fixed": r[6], "cpu_adaptive": r[7]} for r in rows]})


def batched(n: int, k: int, streams: int, rounds: int, target: str) -> None:
    """``streams`` speculative requests at once (different prompts), in one
    batch vs each in a group of its own (a second worker with the bench
    switch off), alternating; aggregate tok/s = tokens ÷ wall time from the
    first send to the last result."""
    import os

    from common import ROOT, worker_env
    from mlx_worker.client import WorkerClient

    prompts = [f"{PROMPT} {' '.join(['again'] * (7 * i))}" for i in range(streams)]
    sides = {}
    for name, switch in (("batched", "1"), ("alone", "0")):
        client = WorkerClient((), env={**worker_env(), "MLX_WORKER_DRAFT_BATCH": switch}, cwd=str(ROOT))
        client.load(str(ensure_model("spec-draft")), model_id="draft")
        client.load(str(ensure_model(target)), model_id="target")
        sides[name] = client
    runs: dict = {name: [] for name in ("batched", "alone", "plain")}
    outputs: dict = {}
    try:
        for r in range(rounds + 1):  # the first round warms up
            for name in (("batched", "alone", "plain") if r % 2 else ("plain", "alone", "batched")):
                client = sides["alone" if name == "alone" else "batched"]
                draft = {} if name == "plain" else {"draft_model_id": "draft", "num_draft_tokens": k}
                t0 = time.perf_counter()
                sent = [client.generate(model_id="target", prompt=p, max_tokens=n, ignore_eos=True, temperature=0,
                                        prompt_cache=False, **draft) for p in prompts]
                results = [s.wait() for s in sent]
                if r:
                    runs[name].append(sum(len(x.tokens) for x in results) / (time.perf_counter() - t0))
                outputs[name] = [x.tokens for x in results]
    finally:
        for client in sides.values():
            client.close()
    b, a, pl = (median(runs[m]) for m in ("batched", "alone", "plain"))
    ratio = median([x / y for x, y in zip(runs["batched"], runs["alone"])])
    over_plain = median([x / y for x, y in zip(runs["batched"], runs["plain"])])
    same = outputs["batched"] == outputs["alone"] == outputs["plain"]
    print(f"{streams} draft streams at once, spec-draft → {target}, greedy, {n} tokens each, num_draft_tokens {k}, "
          f"median of {rounds} alternating rounds (cpu count {os.cpu_count()}; a shared machine: compare within a run)\n")
    print("| side | aggregate tok/s |\n|---|---:|")
    print(f"| one speculative batch | {b:.1f} |\n| a group each (MLX_WORKER_DRAFT_BATCH=0) | {a:.1f} |\n"
          f"| no draft (one plain batch) | {pl:.1f} |")
    print(f"\nbatched ÷ a group each: {ratio:.2f}; batched ÷ no draft: {over_plain:.2f} (medians of the rounds' "
          f"ratios); outputs identical on all three sides: {same}")
    report("speculative_batched" + ("" if target == "spec-target" else "_" + TARGETS[target]), {
        "target": target, "streams": streams, "tokens": n, "num_draft_tokens": k, "rounds": rounds,
        "batched_tps": b, "alone_tps": a, "plain_tps": pl, "ratio": ratio, "over_plain": over_plain,
        "identical": same})


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--tokens", type=int, default=128)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--draft-tokens", type=int, default=4)
    p.add_argument("--sweep-rounds", type=int, default=3)
    p.add_argument("--batched", action="store_true",
                   help="only N draft streams at once: one speculative batch vs a group each")
    p.add_argument("--streams", type=int, default=4)
    p.add_argument("--target", default="spec-target", choices=sorted(TARGETS), help="--batched: the target model")
    p.add_argument("--by-acceptance", action="store_true",
                   help="only the per-pair table: plain vs fixed vs adaptive draft length")
    args = p.parse_args()
    n, k = args.tokens, args.draft_tokens
    if args.batched:
        bind_blas_like_the_worker()
        batched(n, k, args.streams, args.rounds, args.target)
        return
    if args.by_acceptance:
        bind_blas_like_the_worker()
        by_acceptance(n, k, args.rounds)
        return
    blas = bind_blas_like_the_worker()
    from mlx_lm import load

    from peers import MlxLmServer

    _, tok = load(str(ensure_model("spec-target")))
    bias = {str(t): -1e9 for t in tok.eos_token_ids}
    worker = Worker(bias)
    server = MlxLmServer(str(ensure_model("spec-target")), blas,
                         extra=("--draft-model", str(ensure_model("spec-draft")), "--num-draft-tokens", str(k)))
    try:
        server_first = server_text(server, n, k, bias)  # before its prompt cache holds anything
        plain, spec, peer = [], [], []
        identical = True
        for _ in range(args.rounds):
            tps, a = worker.decode("spec-target", n, None)
            plain.append(tps)
            tps, b = worker.decode("spec-target", n, k)
            spec.append(tps)
            identical &= a.tokens == b.tokens
            peer.append(server_decode(server, n, k, bias))
        # The reference: mlx-lm in-process, no draft (tokens for the worker;
        # text, through mlx-lm's own detokenizer, for the server).
        ref_tokens, ref_text = reference(n, bias)
        identical &= b.tokens == ref_tokens
        server_same = (server_first == ref_text, server_text(server, n, k, bias) == ref_text)
        usage = b.usage
        sweep_runs = {kk: [] for kk in range(1, 9)}
        for _ in range(args.sweep_rounds):
            for kk in sweep_runs:
                base = worker.decode("spec-target", n, None)[0]
                sweep_runs[kk].append((worker.decode("spec-target", n, kk)[0], base))
        sweep = {kk: median([t for t, _ in v]) for kk, v in sweep_runs.items()}
        sweep_ratio = {kk: median([t / b for t, b in v]) for kk, v in sweep_runs.items()}
        accept = []
        for name in TARGETS:
            ratios = []
            for _ in range(args.sweep_rounds):
                base, a = worker.decode(name, n, None)
                tps, b = worker.decode(name, n, k)
                identical &= a.tokens == b.tokens
                ratios.append(tps / base)
            rate = b.usage.accepted_draft_tokens / b.usage.draft_tokens
            accept.append((rate, median(ratios), name))
    finally:
        server.close()
        worker.client.close()
    p_med, s_med, v_med = median(plain), median(spec), median(peer)
    # The machine is shared: ratios are taken within a round (its runs are
    # seconds apart), then their median.
    over_plain = median([b / a for a, b in zip(plain, spec)])
    over_server = median([b / c for b, c in zip(spec, peer)])
    print(f"pair spec-draft → spec-target, greedy, {n} tokens, num_draft_tokens {k}, BLAS {blas or 'built-in'}, "
          f"median of {args.rounds} alternating rounds\n")
    print("| side | decode tok/s |\n|---|---:|")
    print(f"| worker, no draft | {p_med:.1f} |\n| worker, draft | {s_med:.1f} |\n| mlx_lm.server --draft-model | {v_med:.1f} |")
    print(f"\ndraft ÷ no draft: {over_plain:.2f} (target ≥ 1.6); draft ÷ mlx_lm.server: {over_server:.2f} "
          f"(target ≥ 1.1) (medians of the rounds' ratios)")
    print(f"worker output with a draft identical to without and to mlx-lm's generate_step: {identical}; "
          f"mlx_lm.server's text with its draft equal to mlx-lm's generate: on its first request {server_same[0]}, "
          f"after {args.rounds} more with the same prompt (its prompt cache reused) {server_same[1]}")
    print(f"acceptance: {usage.accepted_draft_tokens} of {usage.draft_tokens} proposed\n")
    print("| num_draft_tokens | tok/s | ÷ no draft (run just before) |\n|---:|---:|---:|")
    for kk, tps in sweep.items():
        print(f"| {kk} | {tps:.1f} | {sweep_ratio[kk]:.2f} |")
    print("\n| target | acceptance | tok/s with draft ÷ without |\n|---|---:|---:|")
    for rate, speedup, name in accept:
        print(f"| {name} | {rate:.2f} | {speedup:.2f} |")
    report("speculative", {
        "draft_over_plain": over_plain, "draft_over_server": over_server, "identical": identical,
        "server_text_equal_first": server_same[0], "server_text_equal_repeated": server_same[1], "plain_tps": p_med, "draft_tps": s_med, "server_tps": v_med,
        "sweep": sweep, "sweep_ratio": sweep_ratio, "acceptance": [{"target": nm, "rate": r, "speedup": sp} for r, sp, nm in accept],
        "tokens": n, "num_draft_tokens": k, "blas": blas,
    })
    plot(sweep_ratio, accept, RESULTS / "speculative.png")


if __name__ == "__main__":
    main()
