"""Time to first token of a chat's second turn: with the prompt cache vs cold,
and vs ``mlx_lm.server`` (its own prompt cache), same model, same messages.

    python bench/prompt_cache.py [--model small-llama] [--history 2000] [--rounds 3] [--no-server]
    python bench/prompt_cache.py --disk [--model small-llama] [--history 4000] [--conversations 32] [--ram-for 4]

Turn 1 is a chat with about ``--history`` tokens ending in a user message;
turn 2 appends a short assistant reply and a new user message (about 32 new
tokens). Each round runs turn 1 (which leaves its KV cache behind), then turn
2 with the cache, and turn 2 with ``prompt_cache: false``; mlx_lm.server gets
turn 1 then turn 2 the same way. TTFT is measured by the client: request sent
→ first token event (worker) / first streamed ``data:`` chunk (server, with
``max_tokens: 1``). Rounds alternate; medians are compared. Target: cached ÷
cold ≤ 0.03. Both processes use the same BLAS (mlx_worker/blas.py).
"""

from __future__ import annotations

import argparse
import time

from common import ensure_model, median, report, spawn
from mlx_worker.protocol import TokenEvent
from peers import MlxLmServer

WORDS = ("river stone light harbor window garden winter paper silver mountain letter orange "
         "quiet station market thunder candle forest bridge morning").split()


def history_chat(client, target_tokens: int) -> list[dict]:
    """A system message and alternating turns, grown to about target_tokens
    (the last, user, message is replaced per round)."""
    chat = [{"role": "system", "content": "You are a patient assistant. Answer in plain sentences."}]
    i = 0
    while True:
        words = " ".join(WORDS[(i * 7 + j * 3) % len(WORDS)] for j in range(24))
        chat.append({"role": "user" if len(chat) % 2 else "assistant", "content": f"Note {i}: {words}."})
        i += 1
        if len(chat) % 2 == 0 and client.tokenize(messages=chat).count >= target_tokens:
            return chat


def rounds_chats(history: list[dict], k: int) -> tuple[list[dict], list[dict]]:
    """Turn 1 and turn 2 of round k. Only the last user message differs
    between rounds, so turn 1 of round k is itself mostly cached, and its
    cache is the longest match for turn 2 of round k."""
    turn1 = history[:-1] + [{"role": "user", "content": f"Round {k}. " + history[-1]["content"]}]
    turn2 = turn1 + [
        {"role": "assistant", "content": "Noted."},
        {"role": "user", "content": "Which three words did I use most? One reason each."},
    ]
    return turn1, turn2


def worker_ttft(client, messages, **params) -> tuple[float, dict]:
    start = time.perf_counter()
    stream = client.generate(messages=messages, max_tokens=1, temperature=0, **params)
    first = None
    for event in stream:
        if first is None and isinstance(event, TokenEvent) and event.tokens:
            first = time.perf_counter()
    result = stream.result
    first = first or time.perf_counter()  # an EOS first token sends no token event
    return first - start, {"prompt": result.usage.prompt_tokens, "cached": result.usage.cached_tokens}


def server_ttft(server, messages) -> float:
    start, first, _, _ = server.stream("/v1/chat/completions", {"messages": messages, "max_tokens": 1, "temperature": 0})
    return first - start


# ---------------------------------------------------------------- disk tier


def conversation(client, i: int, target_tokens: int) -> list[dict]:
    """Conversation i: its own first message (no prefix shared with the others)."""
    chat = history_chat(client, target_tokens)
    chat[0] = {"role": "system", "content": f"Conversation {i}. " + chat[0]["content"]}
    return chat


def disk_restart(path: str, history: int) -> dict:
    """Turn 1 in one worker, shut down; turn 2 in a new worker: restored from
    disk vs recomputed (``prompt_cache: false``), same process."""
    import tempfile

    folder = tempfile.mkdtemp(prefix="mlx-worker-kv-")
    a = spawn("--cache-dir", folder)
    try:
        a.load(path)
        chat = history_chat(a, history)
        turn1, turn2 = rounds_chats(chat, 0)
        worker_ttft(a, turn1)
    finally:
        a.close()  # writes the entry
    b = spawn("--cache-dir", folder)
    try:
        b.load(path)
        worker_ttft(b, [{"role": "user", "content": "warm up"}])  # a new process's first-call costs
        restored, info = worker_ttft(b, turn2)
        cold, _ = worker_ttft(b, turn2, prompt_cache=False)
    finally:
        b.close()
    return {"restored_ms": restored * 1000, "cold_ms": cold * 1000, "prompt": info["prompt"],
            "cached": info["cached"], "restart_over_cold": restored / cold, "restore_speedup": cold / restored}


def disk_cycling(path: str, history: int, conversations: int, ram_for: int, rounds: int) -> dict:
    """``conversations`` chats visited in turn, a RAM budget for ``ram_for``
    of them: hit rate and TTFT without and with the disk tier (rounds after
    the first; the first is cold in both)."""
    import tempfile

    probe = spawn()
    try:
        probe.load(path)
        chats = [conversation(probe, i, history) for i in range(conversations)]
        worker_ttft(probe, chats[0])
        entry = probe.status().memory.pools.prompt_cache
    finally:
        probe.close()
    out = {}
    for mode in ("ram", "ram+disk"):
        flags = ["--prompt-cache-bytes", str(int(entry * ram_for * 1.1))]
        if mode == "ram+disk":
            flags += ["--cache-dir", tempfile.mkdtemp(prefix="mlx-worker-kv-")]
        w = spawn(*flags)
        times, hits = [], 0
        try:
            w.load(path)
            for r in range(rounds):
                for i, chat in enumerate(chats):
                    turn = chat[:-1] + [{"role": "user", "content": f"Round {r}. " + chat[-1]["content"]}] if r else chat
                    t, info = worker_ttft(w, turn)
                    if r:
                        times.append(t)
                        hits += info["cached"] >= 0.5 * info["prompt"]
        finally:
            w.close()
        out[mode] = {"hit_rate": hits / len(times), "ttft_ms": median(times) * 1000}
    return out


def write_svg(path, rows: list[tuple[str, float]], title: str) -> None:
    """A bar chart without plotting libraries."""
    top = max(v for _, v in rows) or 1.0
    bars = "".join(
        f'<rect x="{20 + i * 120}" y="{220 - 180 * v / top:.1f}" width="80" height="{180 * v / top:.1f}" fill="#4a7"/>'
        f'<text x="{60 + i * 120}" y="240" text-anchor="middle" font-size="12">{name}</text>'
        f'<text x="{60 + i * 120}" y="{214 - 180 * v / top:.1f}" text-anchor="middle" font-size="12">{v:.0f}</text>'
        for i, (name, v) in enumerate(rows))
    path.write_text(f'<svg xmlns="http://www.w3.org/2000/svg" width="{40 + 120 * len(rows)}" height="260">'
                    f'<text x="10" y="16" font-size="13">{title}</text>{bars}</svg>\n')


def disk_main(args) -> None:
    from common import RESULTS

    path = str(ensure_model(args.model))
    restart = disk_restart(path, args.history)
    cycling = disk_cycling(path, args.history, args.conversations, args.ram_for, args.rounds)
    print(f"model {args.model}; {restart['prompt']} prompt tokens, {restart['cached']} restored from disk\n")
    print("| after a restart: next-turn time to first token | ms | ratio |")
    print("|---|---:|---:|")
    print(f"| recomputed (`prompt_cache: false`) | {restart['cold_ms']:.1f} | 1 |")
    print(f"| restored from disk | {restart['restored_ms']:.1f} | {restart['restart_over_cold']:.3f} of cold "
          f"(target ≤ 0.1; {restart['restore_speedup']:.1f} × faster, target ≥ 5) |")
    print(f"\n{args.conversations} conversations × ~{args.history} tokens, cycling, RAM budget for {args.ram_for}:\n")
    print("| tiers | hit rate | median TTFT ms |")
    print("|---|---:|---:|")
    for mode, f in cycling.items():
        print(f"| {mode} | {f['hit_rate']:.2f} | {f['ttft_ms']:.1f} |")
    RESULTS.mkdir(parents=True, exist_ok=True)
    write_svg(RESULTS / "prompt_cache_disk.svg", [(m, f["ttft_ms"]) for m, f in cycling.items()],
              f"median TTFT (ms), {args.conversations} conversations cycling, RAM for {args.ram_for}")
    report("prompt_cache_disk", {"restart_over_cold": restart["restart_over_cold"],
                                 "restore_speedup": restart["restore_speedup"],
                                 **{f"{m}_hit_rate": f["hit_rate"] for m, f in cycling.items()},
                                 **{f"{m}_ttft_ms": f["ttft_ms"] for m, f in cycling.items()}})


# -------------------------------------------------------------------------- main


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="small-llama")
    p.add_argument("--history", type=int, default=2000)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--no-server", action="store_true", help="skip the mlx_lm.server comparison")
    p.add_argument("--disk", action="store_true", help="the disk tier: restart, restore, cycling conversations")
    p.add_argument("--conversations", type=int, default=32)
    p.add_argument("--ram-for", type=int, default=4)
    args = p.parse_args()
    if args.disk:
        disk_main(args)
        return
    path = str(ensure_model(args.model))
    client = spawn()
    client.load(path)
    history = history_chat(client, args.history)
    blas = client.ready.capabilities.blas  # the server gets the same one (LD_PRELOAD)

    server = None if args.no_server else MlxLmServer(path, blas)

    cached, cold, srv = [], [], []
    info: dict = {}
    try:
        turn1, _ = rounds_chats(history, -1)
        worker_ttft(client, turn1)  # warm both sides: the shared history gets cached
        if server:
            server_ttft(server, turn1)
        for k in range(args.rounds):
            turn1, turn2 = rounds_chats(history, k)
            worker_ttft(client, turn1)  # leaves turn 1's cache
            t, info = worker_ttft(client, turn2)
            cached.append(t)
            t, _ = worker_ttft(client, turn2, prompt_cache=False)
            cold.append(t)
            if server:
                server_ttft(server, turn1)
                srv.append(server_ttft(server, turn2))
    finally:
        client.close()
        if server:
            server.close()

    new = info["prompt"] - info["cached"]
    print(f"model {args.model}; turn 2: {info['prompt']} prompt tokens, {info['cached']} from the cache, "
          f"{new} processed; median of {args.rounds} alternating rounds; BLAS {blas or 'built-in'}\n")
    print("| turn-2 time to first token | ms | ratio |")
    print("|---|---:|---:|")
    print(f"| worker, cold (`prompt_cache: false`) | {median(cold) * 1000:.1f} | 1 |")
    print(f"| worker, cached | {median(cached) * 1000:.1f} | {median(cached) / median(cold):.4f} of cold |")
    if srv:
        print(f"| mlx_lm.server, cached | {median(srv) * 1000:.1f} | {median(srv) / median(cached):.2f} × worker cached |")
    print(f"\nlimit for this prompt: {new}/{info['prompt']} = {new / info['prompt']:.4f}; target ≤ 0.03")
    figures = {"cached_over_cold": median(cached) / median(cold), "limit": new / info["prompt"],
               "cold_ms": median(cold) * 1000, "cached_ms": median(cached) * 1000}
    if srv:
        figures["server_over_worker"] = median(srv) / median(cached)
    report("prompt_cache", figures)


if __name__ == "__main__":
    main()
