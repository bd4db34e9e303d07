"""Time to first token of a chat's second turn: with the prompt cache vs cold,
and vs ``mlx_lm.server`` (its own prompt cache), same model, same messages.

    python bench/prompt_cache.py [--model small-llama] [--history 2000] [--rounds 3] [--no-server]

Turn 1 is a chat with about ``--history`` tokens ending in a user message;
turn 2 appends a short assistant reply and a new user message (about 32 new
tokens). Each round runs turn 1 (which leaves its KV cache behind), then turn
2 with the cache, and turn 2 with ``prompt_cache: false``; mlx_lm.server gets
turn 1 then turn 2 the same way. TTFT is measured by the client: request sent
→ first token event (worker) / first streamed ``data:`` chunk (server, with
``max_tokens: 1``). Rounds alternate; medians are compared. Target: cached ÷
cold ≤ 0.03. Both processes use the same BLAS (mlx_worker/blas.py).

    python bench/prompt_cache.py --checkpoints [--history 2000] [--rounds 3]

compares, on tiny fixtures, the plain KV model with a hybrid (Gated DeltaNet)
and a sliding-window one, whose caches can't be cut back and are served by
checkpoints: the same rounds, turn-2 TTFT cached ÷ cold (target ≤ 0.1), and
the checkpoints' bytes per conversation (status after one conversation's
two turns on a fresh store; ``--checkpoint-models`` picks the fixtures).
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


# ------------------------------------------------------------- checkpoints

CHECKPOINT_MODELS = "tiny-llama,tiny-qwen3-5,tiny-gemma3-w8"


def one_model(client, name: str, history_tokens: int, rounds: int) -> dict:
    """Turn-2 TTFT cached and cold, and what one conversation's checkpoints cost."""
    client.load(str(ensure_model(name)), model_id=name)
    try:
        history = history_chat_for(client, name, history_tokens)
        turn1, turn2 = rounds_chats(history, -1)
        worker_ttft(client, turn1, model_id=name)  # one conversation on a fresh store
        worker_ttft(client, turn2, model_id=name)
        store = next(m for m in client.status().models if m.model_id == name).prompt_cache
        cached, cold, info = [], [], {}
        for k in range(rounds):
            turn1, turn2 = rounds_chats(history, k)
            worker_ttft(client, turn1, model_id=name)
            t, info = worker_ttft(client, turn2, model_id=name)
            cached.append(t)
            t, _ = worker_ttft(client, turn2, model_id=name, prompt_cache=False)
            cold.append(t)
    finally:
        client.unload(name)
    return {"model": name, **info, "cached_ms": median(cached) * 1000, "cold_ms": median(cold) * 1000,
            "ratio": median(cached) / median(cold), "checkpoints": store.checkpoints,
            "checkpoint_bytes": store.checkpoint_bytes, "bytes": store.bytes, "entries": store.entries}


def history_chat_for(client, model_id: str, target_tokens: int) -> list[dict]:
    class Named:  # history_chat's client, tokenizing with this model
        def tokenize(self, **kw):
            return client.tokenize(model_id=model_id, **kw)

    return history_chat(Named(), target_tokens)


def checkpoints_main(args) -> None:
    client = spawn()
    rows = []
    try:
        for name in args.checkpoint_models.split(","):
            rows.append(one_model(client, name, args.history, args.rounds))
    finally:
        client.close()
    print(f"turn 2 = turn 1 + a short answer + a new message; median of {args.rounds} rounds; "
          "checkpoint figures after one conversation (2 turns) on a fresh store\n")
    print("| fixture | turn-2 prompt | cached | cold ms | cached ms | cached ÷ cold | checkpoints | "
          "checkpoint bytes | store bytes |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['model']} | {r['prompt']} | {r['cached']} | {r['cold_ms']:.1f} | {r['cached_ms']:.1f} | "
              f"{r['ratio']:.4f} | {r['checkpoints']} | {r['checkpoint_bytes']:,} | {r['bytes']:,} |")
    report("prompt_cache_checkpoints", {f"{r['model']}_cached_over_cold": r["ratio"] for r in rows}
           | {f"{r['model']}_checkpoint_bytes": r["checkpoint_bytes"] for r in rows})


# -------------------------------------------------------------------------- main


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="small-llama")
    p.add_argument("--history", type=int, default=2000)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--no-server", action="store_true", help="skip the mlx_lm.server comparison")
    p.add_argument("--checkpoints", action="store_true",
                   help="plain vs hybrid vs sliding-window fixtures: TTFT ratio and checkpoint bytes")
    p.add_argument("--checkpoint-models", default=CHECKPOINT_MODELS)
    args = p.parse_args()
    if args.checkpoints:
        checkpoints_main(args)
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
